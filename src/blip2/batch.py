"""Batch captioning: inputs to image items, a loader that decodes while the model runs, and a resumable
JSON-lines results file.

```
expand_inputs(["photos/", "*.jpg", "list.txt", "shard-000.tar"])  -> [Item(key, path, member), ...]
ResultsFile("captions.jsonl").done                                  -> keys already written
caption_items(pipe, items, "captions.jsonl", batch_size=8, workers=2)
```

Resuming: every line is one complete JSON object written with a single `write` and flushed (and
`fsync`ed) after each batch. A run killed mid-line leaves a partial last line; `ResultsFile` cuts it
off when it opens the file, so a rerun skips exactly the images with a line and appends the rest.

File names that are not valid UTF-8 (any bytes are legal in a Linux name) are kept losslessly: a key
is the name as `os.fsdecode` gives it, where each undecodable byte 0xXY becomes the lone surrogate
U+DCXY, and such a line is written with JSON's `\\uXXXX` escapes (ASCII only), e.g. the file
`caf\\xe9.jpg` (Latin-1) is `{"image": "caf\\udce9.jpg", ...}`. `json.loads` gives the key back and
`os.fsencode(key)` the exact bytes of the name.

The generation settings of a results file (prompt and `generate` options) are kept beside it in
`<results>.settings.json`; resuming with other settings is refused (`overwrite=True` starts again).
`retry_errors=True` drops the error lines first, so their images are captioned again.

Under `torchrun` each rank captions its share of what is left into `captions.jsonl.part-<rank>`;
rank 0 merges the parts into the results file (in input order, skipping what is there already) and
deletes them. A crash at any point leaves nothing lost and nothing twice: parts left behind are read
as done by the next run and merged then.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from blip2.errors import UserError
from blip2.processing import DEFAULT_MAX_PIXELS, ImageError, ImageProcessor, load_image

IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .bmp .tif .tiff .webp .ppm .pgm .pbm .pnm .ico .tga .dib".split()
)
LIST_SUFFIXES = frozenset({".txt", ".lst"})
SHARD_SUFFIXES = (".tar",)
PART = ".part-"


@dataclass(frozen=True)
class Item:
    """One image to caption.

    Attributes:
        key: what the results file calls it: the path, or `shard.tar#member` for a shard member.
        path: the file to read (the image, or the shard).
        member: the member of a webdataset shard holding the image, else None.
    """

    key: str
    path: str
    member: str | None = None


# ------------------------------------------------------------------------------------------- inputs


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _shard_items(path: str) -> list[Item]:
    try:
        with tarfile.open(path) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile() and _is_image_name(m.name)]
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{path} is not a readable tar shard ({e})") from None
    return [Item(f"{path}#{n}", path, n) for n in names]


def _list_items(path: str) -> list[Item]:
    base = Path(path).parent
    items = []
    for line in Path(path).read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = line if os.path.isabs(line) or os.path.exists(line) else str(base / line)
        items.extend(_expand_one(p, explicit=True, from_list=True))
    return items


def _expand_one(spec: str, explicit: bool, from_list: bool = False) -> list[Item]:
    if os.path.isdir(spec):
        found = []
        for root, dirs, files in os.walk(spec):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files) if _is_image_name(f)]
        return [Item(f, f) for f in found]
    if os.path.isfile(spec):
        low = spec.lower()
        if low.endswith(SHARD_SUFFIXES):
            return _shard_items(spec)
        if Path(low).suffix in LIST_SUFFIXES and not from_list:
            return _list_items(spec)
        return [Item(spec, spec)] if explicit or _is_image_name(spec) else []
    if glob.has_magic(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            raise UserError(f"no file matches {spec}")
        return [it for m in matches for it in _expand_one(m, explicit=False)]
    if from_list:  # a missing file named in a list gets its own error line
        return [Item(spec, spec)]
    raise UserError(f"{spec} does not exist: give image files, folders, globs, .tar shards or a .txt list")


def expand_inputs(specs: Sequence[str]) -> list[Item]:
    """Image items from files, folders (recursive, image suffixes only), globs, webdataset `.tar`
    shards (their image members) and text files listing paths (one a line; `#` comments).

    Each image appears once, in the order given. A file named explicitly is captioned whatever its
    suffix (an unreadable one gets an error line); inside folders and globs only image suffixes count.

    Raises:
        UserError: a path that does not exist, a glob that matches nothing, an unreadable shard.
    """
    seen: set[str] = set()
    items = []
    for spec in specs:
        for it in _expand_one(os.fspath(spec), explicit=True):
            if it.key not in seen:
                seen.add(it.key)
                items.append(it)
    return items


# ------------------------------------------------------------------------------------------- loading


class ImageItems(torch.utils.data.Dataset):
    """Decodes and transforms items in the loader's workers; a bad image becomes an error, not a crash.

    Each element is `(key, pixels (3, S, S) or None, error sentence or None)`.
    """

    def __init__(
        self, items: Sequence[Item], processor: ImageProcessor, max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        self.items = list(items)
        self.processor = processor
        self.max_pixels = max_pixels
        self._tars: dict[str, tarfile.TarFile] = {}  # one open shard per worker process

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, item: Item) -> Any:
        if item.member is None:
            return item.path
        tar = self._tars.get(item.path)
        if tar is None:
            tar = self._tars[item.path] = tarfile.open(item.path)
        f = tar.extractfile(item.member)
        if f is None:
            raise ImageError(f"{item.key} is not a file in its shard")
        return f.read()

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None]:
        item = self.items[i]
        try:
            image = load_image(self._read(item), self.max_pixels)
            return item.key, self.processor.preprocess(image), None
        except ImageError as e:
            message = str(e).replace("image ", f"{item.key} ", 1) if item.member else str(e)
            return item.key, None, message
        except (OSError, tarfile.TarError) as e:
            return item.key, None, f"{item.key} could not be read ({e})"


def _collate(batch: list[Any]) -> list[Any]:
    return batch


def loader(
    items: Sequence[Item],
    processor: ImageProcessor,
    batch_size: int,
    workers: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prefetch: int = 4,
) -> torch.utils.data.DataLoader:
    """Batches of `(key, pixels | None, error | None)`; with `workers > 0` images are decoded in that
    many processes, `prefetch` batches ahead of the model."""
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {"prefetch_factor": prefetch, "persistent_workers": False}
    return torch.utils.data.DataLoader(
        ImageItems(items, processor, max_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------- results


def _read_lines(path: Path, repair: bool) -> list[dict[str, Any]]:
    """The complete JSON lines of a results file; with `repair`, a partial last line is cut off.

    With `repair` the file must be a results file (every complete line a JSON object with an
    "image", a partial last line starting with "{"): anything else raises `UserError` and is left
    untouched, so a wrong `--out` never loses data.
    """
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
        if isinstance(rec, dict) and isinstance(rec.get("image"), str):
            records.append(rec)
        elif repair:
            raise _not_results(path, f'line {n} is not a JSON object with an "image"')
    if repair and end < len(data):
        if not data[end:].startswith(b"{"):
            raise _not_results(path, "its last line is not a partial results line")
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return records


def json_line(record: dict[str, Any]) -> str:
    """One results line: UTF-8 JSON, or ASCII JSON with `\\uXXXX` escapes when the record holds a
    name that is not valid UTF-8 (lone surrogates from `os.fsdecode`, which UTF-8 cannot encode)."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record, ensure_ascii=True)
    return line + "\n"


