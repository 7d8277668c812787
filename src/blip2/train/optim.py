"""AdamW over the trainable parameters and the per-step warm-up + cosine schedule."""

from __future__ import annotations

import math

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
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


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
