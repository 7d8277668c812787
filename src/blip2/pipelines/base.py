"""What every loaded model offers, whatever its kind: images to pixels, the device, saving, text checks.

`Captioner` (stage 2) and `Retriever` (stage 1) build on `Pipeline`; each has the methods its kind of
checkpoint can serve and no others.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from blip2.config import Blip2Config
from blip2.errors import UserError
from blip2.hub import resolve
from blip2.interop.saving import save_pretrained
from blip2.processing import ImageLike, ImageProcessor


class TruncationWarning(UserWarning):
    """Text longer than the model takes was cut; the message says which text and where."""


P = TypeVar("P", bound="Pipeline")


class Pipeline(ABC):
    """A loaded BLIP-2 model with its image processor (and, in the subclasses, its tokenizer).

    Attributes:
        model: the torch model, in eval mode.
        image_processor: images to pixel tensors (transformers' BLIP processor, bit for bit).
        batch_size: images per forward pass when a list is given.
        methods: the methods this kind of checkpoint offers (what `blip2 serve` serves).
        checkpoint_kind: this kind of checkpoint in words, for messages naming what a method needs.
    """

    batch_size: int = 16
    methods: ClassVar[tuple[str, ...]] = ()
    checkpoint_kind: ClassVar[str] = "a BLIP-2 checkpoint"

    def __init__(self, model: nn.Module, image_processor: ImageProcessor):
        self.model = model.eval()
        self.image_processor = image_processor

    @property
    def config(self) -> Blip2Config:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    def to(self: P, device: str | torch.device) -> P:
        self.model.to(device)
        return self

    def __repr__(self) -> str:
        name = self.config.name or "blip2"
        return f"{type(self).__name__}({name}: {', '.join(self.methods)}; device={self.device})"

    def pixels(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Images (paths, PIL images, arrays, ...) to `(B, 3, S, S)` pixel values on the model's device."""
        return self.image_processor(images).to(self.device)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write the model, its configs, the image processor and the tokenizer to a folder.

        Where transformers has the class, the folder loads there unchanged
        (`Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval.from_pretrained(path)`).
        """
        save_pretrained(self.model, path, self.image_processor, *self._tokenizers())

    @abstractmethod
    def _tokenizers(self) -> tuple[Any, Any]:
        """The texts' tokenizer and an InstructBLIP model's Q-Former tokenizer (else None), to save."""

    # ---------------------------------------------------------------------------- inputs, checked

    def _images(self, images: ImageLike | Sequence[ImageLike]) -> list[Any]:
        """One image or a list as a list; a `(B, C, H, W)` tensor is B images."""
        batch = list(images) if is_batch(images) else [images]
        if not batch:
            raise UserError("no images given")
        return batch

    def _chunks(self, n: int) -> list[slice]:
        step = max(1, int(self.batch_size))
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _check_texts(self, texts: Sequence[str], what: str) -> list[str]:
        out = []
        for t in texts:
            if not isinstance(t, str):
                raise UserError(f"{what} must be text, not {type(t).__name__}")
            if not t.strip():
                raise UserError(f"a {what} is empty: give some words")
            out.append(t)
        return out


def is_batch(images: Any) -> bool:
    """A list or tuple of images, or a `(B, C, H, W)` tensor."""
    return isinstance(images, (list, tuple)) or (isinstance(images, torch.Tensor) and images.dim() == 4)


def broadcast(a: list[Any], b: list[Any], name_a: str, name_b: str) -> tuple[list[Any], list[Any]]:
    """Pair two lists: equal lengths as they are, one item repeated for all of the other list."""
    if len(a) == len(b):
        return a, b
    if len(a) == 1:
        return a * len(b), b
    if len(b) == 1:
        return a, b * len(a)
    raise UserError(f"got {len(a)} {name_a} and {len(b)} {name_b}: pass as many of each, or one of either")


def has_tokenizer(path: Path | None) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")
    return path is not None and path.is_dir() and any((path / n).is_file() for n in names)


def tokenizer_source(
    folder: Path | None, fallback: str | os.PathLike[str] | None, hub: dict[str, Any]
) -> str | None:
    """`folder` when it holds a tokenizer, else `fallback` (a folder, or a hub id fetched), else None."""
    if has_tokenizer(folder):
        return str(folder)
    if fallback is None or fallback == "":
        return None
    return str(resolve(fallback, **hub)) if not Path(fallback).exists() else os.fspath(fallback)