def _not_results(path: Path, why: str) -> UserError:
    return UserError(
        f"{path} exists and is not a blip2 results file ({why}): give --out a new file name "
        "(or the JSON-lines file of an earlier run to resume it); the file was left unchanged"
    )


class StdoutResults:
    """Results as JSON lines on stdout (no results file: nothing to resume)."""

    done: set[str] = set()

    def write(self, record: dict[str, Any]) -> None:
        sys.stdout.write(json_line(record))

    def flush(self) -> None:
        sys.stdout.flush()

    def close(self) -> None:
        self.flush()


class ResultsFile:
    """An append-only JSON-lines file of `{"image": key, "caption": ...}` / `{"image": key, "error": ...}`.

    Opening it cuts a partial last line left by a killed run (and refuses, with `UserError`, an existing
    file that is not a results file); `done` is the set of keys with a line. `write` appends whole
    lines; `flush` flushes them to the OS and disk.
    """

    def __init__(self, path: str | os.PathLike[str], repair: bool = True):
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"{self.path} is a folder: give --out a file name such as captions.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = {r["image"] for r in _read_lines(self.path, repair)}
        self._file: TextIO | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._file.write(json_line(record))
        self.done.add(record["image"])

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None


def part_paths(out: Path) -> list[Path]:
    """The per-rank part files of `out` left by a distributed run."""
    return sorted(out.parent.glob(glob.escape(out.name) + PART + "*"))


