"""An image index on disk: which images it holds, their ITC query embeddings, and nothing half written.

```
INDEX/
  index.json           format, the model (its name, weights' fingerprint, layout and dtype), Q, E, dtype,
                       strategy, FAISS
  model.npy            a sample of the model's weights (float32): the same model in another dtype is
                       accepted (`blip2.data.features.same_weights`), another one refused
  entries.jsonl        the log: {"image": key, "seg": s, "row": r} adds (or replaces) an image,
                       {"image": key, "removed": true} deletes it; replayed in order
  segments/<s>.vec     the query embeddings of one writer's images, (rows, Q, E) raw `dtype`
  segments/<s>.pool    their pooled vectors (the mean query, normalized), (rows, E) raw `dtype`
  segments/<s>.jsonl   the writer's own log, {"image": key, "row": r}, until it is merged into entries.jsonl
  faiss.index, faiss.json   the ITC candidate index over the live images (derived: rebuilt when stale)
  lock                 held (`fcntl.flock`) by the one process that changes the index
```

One writer at a time: `build`, `add`, `remove` and `rebuild` hold the folder's lock (`writing`)
while they run, and a second writer is refused in one sentence; the OS releases it when their process
ends, however it ends (a killed build resumes). Readers take no lock: they see the last merged log.

Crash safety: every run writes new segments, one per process (`torchrun` ranks never share a file).
A batch's vectors are appended and `fsync`ed before its log lines, each line one JSON object written
whole (`blip2.data.jsonl.ResultsFile`, which cuts a torn last line), so every logged row is complete
and rows after the last line are ignored. A segment log is folded into `entries.jsonl` by one process
(`Store.merge_segments`), skipping the rows merged already, so a merge cut short is finished by the next.
Embeddings are kept as float16 by default: half the size of float32, cosines within about 1e-3.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from blip2.data.jsonl import ResultsFile, read_records, write_atomic
from blip2.errors import UserError

FORMAT = "blip2-index/1"
DTYPES = ("float16", "float32")
STRATEGIES = ("pooled", "queries")
LOCK = "lock"
META_KEYS = {"model": str, "fingerprint": str, "queries": int, "dim": int, "dtype": str, "strategy": str}
_held: dict[str, Any] = {}  # realpath of an index folder -> its lock file, held by this process


def damaged(path: Path, what: str) -> UserError:
    """The sentence for a damaged index file: which one, and what to do."""
    return UserError(
        f"{path} {what} (the index is damaged): build the index again with "
        f"`blip2 index build IMAGES... --out NEW_FOLDER`"
    )


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of the index folder `path` (which exists) while changing it: a process that holds it
    already goes on; another process holding it (or a folder this one cannot write) is a `UserError`."""
    key = os.path.realpath(path)
    if key in _held:
        yield
        return
    try:
        f = open(Path(path) / LOCK, "a")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise UserError(f"cannot write the index {path} ({e.strerror or e}): check the path") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(
            f"{path} is being changed by another blip2 process (index build, add, remove or rebuild): "
            "run this again once it has finished"
        ) from None
    _held[key] = f
    try:
        yield
    finally:
        del _held[key]
        f.close()


@dataclass(frozen=True)
class Entry:
    """Where one image's vectors are: segment `seg`, row `row`; `member` of a webdataset shard (the key
    is then `shard.tar#member`), else None."""

    seg: int
    row: int
    member: str | None = None


