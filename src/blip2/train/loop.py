"""The training loop: one function for every task, one process or many.

`train(cfg)` builds the task named by the config (`blip2.tasks`: its model and objective) and its data,
wraps the task in DDP when launched by torchrun (optionally sharding a frozen LLM with FSDP2), and runs
optimizer steps with autocast (or bf16 weights over fp32 master copies, `MasterWeights`), gradient
accumulation, clipping, periodic logging / evaluation / checkpoints, and exact resume. Rank 0 alone writes files. The loop never asks which kind of model it
trains: the task type answers (see `blip2.tasks.base.Task`).

Reproducibility: one seed drives new weights, the data order, augmentation (per sample) and the ITM
negatives (a generator re-seeded per micro-batch from `(seed, step, micro-batch)`, identical on every
rank); dropout uses the global torch RNG, whose state is saved in checkpoints. On CPU a resumed run
ends with weights bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from blip2 import distributed as D
from blip2 import tasks
from blip2.data.batching import sample_seed
from blip2.errors import UserError
from blip2.models.encoders import torch_dtype
from blip2.tasks.base import Task
from blip2.train import checkpoint
from blip2.train.config import TrainConfig
from blip2.train.data import DataPosition, make_loader, preprocessor, steps_per_epoch, to_device
from blip2.train.monitor import MetricsLog, StopSignals, evaluator, forward_loss, reduce_window
from blip2.train.optim import MasterWeights, WarmupCosine, build_optimizer


def build_task(cfg: TrainConfig) -> Task:
    """The config's task around the model to train, as its type builds it (new weights, or
    `model.init_from`), on the CPU."""
    task_type = tasks.get(cfg.task)
    task = task_type(task_type.build_model(cfg))
    task.merge_adapters = cfg.lora is not None and cfg.lora.merge
    return task


@dataclass
class StepInfo:
    """What hooks see after each optimizer step."""

    step: int
    total_steps: int
    model: nn.Module
    metrics: dict[str, float]
    dist: D.DistInfo
    keys: list[str] = field(default_factory=list)  # the samples this rank trained on in the step


Hook = Callable[[StepInfo], dict[str, float] | None]


@dataclass
class TrainResult:
    """Summary of a run (returned on every rank)."""

    steps: int
    samples_per_s: float
    skipped: dict[str, int]
    last_loss: float
    final_dir: str | None
    checkpoint: str | None
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal stopped the run early


def train(
    cfg: TrainConfig,
    resume: str | None = None,
    hooks: list[Hook] = (),
    stop_after: int = 0,
    handle_signals: bool = False,
) -> TrainResult:
    """Run a training job.

    Args:
        cfg: the job.
        resume: a checkpoint, checkpoints folder or run folder to continue from; "auto": the run's own
            `output_dir` if it has a checkpoint, else start fresh.
        hooks: called after every optimizer step (every rank) with a `StepInfo`; a returned dict is
            logged (evaluation hooks).
        stop_after: end after this many optimizer steps of this session (a checkpoint is written), as a
            preempted job would; 0 = run to the end.
        handle_signals: SIGTERM/SIGINT end the run at the next step boundary with a checkpoint
            (`TrainResult.stopped_by` names the signal) instead of killing it; `blip2 train` sets it.
            Only from the main thread; every rank must pass the same value.
    """
    t = cfg.train
    stop = StopSignals(handle_signals)
    info = D.setup(t.device)
    try:
        return _train(cfg, info, resume, hooks, stop_after, stop)
    finally:
        stop.restore()
        D.teardown()


def _check_epoch_resume(cfg: TrainConfig, state: dict[str, Any], info: D.DistInfo) -> None:
    """A run whose length is counted in epochs resumes only with the global batch it was written with:
    its step count and learning-rate schedule are in steps of that batch."""
    if cfg.train.max_steps:
        return
    saved = state["config"]["train"]
    before = int(saved["batch_size"]) * int(saved.get("grad_accum", 1)) * int(state["world_size"])
    now = cfg.train.batch_size * cfg.train.grad_accum * info.world_size
    if before != now:
        raise UserError(
            f"this checkpoint counts train.epochs in steps of a global batch of {before} samples "
            f"(batch_size x grad_accum x {state['world_size']} ranks) and this run's global batch is {now}: "
            "resume an epoch-based run with the same global batch, or set train.max_steps"
        )


def full_precision(optimizer) -> contextlib.AbstractContextManager:
    """Where the model's real trainable weights are read or written (checkpoints, resume, the saved
    model): with `MasterWeights`, its fp32 masters stand in the model; else the model as it is."""
    return optimizer.full_precision() if isinstance(optimizer, MasterWeights) else contextlib.nullcontext()


def _resume(
    cfg: TrainConfig, info: D.DistInfo, source: str, model: nn.Module, optimizer, scheduler, scaler
) -> tuple[int, DataPosition, Any]:
    """Load a checkpoint into the model, optimizer, scheduler and scaler; this rank's step, data
    position and RNG state."""
    trainable, state = checkpoint.load(source)
    with full_precision(optimizer):
        checkpoint.load_trainable(model, trainable)
    fused = [g.get("fused") for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for g, f in zip(optimizer.param_groups, fused, strict=True):  # this machine's choice, not the saved
        g["fused"] = f
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _check_epoch_resume(cfg, state, info)
    if state["world_size"] != info.world_size or state["num_workers"] != cfg.data.num_workers:
        if cfg.data.kind == "webdataset":
            raise UserError(
                f"this checkpoint was written by {state['world_size']} ranks x {state['num_workers']} "
                "workers and shard positions belong to those streams; resume webdataset training "
                "with the same world size and data.num_workers"
            )
    pos = state["positions"][min(info.rank, len(state["positions"]) - 1)]
    position = DataPosition(
        pos["micro_step"],
        {int(k): tuple(v) for k, v in pos["streams"].items()},
        sample=tuple(pos["sample"]) if pos.get("sample") is not None else None,
        legacy_global_batch=int(state["config"]["train"]["batch_size"]) * int(state["world_size"]),
    )
    rng = state["rng"][min(info.rank, len(state["rng"]) - 1)]
    return int(state["step"]), position, rng


def _train(
    cfg: TrainConfig, info: D.DistInfo, resume: str | None, hooks, stop_after: int, stop: StopSignals
) -> TrainResult:
    t = cfg.train
    torch.manual_seed(t.seed)
    task = build_task(cfg)
    model = task.model
    task.to(info.device)
    task.set_gradient_checkpointing(t.grad_checkpointing)
    ignore: tuple[str, ...] = ()
    llm = task.frozen_llm()
    if t.fsdp_llm and llm is not None and info.distributed:
        D.shard_frozen_llm(llm)
        ignore = tuple(f"{name}." for name, m in task.named_modules() if m is llm)
    if t.precision == "bfloat16-master":  # the trainable weights become bf16 before DDP sees them
        optimizer = MasterWeights(model, cfg.optim, torch.bfloat16)
        task.set_autocast(None)
    else:
        optimizer = build_optimizer(model, cfg.optim)
        task.set_autocast(None if t.precision == "float32" else torch_dtype(t.precision))
    task.train()
    wrapped = D.wrap_ddp(task, info, ignore_prefixes=ignore)
    if isinstance(optimizer, MasterWeights) and info.distributed:
        optimizer.sync_masters()
    gather = D.make_gather(info)

    total = t.max_steps or t.epochs * steps_per_epoch(cfg, info.world_size)
    if total <= 0:
        raise UserError(
            "nothing to train: the dataset is smaller than one global batch; lower train.batch_size"
        )
    scheduler = WarmupCosine(optimizer, total, cfg.optim)
    scaler = torch.amp.GradScaler(info.device.type, enabled=t.precision == "float16")

    step, position, rng = 0, DataPosition(), None
    ckpt_root = os.path.join(t.output_dir, "checkpoints")
    source = None
    if resume:
        source = checkpoint.find(t.output_dir if resume == "auto" else resume)
        if source is None and resume != "auto":
            raise UserError(f"no checkpoint found at {resume}")
    if source is not None:
        step, position, rng = _resume(cfg, info, source, model, optimizer, scheduler, scaler)

    pre = preprocessor(cfg, task, cfg.data, train=True)
    batches = make_loader(cfg, cfg.data, pre, info, position)
    try:  # from here on every exit stops the loader's workers (they start with it)
        evaluate = None
        if cfg.eval_data is not None and t.eval_every:
            evaluate = evaluator(cfg, task, info)
        log = MetricsLog(t.output_dir, info.is_main, t.tensorboard)
        if info.is_main:
            with open(os.path.join(t.output_dir, "train_config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=2)
        if rng is not None:
            checkpoint.set_rng_state(rng)

        stop.install()  # around the loop only: setup and model building stay interruptible
        bar = None
        if info.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=step, desc=cfg.task, dynamic_ncols=True, smoothing=0.1)
        window: Counter[str] = Counter()
        window_steps, window_samples, window_start = 0, 0, time.perf_counter()
        run_samples, run_start = 0, time.perf_counter()
        skipped_total: Counter[str] = Counter()
        last_loss, last_ckpt, steps_this_session = math.nan, source, 0
        stop_signal = 0

        def save_checkpoint() -> str | None:
            positions = D.all_gather_object(
                {
                    "micro_step": position.micro_step,
                    "streams": {str(k): list(v) for k, v in position.streams.items()},
                    "sample": list(position.sample) if position.sample is not None else None,
                }
            )
            rngs = D.all_gather_object(checkpoint.rng_state())
            path = None
            if info.is_main:
                state = {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "positions": positions,
                    "rng": rngs,
                    "world_size": info.world_size,
                    "num_workers": cfg.data.num_workers,
                    "config": cfg.to_dict(),
                    "skipped": dict(skipped_total),
                }
                with full_precision(optimizer):
                    trainable = checkpoint.trainable_state(model)
                path = checkpoint.save(ckpt_root, step, trainable, state, t.keep_checkpoints)
            D.barrier()
            return path

        while step < total:
            optimizer.zero_grad(set_to_none=True)
            step_keys: list[str] = []
            for micro in range(t.grad_accum):
                batch = next(batches)
                position.update(batch)
                step_keys.extend(batch.get("keys", []))
                window.update({f"skipped_{k}": v for k, v in batch.get("skipped", {}).items()})
                inputs = to_device(batch, info.device)
                gen = torch.Generator(device=info.device).manual_seed(sample_seed(t.seed, "itm", step, micro))
                sync = micro == t.grad_accum - 1 or not info.distributed
                with wrapped.no_sync() if not sync else contextlib.nullcontext():
                    loss, parts = forward_loss(wrapped, task, inputs, gather, gen)
                    scaler.scale(loss / t.grad_accum).backward()
                window["loss"] += loss.item() / t.grad_accum
                for k, v in parts.items():
                    window[k] += v.item() / t.grad_accum
                window_samples += batch["size"]
            trained = [p for p in model.parameters() if p.requires_grad]
            if isinstance(optimizer, MasterWeights):
                optimizer.take_grads()  # clipping and AdamW work on the fp32 masters
                trained = optimizer.masters
            scaler.unscale_(optimizer)
            if cfg.optim.grad_clip > 0:
                window["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(trained, cfg.optim.grad_clip))
            lr = scheduler.lr
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            steps_this_session += 1
            window_steps += 1

            metrics: dict[str, float] = {}
            if step % t.log_every == 0 or step == total:
                metrics = reduce_window(window, window_steps, window_samples, window_start, info)
                for k in [k for k in metrics if k.startswith("skipped_")]:
                    skipped_total[k[len("skipped_") :]] += int(metrics[k])
                run_samples += int(metrics.pop("_samples"))
                metrics.update(
                    step=step, lr=lr, skipped_total=sum(skipped_total.values()), progress=step / total
                )
                last_loss = metrics["loss"]
                log.write(metrics)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.4f}",
                        sps=f"{metrics['samples_per_s']:.1f}",
                        skipped=metrics["skipped_total"],
                    )
                window, window_steps, window_samples, window_start = Counter(), 0, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            if evaluate is not None and (step % t.eval_every == 0 or step == total):
                result = evaluate(wrapped, gather)
                log.write({"step": step, **result})
            for hook in hooks:
                extra = hook(StepInfo(step, total, model, metrics, info, step_keys))
                if extra:
                    log.write({"step": step, **extra})
            stop_signal = stop.agreed(info)
            done = step == total or (stop_after and steps_this_session >= stop_after) or stop_signal
            if (t.save_every and step % t.save_every == 0) or done:
                last_ckpt = save_checkpoint()
            if done:
                break

    finally:
        stop.restore()
        batches.close()  # its workers stop now, on an error too

    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - run_start
    final_dir = None
    if step == total and t.save_final:
        final_dir = os.path.join(t.output_dir, "final")
        if info.is_main:
            with full_precision(optimizer):  # the fp32 masters, not their bf16 copies
                task.save(final_dir, pre.text)
        D.barrier()
    stopped_by = signal.Signals(stop_signal).name if step < total and stop_signal else None
    summary = {
        "event": "end",
        "step": step,
        "samples_per_s": run_samples / max(elapsed, 1e-9),
        "skipped": dict(skipped_total),
    }
    if stopped_by:
        summary["stopped_by"] = stopped_by
    log.write(summary)
    log.close()
    if info.is_main and sum(skipped_total.values()):
        print(f"skipped {sum(skipped_total.values())} unusable samples: {dict(skipped_total)}")
    return TrainResult(
        step, summary["samples_per_s"], dict(skipped_total), last_loss, final_dir, last_ckpt, stopped_by
    )