def merge_parts(out: Path, items: Sequence[Item]) -> int:
    """Append the lines of `out`'s part files that `out` lacks, in input order, then delete the parts.

    Returns the number of lines appended.
    """
    parts = part_paths(out)
    if not parts:
        return 0
    results = ResultsFile(out)
    records = {r["image"]: r for p in parts for r in _read_lines(p, repair=False)}
    order = [it.key for it in items] + sorted(set(records) - {it.key for it in items})
    added = 0
    for key in order:
        if key in records and key not in results.done:
            results.write(records[key])
            added += 1
    results.close()
    for p in parts:
        p.unlink()
    return added


def settings_path(out: Path) -> Path:
    """Where the generation settings of the results file `out` are kept."""
    return out.with_name(out.name + ".settings.json")


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume `out` if it was written with other generation settings."""
    side = settings_path(out)
    if not side.is_file():
        return  # a new results file, or one written before settings were kept
    try:
        old = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    new = json.loads(json.dumps(settings))
    if old == new:
        return
    if not isinstance(old, dict):
        diff = f"{side} is unreadable"
    else:
        names = sorted(set(old) | set(new), key=lambda n: (n != "prompt", n))
        diff = ", ".join(
            f"{n} {old.get(n)!r} then, {new.get(n)!r} now" for n in names if old.get(n) != new.get(n)
        )
    raise UserError(
        f"{out} was written with other generation settings ({diff}): rerun with those settings to resume, "
        "add --overwrite to caption everything again, or give another --out"
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _drop_errors(out: Path) -> int:
    """Rewrite `out` without its error lines (atomically); returns how many were dropped."""
    records = _read_lines(out, repair=False)
    keep = [r for r in records if "error" not in r]
    if len(keep) < len(records):
        _write_atomic(out, "".join(json_line(r) for r in keep))
    return len(records) - len(keep)


def _prepare(
    out: Path, items: Sequence[Item], settings: dict[str, Any], overwrite: bool, retry: bool
) -> None:
    """Rank 0, before anyone reads `out`: start again (`overwrite`), cut a torn last line, keep the
    settings, and with `retry` merge leftover parts and drop the error lines."""
    if overwrite:
        ResultsFile(out)  # refuses a file that is not a results file, which is then left alone
        for p in [out, settings_path(out), *part_paths(out)]:
            p.unlink(missing_ok=True)
    ResultsFile(out)  # cut a partial last line before anyone reads it
    _write_atomic(settings_path(out), json.dumps(settings, indent=1) + "\n")
    if retry:
        merge_parts(out, items)
        _drop_errors(out)


def _from_rank0(value: Any, world_size: int, wait: Any) -> Any:
    """Rank 0's `value` on every rank (a collective, so also a barrier); under torchrun through the
    default process group, else `wait()` and the value as it is."""
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
    wait()
    return value


# ------------------------------------------------------------------------------------------- running


@dataclass
class RunStats:
    """What one `caption_items` call did (this rank's share)."""

    total: int  # items given
    skipped: int  # already in the results (resumed)
    captioned: int
    errors: int
    seconds: float
    earlier_errors: int = 0  # of the skipped, those with an error line

    @property
    def images_per_second(self) -> float:
        return (self.captioned + self.errors) / self.seconds if self.seconds > 0 else 0.0


def _progress(total: int, enabled: bool, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if not enabled:
        return None
    return tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)


def caption_items(
    pipe: Any,
    items: Sequence[Item],
    out: str | os.PathLike[str] | None,
    *,
    prompt: str | None = None,
    batch_size: int = 8,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
    overwrite: bool = False,
    retry_errors: bool = False,
    **generate_options: Any,
) -> RunStats:
    """Caption `items` into the results file `out`, skipping those already there.

    Args:
        pipe: a `Captioner`.
        items: from `expand_inputs`.
        out: the JSON-lines results file (appended to; created if missing); None: stdout.
        prompt: the caption prompt (default: the checkpoint's).
        batch_size: images per model call.
        workers: loader processes decoding images while the model runs (0: in this process).
        max_pixels: larger images get an error line (decompression bombs).
        progress: show a progress bar (images/s and ETA) on stderr.
        rank, world_size, barrier: this process's place under torchrun and a function that waits for
            every rank (e.g. `torch.distributed.barrier`); rank r captions every world_size-th
            remaining item into a part file, rank 0 merges.
        overwrite: discard the results file (its settings and parts) and caption everything again.
        retry_errors: caption again the images with an error line (the error lines are dropped).
        generate_options: transformers `generate` options (default: the pipeline's caption defaults).

    Raises:
        UserError: `out` was written with other generation settings (prompt or options) and
            `overwrite` is not set, or `out` is not a results file.
    """
    from blip2.pipelines.captioner import CAPTION_DEFAULTS, check_generation_options

    options = {**CAPTION_DEFAULTS, **generate_options}
    check_generation_options(options)  # before any file is touched
    pipe.check_generation_length([pipe.config.llm.prompt if prompt is None else prompt], options)
    start = time.perf_counter()
    wait = barrier or (lambda: None)
    prompt = pipe.config.llm.prompt if prompt is None else prompt
    done: set[str] = set()
    failed: set[str] = set()
    if out is not None:
        out = Path(out)
        settings = {"prompt": prompt, **options}
        if not overwrite:
            _check_settings(out, settings)  # on every rank: all of them stop with the same sentence
        refusal = None
        if rank == 0:
            try:
                _prepare(out, items, settings, overwrite, retry_errors)
            except UserError as e:
                refusal = str(e)
            except OSError as e:
                refusal = f"cannot prepare the results file {out} ({e.strerror or e}): check --out"
        refusal = _from_rank0(refusal, world_size, wait)  # every rank stops with rank 0's sentence
        if refusal:
            raise UserError(refusal)
        records = _read_lines(out, repair=False)
        for p in part_paths(out):
            records += _read_lines(p, repair=False)
        done = {r["image"] for r in records}
        failed = {r["image"] for r in records if "error" in r}
        wait()  # every rank has the same `done` before anyone appends
    pending = [it for it in items if it.key not in done]
    mine = pending[rank::world_size]
    results: ResultsFile | StdoutResults
    if out is None:
        results = StdoutResults()
    else:
        results = ResultsFile(out if world_size == 1 else out.with_name(f"{out.name}{PART}{rank}"))
    stats = RunStats(len(items), len(items) - len(pending), 0, 0, 0.0)
    stats.earlier_errors = sum(1 for it in items if it.key in failed)
    desc = "caption" if world_size == 1 else f"caption (rank 0 of {world_size})"
    bar = _progress(len(mine), progress and rank == 0, desc)
    try:
        for batch in loader(mine, pipe.image_processor, batch_size, workers, max_pixels):
            good = [(k, px) for k, px, err in batch if px is not None]
            captions: dict[str, str] = {}
            if good:
                pixels = torch.stack([px for _, px in good])  # (B, 3, S, S)
                texts = pipe.generate_from_pixels(pixels, [prompt] * len(good), **options)
                captions = dict(zip([k for k, _ in good], texts, strict=True))
            for key, _, err in batch:
                if err is None:
                    results.write({"image": key, "caption": captions[key]})
                    stats.captioned += 1
                else:
                    results.write({"image": key, "error": err})
                    stats.errors += 1
            results.flush()
            if bar is not None:
                bar.update(len(batch))
    finally:
        results.close()
        if bar is not None:
            bar.close()
    if out is not None:
        wait()
        if rank == 0:
            merge_parts(out, items)
    stats.seconds = time.perf_counter() - start
    return stats


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The complete records of a results file (for reading results back)."""
    yield from _read_lines(Path(path), repair=False)


def write_jsonl(records: Iterable[dict[str, Any]], stream: TextIO) -> None:
    """Records as JSON lines on a stream (stdout when no results file is given)."""
    for r in records:
        stream.write(json_line(r))
    stream.flush()
