"""Webdataset tar shards (the img2dataset layout), streamed with shuffling and exact resume.

A shard `00000.tar` holds per sample key `000000123` the members `000000123.jpg` (or png/jpeg/webp),
`000000123.txt` (caption) and/or `000000123.json` (`{"caption": ...}`). Shard sets use brace notation:
`data/{00000..01023}.tar` (several patterns may be joined with `::`).

Splitting: shard `i` goes to stream `i mod (world_size x num_workers)`, stream `rank x num_workers +
worker`; a run needs at least one shard per stream. Each stream runs its own epochs (the job runs by
steps, so ranks never wait on one another at an epoch's end).

Shuffling: per epoch the stream's shards are put in a seeded order, taken `shuffle_shards` at a time,
and the samples of those shards are put in a seeded random order (a shuffle buffer of
`shuffle_shards` whole shards). The buffer holds each sample's byte offsets in the tars, not the bytes:
the tar headers are read first and members are read by seeking (shards must be local or mounted files).

Position: every batch carries its stream's `(epoch, group, offset)` after it. Resuming at that position
re-reads the headers of one group, recomputes its order and carries on at the offset: no sample of the
epoch is seen twice and none is missed.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from blip2.data.annotations import Record
from blip2.data.batching import BadSample, Preprocessor, sample_seed
from blip2.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> `a/000.tar a/001.tar a/002.tar` (zero-padding kept); `{x,y}` lists; `::`
    joins patterns; a pattern with `*` is globbed."""
    out: list[str] = []
    for part in pattern.split("::"):
        m = re.search(r"\{([^{}]*)\}", part)
        if m is None:
            out.extend(sorted(glob.glob(part)) if "*" in part else [part])
            continue
        body, head, tail = m.group(1), part[: m.start()], part[m.end() :]
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng:
            lo, hi = rng.group(1), rng.group(2)
            items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            items = body.split(",")
        for item in items:
            out.extend(expand_braces(head + item + tail))
    return out


@dataclass
class Member:
    offset: int
    size: int


def index_shard(path: str) -> tuple[list[tuple[str, dict[str, Member]]], int]:
    """Read a tar's headers: `[(key, {ext: Member})]` in file order, and how many members were lost to a
    damaged tail (a truncated shard keeps the samples before the damage)."""
    samples: dict[str, dict[str, Member]] = {}
    lost = 0
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                try:
                    info = tar.next()
                except tarfile.TarError:
                    lost += 1
                    break
                if info is None:
                    break
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                if "." not in base or base.startswith("."):
                    continue
                key, ext = base.split(".", 1)
                key = os.path.join(os.path.dirname(info.name), key)
                samples.setdefault(key, {})[ext.lower()] = Member(info.offset_data, info.size)
    except (tarfile.TarError, OSError) as e:
        if not os.path.exists(path):
            raise UserError(f"shard not found: {path}") from None
        if not samples:
            raise UserError(f"{path} is not a readable tar file ({e})") from None
        lost += 1
    return list(samples.items()), lost


