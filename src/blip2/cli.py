"""`blip2 <command>`: one entry point, one module per command.

Each command module defines `add_arguments(parser)` and `run(args) -> int` and keeps heavy imports
inside `run`, so `blip2 --help` stays fast. Errors a user can cause (`UserError`) print one sentence
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from blip2.errors import UserError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "presets": ("blip2.cli_presets", "list the named model presets"),
    "convert": (
        "blip2.cli_convert",
        "convert a LAVIS checkpoint (or any loadable model) into a blip2 folder",
    ),
    "train": ("blip2.train.cli", "train stage 1, stage 2 or fine-tune, in one process or under torchrun"),
    "cache-features": (
        "blip2.train.feature_cache",
        "run the frozen image encoder once and store its features",
    ),
    "caption": (
        "blip2.commands.caption",
        "caption images: files, folders, globs, shards; resumable JSON lines",
    ),
    "ask": ("blip2.commands.ask", "answer questions about an image"),
    "match": ("blip2.commands.match", "score how well texts match an image (ITM and ITC)"),
    "search": (
        "blip2.commands.search",
        "rank a folder of images for a text query (ITC, then ITM re-ranking)",
    ),
    "serve": ("blip2.commands.serve", "HTTP API and web page for caption, ask, match and search"),
    "eval": ("blip2.eval.cli", "benchmarks: captioning, VQA and retrieval from their standard files"),
    "demo": ("blip2.cli_demo", "train a small BLIP-2 from nothing on CPU and show it works (no download)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2", description="BLIP-2: train, convert, caption, ask, search."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
