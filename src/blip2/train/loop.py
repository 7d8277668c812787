"""The training loop: one function for every task, one process or many.

`train(cfg)` builds the model and data from a `TrainConfig`, wraps the trainable part in DDP when
launched by torchrun (optionally sharding a frozen LLM with FSDP2), and runs optimizer steps with
autocast, gradient accumulation, clipping, periodic logging / evaluation / checkpoints, and exact
resume. Rank 0 alone writes files.

Reproducibility: one seed drives new weights, the data order, augmentation (per sample) and the ITM
negatives (a generator re-seeded per micro-batch from `(seed, step, micro-batch)`, identical on every
rank); dropout uses the global torch RNG, whose state is saved in checkpoints. On CPU a resumed run
ends with weights bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from blip2 import distributed as D
from blip2 import hub
from blip2.config import PRESETS, Blip2Config, LLMConfig, preset
from blip2.data.annotations import load_records
from blip2.data.batching import SKIP_REASONS, Preprocessor, TextSpec, sample_seed
from blip2.data.features import FeatureStore
from blip2.data.json_dataset import GlobalBatchSampler, JsonDataset
from blip2.data.shards import ShardStream, expand_braces, worker_init
from blip2.errors import UserError, worker_sentence
from blip2.processing import ImageProcessor
from blip2.train import checkpoint
from blip2.train.config import DataSection, TrainConfig
from blip2.train.optim import WarmupCosine, build_optimizer

MODEL_INPUTS = (
    "pixel_values",
    "image_features",
    "input_ids",
    "attention_mask",
    "image_ids",
    "prompt_lengths",
    "labels",
    "decoder_attention_mask",
)


# ------------------------------------------------------------------------------------------------ model


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _config_with_overrides(config: Blip2Config, overrides: dict) -> Blip2Config:
    if not overrides:
        return config
    try:
        return Blip2Config.from_dict(_merge(config.to_dict(), overrides))
    except (TypeError, ValueError) as e:
        raise UserError(f"model.overrides do not fit the model config: {e}") from None


def _load_saved(path: str) -> nn.Module:
    """A saved model (interop format) as its torch module."""
    try:
        from blip2.pipelines import load
    except ImportError:
        raise UserError("model.init_from needs blip2.load, which this install lacks") from None
    try:
        loaded = load(path)
    except UserError as e:  # say which setting named it
        raise UserError(f"model.init_from: {e}") from None
    return getattr(loaded, "model", loaded)


def _llm_for_stage2(name: str | None, base: LLMConfig | None) -> tuple[LLMConfig, nn.Module | None]:
    """The LLM of a stage-2 model: its `LLMConfig` and, for a pretrained LM, the loaded module.

    `name` is a preset (its LLM), a transformers LM folder or hub id, or None for `base` (the model's
    own `LLMConfig`). A preset LLM without a `name` is built with random weights (tiny presets); one
    with a name is loaded from it, keeping the preset's conventions (dtype, prompt, EOS text).
    """
    if name in PRESETS:
        base = preset(name).llm
        if base is None:
            raise UserError(f"preset {name!r} has no LLM; use a stage-2 preset for model.llm")
        name = None
    if name is None:
        if base is None:
            raise UserError(
                "stage 2 from a stage-1 model needs model.llm (a preset like blip2-opt-2.7b or a folder)"
            )
        if not base.name:
            return base, None
        name = base.name
    elif base is None:
        base = LLMConfig(name=name)
    from blip2.interop.checkpoint import load_pretrained_llm, pretrained_llm_config

    path = hub.resolve(name)
    llm_config = pretrained_llm_config(path, base)
    return llm_config, load_pretrained_llm(path, llm_config)


def build_model(cfg: TrainConfig) -> nn.Module:
    """The model to train: from a preset/config (new weights) or a saved model (`init_from`)."""
    from blip2.models.blip2 import Stage1Model

    m = cfg.model
    bert = None
    if m.qformer_init and m.init_from is None:  # fetch (or fail) before building a large model
        from blip2.interop.bert import read_bert_state_dict

        bert = read_bert_state_dict(m.qformer_init)
    if m.init_from is not None:
        model = _load_saved(m.init_from)
        if m.overrides:
            raise UserError("model.overrides apply to new models only, not to model.init_from")
        is_stage1 = getattr(model.config, "llm", None) is None
        if cfg.stage == 1:
            if not is_stage1:
                raise UserError(
                    f"task {cfg.task!r} trains a stage-1 model but {m.init_from} is a stage-2 one"
                )
            return model
        if is_stage1:
            from blip2.models.stage2 import Stage2Model

            llm_config, llm = _llm_for_stage2(m.llm, None)
            return Stage2Model.from_stage1(
                model, llm if llm is not None else llm_config, llm_config=llm_config
            )
        return model
    if m.preset is not None:
        try:
            config = preset(m.preset)
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        try:
            with open(m.config) as f:
                config = Blip2Config.from_json(f.read())
        except FileNotFoundError:
            raise UserError(f"model config not found: {m.config}") from None
    config = _config_with_overrides(config, m.overrides)
    if cfg.stage == 1:
        if config.llm is not None:
            raise UserError(f"task {cfg.task!r} trains stage 1; model {config.name or m.preset!r} is stage 2")
        model = Stage1Model(config)
    else:
        from blip2.models.stage2 import Stage2Model

        if config.llm is None:
            raise UserError(f"task {cfg.task!r} needs a stage-2 model (one with an LLM)")
        llm_config, llm = _llm_for_stage2(None, config.llm)
        model = Stage2Model(dataclasses.replace(config, llm=llm_config), llm=llm)
    if m.qformer_init:
        from blip2.interop.bert import init_qformer_from_bert

        init_qformer_from_bert(model.qformer, bert if bert is not None else m.qformer_init)
    return model


# ------------------------------------------------------------------------------------------------ data


def text_spec(cfg: TrainConfig, section: DataSection, config: Blip2Config) -> TextSpec:
    """How the task's texts are tokenized (see `blip2.data.batching`)."""
    from blip2.tokenizers import qformer_tokenizer

    if cfg.stage == 1:
        tok = qformer_tokenizer(cfg.model.tokenizer or config.tokenizer)
        return TextSpec("stage1", tok, max_len=section.max_len)
    llm = config.llm
    name = cfg.model.llm_tokenizer or llm.name or cfg.model.llm
    if not name:
        raise UserError("set model.llm_tokenizer: the tokenizer of the LLM (folder or hub id)")
    mode = "seq2seq" if llm.is_encoder_decoder else "causal"
    prompt = section.prompt if section.prompt is not None else (llm.prompt if cfg.task == "caption" else "")
    return TextSpec(
        mode,
        _llm_tokenizer(name, llm),
        max_len=section.max_len,
        prompt=prompt,
        eos_text=llm.eos_text,
        vqa_template=llm.vqa_template,
        prefix_split=cfg.task == "stage2" and mode == "seq2seq",
    )


