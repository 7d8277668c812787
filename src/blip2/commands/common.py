"""Options and helpers the usage commands share: the model, generation options, notices."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from blip2.errors import UserError
from blip2.processing import DEFAULT_MAX_PIXELS

# name -> (type, help); transformers' names, so they pass straight to `generate`
GENERATION_ARGS: dict[str, tuple[Any, str]] = {
    "num_beams": (int, "beams for beam search (1: greedy or sampling)"),
    "max_new_tokens": (int, "most tokens to generate"),
    "min_new_tokens": (int, "fewest tokens to generate"),
    "length_penalty": (float, "beam search length penalty"),
    "repetition_penalty": (float, "penalty on repeated tokens (1: none)"),
    "top_p": (float, "nucleus sampling probability mass (with --do-sample)"),
    "temperature": (float, "sampling temperature (with --do-sample)"),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id or path of a BLIP-2 checkpoint")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if there is one)"
    )
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 for the frozen towers")
    loading = parser.add_argument_group("checkpoints that need more to load (LAVIS .pth files)")
    loading.add_argument("--preset", help="which model a LAVIS checkpoint file is (`blip2 presets`)")
    loading.add_argument("--vision-weights", help="LAVIS image-encoder file (eva_vit_g.pth, clip_vit_L.pth)")
    loading.add_argument("--llm", help="LLM folder or hub id of a LAVIS stage-2 checkpoint")
    loading.add_argument("--tokenizer", help="tokenizer folder or hub id when the model has none beside it")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images with more pixels than this (decompression bombs)",
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (transformers' generate options)")
    for name, (kind, help_text) in GENERATION_ARGS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    group.add_argument("--do-sample", action="store_true", default=None, help="sample instead of searching")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generation options given on the command line (the pipeline's defaults fill the rest);
    values out of range are a `UserError`."""
    from blip2.pipelines.captioner import check_generation_options

    names = [*GENERATION_ARGS, "do_sample"]
    options = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    check_generation_options(options)
    return options


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """`blip2.load`'s extra options given on the command line (`add_model_arguments`)."""
    names = ("preset", "vision_weights", "llm", "tokenizer")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def load_pipeline(
    model: str,
    device: str | None = None,
    dtype: str | None = None,
    task: str | None = None,
    **options: Any,
) -> Any:
    """`blip2.load` for a command: anything that goes wrong is one sentence (`UserError`).

    Args:
        task: the method the command needs (`caption`, `match`, ...); a checkpoint of the other kind
            (`Captioner` or `Retriever`) is refused with a sentence naming the kind to use.
        options: more `blip2.load` options (`load_options`).
    """
    import blip2

    try:
        pipe = blip2.load(model, device=device or default_device(), dtype=dtype, **options)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load a BLIP-2 model from {model} ({reason})") from None
    if task is not None:
        from blip2.pipelines import Captioner, Retriever

        need = Captioner if task in Captioner.tasks else Retriever
        if not isinstance(pipe, need):
            raise UserError(
                f"{task} needs {need.checkpoint_kind}; {model} is a {type(pipe).__name__.lower()} "
                f"checkpoint, which offers {', '.join(pipe.tasks)}"
            )
    return pipe


def show_notices() -> None:
    """Print warnings (e.g. truncated text) as one `notice:` line on stderr, without file and line."""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        print(f"notice: {message}", file=sys.stderr)

    warnings.showwarning = show  # type: ignore[assignment]
