"""AdamW over the trainable parameters and the per-step warm-up + cosine schedule; `MasterWeights`:
AdamW over fp32 master copies of bf16 trainable weights (`train.precision: bfloat16-master`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from blip2.train.config import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups, as LAVIS groups them: biases and 1-D tensors (norms) get no
    weight decay; everything else (matrices, the 3-D query tokens, the 0-D temperature) does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW; its fused (one kernel per step) implementation when every trainable tensor is on CUDA."""
    return _adamw(param_groups(model, cfg.weight_decay), cfg)


def _adamw(groups: list[dict], cfg: OptimSection) -> torch.optim.AdamW:
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


class MasterWeights:
    """AdamW over fp32 master copies of a model's trainable parameters, which compute in `dtype` (bf16).

    Made before the model is wrapped in DDP: it keeps an fp32 copy of every trainable parameter (the
    master, in `param_groups(model)` order) and casts the parameter itself to `dtype`, so the model's
    trainable part holds and computes in bf16 with no autocast; frozen parameters and all buffers keep
    their dtype. One optimizer step:

    1. backward leaves bf16 gradients on the parameters (DDP all-reduces them in bf16);
    2. `take_grads()` casts them onto the masters' `.grad` (fp32), where clipping measures and scales;
    3. `step()` runs AdamW on the masters (fp32 moments too) and rounds the masters into the parameters.

    It stands in for the optimizer in the training loop (`param_groups`, `zero_grad`, `step`,
    `state_dict`, `load_state_dict`; the schedule and a disabled GradScaler see the inner AdamW's
    groups). Checkpoints and saved models hold the masters: see `full_precision`.
    """

    def __init__(self, model: nn.Module, cfg: OptimSection, dtype: torch.dtype = torch.bfloat16):
        groups = param_groups(model, cfg.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.masters = [p.detach().float().clone() for p in self.params]
        to_master = dict(zip(map(id, self.params), self.masters, strict=True))
        self.optimizer = _adamw(
            [{**g, "params": [to_master[id(p)] for p in g["params"]]} for g in groups], cfg
        )
        for p in self.params:
            p.data = p.data.to(dtype)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def sync_masters(self, src: int = 0) -> None:
        """Every rank takes rank `src`'s masters (DDP broadcasts the working weights at wrapping, not
        these copies), then rounds them into its parameters."""
        import torch.distributed as dist

        for m in self.masters:
            dist.broadcast(m, src)
        self._copy_to_params()

    def take_grads(self) -> None:
        """The parameters' gradients, in fp32, as the masters' gradients (None stays None)."""
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.detach().float()

    def step(self) -> None:
        """AdamW on the masters (after `take_grads`), then the parameters become the rounded masters."""
        self.optimizer.step()
        self._copy_to_params()

    def _copy_to_params(self) -> None:
        if self.params:  # one multi-tensor copy (round to nearest), not a kernel per parameter
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """Inside: the model's trainable parameters are the fp32 masters themselves (the same storage),
        for what reads or writes the real weights (checkpoints, resume, the saved model); after: their
        `dtype` copies again, rounded from the masters (which a resume may have loaded)."""
        working = [p.data for p in self.params]
        for p, m in zip(self.params, self.masters, strict=True):
            p.data = m
        try:
            yield
        finally:
            for p, w in zip(self.params, working, strict=True):
                p.data = w
            self._copy_to_params()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def lr_at(step: int, total: int, cfg: OptimSection) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`.

    Linear from `warmup_lr` to `lr` over `warmup_steps`, then cosine from `lr` to `min_lr` over the
    remaining steps (per step; LAVIS steps its cosine once per epoch).
    """
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """Sets the optimizer's learning rate for each step; its state is just the step (in checkpoints)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimSection):
        self.optimizer, self.total, self.cfg = optimizer, total_steps, cfg
        self.step_num = 0
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.step_num, self.total, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        self.step_num += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step": self.step_num, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.step_num = int(state["step"])
        self._apply()