def _llm_tokenizer(name: str, llm: LLMConfig) -> Any:
    """The LLM's tokenizer for training; anything missing is one sentence naming the setting."""
    from blip2.tokenizers import llm_tokenizer

    if name in PRESETS and not getattr(preset(name).llm, "name", ""):
        vocab = llm.hf_config.get("vocab_size", "its")
        raise UserError(
            f"model.llm {name!r} is a small random LLM without a tokenizer: set model.llm_tokenizer to a "
            f"tokenizer folder whose ids fit its {vocab}-token vocabulary"
        )
    try:
        return llm_tokenizer(name)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not load the LLM tokenizer {name!r} ({reason}): set model.llm_tokenizer to a local "
            "tokenizer folder, or connect to the Hugging Face hub"
        ) from None


def preprocessor(
    cfg: TrainConfig, section: DataSection, config: Blip2Config, train: bool, tower: nn.Module | None = None
) -> Preprocessor:
    """The section's batch maker; `tower` (the frozen image tower) is checked against a feature cache."""
    features = None
    if section.features:
        if not config.vision.freeze:
            raise UserError(
                "cached image features need a frozen image encoder: drop data.features or set "
                "model.overrides.vision.freeze=true"
            )
        features = FeatureStore(section.features)
        features.check_vision(config.to_dict()["vision"], tower)
    v = config.vision
    return Preprocessor(
        text_spec(cfg, section, config),
        images=ImageProcessor(v.image_size, v.image_mean, v.image_std),
        features=features,
        augment=section.augment and train,
        use_image_ids=cfg.task == "retrieval",
    )


@dataclass
class DataPosition:
    """Where this rank is in its data: micro-batches consumed; for annotation data the global cursor
    `(epoch, offset)` of the next global batch (the same on every rank, valid on any world size, see
    `GlobalBatchSampler`); for shards each stream's `(epoch, group, offset)`.

    `legacy_global_batch`: a checkpoint written before cursors were saved: its global batch, to turn
    `micro_step` into a cursor."""

    micro_step: int = 0
    streams: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    sample: tuple[int, int] | None = None
    legacy_global_batch: int = 0

    def update(self, batch: dict[str, Any]) -> None:
        self.micro_step += 1
        if "position" in batch:
            stream, *pos = batch["position"]
            self.streams[int(stream)] = tuple(pos)
        if "cursor" in batch:
            self.sample = tuple(batch["cursor"])


