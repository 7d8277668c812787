"""`blip2.load(...)`: a checkpoint in, the object of its kind out (a `Captioner` or a `Retriever`).

An LLM too large for one device can be placed by accelerate (`device_map="auto"`, with `max_memory`
per device and an `offload_folder` for what goes to disk) and quantized to 8 or 4 bits by
bitsandbytes on CUDA (`load_in_8bit`, `load_in_4bit`): the LLM is reloaded through transformers'
own `from_pretrained`, which does both; the image side (tower, Q-Former, projection) goes to `device`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip2.config import DTYPES, Blip2Config
from blip2.devices import check_device
from blip2.errors import UserError
from blip2.hub import resolve
from blip2.interop import loading
from blip2.interop.processor import QFORMER_TOKENIZER, image_processor
from blip2.interop.surgery import add_lavis_pad_token, ensure_image_token
from blip2.pipelines.base import has_tokenizer, tokenizer_source
from blip2.pipelines.captioner import Captioner
from blip2.pipelines.instruct import InstructCaptioner
from blip2.pipelines.retriever import Retriever
from blip2.processing import ImageProcessor


def load(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    preset: str | None = None,
    config: Blip2Config | str | os.PathLike[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    vision_weights: str | os.PathLike[str] | None = None,
    llm: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
) -> Captioner | Retriever:
    """Load a BLIP-2 checkpoint as the object of its kind.

    A stage-2 checkpoint (with an LLM) gives a `Captioner` (`caption`, `ask`, `chat`, `stream`,
    `generate`), an InstructBLIP one an `InstructCaptioner` (a `Captioner` whose prompts also reach the
    Q-Former); a stage-1 checkpoint gives a `Retriever` (`match`, `similarity`, `search`,
    `embed_images`, `embed_texts`, `pair_scores`). Each has only the methods its kind can serve:
    `isinstance(model, blip2.Captioner)` tells which one was loaded.

    Args:
        name_or_path: one of
            - a hub id (`Salesforce/blip2-opt-2.7b`, `-opt-6.7b`, `-flan-t5-xl`, `-flan-t5-xxl`, the
              `-coco` variants, `blip2-itm-vit-g`, `Salesforce/instructblip-vicuna-7b`, `-vicuna-13b`,
              `-flan-t5-xl`, `-flan-t5-xxl`): downloaded or taken from the hub cache;
            - a transformers BLIP-2 or InstructBLIP folder (`config.json` + weights), or a folder from `save_pretrained`;
            - a LAVIS checkpoint file (`blip2_pretrained_opt2.7b.pth`, ...); give `preset` unless the
              file has its released name, or `config` when its sizes match no preset.
        device: where to put the model (default CPU).
        dtype: "float32" (default), "bfloat16" or "float16" for the frozen image encoder and LLM; the
            Q-Former, queries, `ln_vision` and projection stay in float32.
        preset: the preset a LAVIS checkpoint belongs to (`blip2 presets` lists them).
        config: a `Blip2Config`, or a JSON file of one (`blip2 presets NAME` prints one to edit), for a
            LAVIS checkpoint of other sizes than the presets' (e.g. a small Q-Former trained with LAVIS).
        revision, cache_dir, local_files_only: hub options (`huggingface_hub.snapshot_download`).
        vision_weights: the image encoder of a LAVIS checkpoint without one: LAVIS's file of it
            (`eva_vit_g.pth`, `clip_vit_L.pth`; default: that file name beside the checkpoint) or a
            transformers folder or hub id of the tower (default: `config.vision.hf_config`'s
            `_name_or_path`, when set).
        llm: the LLM (transformers folder or hub id) of a LAVIS stage-2 checkpoint; default: the
            preset's (`facebook/opt-2.7b`, `google/flan-t5-xl`, ...).
        tokenizer: the tokenizer folder or hub id when the checkpoint has none beside it.
        device_map: where the LLM's layers go (accelerate): `"auto"` (spread over the GPUs, then the
            CPU, then disk), or a transformers device map; the rest of the model goes to `device`.
        max_memory: with `device_map`, the most memory each device may hold, e.g.
            `{0: "20GiB", "cpu": "60GiB"}`.
        offload_folder: with `device_map`, where layers offloaded to disk are kept (default: a
            temporary folder).
        load_in_8bit, load_in_4bit: quantize the LLM's linear layers with bitsandbytes (CUDA only; the
            `quant` extra); the model is for inference then.

    Raises:
        UserError: a missing path, an unreachable hub id, a checkpoint that does not fit (naming the
            keys), an unknown dtype or preset, a config file that is not one.
    """
    if device is not None:
        device = check_device(device)  # a device this machine lacks: one sentence, before any loading
    quantize = _quantization(load_in_8bit, load_in_4bit, device)
    placed = quantize is not None or device_map is not None
    if placed and device_map is None and max_memory is not None:
        raise UserError("max_memory (--max-memory) limits a device map: give device_map='auto' too")
    dtype_name = _dtype_name(dtype)
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    name = os.fspath(name_or_path)
    loaded = loading.load_model(
        name,
        resolve(name, **hub),
        dtype=dtype_name,
        preset_name=preset,
        config=config,
        vision_weights=vision_weights,
        llm=llm,
        hub=hub,
    )
    model, folder = loaded.model, loaded.folder
    kind = pipeline_class(model.config)
    texts = [_tokenizer(kind, loaded, tokenizer, hub)]
    if issubclass(kind, InstructCaptioner):  # and the Q-Former's, for the instructions
        texts.append(_instruction_tokenizer(folder))
    pipe = kind(model, image_processor(folder, model.config), *texts)
    if loaded.from_lavis and isinstance(pipe, Captioner):  # to transformers' conventions, as released
        add_lavis_pad_token(pipe.model, pipe.llm_tokenizer)  # InstructBLIP Vicuna's [PAD]
        ensure_image_token(pipe.model, pipe.llm_tokenizer)
    if placed:
        if not isinstance(pipe, Captioner):
            raise UserError(f"{name} is a stage-1 model without an LLM: device maps and 8/4-bit are for LLMs")
        place_llm(pipe.model, device or torch.device("cpu"), device_map, max_memory, offload_folder, quantize)
        return pipe
    return pipe.to(device) if device is not None else pipe


def _quantization(load_in_8bit: bool, load_in_4bit: bool, device: torch.device | None) -> Any:
    """transformers' `BitsAndBytesConfig` for the flags, None for neither; a machine that cannot run
    bitsandbytes is one sentence, before anything loads."""
    if not (load_in_8bit or load_in_4bit):
        return None
    flag = "--load-in-8bit" if load_in_8bit else "--load-in-4bit"
    if load_in_8bit and load_in_4bit:
        raise UserError("choose one of --load-in-8bit and --load-in-4bit")
    if not torch.cuda.is_available():
        raise UserError(
            f"{flag} quantizes the LLM with bitsandbytes, which runs on a CUDA GPU, and this machine has "
            "none: load the model without it (or with --dtype bfloat16)"
        )
    if device is not None and device.type != "cuda":
        raise UserError(f"{flag} quantizes the LLM for a CUDA GPU: use --device cuda, not {device}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"{flag} needs the bitsandbytes package: pip install 'blip2[quant]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)


def _map_target(device: torch.device) -> int | str:
    """`device` as a device map names it: a CUDA device by its index, others by name."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return str(device)


