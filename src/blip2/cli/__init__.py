"""`blip2 <command>`: one entry point, one module per command in this package.

Each command module (`blip2.cli.caption`, ...) defines `add_arguments(parser)` and `run(args) -> int`
and keeps heavy imports inside `run`; `blip2.cli.options` holds the options several commands share.
Only the module of the command given is imported, so `blip2 --help` and `blip2 --version` never load
torch. Errors a user can cause (`UserError`) print one sentence and exit with status 2, never a
traceback. The `section.key=value` config changes of `train` and `cache-features` may come anywhere on
the line, before or after the options.

Exit codes: 0 everything done; 1 the command ran but some inputs failed (e.g. `caption` wrote error
lines); 2 a usage error (bad option, path, config or model: one sentence on stderr); 130 interrupted.

Global options (before or after the command): `--threads N` sets torch's CPU threads. Unless the
environment sets `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`, an idle OpenMP thread spins only briefly before
it sleeps (`GOMP_SPINCOUNT=1000`): on a quiet machine nearly as fast as the default long spin, on a
shared one it does not fight other processes for the cores (see `SPIN_COUNT`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from blip2.cli.options import apply_threads, global_options
from blip2.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    InputFailed,
    UserError,
    worker_sentence,
)

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "presets": ("blip2.cli.presets", "list the named model presets"),
    "convert": (
        "blip2.cli.convert",
        "convert a LAVIS checkpoint (or any loadable model) into a blip2 folder",
    ),
    "train": ("blip2.cli.train", "train stage 1, stage 2 or fine-tune, in one process or under torchrun"),
    "cache-features": (
        "blip2.cli.cache_features",
        "run the frozen image encoder once and store its features",
    ),
    "caption": (
        "blip2.cli.caption",
        "caption images: files, folders, globs, shards; resumable JSON lines",
    ),
    "ask": ("blip2.cli.ask", "answer questions about an image"),
    "match": ("blip2.cli.match", "score how well texts match an image (ITM and ITC)"),
    "search": (
        "blip2.cli.search",
        "rank a folder of images for a text query (ITC, then ITM re-ranking)",
    ),
    "index": ("blip2.cli.index", "a persistent image index for search: build, add, remove, info"),
    "serve": ("blip2.cli.serve", "HTTP API and web page for caption, ask, match and search"),
    "eval": (
        "blip2.cli.eval",
        "benchmarks: captioning, VQA and retrieval from their standard files; rescore predictions",
    ),
    "demo": ("blip2.cli.demo", "train a small BLIP-2 from nothing on CPU and show it works (no download)"),
}

EPILOG = (
    "exit codes: 0 all done; 1 some inputs failed (e.g. caption error lines); 2 usage error; 130 interrupted"
)


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named in `argv` (the first word that is not an option or an option's value)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--threads":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the module of the command it names is imported (the others'
    options are not needed to parse it), without, every command's."""
    from blip2 import __version__

    parser = argparse.ArgumentParser(
        prog="blip2",
        description="BLIP-2: train, convert, caption, ask, search.",
        epilog=EPILOG,
        parents=[global_options(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"blip2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = None if argv is None else _command_in(argv)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, parents=[global_options(suppress=True)]
        )
        if argv is None or name == wanted:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_module=mod)
    return parser


# How long an idle OpenMP thread spins before it sleeps (libgomp, the OpenMP of torch's Linux wheels).
# A stage-1 step of the demo on 2 cores, measured 2026-12-03 (ms; quiet / beside a second such job):
# libgomp's default spin 400 / 1800, `OMP_WAIT_POLICY=PASSIVE` 590 / 730, 1000 spins 430 / 870.
SPIN_COUNT = "1000"


def set_wait_policy() -> None:
    """Before torch loads: a short spin, unless the environment chose a wait policy itself."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line. Words left after the options of `train` and `cache-features` that look
    like `section.key=value` are their config overrides (`blip2 train CFG --resume auto k=v`);
    anything else left is an error, as argparse would say it."""
    parser = build_parser(argv)
    args, extras = parser.parse_known_args(argv)
    if getattr(args, "_takes_overrides", False):
        args.overrides = [*args.overrides, *(w for w in extras if _is_override(w))]
        extras = [w for w in extras if not _is_override(w)]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _is_override(word: str) -> bool:
    return "=" in word and not word.startswith("-")


def main(argv: list[str] | None = None) -> int:
    set_wait_policy()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    try:
        apply_threads(args.threads)
        return int(args._module.run(args) or 0)
    except InputFailed as e:  # the run stopped at an input it cannot use
        print(f"error: {worker_sentence(e)}", file=sys.stderr)
        return EXIT_SOME_FAILED
    except UserError as e:
        print(f"error: {worker_sentence(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `blip2 presets | head`: the reader has gone, nothing left to say
        sys.stdout = None  # type: ignore[assignment]  # no flush error at exit
        return EXIT_OK
