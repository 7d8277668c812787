"""`blip2 caption --model M INPUTS... --out captions.jsonl`: resumable batch captioning.

INPUTS are image files, folders, globs, webdataset `.tar` shards and `.txt` files listing paths. One
JSON line per image: `{"image": ..., "caption": ...}` or `{"image": ..., "error": ...}`. Rerun the same
command after a crash or Ctrl-C and it carries on where it stopped; `--retry-errors` captions the error
lines' images again, `--overwrite` starts from nothing, and a rerun with other generation settings is
refused (they are kept in `<out>.settings.json`). Exit status 1 when some images have an error line. Under
`torchrun --nproc-per-node N -m blip2.cli caption ...` each process captions its share and rank 0
merges them into the one results file.
"""

from __future__ import annotations

import argparse
import os
import sys

from blip2.commands import common
from blip2.errors import EXIT_OK, EXIT_SOME_FAILED, UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
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
    common.add_generation_arguments(parser)


def _distributed() -> tuple[int, int, object | None]:
    """(rank, world size, barrier) under torchrun, else (0, 1, None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size(), dist.barrier


def run(args: argparse.Namespace) -> int:
    from blip2 import batch

    common.show_notices()
    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be at least 1 and --workers at least 0")
    options = common.generation_options(args)
    items = batch.expand_inputs(args.inputs)
    if not items:
        raise UserError("the inputs hold no images (folders and globs count .jpg, .png, ... files only)")
    rank, world, barrier = _distributed()
    if world > 1 and args.out is None:
        raise UserError("under torchrun give --out: the ranks' results are merged into that file")
    device = args.device
    if world > 1 and device is None:
        import torch

        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    pipe = common.load_pipeline(args.model, device, args.dtype, task="caption", **common.load_options(args))
    try:
        stats = batch.caption_items(
            pipe,
            items,
            args.out,
            prompt=args.prompt,
            batch_size=args.batch_size,
            workers=args.workers,
            max_pixels=args.max_pixels,
            progress=not args.no_progress,
            rank=rank,
            world_size=world,
            barrier=barrier,
            overwrite=args.overwrite,
            retry_errors=args.retry_errors,
            **options,
        )
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return 0
    done = stats.captioned + stats.errors
    failed = stats.errors + stats.earlier_errors
    if world > 1:  # the other ranks' errors are in the merged file
        keys = {it.key for it in items}
        failed = sum(1 for r in batch.iter_jsonl(args.out) if "error" in r and r["image"] in keys)
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
