"""Options the commands share, each defined once: `--threads`, the device and dtype, the model to load,
transformers' generation flags; and the helpers that read them (loading a model, notices).

No torch at import: `blip2 --help` reads `global_options` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

from blip2.errors import UserError

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


def global_options(suppress: bool) -> argparse.ArgumentParser:
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


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`: where the model runs and the precision of its frozen towers."""
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if there is one)"
    )
    parser.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 for the frozen image encoder and LLM"
    )


def add_model_arguments(
    parser: argparse.ArgumentParser,
    image_limit: bool = True,
    model_help: str | None = None,
    llm: bool = True,
) -> None:
    """`--model`, the device options and what a LAVIS checkpoint file needs to load; with
    `image_limit`, `--max-pixels`; with `llm`, the options of a model's LLM: `--llm` and the placement
    of a large one (`add_llm_placement`). `llm=False`: a command that loads retrieval models only
    (`match`, `search`, `index`). With `model_help`, `--model` is optional and says so (a command that
    can take the model from elsewhere, as an index names its own)."""
    parser.add_argument(
        "--model",
        required=model_help is None,
        help=model_help or "hub id, model folder or LAVIS checkpoint file",
    )
    add_device_arguments(parser)
    add_loading_arguments(parser, llm=llm)
    if llm:
        add_llm_placement(parser)
    if image_limit:
        add_max_pixels(parser)


def add_loading_arguments(parser: argparse.ArgumentParser, llm: bool = True) -> argparse._ArgumentGroup:
    """`--preset`, `--vision-weights`, `--llm` (with `llm`), `--tokenizer`: what a LAVIS checkpoint file
    needs to load (`load_options` reads them). Returns their group, for a command's own loading options."""
    loading = parser.add_argument_group("checkpoints that need more to load (LAVIS .pth files)")
    loading.add_argument("--preset", help="which model a LAVIS checkpoint file is (`blip2 presets`)")
    loading.add_argument(
        "--vision-weights",
        help="image encoder: LAVIS file (eva_vit_g.pth, clip_vit_L.pth) or transformers folder",
    )
    if llm:
        loading.add_argument("--llm", help="LLM folder or hub id of a LAVIS stage-2 checkpoint")
    loading.add_argument("--tokenizer", help="tokenizer folder or hub id when the model has none beside it")
    return loading


def add_llm_placement(parser: argparse.ArgumentParser) -> None:
    """`--device-map`, `--max-memory`, `--offload-folder`, `--load-in-8bit`, `--load-in-4bit`: an LLM
    placed over devices by accelerate, or quantized by bitsandbytes (`load_options` reads them)."""
    group = parser.add_argument_group("large LLMs (stage-2 models)")
    group.add_argument(
        "--device-map",
        type=_device_map,
        help="place the LLM's layers: auto (GPUs, then CPU, then disk), balanced, sequential, or a JSON map",
    )
    group.add_argument(
        "--max-memory",
        type=_max_memory,
        help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB",
    )
    group.add_argument("--offload-folder", help="with --device-map: where layers offloaded to disk go")
    group.add_argument(
        "--load-in-8bit", action="store_true", help="quantize the LLM to 8 bits (bitsandbytes, CUDA)"
    )
    group.add_argument(
        "--load-in-4bit", action="store_true", help="quantize the LLM to 4 bits (bitsandbytes, CUDA)"
    )


def _device_map(text: str) -> str | dict[str, Any]:
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"use auto, balanced, sequential or a JSON object, not {text!r}")
    return value


def _max_memory(text: str) -> dict[int | str, str]:
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, amount = part.partition("=")
        if not sep or not device.strip() or not amount.strip():
            raise argparse.ArgumentTypeError(f"use DEVICE=AMOUNT pairs like 0=20GiB,cpu=60GiB, not {text!r}")
        device = device.strip()
        out[int(device) if device.isdigit() else device] = amount.strip()
    return out


def add_max_pixels(parser: argparse.ArgumentParser) -> None:
    from blip2.processing import DEFAULT_MAX_PIXELS

    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images with more pixels than this (decompression bombs)",
    )


SAMPLING = ("top_p", "temperature")


def add_generation_arguments(
    parser: argparse.ArgumentParser, sampling: bool = True, defaults: str = "the checkpoint's"
) -> None:
    """transformers' `generate` options as flags (`--num-beams`, ...); with `sampling`, also
    `--do-sample`, `--top-p` and `--temperature`. `defaults` says what an absent flag means."""
    group = parser.add_argument_group(f"generation (transformers' generate options; defaults: {defaults})")
    for name, (kind, help_text) in GENERATION_ARGS.items():
        if sampling or name not in SAMPLING:
            group.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    if sampling:
        group.add_argument(
            "--do-sample", action="store_true", default=None, help="sample instead of searching"
        )


DECODE_MODES = ("fast", "static", "compiled", "transformers")  # `blip2.generation.Decoding.MODES`


def add_decode_mode_argument(parser: argparse.ArgumentParser) -> None:
    """`--decode-mode`: how the model decodes (the same tokens every way; `compiled` is the fastest
    for many batches of one shape, after compiling its step once)."""
    parser.add_argument(
        "--decode-mode",
        choices=DECODE_MODES,
        default=None,
        help="fast (default): the lean loop; static: a static KV cache; compiled: static with the step "
        "compiled (fastest for long jobs, compiles first); transformers: its own generate",
    )


def set_decode_mode(pipe: Any, args: argparse.Namespace) -> None:
    """The pipeline decodes the way `--decode-mode` says (generated tokens do not change)."""
    if getattr(args, "decode_mode", None) is not None:
        pipe.decoding.mode = args.decode_mode


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


def add_overrides(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The `section.key=value` config changes of `train` and `cache-features`: given anywhere on the
    line, before or after the options (`blip2.cli.main` gathers the ones after)."""
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=help_text)
    parser.set_defaults(_takes_overrides=True)


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """`blip2.load`'s extra options given on the command line (`add_loading_arguments`)."""
    names = ("preset", "vision_weights", "llm", "tokenizer", "device_map", "max_memory", "offload_folder")
    out = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    out.update({n: True for n in ("load_in_8bit", "load_in_4bit") if getattr(args, n, False)})
    return out


def load_pipeline(
    model: str,
    device: str | None = None,
    dtype: str | None = None,
    method: str | None = None,
    what: str | None = None,
    **options: Any,
) -> Any:
    """`blip2.load` for a command: anything that goes wrong is one sentence (`UserError`).

    Args:
        method: a method the command needs (`caption`, `match`, ...); a checkpoint of the other kind
            (`Captioner` or `Retriever`) is refused with a sentence naming the kind to use.
        what: what needs that kind, in the refusal (default: `method`), e.g. "`blip2 eval vqa`".
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
    if method is not None:
        from blip2.pipelines import Captioner, Retriever

        need = Captioner if method in Captioner.methods else Retriever
        if not isinstance(pipe, need):
            raise UserError(
                f"{what or method} needs {need.checkpoint_kind}; {model} is a {type(pipe).__name__.lower()} "
                f"checkpoint, which offers {', '.join(pipe.methods)}"
            )
    return pipe


def show_notices() -> None:
    """Print warnings (e.g. truncated text) as one `notice:` line on stderr, without file and line."""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        print(f"notice: {message}", file=sys.stderr)

    warnings.showwarning = show  # type: ignore[assignment]
