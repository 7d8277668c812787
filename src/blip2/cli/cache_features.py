"""`blip2 cache-features CONFIG --out DIR [section.key=value ...]`: run the frozen image encoder once over
the dataset of a training config and store its outputs (`blip2.train.feature_cache`); training with
`data.features=DIR` reads them instead of images.

Examples:
    blip2 cache-features configs/stage1-vit-g.yaml --out cache/coco data.path=coco.json
    torchrun --nproc_per_node=8 -m blip2.cli cache-features configs/stage1-vit-g.yaml --out cache/
"""

from __future__ import annotations

import argparse

from blip2.cli import options
from blip2.config import DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a training YAML: its model and data sections say what to encode")
    options.add_overrides(p, "config changes, before or after the options")
    p.add_argument("--out", required=True, help="folder to write the cache to (data.features of training)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder forward")
    p.add_argument("--part-size", type=int, default=4096, help="images per .npy part")
    p.add_argument(
        "--dtype",
        choices=("tower", *DTYPES),
        default="tower",
        help="storage precision (default: the tower's; bfloat16 is stored as float32 by NumPy)",
    )
    p.add_argument("--num-workers", type=int, default=2, help="image-decoding workers")


def run(args: argparse.Namespace) -> int:
    import os

    from blip2.train.config import load_config
    from blip2.train.feature_cache import cache_features

    cfg = load_config(args.config, list(args.overrides))
    stats = cache_features(
        cfg,
        args.out,
        batch_size=args.batch_size,
        part_size=args.part_size,
        dtype=args.dtype,
        num_workers=args.num_workers,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"cached {stats['images']} images to {args.out} ({stats['skipped']} unusable skipped)")
    return 0
