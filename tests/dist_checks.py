"""Scripts the distributed tests run, as one process or under torchrun (gloo, CPU).

`python dist_checks.py stage1 OUT`: a tiny stage-1 model (dropout off), a fixed global batch of 8; each
rank takes its rows, runs the loss through DDP with the autograd all-gather, and rank 0 writes the
rank-averaged losses and the DDP-averaged gradients to OUT.

`python dist_checks.py fsdp OUT`: a tiny stage-2 model (OPT, dropout off); the same batch on every
rank; the stage-2 loss and projection gradient without FSDP, then with the frozen LLM sharded by FSDP2.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from blip2 import distributed as D
from blip2.config import Blip2Config
from blip2.presets import preset

GLOBAL_BATCH = 8


def _no_dropout(name: str, llm_dropout: bool = False) -> Blip2Config:
    d = preset(name).to_dict()
    d["qformer"].update(dropout=0.0, attention_dropout=0.0)
    if llm_dropout and d.get("llm"):
        d["llm"]["hf_config"].update(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return Blip2Config.from_dict(d)


def _batch(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (GLOBAL_BATCH, 12), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)  # every row has the same number of tokens (token-mean ITG matches)
    pixels = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g)
    return ids, mask, pixels


def stage1(out: str) -> None:
    from blip2.models import RetrievalModel
    from blip2.tasks.stage1 import Stage1Task

    info = D.setup("cpu")
    torch.manual_seed(0)
    model = RetrievalModel(_no_dropout("tiny-stage1"))
    ddp = D.wrap_ddp(Stage1Task(model), info)
    gather = D.make_gather(info)
    ids, mask, pixels = _batch()
    b = GLOBAL_BATCH // info.world_size
    rows = slice(info.rank * b, (info.rank + 1) * b)
    gen = torch.Generator().manual_seed(123)
    # no image ids: each row is its own image, its positive at column rank * b + i of the gathered batch
    o = ddp(ids[rows], mask[rows], pixel_values=pixels[rows], gather=gather, generator=gen)
    o.loss.backward()
    losses = torch.stack([o.loss, o.loss_itc, o.loss_itm, o.loss_itg]).detach()
    if info.distributed:
        dist.all_reduce(losses)
        losses /= info.world_size
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if info.is_main:
        torch.save({"losses": losses, "grads": grads}, out)
    D.barrier()  # every rank leaves together: none tears its group down while rank 0 still writes
    D.teardown()


def fsdp(out: str) -> None:
    from blip2.models import LanguageBridge
    from blip2.tasks.stage2 import Stage2Task

    info = D.setup("cpu")
    torch.manual_seed(0)
    model = LanguageBridge(_no_dropout("tiny-opt", llm_dropout=True))
    ids, mask, pixels = _batch()
    ids = ids % 90 + 4
    ids[:, 0] = 2

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        o = Stage2Task(model)(pixel_values=pixels, input_ids=ids, attention_mask=mask, prompt_lengths=2)
        o.loss.backward()
        return o.loss.detach(), model.language_projection.weight.grad.clone()

    loss_plain, grad_plain = run()
    blocks = D.shard_frozen_llm(model.llm)
    sharded = sum(type(p).__name__ == "DTensor" for p in model.llm.parameters())
    loss_fsdp, grad_fsdp = run()
    if info.is_main:
        torch.save(
            {
                "plain": (loss_plain, grad_plain),
                "fsdp": (loss_fsdp, grad_fsdp),
                "blocks": blocks,
                "sharded_params": sharded,
            },
            out,
        )
    D.barrier()
    D.teardown()


if __name__ == "__main__":
    {"stage1": stage1, "fsdp": fsdp}[sys.argv[1]](sys.argv[2])