def place_llm(
    model: nn.Module,
    device: torch.device,
    device_map: str | dict[str, Any] | None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    quantization: Any = None,
) -> None:
    """Move `model` to `device` except its LLM, which transformers' `from_pretrained` reloads with
    `device_map` (accelerate; default: all on `device`) and `quantization` (a `BitsAndBytesConfig`).

    The LLM is written to `offload_folder/llm` first (transformers places and quantizes weights as it
    reads them; default: a temporary folder), which is deleted unless layers were offloaded to disk
    (they are read from there). The LLM is frozen and in eval mode after, as before.
    """
    import shutil
    import tempfile

    from blip2.models import language

    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise UserError(
            "placing the LLM with a device map needs the accelerate package: pip install 'blip2[quant]'"
        ) from None
    llm = model.llm
    dtype = language.llm_dtype(llm)
    kind = language.auto_class(llm.config)
    # the LLM's weights as transformers reads them; layers offloaded to disk are read from here later
    offload = Path(offload_folder) if offload_folder is not None else Path(tempfile.mkdtemp(prefix="blip2-"))
    source = offload / "llm"
    llm.save_pretrained(source)
    del model.llm, llm  # the image side moves alone; the LLM's copy on the CPU is freed
    model.to(device)
    try:
        placed = kind.from_pretrained(
            source,
            dtype=dtype,
            device_map=device_map if device_map is not None else {"": _map_target(device)},
            max_memory=max_memory,
            offload_folder=str(offload),
            quantization_config=quantization,
        )
    except (ValueError, RuntimeError, OSError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"the LLM could not be placed with device_map={device_map!r} ({reason})") from None
    if "disk" not in (getattr(placed, "hf_device_map", None) or {}).values():
        shutil.rmtree(source if offload_folder is not None else offload, ignore_errors=True)
    model.llm = language.freeze(language.tie_input_embeddings(placed)).eval()


