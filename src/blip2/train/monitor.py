"""What the training loop reports and reacts to: the metrics log, the per-window reduction over
ranks, the validation loss, and SIGTERM/SIGINT at step boundaries."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from blip2 import distributed as D
from blip2.data.batching import SKIP_REASONS, sample_seed
from blip2.errors import UserError
from blip2.losses import Gather
from blip2.tasks.base import Task
from blip2.train.config import TrainConfig
from blip2.train.data import DataPosition, make_loader, preprocessor, to_device


def forward_loss(
    wrapped: nn.Module, task: Task, inputs: dict[str, Any], gather: Gather, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The task's loss and its parts for logging, through `wrapped` (the task, or DDP around it)."""
    out = wrapped(**task.inputs(inputs, gather, generator))
    return out.loss, task.parts(out)


class MetricsLog:
    """Rank 0's `metrics.jsonl` (one JSON object a line) and optional TensorBoard."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "train.tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) while the training loop runs: the first is remembered (one line on
    stderr says so) and acted on at the next step boundary (checkpoint, then end), instead of killing
    the process mid-step; preemption (SLURM, Kubernetes) sends SIGTERM. The first signal puts the
    previous handlers back, so a second one acts as it normally would (Ctrl-C again quits now).

    Under torchrun a signal may reach the ranks at different steps, so `agreed()` all-reduces the flag
    every step and all ranks stop at the same one; whether a rank takes part depends on `enabled` only
    (the same on every rank), not on whether its handler could be installed."""

    MESSAGE = (
        "stopping after this step with a checkpoint; press Ctrl-C again / send the signal again to quit now"
    )

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch the signals (from the main thread only; elsewhere the flag simply never gets set)."""
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum  # a flag: the loop acts on it between steps
        self.restore()
        print(f"\n{self.MESSAGE}", file=sys.stderr, flush=True)

    def agreed(self, info: D.DistInfo) -> int:
        """The signal to stop for (0: none), the same on every rank."""
        if not self.enabled:
            return 0
        return int(D.all_reduce_max(self.signum, info.device)) if info.distributed else self.signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def reduce_window(
    window: Counter, steps: int, samples: int, start: float, info: D.DistInfo
) -> dict[str, float]:
    """Average the window's losses over steps and ranks, sum its sample and skip counts over ranks.

    Every rank all-reduces the same vector: the window's loss keys (the same on every rank: one task,
    one model) and a count for every skip reason (`SKIP_REASONS`), zero where none was skipped; skip
    counts of zero are left out of the result."""
    skips = [f"skipped_{r}" for r in SKIP_REASONS]
    keys = sorted(k for k in window if k not in skips) + skips
    sums = D.all_reduce_sum([float(window[k]) for k in keys] + [float(samples)], info.device)
    elapsed = max(time.perf_counter() - start, 1e-9)
    out: dict[str, float] = {}
    for k, v in zip(keys, sums[:-1], strict=True):
        if k in skips:
            if v:
                out[k] = v
        else:
            out[k] = v / (steps * info.world_size)
    out["samples_per_s"] = sums[-1] / elapsed
    out["_samples"] = sums[-1]
    return out


def evaluator(
    cfg: TrainConfig, task: Task, info: D.DistInfo
) -> Callable[[nn.Module, Gather], dict[str, float]]:
    """Validation loss on `eval_data` (eval transform, fixed batches), averaged over ranks."""
    section = cfg.eval_data
    pre = preprocessor(cfg, task, section, train=False)

    def evaluate(wrapped: nn.Module, gather: Gather) -> dict[str, float]:
        batches = make_loader(cfg, section, pre, info, DataPosition(), train=False)
        wrapped.eval()
        total, n = 0.0, 0
        try:
            with torch.no_grad():
                for i in range(cfg.train.eval_batches):
                    inputs = to_device(next(batches), info.device)
                    seed = sample_seed(cfg.train.seed, "eval", i)
                    gen = torch.Generator(device=info.device).manual_seed(seed)
                    loss, _ = forward_loss(wrapped, task, inputs, gather, gen)
                    total, n = total + loss.item(), n + 1
        finally:
            batches.close()
            wrapped.train()
        s = D.all_reduce_sum([total, float(n)], info.device)
        return {"eval_loss": s[0] / max(s[1], 1)}

    return evaluate
