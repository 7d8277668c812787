"""Images and text in: robust image loading, the eval and train image transforms, caption cleaning.

Written with PIL, numpy and torch only (no torchvision). The eval transform equals transformers'
`BlipImageProcessor` PIL backend and LAVIS's `blip_image_eval`: RGB, bicubic resize to exactly
`size x size` (no crop, aspect ratio not kept), scale by 1/255, normalize with the CLIP mean and std.
The train transform is the paper's: random resized crop (scale 0.5-1) and horizontal flip.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from blip2.config import CLIP_MEAN, CLIP_STD
from blip2.errors import UserError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold

ImageLike = Any  # a path, bytes, a PIL image, a numpy array (H, W[, C]) or a tensor (C, H, W)


class ImageError(UserError, ValueError):
    """An input that is not a usable image; the message is one sentence a user can act on."""


def _to_pil(src: ImageLike) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise ImageError(f"image file not found: {path}")
        if os.path.isdir(path):
            raise ImageError(f"{path} is a folder, not an image file")
        return Image.open(path)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(src)))
    if isinstance(src, torch.Tensor):
        src = src.detach().cpu()
        if src.dim() == 3 and src.shape[0] in (1, 3, 4):
            src = src.permute(1, 2, 0)
        arr = src.numpy()
        if arr.dtype != np.uint8:
            arr = (
                (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
                if arr.max() <= 1
                else arr.astype(np.uint8)
            )
        src = arr
    if isinstance(src, np.ndarray):
        arr = src.squeeze(-1) if src.ndim == 3 and src.shape[-1] == 1 else src
        return Image.fromarray(arr)
    raise ImageError(
        f"cannot read an image from a {type(src).__name__}: pass a path, bytes, a PIL image or an array"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any PIL mode: alpha is composited on white (as transformers does), 16-bit is scaled to 8."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray((np.clip(arr / top, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        return Image.fromarray((np.clip(arr / top, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(src: ImageLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and decode an image fully, apply its EXIF orientation, return RGB.

    Raises:
        ImageError: missing file, not an image, truncated data, or more than `max_pixels` pixels.
    """
    name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "image"
    try:
        image = _to_pil(src)
        w, h = image.size
        if w * h > max_pixels:
            raise ImageError(
                f"{name} has {w}x{h} pixels, more than the limit of {max_pixels}; resize it first"
            )
        if w < 1 or h < 1:
            raise ImageError(f"{name} is empty (0 pixels)")
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{name} is too large to decode safely (decompression bomb limit)") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, Image.UnidentifiedImageError):
            raise ImageError(f"{name} is not an image file PIL can read") from None
        raise ImageError(
            f"{name} could not be decoded ({str(e).strip() or type(e).__name__}): is it truncated?"
        ) from None


class ImageProcessor:
    """Turns images into normalized `(B, 3, size, size)` float32 tensors.

    Args:
        size: output side in pixels (224, or 364 for the COCO fine-tuned checkpoints).
        mean, std: per-channel normalization (CLIP's by default).
        max_pixels: larger inputs are refused (decompression bombs).
    """

    def __init__(
        self,
        size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.max_pixels = max_pixels

    def _finish(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), resample=Image.BICUBIC)
        arr = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)  # (H, W, 3)
        arr = (arr - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def preprocess(self, image: ImageLike) -> torch.Tensor:
        """Eval transform of one image: `(3, size, size)`."""
        return self._finish(load_image(image, self.max_pixels))

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Eval transform of one image or a list: `(B, 3, size, size)`."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self.preprocess(im) for im in images])

    def train_transform(
        self,
        image: ImageLike,
        generator: torch.Generator | None = None,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
    ) -> torch.Tensor:
        """Train transform: random resized crop (area `scale`, aspect `ratio`, bicubic) + horizontal flip."""
        image = load_image(image, self.max_pixels)
        w, h = image.size

        def rand() -> float:
            return torch.rand((), generator=generator).item()

        box = (0, 0, w, h)
        area = w * h
        for _ in range(10):
            target = area * (scale[0] + (scale[1] - scale[0]) * rand())
            log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand()
            aspect = math.exp(log_r)
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = int(rand() * (w - cw + 1)), int(rand() * (h - ch + 1))
                box = (x, y, x + cw, y + ch)
                break
        else:  # central crop with the closest allowed aspect ratio
            aspect = min(max(w / h, ratio[0]), ratio[1])
            cw, ch = (w, round(w / aspect)) if w / h < ratio[0] else (round(h * aspect), h)
            cw, ch = min(cw, w), min(ch, h)
            box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        image = image.resize((self.size, self.size), resample=Image.BICUBIC, box=box)
        if flip and rand() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return self._finish(image)


# ------------------------------------------------------------------------------------------------ text

_CAPTION_CHARS = re.compile(r"([.!\"()*#:;~])")


def clean_caption(text: str, max_words: int = 50, prompt: str = "") -> str:
    """LAVIS's `blip_caption`: lowercase, punctuation `.!"()*#:;~` to spaces, collapse spaces, cut."""
    text = _CAPTION_CHARS.sub(" ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return prompt + " ".join(text.split(" ")[:max_words])


def clean_question(text: str, max_words: int = 50) -> str:
    """LAVIS's `blip_question`: lowercase, drop `.!"()*#:;~`, cut to `max_words`."""
    text = re.sub(r"([.!\"()*#:;~])", "", text.lower()).rstrip(" ")
    return " ".join(text.split(" ")[:max_words])


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a silently grey image
