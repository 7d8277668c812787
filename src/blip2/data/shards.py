"""Webdataset tar shards (the img2dataset layout), streamed with shuffling and exact resume.

A shard `00000.tar` holds per sample key `000000123` the members `000000123.jpg` (or png/jpeg/webp),
`000000123.txt` (caption) and/or `000000123.json` (`{"caption": ...}`). Shard sets use brace notation:
`data/{00000..01023}.tar` (several patterns may be joined with `::`).

Where shards live: a local (or mounted) file; an `http://` or `https://` URL; or `pipe:COMMAND`, a
shell command that writes the tar to its standard output (`pipe:aws s3 cp s3://bucket/00000.tar -`,
`pipe:curl -s https://host/00000.tar`). Local files are read by seeking (the tar headers first, then
each member where it lies); URLs and commands are read front to back once, never seeked.

Sample keys name their shard by its path relative to the deepest folder common to all configured
shards (`a/00000/000000123` and `b/00000/000000123` for two img2dataset folders `a/` and `b/`).

Splitting: shard `i` goes to stream `i mod (world_size x num_workers)`, stream `rank x num_workers +
worker`; a run needs at least one shard per stream. Each stream runs its own epochs (the job runs by
steps, so ranks never wait on one another at an epoch's end).

Shuffling: per epoch the stream's shards are put in a seeded order, taken `shuffle_shards` at a time,
and the samples of those shards are put in a seeded random order (a shuffle buffer of
`shuffle_shards` whole shards). For local shards the buffer holds each sample's byte offsets in the
tars, not the bytes; for URLs and commands it holds the samples' bytes (`shuffle_shards` whole shards
in memory per stream), and without shuffling (`shuffle_shards` 0) they are streamed sample by sample.

Position: every batch carries its stream's `(epoch, group, offset)` after it. Resuming at that position
re-reads one group (local: its headers; URLs and commands: its shards from their start, skipping the
`offset` samples already used), recomputes its order and carries on at the offset: no sample of the
epoch is seen twice and none is missed. The streams, and so the positions, depend on the world size
and `num_workers`: a run resumes with the same ones.

Damage: a shard whose tail is damaged or cut off (a truncated file, a download or command that stops
early) keeps the samples before the damage; the loss is counted as a skipped `shard`. A shard that gives
no sample at all (missing file, unreachable URL, failing command, not a tar) stops the run with one
sentence naming it.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import random
import re
import signal
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
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
REMOTE = ("http://", "https://", "pipe:")
HTTP_TIMEOUT_S = 60


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> `a/000.tar a/001.tar a/002.tar` (zero-padding kept); `{x,y}` lists; `::`
    joins patterns; a pattern with `*` is globbed."""
    out: list[str] = []
    for part in pattern.split("::"):
        m = re.search(r"\{([^{}]*)\}", part)
        if m is None:
            out.extend(sorted(glob.glob(part)) if "*" in part and not is_remote(part) else [part])
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


