"""`blip2 caption --model M INPUTS... --out captions.jsonl`: resumable batch captioning.

INPUTS are image files, folders, globs, webdataset `.tar` shards and `.txt` files listing paths
(`blip2.data.inputs`). One JSON line per image: `{"image": ..., "caption": ...}` or
`{"image": ..., "error": ...}` (`blip2.data.jsonl`). Rerun the same command after a crash or Ctrl-C and
it carries on where it stopped; `--retry-errors` captions the error lines' images again, `--overwrite`
starts from nothing, and a rerun with other generation settings is refused (they are kept in
`<out>.settings.json`). Exit status 1 when some images have an error line. Under
`torchrun --nproc-per-node N -m blip2.cli caption ...` each process captions its share of what is left
into `<out>.part-<rank>` and rank 0 merges the parts into the one results file (in input order,
skipping what is there already) and deletes them; parts left by a crash count as done and are merged
by the next run.
"""

from __future__ import annotations

import argparse
import os
import sys

from blip2.cli import options
from blip2.data.jsonl import read_records
from blip2.errors import EXIT_OK, EXIT_SOME_FAILED, UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_arguments(parser)
    parser.add_argument("inputs", nargs="+", help="image files, folders, globs, .tar shards, .txt path lists")
    parser.add_argument("--out", default=None, help="results file (JSON lines; resumable); default: stdout")
    parser.add_argument(
        "--prompt", default=None, help="text the captions continue (default: the checkpoint's)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, max(0, (os.cpu_count() or 1) - 1)),
        help="processes decoding images while the model runs (0: none; default min(4, CPUs - 1))",
    )
    parser.add_argument(
        "--retry-errors", action="store_true", help="caption again the images whose line is an error"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="discard the results in --out and caption everything"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    options.add_generation_arguments(parser)
    options.add_decode_mode_argument(parser)


def run(args: argparse.Namespace) -> int:
    from blip2.data.inputs import expand_inputs
    from blip2.distributed import setup, teardown
    from blip2.pipelines.batch import caption_items

    options.show_notices()
    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be at least 1 and --workers at least 0")
    generate_options = options.generation_options(args)
    items = expand_inputs(args.inputs)
    if not items:
        raise UserError("the inputs hold no images (folders and globs count .jpg, .png, ... files only)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.out is None:
        raise UserError("under torchrun give --out: the ranks' results are merged into that file")
    info = setup(args.device)
    try:
        pipe = options.load_pipeline(
            args.model, str(info.device), args.dtype, method="caption", **options.load_options(args)
        )
        options.set_decode_mode(pipe, args)
        stats = caption_items(
            pipe,
            items,
            args.out,
            prompt=args.prompt,
            batch_size=args.batch_size,
            workers=args.workers,
            max_pixels=args.max_pixels,
            progress=not args.no_progress,
            info=info,
            overwrite=args.overwrite,
            retry_errors=args.retry_errors,
            **generate_options,
        )
    finally:
        teardown()
    if not info.is_main:
        return 0
    done = stats.captioned + stats.errors
    failed = stats.errors + stats.earlier_errors
    world = info.world_size
    if world > 1:  # the other ranks' errors are in the merged file
        keys = {it.key for it in items}
        failed = sum(1 for r in read_records(args.out) if "error" in r and r["image"] in keys)
    earlier = (
        f" ({stats.earlier_errors} of them errors: --retry-errors redoes them)"
        if stats.earlier_errors
        else ""
    )
    print(
        f"{done} images in {stats.seconds:.1f} s ({stats.images_per_second:.1f} images/s"
        + (f" on rank 0 of {world}" if world > 1 else "")
        + f"): {stats.captioned} captioned, {stats.errors} errors, {stats.skipped} already done{earlier}"
        + (f"; results in {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if failed else EXIT_OK