def make_loader(
    cfg: TrainConfig,
    section: DataSection,
    pre: Preprocessor,
    info: D.DistInfo,
    start: DataPosition,
    train: bool = True,
) -> Iterator[dict[str, Any]]:
    """An endless iterator of this rank's batches from `start` on."""
    from torch.utils.data import DataLoader

    t = cfg.train
    seed = t.seed if train else t.seed + 1
    common = dict(
        num_workers=section.num_workers,
        worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
        persistent_workers=False,
        prefetch_factor=4 if section.num_workers else None,
    )
    if section.kind == "webdataset":
        stream = ShardStream(
            expand_braces(section.path),
            pre,
            batch_size=t.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            seed=seed,
            shuffle_shards=section.shuffle_shards if section.shuffle else 0,
            start=start.streams,
            need_image=pre.features is None,
        )
        stream.check(section.num_workers)
        return Batches(iter(DataLoader(stream, batch_size=None, **common)))
    if section.images and not os.path.isdir(section.images):
        raise UserError(_missing_images(section))
    records = load_records(section.kind, section.path, section.images, section.split, section.questions)
    ds = JsonDataset(records, pre, seed=seed)
    cursor = start.sample or (0, 0)
    if start.sample is None and start.micro_step:  # an older checkpoint: its step count as a cursor
        epoch, s = divmod(start.micro_step, max(1, len(ds) // start.legacy_global_batch))
        cursor = (epoch, s * start.legacy_global_batch)
    sampler = GlobalBatchSampler(
        len(ds), t.batch_size, info.rank, info.world_size, seed, section.shuffle, start=cursor
    )
    return Batches(iter(DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate, **common)), sampler)


def _missing_images(section: DataSection) -> str:
    text = f"the image folder {section.images} does not exist: check data.images"
    if section.features:
        text += (
            " (a feature cache is keyed by the images' bytes, so training from data.features still reads "
            "the images and data.images must point at them)"
        )
    return text


class Batches:
    """This rank's batches from a DataLoader iterator. A `UserError` raised in a worker (which arrives
    wrapped in the worker's traceback text) comes out as its own one sentence; for annotation data each
    batch carries `cursor`, where the next global batch starts. `close()` stops the workers at once,
    whether or not a batch was read (they start with the iterator)."""

    def __init__(self, loader: Iterator[dict[str, Any]], sampler: GlobalBatchSampler | None = None):
        self.loader = loader
        self.sampler = sampler
        self.at = sampler.start if sampler is not None else None

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            batch = next(self.loader)
        except UserError as e:
            raise UserError(worker_sentence(e)) from None
        if self.sampler is not None:
            self.at = self.sampler.advance(self.at)
            batch["cursor"] = self.at
        return batch

    def close(self) -> None:
        _stop_workers(self.loader)


def _stop_workers(batches: Iterator[dict[str, Any]]) -> None:
    """Shut a DataLoader iterator's workers down now: ask them to end (torch waits a few seconds for
    each), then kill those still alive. Workers ignore SIGTERM (see `_worker_init`), so one stuck in a
    read must be killed: left to Python's exit, which terminates and then joins its child processes, it
    would hang the process."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return
    shutdown()
    alive = [w for w in getattr(batches, "_workers", []) if w.is_alive()]
    for w in alive:
        w.kill()
    for w in alive:  # SIGKILL: each ends at once
        w.join()


def _worker_init(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops at a step boundary
    with a checkpoint (Ctrl-C and SLURM signal the whole process group); workers end with the loader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker_init(worker_id)


def steps_per_epoch(cfg: TrainConfig, world_size: int) -> int:
    d = cfg.data
    n = len(load_records(d.kind, d.path, d.images, d.split, d.questions))
    return n // (cfg.train.batch_size * world_size * cfg.train.grad_accum)


# ------------------------------------------------------------------------------------------------ loop


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


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}


def forward_loss(
    model: nn.Module, inputs: dict[str, Any], stage: int, gather, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The task's loss and its parts for logging."""
    if stage == 1:
        out = model(
            inputs["input_ids"],
            inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_features=inputs.get("image_features"),
            image_ids=inputs.get("image_ids"),
            gather=gather,
            generator=generator,
        )
        return out.loss, {"loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_itg": out.loss_itg}
    keys = (
        "pixel_values",
        "input_ids",
        "attention_mask",
        "image_features",
        "labels",
        "prompt_lengths",
        "decoder_attention_mask",
    )
    out = model(**{k: inputs[k] for k in keys if k in inputs}, return_logits=False)  # the loss only
    return out.loss, {}


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


def _train(
    cfg: TrainConfig, info: D.DistInfo, resume: str | None, hooks, stop_after: int, stop: StopSignals
) -> TrainResult:
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg)
    config: Blip2Config = model.config
    model.to(info.device)
    model.qformer.gradient_checkpointing = t.grad_checkpointing
    ignore: tuple[str, ...] = ()
    if t.fsdp_llm and cfg.stage == 2 and info.distributed:
        D.shard_frozen_llm(model.llm)
        ignore = ("llm.",)
    model.train()
    ddp = D.wrap_ddp(model, info, ignore_prefixes=ignore)
    gather = D.make_gather(info)

    total = t.max_steps or t.epochs * steps_per_epoch(cfg, info.world_size)
    if total <= 0:
        raise UserError(
            "nothing to train: the dataset is smaller than one global batch; lower train.batch_size"
        )
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = WarmupCosine(optimizer, total, cfg.optim)
    # mixed precision through the models' own mechanism: the Q-Former side computes under autocast,
    # the frozen towers in their configured dtype (`VisionConfig.dtype`, `LLMConfig.dtype`)
    model.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    scaler = torch.amp.GradScaler(info.device.type, enabled=t.precision == "fp16")

    # ---- resume
    step, position, rng = 0, DataPosition(), None
    ckpt_root = os.path.join(t.output_dir, "checkpoints")
    source = None
    if resume:
        source = checkpoint.find(t.output_dir if resume == "auto" else resume)
        if source is None and resume != "auto":
            raise UserError(f"no checkpoint found at {resume}")
    if source is not None:
        trainable, state = checkpoint.load(source)
        checkpoint.load_trainable(model, trainable)
        fused = [g.get("fused") for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for g, f in zip(optimizer.param_groups, fused, strict=True):  # this machine's choice, not the saved
            g["fused"] = f
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
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

    pre = preprocessor(cfg, cfg.data, config, train=True, tower=model.visual.tower)
    batches = make_loader(cfg, cfg.data, pre, info, position)
    try:  # from here on every exit stops the loader's workers (they start with it)
        evaluate = None
        if cfg.eval_data is not None and t.eval_every:
            evaluate = _evaluator(cfg, config, info, model.visual.tower)
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
                path = checkpoint.save(
                    ckpt_root, step, checkpoint.trainable_state(model), state, t.keep_checkpoints
                )
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
                inputs = _to_device(batch, info.device)
                gen = torch.Generator(device=info.device).manual_seed(sample_seed(t.seed, "itm", step, micro))
                sync = micro == t.grad_accum - 1 or not info.distributed
                with ddp.no_sync() if not sync else contextlib.nullcontext():
                    loss, parts = forward_loss(ddp, inputs, cfg.stage, gather, gen)
                    scaler.scale(loss / t.grad_accum).backward()
                window["loss"] += loss.item() / t.grad_accum
                for k, v in parts.items():
                    window[k] += v.item() / t.grad_accum
                window_samples += batch["size"]
            scaler.unscale_(optimizer)
            if cfg.optim.grad_clip > 0:
                window["grad_norm"] += float(
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip
                    )
                )
            lr = scheduler.lr
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            steps_this_session += 1
            window_steps += 1

            metrics: dict[str, float] = {}
            if step % t.log_every == 0 or step == total:
                metrics = _reduce_window(window, window_steps, window_samples, window_start, info)
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
                result = evaluate(ddp, gather)
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
            save_final(model, final_dir, cfg, pre)
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