def _sample_key(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """A tar member's sample key (its path up to the first dot of its file name) and extension;
    None for what is no sample's file (folders, hidden files, names without an extension)."""
    if not info.isfile():
        return None
    base = os.path.basename(info.name)
    if "." not in base or base.startswith("."):
        return None
    key, ext = base.split(".", 1)
    return os.path.join(os.path.dirname(info.name), key), ext


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
                named = _sample_key(info)
                if named is None:
                    continue
                key, ext = named
                samples.setdefault(key, {})[ext.lower()] = Member(info.offset_data, info.size)
    except (tarfile.TarError, OSError) as e:
        if not os.path.exists(path):
            raise UserError(f"shard not found: {path}") from None
        if not samples:
            raise UserError(f"{path} is not a readable tar file ({e})") from None
        lost += 1
    return list(samples.items()), lost


def shard_names(shards: list[str]) -> dict[str, str]:
    """Each shard's name in sample keys: its path (URL, command) after the deepest `/` common to all
    shards, without `.tar` (and a command's trailing ` -`)."""
    prefix = os.path.commonprefix(list(shards))
    cut = prefix.rfind("/") + 1
    names = {}
    for s in shards:
        name = s[cut:].strip()
        name = name[:-2].rstrip() if name.endswith(" -") else name
        names[s] = name[:-4] if name.endswith(".tar") else name
    return names


def read_record(name: str, key: str, members: dict[str, Member | bytes], handle=None) -> Record:
    """Read one sample's members (offsets read from `handle`, or bytes already read) into a `Record`
    (image bytes + caption, key `name/key`); raises `BadSample`."""

    def read(m: Member | bytes) -> bytes:
        if isinstance(m, bytes):
            return m
        handle.seek(m.offset)
        data = handle.read(m.size)
        if len(data) != m.size:
            raise BadSample("image", f"{name}/{key} is cut short")
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
    return Record(key=f"{name}/{key}", image=image, text=text)


def is_remote(path: str) -> bool:
    """A shard read as a stream: an http(s) URL or a `pipe:` command."""
    return path.startswith(REMOTE)


def _default_signals() -> None:
    """In a `pipe:` command's process, before exec: SIGINT and SIGTERM back to their defaults (the
    DataLoader worker that starts it ignores them, and ignored signals stay ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Source:
    """A shard's bytes, front to back: an http(s) response, a command's stdout or a local file.
    `finish()` closes it and says why it failed (None when it did not)."""

    def __init__(self, path: str):
        self.path, self.proc, self.stream = path, None, None
        if path.startswith("pipe:"):
            self.errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command never blocks
            self.proc = subprocess.Popen(  # its own process group, killed whole in finish()
                path[len("pipe:") :],
                shell=True,
                stdout=subprocess.PIPE,
                stderr=self.errors,
                start_new_session=True,
                preexec_fn=_default_signals,
            )
            self.stream = self.proc.stdout
        elif path.startswith(("http://", "https://")):
            try:
                self.stream = urllib.request.urlopen(path, timeout=HTTP_TIMEOUT_S)  # noqa: S310 (http(s) only)
            except urllib.error.HTTPError as e:
                raise UserError(f"cannot download shard {path}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise UserError(
                    f"cannot reach shard {path} ({reason}); check the URL and the network"
                ) from None
        else:
            try:
                self.stream = open(path, "rb")  # noqa: SIM115 (closed in finish())
            except FileNotFoundError:
                raise UserError(f"shard not found: {path}") from None
            except OSError as e:
                raise UserError(f"cannot open shard {path} ({e.strerror})") from None

    def finish(self, how: str) -> str | None:
        """Close the source. `how`: "drain" (the tar ended: read the rest, its end padding, so that a
        command ends on its own), "close" (the data broke off: close and wait for the command's own
        exit status) or "stop" (the reader stopped early: a command still running is killed)."""
        if self.proc is None:
            self.stream.close()
            return None
        if how == "drain":
            while self.stream.read(1 << 16):
                pass
        elif how == "stop" and self.proc.poll() is None:  # not needed any more: the shell and its children
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.stream.close()  # a command still writing now ends by SIGPIPE
        code = self.proc.wait()
        self.errors.seek(0)
        err = self.errors.read().decode("utf-8", errors="replace").strip()
        self.errors.close()
        stopped = [-getattr(signal, n) for n in ("SIGKILL", "SIGPIPE") if hasattr(signal, n)]
        if code == 0 or code in stopped or code == 128 + 13:  # done, or stopped by us (a shell: 141)
            return None
        last = err.splitlines()[-1] if err else "no message"
        return f"the command exited with status {code} ({last})"


class ShardReader:
    """The samples of one shard read front to back, never seeked: `for key, members in reader` with
    `members` ext -> bytes. Works for URLs, `pipe:` commands and local files. A shard that gives no
    sample raises `UserError` (one sentence); a damaged or cut-off tail ends the iteration early and
    sets `lost` to 1 (the samples before it are kept)."""

    def __init__(self, path: str):
        self.path = path
        self.lost = 0

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        self.lost = 0
        source = _Source(self.path)
        yielded, failure, how = 0, None, "stop"
        key, members = None, {}
        try:
            try:
                with tarfile.open(fileobj=source.stream, mode="r|") as tar:
                    for info in tar:
                        named = _sample_key(info)
                        if named is None:
                            continue
                        k, ext = named
                        data = tar.extractfile(info).read()
                        if len(data) != info.size:
                            raise tarfile.ReadError("unexpected end of data")
                        if k != key and members:
                            yield key, members
                            yielded += 1
                            members = {}
                        key = k
                        members[ext.lower()] = data
                how = "drain"
            except (tarfile.TarError, OSError, EOFError, http.client.HTTPException) as e:
                failure, how = str(e) or type(e).__name__, "close"
                members = {}  # the sample being read when the data broke off may be incomplete
            if members:
                yield key, members
                yielded += 1
        finally:
            failure = source.finish(how) or failure
        if failure and not yielded:
            raise UserError(f"shard {self.path} gave no sample: {failure}")
        if failure:
            self.lost = 1


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
        self.names = shard_names(shards)

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

    def _samples(self, group: list[str], stream: int, epoch: int, g: int) -> tuple[Iterator, list]:
        """The group's samples `(path, key, members)` in their order (a list, or a lazy stream for
        unshuffled URLs and commands), and the group's readers (`lost` counts their damaged tails once
        the samples are used; local shards give an int)."""
        if not self.shuffle_shards and len(group) == 1 and is_remote(group[0]):
            reader = ShardReader(group[0])
            return ((group[0], key, members) for key, members in reader), [reader]
        items, losses = [], []
        for path in group:
            if is_remote(path):
                reader = ShardReader(path)
                items.extend((path, key, members) for key, members in reader)
                losses.append(reader)
            else:
                found, bad = index_shard(path)
                losses.append(bad)
                items.extend((path, key, members) for key, members in found)
        if self.shuffle_shards:
            random.Random(sample_seed(self.seed, "samples", stream, epoch, g)).shuffle(items)
        return iter(items), losses

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
                    items, losses = self._samples(groups[g], stream, epoch, g)
                    for j, (path, key, members) in enumerate(items):
                        if j < off0:  # used before the resume (a stream still reads it)
                            continue
                        try:
                            if path not in handles and not is_remote(path):
                                handles[path] = open(path, "rb")  # noqa: SIM115 (closed below)
                            rec = read_record(self.names[path], key, members, handles.get(path))
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
                    lost = sum(x if isinstance(x, int) else x.lost for x in losses)
                    if lost:
                        skipped["shard"] += lost
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
