"""Captioning a whole collection into a resumable results file: what `blip2 caption` runs.

`caption_items(captioner, items, out)` writes one JSON line per image (`{"image": ..., "caption": ...}`
or `{"image": ..., "error": ...}`, `blip2.data.jsonl`), skipping what the file holds already, so a
rerun after a crash carries on; a rerun with other generation settings is refused (they are kept in
`<out>.settings.json`). Under torchrun each rank captions its share of what is left into
`<out>.part-<rank>` and rank 0 merges the parts into the one file, in input order.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip2.data.jsonl import Parts, ResultsFile, StdoutResults, json_line, merge, read_records, write_atomic
from blip2.errors import UserError

if TYPE_CHECKING:
    from blip2.data.inputs import Item


def part_paths(out: Path) -> list[Path]:
    """The per-rank part files of `out` left by a distributed run."""
    return Parts.beside(out).paths()


def merge_parts(out: Path, items: Sequence[Item]) -> int:
    """Append the lines of `out`'s part files that `out` lacks, in input order, then delete the parts.

    Returns the number of lines appended.
    """
    if not part_paths(out):
        return 0
    return merge(ResultsFile(out), Parts.beside(out), [it.key for it in items])


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


def _drop_errors(out: Path) -> int:
    """Rewrite `out` without its error lines (atomically); returns how many were dropped."""
    records = read_records(out)
    keep = [r for r in records if "error" not in r]
    if len(keep) < len(records):
        write_atomic(out, "".join(json_line(r) for r in keep))
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
    write_atomic(settings_path(out), json.dumps(settings, indent=1) + "\n")
    if retry:
        merge_parts(out, items)
        _drop_errors(out)


# ------------------------------------------------------------------------------------------ running


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
    max_pixels: int | None = None,
    progress: bool = True,
    info: Any = None,
    overwrite: bool = False,
    retry_errors: bool = False,
    **generate_options: Any,
) -> RunStats:
    """Caption `items` into the results file `out`, skipping those already there.

    Args:
        pipe: a `Captioner`.
        items: from `blip2.data.inputs.expand_inputs`.
        out: the JSON-lines results file (appended to; created if missing); None: stdout.
        prompt: the caption prompt (default: the checkpoint's).
        batch_size: images per model call.
        workers: loader processes decoding images while the model runs (0: in this process).
        max_pixels: larger images get an error line (decompression bombs; default the library's).
        progress: show a progress bar (images/s and ETA) on stderr.
        info: this process's place (`blip2.distributed.DistInfo`; default one process): rank r
            captions every world_size-th remaining item into its part file, rank 0 merges.
        overwrite: discard the results file (its settings and parts) and caption everything again.
        retry_errors: caption again the images with an error line (the error lines are dropped).
        generate_options: transformers `generate` options (default: the pipeline's caption defaults).

    Raises:
        UserError: `out` was written with other generation settings (prompt or options) and
            `overwrite` is not set, or `out` is not a results file.
    """
    import torch

    from blip2.data.inputs import loader
    from blip2.distributed import DistInfo, barrier, broadcast_object
    from blip2.pipelines.captioner import CAPTION_DEFAULTS, check_generation_options
    from blip2.processing import DEFAULT_MAX_PIXELS

    info = info or DistInfo()
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    generate_options = {**CAPTION_DEFAULTS, **generate_options}
    check_generation_options(generate_options)  # before any file is touched
    prompt = pipe.config.llm.prompt if prompt is None else prompt
    pipe.check_generation_length([prompt], generate_options)
    start = time.perf_counter()
    done: set[Any] = set()
    failed: set[Any] = set()
    if out is not None:
        out = Path(out)
        settings = {"prompt": prompt, **generate_options}
        if not overwrite:
            _check_settings(out, settings)  # on every rank: all of them stop with the same sentence
        refusal = None
        if info.is_main:
            try:
                _prepare(out, items, settings, overwrite, retry_errors)
            except UserError as e:
                refusal = str(e)
            except OSError as e:
                refusal = f"cannot prepare the results file {out} ({e.strerror or e}): check --out"
        refusal = broadcast_object(refusal)  # every rank stops with rank 0's sentence
        barrier()
        if refusal:
            raise UserError(refusal)
        records = read_records(out) + Parts.beside(out).records()
        done = {r["image"] for r in records}
        failed = {r["image"] for r in records if "error" in r}
        barrier()  # every rank has the same `done` before anyone appends
    pending = [it for it in items if it.key not in done]
    mine = pending[info.rank :: info.world_size]
    results: ResultsFile | StdoutResults
    if out is None:
        results = StdoutResults()
    elif info.distributed:
        results = Parts.beside(out).writer(info.rank)
    else:
        results = ResultsFile(out)
    stats = RunStats(len(items), len(items) - len(pending), 0, 0, 0.0)
    stats.earlier_errors = sum(1 for it in items if it.key in failed)
    desc = "caption" if not info.distributed else f"caption (rank 0 of {info.world_size})"
    bar = _progress(len(mine), progress and info.is_main, desc)
    try:
        for batch in loader(mine, pipe.image_processor, batch_size, workers, max_pixels):
            good = [(k, px) for k, px, err in batch if px is not None]
            captions: dict[str, str] = {}
            if good:
                pixels = torch.stack([px for _, px in good])  # (B, 3, S, S)
                texts = pipe.generate_from_pixels(pixels, [prompt] * len(good), **generate_options)
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
        barrier()
        if info.is_main:
            merge_parts(out, items)
    stats.seconds = time.perf_counter() - start
    return stats
