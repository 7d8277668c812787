"""One resumable, per-rank, sharded JSON-lines writer: the results of `blip2 caption` and the predictions
of `blip2 eval` are written with it.

```
results = ResultsFile("captions.jsonl")          # key "image"; opening cuts a torn last line
results.done                                     # keys already written: a rerun skips them
results.write({"image": key, "caption": text}); results.flush(); results.close()
parts = Parts.beside(Path("captions.jsonl"))     # captions.jsonl.part-0, -1, ...: one file per rank
merge(ResultsFile("captions.jsonl"), parts, keys)  # rank 0: the parts' lines, in input order
```

Resuming: every line is one complete JSON object written with a single `write`, flushed and `fsync`ed
by `flush` (after each batch). A run killed mid-line leaves a partial last line; `ResultsFile` cuts it
off when it opens the file, so a rerun skips exactly the records with a line and appends the rest.

Under `torchrun` each rank appends to its own part file (`Parts.path(rank)`), so no two processes ever
write one file; what any part holds counts as done, whatever world size wrote it. A crash at any point
leaves nothing lost and nothing twice.

Names that are not valid UTF-8 (a file name's undecodable bytes become lone surrogates with
`os.fsdecode`) are written with JSON's `\\uXXXX` escapes (ASCII only), so `json.loads` gives them back.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from blip2.errors import UserError

PART = ".part-"


def json_line(record: dict[str, Any]) -> str:
    """One results line: UTF-8 JSON, or ASCII JSON with `\\uXXXX` escapes when the record holds a
    name that is not valid UTF-8 (lone surrogates from `os.fsdecode`, which UTF-8 cannot encode)."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record, ensure_ascii=True)
    return line + "\n"


def hashable(key: Any) -> Hashable:
    """A record's key as a set member (a JSON list, e.g. a composite id, becomes a tuple)."""
    return tuple(key) if isinstance(key, list) else key


def _is_record(rec: Any, key: str) -> bool:
    return isinstance(rec, dict) and isinstance(rec.get(key), (str, int, list))


def _not_results(path: Path, why: str) -> UserError:
    return UserError(
        f"{path} exists and is not a blip2 results file ({why}): give --out a new file name "
        "(or the JSON-lines file of an earlier run to resume it); the file was left unchanged"
    )


def read_records(
    path: str | os.PathLike[str], key: str = "image", repair: bool = False
) -> list[dict[str, Any]]:
    """The complete records of a JSON-lines file (none when it does not exist).

    Args:
        path: the file.
        key: the field every record has (its identity: "image" for captions, "id" for predictions).
        repair: the file must be a results file (every complete line a JSON object with `key`, a
            partial last line starting with "{"); its partial last line is cut off. Anything else
            raises `UserError` and is left untouched, so a wrong `--out` never loses data. Without
            `repair`, damaged lines are skipped (they do not count as done).
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    records = []
    for n, raw in enumerate(data[:end].splitlines(), 1):
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None  # a damaged line (never written by us whole) does not count as done
        if _is_record(rec, key):
            records.append(rec)
        elif repair:
            raise _not_results(path, f"line {n} is not a JSON object with an {key!r}")
    if repair and end < len(data):
        if not data[end:].startswith(b"{"):
            raise _not_results(path, "its last line is not a partial results line")
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return records


class ResultsFile:
    """An append-only JSON-lines file of records identified by `record[key]`.

    Opening it cuts a partial last line left by a killed run (and refuses, with `UserError`, an existing
    file that is not a results file); `done` is the set of keys with a line. `write` appends whole
    lines; `flush` flushes them to the OS and disk.
    """

    def __init__(self, path: str | os.PathLike[str], key: str = "image", repair: bool = True):
        self.path = Path(path)
        self.key = key
        if self.path.is_dir():
            raise UserError(f"{self.path} is a folder: give --out a file name such as captions.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[Hashable] = {hashable(r[key]) for r in read_records(self.path, key, repair)}
        self._file: TextIO | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._file.write(json_line(record))
        self.done.add(hashable(record[self.key]))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None


class StdoutResults:
    """Records as JSON lines on stdout (no results file: nothing to resume); `ResultsFile`'s methods."""

    done: set[Hashable] = set()

    def write(self, record: dict[str, Any]) -> None:
        sys.stdout.write(json_line(record))

    def flush(self) -> None:
        sys.stdout.flush()

    def close(self) -> None:
        self.flush()


@dataclass(frozen=True)
class Parts:
    """The per-rank part files of one output: rank r writes `<prefix><r><suffix>`, r zero-padded to
    `width` digits (e.g. `captions.jsonl.part-1`, `predictions.part-001.jsonl`)."""

    prefix: str
    width: int = 0
    suffix: str = ""

    @classmethod
    def beside(cls, out: str | os.PathLike[str]) -> Parts:
        """The parts of the results file `out`: `<out>.part-<rank>`."""
        return cls(os.fspath(out) + PART)

    def path(self, rank: int) -> Path:
        return Path(f"{self.prefix}{rank:0{self.width}d}{self.suffix}")

    def paths(self) -> list[Path]:
        """The part files there are, of any rank."""
        prefix = Path(self.prefix)
        return sorted(prefix.parent.glob(glob.escape(prefix.name) + "*" + glob.escape(self.suffix)))

    def records(self, key: str = "image") -> list[dict[str, Any]]:
        """The complete records of every part (a torn or damaged line is skipped)."""
        return [r for p in self.paths() for r in read_records(p, key)]

    def writer(self, rank: int, key: str = "image") -> ResultsFile:
        """Rank `rank`'s part, opened for appending (a torn last line cut off)."""
        return ResultsFile(self.path(rank), key)

    def remove(self) -> None:
        for p in self.paths():
            p.unlink(missing_ok=True)


def merge(results: ResultsFile, parts: Parts, order: Sequence[Hashable]) -> int:
    """Append to `results` the parts' records it lacks (those keyed in `order` first, in that order,
    then the others sorted), close it, then delete the parts. Returns the number of lines appended.

    A crash during a merge leaves the parts: the next merge appends only what is still missing.
    """
    paths = parts.paths()
    if not paths:
        return 0
    records = {hashable(r[results.key]): r for r in parts.records(results.key)}
    rest = sorted(set(records) - set(order), key=str)
    added = 0
    for key in [*order, *rest]:
        if key in records and key not in results.done:
            results.write(records[key])
            added += 1
    results.close()
    for p in paths:
        p.unlink()
    return added


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` through a temporary file renamed over it (never half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