class Store:
    """The files of one index folder (see the module docstring); `meta` is `index.json`."""

    def __init__(self, path: str | os.PathLike[str], meta: dict[str, Any]):
        self.path = Path(path)
        self.meta = meta

    # ------------------------------------------------------------------------- creating, opening

    @staticmethod
    def is_index(path: str | os.PathLike[str]) -> bool:
        return (Path(path) / "index.json").is_file()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """The index at `path`; a missing folder or one that is not an index is a `UserError`."""
        path = Path(path)
        if not path.exists():
            raise UserError(
                f"there is no index at {path}: build one with `blip2 index build IMAGES... --out {path}`"
            )
        try:
            meta = json.loads((path / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{path} is not a blip2 image index (no readable index.json of {FORMAT})")
        for key, kind in META_KEYS.items():
            if not isinstance(meta.get(key), kind):
                raise damaged(path / "index.json", f"has no valid {key!r}")
        if meta["dtype"] not in DTYPES or meta["strategy"] not in STRATEGIES:
            raise damaged(path / "index.json", "names an unknown dtype or strategy")
        return cls(path, meta)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        model: str,
        fingerprint: str,
        queries: int,
        dim: int,
        dtype: str = "float16",
        strategy: str = "queries",
        faiss: str = "auto",
        weights: tuple[str, np.ndarray] | None = None,
        model_dtype: str | None = None,
        flat_limit: int | None = None,
    ) -> Store:
        """A new, empty index folder (`path` must not exist or be an empty folder, or one a create killed
        before `index.json` left).

        Args:
            model, fingerprint: the model's name and `tower_fingerprint` (of the whole model).
            queries, dim: Q and E of its image embeddings.
            dtype: how embeddings are stored.
            strategy, faiss: what FAISS indexes, and its `index_factory` string ("auto": by size).
            weights: the model's `weights_sample` (layout hash, values), to accept it in another dtype.
            model_dtype: the dtype it was loaded in (recorded for `blip2 index info`).
            flat_limit: vectors up to which the automatic FAISS type is exact (default
                `blip2.index.search.FLAT_LIMIT`; above, an inverted file).
        """
        from blip2.index.search import check_factory

        path = Path(path)
        if dtype not in DTYPES or strategy not in STRATEGIES:
            raise UserError(
                f"an index stores {' or '.join(DTYPES)} and indexes {' or '.join(STRATEGIES)} vectors"
            )
        check_factory(faiss, dim)
        if not cls.is_new(path):
            raise UserError(f"{path} exists and is not a blip2 image index: give --out a new folder")
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "model": model,
            "fingerprint": fingerprint,
            "queries": queries,
            "dim": dim,
            "dtype": dtype,
            "strategy": strategy,
            "faiss": faiss,
            "model_dtype": model_dtype,
            "weights": weights[0] if weights else None,
            "flat_limit": flat_limit,
        }
        if weights:
            with open(path / "model.npy.tmp", "wb") as f:
                np.save(f, weights[1])
            os.replace(path / "model.npy.tmp", path / "model.npy")
        store = cls(path, meta)
        store.save_meta()  # last: the folder is an index
        return store

    @staticmethod
    def is_new(path: str | os.PathLike[str]) -> bool:
        """Whether `path` can become an index: missing, or a folder holding nothing but what `create`
        writes before `index.json` (a create killed half-way) and the lock."""
        path = Path(path)
        if not path.exists():
            return True
        return path.is_dir() and all(p.name in (LOCK, "model.npy", "model.npy.tmp") for p in path.iterdir())

    def save_meta(self) -> None:
        """Write `meta` to `index.json` (atomically)."""
        write_atomic(self.path / "index.json", json.dumps(self.meta, indent=1) + "\n")

    # ------------------------------------------------------------------------------------ files

    @property
    def log_path(self) -> Path:
        return self.path / "entries.jsonl"

    def segment_path(self, seg: int, suffix: str) -> Path:
        return self.path / "segments" / f"{seg:06d}{suffix}"

    def segments(self, suffix: str) -> list[int]:
        """The numbers of the segments with a `suffix` file (".vec": all, ".jsonl": unmerged)."""
        return sorted(int(p.stem) for p in (self.path / "segments").glob(f"*{suffix}") if p.stem.isdigit())

    def next_segment(self) -> int:
        """A segment number no earlier run used."""
        return max(self.segments(".vec"), default=-1) + 1

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def rows(self, seg: int, pooled: bool = False) -> int:
        """The whole rows segment `seg`'s vector file holds (-1 when it is missing)."""
        shape = (self.meta["dim"],) if pooled else (self.meta["queries"], self.meta["dim"])
        try:
            size = self.segment_path(seg, ".pool" if pooled else ".vec").stat().st_size
        except FileNotFoundError:
            return -1
        return size // (self.np_dtype.itemsize * int(np.prod(shape)))

    def check_segments(self, rows: dict[int, int]) -> None:
        """Refuse (`UserError`, naming the file) segments whose vector files are missing or hold fewer than
        `rows[seg]` rows: what the log says they hold."""
        for seg, n in rows.items():
            for pooled in (False, True):
                have = self.rows(seg, pooled)
                if have < n:
                    what = "is missing" if have < 0 else f"holds {have} rows where entries.jsonl uses {n}"
                    raise damaged(self.segment_path(seg, ".pool" if pooled else ".vec"), what)

    def vectors(self, seg: int, pooled: bool = False) -> np.ndarray:
        """Segment `seg`'s vectors, memory-mapped read-only: `(rows, Q, E)`, or `(rows, E)` pooled."""
        shape = (self.meta["dim"],) if pooled else (self.meta["queries"], self.meta["dim"])
        path = self.segment_path(seg, ".pool" if pooled else ".vec")
        rows = max(0, self.rows(seg, pooled))
        if rows == 0:
            return np.zeros((0, *shape), dtype=self.np_dtype)
        return np.memmap(path, dtype=self.np_dtype, mode="r", shape=(rows, *shape))

    # ------------------------------------------------------------------------------------ the log

    def records(self) -> list[dict[str, Any]]:
        """The main log's records; a line that is not one (the file damaged) is a `UserError` naming it. A
        torn last line (a writer killed mid-line) does not count."""
        if not self.log_path.exists():
            return []
        data = self.log_path.read_bytes()
        end = data.rfind(b"\n") + 1
        out = []
        for n, raw in enumerate(data[:end].splitlines(), 1):
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = None
            ok = isinstance(rec, dict) and isinstance(rec.get("image"), str)
            if ok and not rec.get("removed"):
                ok = isinstance(rec.get("seg"), int) and isinstance(rec.get("row"), int) and rec["row"] >= 0
            if not ok:
                raise damaged(self.log_path, f"line {n} is not an index entry")
            out.append(rec)
        if end < len(data) and not data[end:].startswith(b"{"):
            raise damaged(self.log_path, "ends in a line that is not an index entry")
        return out

    def entries(self) -> dict[str, Entry]:
        """The live images, key -> `Entry`, in the order they were first added (a torn last line of the
        log does not count)."""
        live: dict[str, Entry] = {}
        for rec in self.records():
            if rec.get("removed"):
                live.pop(rec["image"], None)
            else:
                live[rec["image"]] = Entry(rec["seg"], rec["row"], rec.get("member"))
        return live

    def log(self) -> ResultsFile:
        """The main log, opened for appending (a torn last line is cut); one process writes it."""
        return ResultsFile(self.log_path)

    def remove(self, keys: Sequence[str]) -> int:
        """Delete images from the index (their vectors stay on disk, unused); returns how many were there."""
        live = self.entries()
        gone = [k for k in dict.fromkeys(keys) if k in live]
        log = self.log()
        for key in gone:
            log.write({"image": key, "removed": True})
        log.close()
        return len(gone)

    def merge_segments(self) -> int:
        """Fold the segment logs left by writers into the main log (rows merged already are skipped), then
        delete them. Returns the number of images added or replaced."""
        pending = self.segments(".jsonl")
        if not pending:
            return 0
        merged: dict[int, int] = {}  # segment -> rows of it in the main log
        for rec in self.records():
            if not rec.get("removed"):
                merged[rec["seg"]] = max(merged.get(rec["seg"], 0), rec["row"] + 1)
        log, added = self.log(), 0
        for seg in pending:
            for rec in read_records(self.segment_path(seg, ".jsonl")):
                if rec["row"] >= merged.get(seg, 0):
                    log.write(
                        {"image": rec["image"], "seg": seg, **{k: v for k, v in rec.items() if k != "image"}}
                    )
                    added += 1
            log.flush()
        log.close()
        for seg in pending:
            self.segment_path(seg, ".jsonl").unlink()
        return added


