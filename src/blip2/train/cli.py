"""`blip2 train CONFIG [section.key=value ...]`: stage 1, stage 2 and fine-tuning, one process or torchrun.

Examples:
    blip2 train configs/tiny-stage1.yaml train.max_steps=20
    torchrun --nproc_per_node=8 -m blip2.cli train configs/stage1-vit-g.yaml --resume auto

Exit status: 0 when the run ended (or `--stop-after` stopped it with a checkpoint); 2 for a config or
input error (one sentence); 128 + the signal number (143 SIGTERM, 130 SIGINT) when a signal stopped it
at a step boundary with a checkpoint (resume with `--resume auto`).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML job file (see configs/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="change config fields, e.g. train.max_steps=100 data.path='shards/{00000..00009}.tar'",
    )
    p.add_argument(
        "--resume",
        metavar="PATH",
        help="continue from a checkpoint, a checkpoints folder or a run folder; 'auto': this run's "
        "output_dir when it has a checkpoint",
    )
    p.add_argument("--output-dir", help="same as train.output_dir=...")
    p.add_argument(
        "--stop-after",
        type=int,
        default=0,
        metavar="N",
        help="stop (with a checkpoint) after N steps of this session, to resume later",
    )


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import sys

    from blip2.train.config import load_config
    from blip2.train.loop import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    result = train(cfg, resume=args.resume, stop_after=args.stop_after, handle_signals=True)
    main = int(os.environ.get("RANK", "0")) == 0
    if result.stopped_by:  # preempted or Ctrl-C: a checkpoint is written; exit as the signal would
        if main:
            print(
                f"stopped by {result.stopped_by} after step {result.steps}: checkpoint {result.checkpoint}; "
                "run the same command with --resume auto to continue",
                file=sys.stderr,
            )
        return 128 + signal.Signals[result.stopped_by].value
    if main:
        where = f"; model in {result.final_dir}" if result.final_dir else f"; checkpoint {result.checkpoint}"
        print(f"trained {result.steps} steps, {result.samples_per_s:.1f} samples/s{where}")
    return 0
