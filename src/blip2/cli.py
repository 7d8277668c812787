"""`blip2 <command>`: one entry point, one module per command.

Each command module defines `add_arguments(parser)` and `run(args) -> int` and keeps heavy imports
inside `run`. Only the module of the command given is imported, so `blip2 --help` and `blip2 --version`
never load torch. Errors a user can cause (`UserError`) print one sentence and exit with status 2,
never a traceback.

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

EPILOG = (
    "exit codes: 0 all done; 1 some inputs failed (e.g. caption error lines); 2 usage error; 130 interrupted"
)


def _global_options(suppress: bool) -> argparse.ArgumentParser:
    """`--threads`, accepted before the command and after it (`blip2 --threads 2 demo`, `blip2 demo
    --threads 2`); in a subcommand its default is suppressed so it does not hide the global value."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--threads",
        type=int,
        default=argparse.SUPPRESS if suppress else None,
        metavar="N",
        help="CPU threads for torch (default: torch's, usually the number of cores)",
    )
    return p


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
        parents=[_global_options(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"blip2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = None if argv is None else _command_in(argv)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, parents=[_global_options(suppress=True)]
        )
        if argv is None or name == wanted:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_module=mod)
    return parser


def apply_threads(threads: int | None) -> None:
    """Set the CPU thread count (`--threads`) for torch and for processes started from here."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be 1 or more, not {threads}")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


# How long an idle OpenMP thread spins before it sleeps (libgomp, the OpenMP of torch's Linux wheels).
# A stage-1 step of the demo on 2 cores, measured 2026-12-03 (ms; quiet / beside a second such job):
# libgomp's default spin 400 / 1800, `OMP_WAIT_POLICY=PASSIVE` 590 / 730, 1000 spins 430 / 870.
SPIN_COUNT = "1000"


def set_wait_policy() -> None:
    """Before torch loads: a short spin, unless the environment chose a wait policy itself."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def main(argv: list[str] | None = None) -> int:
    set_wait_policy()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