def _reduce_window(
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


def _evaluator(cfg: TrainConfig, config: Blip2Config, info: D.DistInfo, tower: nn.Module):
    """Validation loss on `eval_data` (eval transform, fixed batches), averaged over ranks."""
    section = cfg.eval_data
    pre = preprocessor(cfg, section, config, train=False, tower=tower)

    def evaluate(model: nn.Module, gather) -> dict[str, float]:
        batches = make_loader(cfg, section, pre, info, DataPosition(), train=False)
        model.eval()
        total, n = 0.0, 0
        try:
            with torch.no_grad():
                for i in range(cfg.train.eval_batches):
                    inputs = _to_device(next(batches), info.device)
                    seed = sample_seed(cfg.train.seed, "eval", i)
                    gen = torch.Generator(device=info.device).manual_seed(seed)
                    loss, _ = forward_loss(model, inputs, cfg.stage, gather, gen)
                    total, n = total + loss.item(), n + 1
        finally:
            batches.close()
            model.train()
        s = D.all_reduce_sum([total, float(n)], info.device)
        return {"eval_loss": s[0] / max(s[1], 1)}

    return evaluate


def save_final(model: nn.Module, path: str, cfg: TrainConfig, pre: Preprocessor) -> None:
    """Write the trained model in the loadable format (`blip2.load`), with its image processor and
    tokenizer (the `Captioner` or `Retriever` of its kind: `save_pretrained`)."""
    from blip2.pipelines import pipeline_for

    v = model.config.vision
    processor = ImageProcessor(v.image_size, v.image_mean, v.image_std)
    pipeline_for(model, processor, pre.text.tokenizer).save_pretrained(path)
