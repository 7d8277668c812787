"""The training data: batch makers, this rank's loader, and where it is in the data (for resume)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from blip2 import distributed as D
from blip2.data.annotations import Record, load_records
from blip2.data.batching import Preprocessor
from blip2.data.features import FeatureStore
from blip2.data.json_dataset import GlobalBatchSampler, JsonDataset, MixtureSampler
from blip2.data.shards import ShardStream, expand_braces, worker_init
from blip2.errors import UserError, worker_sentence
from blip2.processing import ImageProcessor
from blip2.tasks.base import Task
from blip2.train.config import DataSection, TrainConfig

MODEL_INPUTS = (
    "pixel_values",
    "image_features",
    "input_ids",
    "attention_mask",
    "image_ids",
    "prompt_lengths",
    "labels",
    "decoder_attention_mask",
    "qformer_input_ids",
    "qformer_attention_mask",
)


def preprocessor(cfg: TrainConfig, task: Task, section: DataSection, train: bool) -> Preprocessor:
    """The section's batch maker for the task's texts; a feature cache is checked against the task's
    frozen image tower (`Task.image_tower`)."""
    config = task.model.config
    features = None
    if section.features:
        if not config.vision.freeze:
            raise UserError(
                "cached image features need a frozen image encoder: drop data.features or set "
                "model.overrides.vision.freeze=true"
            )
        features = FeatureStore(section.features)
        features.check_vision(config.to_dict()["vision"], task.image_tower())
    v = config.vision
    return Preprocessor(
        task.text_spec(cfg, section, config),
        images=ImageProcessor(v.image_size, v.image_mean, v.image_std),
        features=features,
        augment=section.augment and train,
        use_image_ids=task.uses_image_ids,
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
    records, sizes = section_records(section)
    ds = JsonDataset(records, pre, seed=seed)
    cursor = start.sample or (0, 0)
    if start.sample is None and start.micro_step:  # an older checkpoint: its step count as a cursor
        epoch, s = divmod(start.micro_step, max(1, len(ds) // start.legacy_global_batch))
        cursor = (epoch, s * start.legacy_global_batch)
    if section.kind == "mixture":
        sampler = MixtureSampler(
            sizes, t.batch_size, info.rank, info.world_size, seed, section.shuffle, cursor
        )
    else:
        sampler = GlobalBatchSampler(
            len(ds), t.batch_size, info.rank, info.world_size, seed, section.shuffle, start=cursor
        )
    return Batches(iter(DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate, **common)), sampler)


def section_records(section: DataSection) -> tuple[list[Record], list[int]]:
    """The records of an annotation section (a mixture's sources laid end to end) and the size of each
    dataset."""
    records, sizes = [], []
    for source in section.datasets():
        if source.images and not os.path.isdir(source.images):
            raise UserError(_missing_images(source))
        recs = load_records(source.kind, source.path, source.images, source.split, source.questions)
        records += recs
        sizes.append(len(recs))
    return records, sizes


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
    n = len(section_records(cfg.data)[0])
    return n // (cfg.train.batch_size * world_size * cfg.train.grad_accum)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