# what users get for each model kind (`Blip2Config.kind`)
PIPELINES: dict[str, type[Captioner] | type[Retriever]] = {
    "retrieval": Retriever,
    "generation": Captioner,
    "instruct": InstructCaptioner,
}


def pipeline_class(config: Blip2Config) -> type[Captioner] | type[Retriever]:
    """The object users get for a model of `config`'s kind (`PIPELINES`)."""
    return PIPELINES[config.kind]


def pipeline_for(model: nn.Module, image_processor: ImageProcessor, tokenizer: Any) -> Captioner | Retriever:
    """The object of `model`'s kind (`pipeline_class`) around a model built in Python, with its image
    processor and tokenizer (the Q-Former's for a `Retriever`, the LLM's for a `Captioner`)."""
    return pipeline_class(model.config)(model, image_processor, tokenizer)


def _tokenizer(
    kind: type[Captioner] | type[Retriever],
    loaded: loading.Loaded,
    tokenizer: str | os.PathLike[str] | None,
    hub: dict[str, Any],
) -> Any:
    """The Q-Former's tokenizer of a `Retriever`, the LLM's of a `Captioner`: `tokenizer` when given,
    else the one beside the checkpoint, else (LLM) the LAVIS LLM folder's or the config's LLM's."""
    from blip2 import tokenizers

    folder = loaded.folder
    if kind is Retriever:
        source = str(tokenizer) if tokenizer else (str(folder) if has_tokenizer(folder) else None)
        return tokenizers.qformer_tokenizer(source)
    source = tokenizer_source(folder if tokenizer is None else None, tokenizer or loaded.llm_folder, hub)
    if source is None:
        source = tokenizer_source(None, loaded.model.config.llm.name, hub)
    if source is None:
        raise UserError(
            "no tokenizer found for the LLM: pass --tokenizer (tokenizer= in blip2.load) a folder or hub id"
        )
    return tokenizers.llm_tokenizer(source)


def _instruction_tokenizer(folder: Path | None) -> Any:
    """The Q-Former's tokenizer saved beside an InstructBLIP checkpoint (its `qformer_tokenizer`
    subfolder), else None (the default: bert-base-uncased)."""
    from blip2 import tokenizers

    if folder is None or not has_tokenizer(folder / QFORMER_TOKENIZER):
        return None
    return tokenizers.qformer_tokenizer(str(folder / QFORMER_TOKENIZER), truncation_side="left")


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return dtype