def pool(feats: Tensor) -> Tensor:
    """One vector per image for ITC candidates: the mean of its `(N, Q, E)` query embeddings, normalized."""
    return torch.nn.functional.normalize(feats.float().mean(dim=1), dim=-1)


class SegmentWriter:
    """Appends images to a new segment of `store`; a batch is on disk, whole, once `append` returns."""

    def __init__(self, store: Store, seg: int):
        self.store, self.seg = store, seg
        self.rows = 0
        self._files: tuple[Any, Any] | None = None
        self._log: ResultsFile | None = None

    def append(self, keys: Sequence[str], members: Sequence[str | None], feats: Tensor) -> None:
        """Add images: their keys, shard members (None for files) and `(n, Q, E)` query embeddings."""
        dtype = self.store.np_dtype
        if self._files is None:
            self.store.segment_path(self.seg, "").parent.mkdir(exist_ok=True)
            self._files = (
                open(self.store.segment_path(self.seg, ".vec"), "xb"),  # noqa: SIM115 (closed in close())
                open(self.store.segment_path(self.seg, ".pool"), "xb"),  # noqa: SIM115
            )
            self._log = ResultsFile(self.store.segment_path(self.seg, ".jsonl"))
        for f, x in zip(self._files, (feats, pool(feats)), strict=True):
            f.write(x.float().numpy().astype(dtype).tobytes())
            f.flush()
            os.fsync(f.fileno())
        assert self._log is not None
        for i, (key, member) in enumerate(zip(keys, members, strict=True)):
            rec: dict[str, Any] = {"image": key, "row": self.rows + i}
            if member is not None:
                rec["member"] = member
            self._log.write(rec)
        self._log.flush()
        self.rows += len(keys)

    def close(self) -> None:
        if self._files is not None:
            for f in self._files:
                f.close()
        if self._log is not None:
            self._log.close()
