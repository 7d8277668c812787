"""`blip2 train CONFIG [section.key=value ...]`: stage 1, stage 2 and fine-tuning, one process or torchrun.

Examples:
    blip2 train configs/tiny-stage1.yaml train.max_steps=20
    blip2 train configs/tiny-stage1.yaml --resume auto train.max_steps=40   # overrides anywhere
    torchrun --nproc_per_node=8 -m blip2.cli train configs/stage1-vit-g.yaml --resume auto

`blip2 train --help` lists the config's sections and fields, read from the docstrings of the section
dataclasses in `blip2.train.config`.

Exit status: 0 when the run ended (or `--stop-after` stopped it with a checkpoint); 2 for a config or
input error (one sentence); 128 + the signal number (143 SIGTERM, 130 SIGINT) when a signal stopped it
at a step boundary with a checkpoint (resume with `--resume auto`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import textwrap

from blip2.cli import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = config_help()
    p.add_argument("config", help="YAML job file (see configs/)")
    options.add_overrides(
        p,
        "change config fields (before or after the options), e.g. train.max_steps=100 "
        "data.path='shards/{00000..00009}.tar'",
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


def _field_docs(cls: type) -> dict[str, str]:
    """A dataclass's `Attributes:` docstring section as field -> text (continuation lines joined)."""
    docs: dict[str, str] = {}
    name = None
    in_attributes = False
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        if line.strip() == "Attributes:":
            in_attributes = True
            continue
        if not in_attributes:
            continue
        m = re.match(r"^    (\w+): (.*)$", line)
        if m:
            name = m.group(1)
            docs[name] = m.group(2)
        elif line.startswith("        ") and name is not None:
            docs[name] += " " + line.strip()
        elif line.strip():
            break
    return docs


def config_help() -> str:
    """The config's sections and fields, with defaults, from the section dataclasses' docstrings."""
    from blip2.tasks import registry
    from blip2.train import config as C

    lines = [
        "config (YAML; change any field with section.key=value):",
        f"  task: {' | '.join(registry.names())}",
    ]
    sections = {
        "model": C.ModelSection,
        "data": C.DataSection,
        "eval_data": None,
        "optim": C.OptimSection,
        "train": C.TrainSection,
        "lora": C.LoraSection,
    }
    for section, cls in sections.items():
        if cls is None:
            lines.append(f"  {section}: optional; the fields of data, for evaluation during training")
            continue
        summary = inspect.cleandoc(cls.__doc__ or "").splitlines()[0]
        lines.append(f"  {section}: {summary}")
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            text = f"{f.name} = {json.dumps(default)}: {docs.get(f.name, '')}".rstrip(": ")
            lines.append(textwrap.fill(text, width=100, initial_indent="    ", subsequent_indent="        "))
    return "\n".join(lines)
