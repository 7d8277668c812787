"""A folder `blip2.load` reads, and transformers too where it has the class: the checkpoint surgery a
model with an LLM needs first (`surgery.ensure_image_token`), the weights (`checkpoint.save_folder`),
the image processor and the tokenizers (`processor.save_processors`). What a loaded pipeline's
`save_pretrained` and the end of a training run both write."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

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
