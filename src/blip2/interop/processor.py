"""The image processor both ways: ours from a checkpoint folder, transformers' for a folder we write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blip2.config import Blip2Config
from blip2.errors import UserError
from blip2.processing import ImageProcessor


def image_processor(folder: Path | None, config: Blip2Config) -> ImageProcessor:
    """Our image processor from a folder's `preprocessor_config.json` (hub layout) or
    `processor_config.json` (transformers 5 layout; a video model's video processor, which processes
    each frame as this one does an image), else from the config."""
    settings: dict[str, Any] | None = None
    if folder is not None:
        if (folder / "preprocessor_config.json").is_file():
            settings = json.loads((folder / "preprocessor_config.json").read_text())
        elif (folder / "processor_config.json").is_file():
            saved = json.loads((folder / "processor_config.json").read_text())
            settings = saved.get("image_processor") or saved.get("video_processor")
    v = config.vision
    if not settings:
        return ImageProcessor(v.image_size, v.image_mean, v.image_std)
    size = settings.get("size", {})
    side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    if isinstance(size, dict) and size.get("width", side) != side:
        raise UserError(f"the image processor resizes to {size}; only square sizes are supported")
    if settings.get("resample", 3) != 3 or settings.get("do_center_crop"):
        raise UserError("the image processor does not resize bicubically without cropping, as BLIP-2's does")
    return ImageProcessor(
        int(side or v.image_size),
        settings.get("image_mean", v.image_mean),
        settings.get("image_std", v.image_std),
    )


def to_transformers(processor: ImageProcessor) -> Any:
    """transformers' `BlipImageProcessorPil` doing what `processor` does (for `save_pretrained`)."""
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(
        size={"height": processor.size, "width": processor.size},
        resample=3,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(x) for x in processor.mean],
        image_std=[float(x) for x in processor.std],
        do_convert_rgb=True,
    )
