"""A folder `blip2.load` reads, and transformers too where it has the class: the checkpoint surgery a
model with an LLM needs first (`surgery.ensure_image_token`), the weights (`checkpoint.save_folder`),
the image processor and the tokenizers (`processor.save_processors`). What a loaded pipeline's
`save_pretrained` and the end of a training run both write.

transformers' BLIP-2 classes know only the EVA ViT-g tower (`Blip2VisionModel`). A model with another
image encoder (CLIP, SigLIP, DINOv2, ConvNeXt, timm, ...) is written in our layout alone: weights in
our key names in `blip2_model.safetensors` and no `config.json`, so transformers' `from_pretrained`
refuses the folder instead of building a default EVA model in its place; `layout(config)` says which."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from blip2.config import Blip2Config
from blip2.interop import hf
from blip2.interop.checkpoint import save_folder
from blip2.interop.processor import save_processors
from blip2.interop.surgery import ensure_image_token
from blip2.processing import ImageProcessor


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str],
    image_processor: ImageProcessor,
    tokenizer: Any,
    qformer_tokenizer: Any = None,
) -> None:
    """Write `model` with its processors to the folder `path`.

    A model with an LLM gets transformers' `<image>` placeholder first if it has none (added to
    `tokenizer`, the LLM's table grown if needed; `<video>` for a video model).

    Args:
        tokenizer: the texts' tokenizer: the Q-Former's for a retrieval model, the LLM's otherwise.
        qformer_tokenizer: an InstructBLIP model's instruction tokenizer.
    """
    if model.config.llm is not None:
        ensure_image_token(model, tokenizer)
    save_folder(model, path)
    save_processors(path, model.config, image_processor, tokenizer, qformer_tokenizer)


def layout(config: Blip2Config) -> str:
    """Which layout `save_pretrained` writes for `config`, in a few words (what `blip2 convert` prints)."""
    if hf.has_counterpart(config):
        return f"transformers' {hf.architecture(config)} loads it too"
    if config.vision.model_type != hf.EVA_TOWER:
        reason = f"transformers has no BLIP-2 class with a {config.vision.model_type!r} image encoder"
    else:
        reason = "transformers' class of this kind reads text in the Q-Former, which this one lacks"
    return f"our layout: {reason}"
