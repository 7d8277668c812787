"""`blip2 presets`: list the named presets (or print one as JSON)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="print this preset's config as JSON")


def run(args: argparse.Namespace) -> int:
    from blip2.errors import UserError
    from blip2.presets import PRESETS, list_presets, preset

    if args.name:
        if args.name not in PRESETS:
            raise UserError(f"unknown preset {args.name!r}; `blip2 presets` lists them")
        print(preset(args.name).to_json())
        return 0
    for name in list_presets():
        cfg = preset(name)
        llm = cfg.llm.name or cfg.llm.model_type if cfg.llm else "-"
        print(f"{name:28s} {cfg.kind:10s}  vision {cfg.vision.model_type}@{cfg.vision.image_size}  llm {llm}")
    return 0
