"""Distributed glue shared by `blip2 train`, `eval` and `caption`: the torchrun set-up, a few
collectives, the autograd all-gather the stage-1 losses use, DDP and FSDP wrapping.

One process (CPU or one GPU) and `torchrun` on many GPUs and nodes run the same code: `setup()` reads
torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) and starts a process group only when it is
there (NCCL on GPUs, gloo on CPU); `teardown()` ends it.

Gradient scaling, written out. Each rank's stage-1 loss is a mean over its own `B` rows, computed
against features gathered from all `N` ranks. `DistGather`'s backward sums the gradient that every
rank's loss sends to a feature and hands it to the rank that owns the feature, so after `backward()`
rank `r` holds `d(sum_r' loss_r') / d(theta)` through its own rows. DDP then averages over ranks:
`(1/N) d(sum_r loss_r)/d(theta) = d(mean_r loss_r)/d(theta)`, the gradient of one process on the whole
`N x B` batch (whose ITC and ITM losses are means over `N x B` rows, i.e. the mean of the per-rank
means). Token-averaged losses (ITG, the LM loss) match only when every rank holds the same number of
target tokens, as in any data-parallel training.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from blip2.devices import check_device
from blip2.losses import Gather


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, its local rank and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Start the process group when launched by torchrun; pick this process's device.

    Args:
        device: "cpu", "cuda", "cuda:1", ... or None (CUDA when available). Under torchrun each process
            takes the GPU of its `LOCAL_RANK`; in one process a numbered GPU is used as given.
        timeout_s: collective timeout.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        check_device(device)  # `train.device=cuda` on a CPU machine: one sentence
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda and world == 1 and device is not None and torch.device(device).index is not None:
        dev = torch.device(device)
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (counts, losses for logging)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest of one number over ranks (a stop flag every rank must agree on)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_gather_object(obj) -> list:
    """A picklable object from every rank, in rank order (`[obj]` in one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to all ranks."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _AllGather(torch.autograd.Function):
    """all_gather with a gradient: backward sums the incoming gradients over ranks and returns the
    slice of this rank's own input (the gradient of everyone's loss with respect to this rank's rows)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


@dataclass
class DistGather(Gather):
    """`Gather` over the default process group: `gather(x)` is `x` of every rank concatenated on dim 0
    (rank order); differentiable tensors get the autograd all-gather (gradients go back to the owner),
    others (token ids, masks, image ids) a plain all_gather. Every rank must pass the same shape."""

    def __call__(self, x: Tensor) -> Tensor:
        if self.world_size == 1:
            return x
        if x.requires_grad:
            return _AllGather.apply(x)
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)


def make_gather(info: DistInfo) -> Gather:
    """The gather the losses use: identity in one process, `DistGather` under torchrun."""
    return DistGather(rank=info.rank, world_size=info.world_size) if info.distributed else Gather()


def shard_frozen_llm(llm: nn.Module, layer_types: Iterable[type] | None = None) -> int:
    """Shard a frozen LLM's blocks over the ranks with FSDP2 (`fully_shard`), for LMs that do not fit one
    GPU. Returns the number of sharded blocks.

    Each decoder block (the children of the LM's `nn.ModuleList`s: transformers' `layers` / `h` /
    `block`, or modules of `layer_types`) becomes an FSDP unit: its weights are all-gathered for its
    forward (and again for the backward that carries gradients to the soft prompt) and freed after.
    The rest (token embeddings, final norm, output head: a small part of a large LM) stays replicated,
    because the stage-2 model calls the input embeddings outside the LM's forward and the output head
    is often tied to them. Parameters stay frozen.
    """
    from torch.distributed.fsdp import fully_shard

    if layer_types is not None:
        types = tuple(layer_types)
        blocks = [m for m in llm.modules() if isinstance(m, types)]
    else:
        blocks = [b for m in llm.modules() if isinstance(m, nn.ModuleList) and len(m) > 1 for b in m]
    for block in blocks:
        fully_shard(block)
    return len(blocks)


def wrap_ddp(model: nn.Module, info: DistInfo, ignore_prefixes: Iterable[str] = ()) -> nn.Module:
    """DDP over the trainable part: frozen parameters (and those under `ignore_prefixes`, e.g. an
    FSDP-sharded LLM) are neither broadcast at start nor all-reduced. Frozen towers are replicated:
    every rank builds or loads the same weights. Returns the model itself in one process."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    prefixes = tuple(ignore_prefixes)
    ignore = [
        name
        for name, p in model.named_parameters()
        if not p.requires_grad or (prefixes and name.startswith(prefixes))
    ]
    ignore += [name for name, _ in model.named_buffers() if prefixes and name.startswith(prefixes)]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, broadcast_buffers=False)