def read_record(path: str, key: str, members: dict[str, Member], handle) -> Record:
    """Read one sample's members into a `Record` (image bytes + caption); raises `BadSample`."""
    shard = os.path.basename(path)
    if shard.endswith(".tar"):
        shard = shard[:-4]

    def read(m: Member) -> bytes:
        handle.seek(m.offset)
        data = handle.read(m.size)
        if len(data) != m.size:
            raise BadSample("image", f"{shard}/{key} is cut short")
        return data

    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    image = read(members[image_ext]) if image_ext else None
    text = None
    if "txt" in members:
        text = read(members["txt"]).decode("utf-8", errors="replace").strip() or None
    if text is None and "json" in members:
        try:
            meta = json.loads(read(members["json"]))
            text = meta.get("caption") if isinstance(meta, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            text = None
    return Record(key=f"{shard}/{key}", image=image, text=text)


class ShardStream(IterableDataset):
    """Batches from webdataset shards for one rank (and its DataLoader workers).

    Args:
        shards: shard paths (see `expand_braces`).
        pre: preprocessor (transforms, tokenizer, optional feature cache).
        batch_size: per-rank batch size.
        rank, world_size: this process in the job.
        seed: shuffling seed (the same on every rank).
        shuffle_shards: how many shards are shuffled together (1 = within each shard; 0 = no shuffling).
        start: resume positions, stream id -> `(epoch, group, offset)`.
        need_image: skip samples without an image member (False when features come from a cache).

    Each yielded batch is the collated tensors plus `skipped` (reason -> count since the last batch)
    and `position` (`(stream, epoch, group, offset)` after this batch).
    """

    def __init__(
        self,
        shards: list[str],
        pre: Preprocessor,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_shards: int = 4,
        start: dict[int, tuple[int, int, int]] | None = None,
        need_image: bool = True,
    ):
        if not shards:
            raise UserError("no webdataset shards given; set data.path to e.g. 'data/{00000..00099}.tar'")
        self.shards, self.pre, self.batch_size = shards, pre, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_shards = shuffle_shards
        self.start = dict(start or {})
        self.need_image = need_image

    def streams(self, num_workers: int) -> int:
        return self.world_size * max(1, num_workers)

    def check(self, num_workers: int) -> None:
        n = self.streams(num_workers)
        if len(self.shards) < n:
            raise UserError(
                f"{len(self.shards)} shards cannot feed {n} streams ({self.world_size} ranks x "
                f"{max(1, num_workers)} workers): use at least one shard per stream (fewer data.num_workers)"
            )

    def _groups(self, mine: list[str], stream: int, epoch: int) -> list[list[str]]:
        order = list(mine)
        if self.shuffle_shards:
            random.Random(sample_seed(self.seed, "shards", stream, epoch)).shuffle(order)
        size = max(1, self.shuffle_shards)
        return [order[i : i + size] for i in range(0, len(order), size)]

    def _samples(self, group: list[str], stream: int, epoch: int, g: int) -> tuple[list, int]:
        items, lost = [], 0
        for path in group:
            found, bad = index_shard(path)
            lost += bad
            items.extend((path, key, members) for key, members in found)
        if self.shuffle_shards:
            random.Random(sample_seed(self.seed, "samples", stream, epoch, g)).shuffle(items)
        return items, lost

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        n_streams = self.world_size * workers
        stream = self.rank * workers + worker
        mine = self.shards[stream::n_streams]
        if not mine:
            raise UserError(f"stream {stream} has no shard: use at least {n_streams} shards")
        epoch, g0, off0 = self.start.get(stream, (0, 0, 0))
        batch: list[dict[str, Any]] = []
        skipped: Counter[str] = Counter()
        handles: dict[str, Any] = {}
        try:
            while True:
                groups = self._groups(mine, stream, epoch)
                for g in range(g0, len(groups)):
                    items, lost = self._samples(groups[g], stream, epoch, g)
                    if lost:
                        skipped["shard"] += lost
                    for j in range(off0, len(items)):
                        path, key, members = items[j]
                        try:
                            if path not in handles:
                                handles[path] = open(path, "rb")  # noqa: SIM115 (closed below)
                            rec = read_record(path, key, members, handles[path])
                            if self.need_image and rec.image is None:
                                raise BadSample("image", f"{rec.key} has no image member")
                            batch.append(self.pre.load(rec, sample_seed(self.seed, stream, epoch, g, j)))
                        except BadSample as e:
                            skipped[e.reason] += 1
                            continue
                        if len(batch) == self.batch_size:
                            out = self.pre.collate(batch)
                            out["skipped"], out["position"] = dict(skipped), (stream, epoch, g, j + 1)
                            yield out
                            batch, skipped = [], Counter()
                    off0 = 0
                    for h in handles.values():
                        h.close()
                    handles = {}
                epoch, g0 = epoch + 1, 0
        finally:
            for h in handles.values():
                h.close()


def worker_init(_: int) -> None:
    """DataLoader worker setup: no tokenizer thread pools inside forked workers, one torch thread."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)
