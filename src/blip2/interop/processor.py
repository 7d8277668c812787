"""The processors both ways: our image processor from a checkpoint folder; for a folder we write,
transformers' image processor and the tokenizers, saved as transformers' processor class of the model's
kind saves them (`save_processors`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blip2.config import Blip2Config
from blip2.errors import UserError
from blip2.processing import ImageProcessor

QFORMER_TOKENIZER = "qformer_tokenizer"  # the Q-Former's tokenizer's subfolder (InstructBLIP's layout)


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


def save_processors(
    path: str | Path,
    config: Blip2Config,
    image_processor: ImageProcessor,
    tokenizer: Any,
    qformer_tokenizer: Any = None,
) -> None:
    """Write the image processor and the tokenizers beside a model's weights, where `blip2.load` and
    transformers' processor class of the model's kind read them.

    Args:
        path: the model's folder.
        config: the model's config (its kind picks the layout).
        image_processor: our image processor.
        tokenizer: the texts' tokenizer: the Q-Former's for a retrieval model, the LLM's otherwise.
        qformer_tokenizer: an InstructBLIP model's Q-Former tokenizer (the instruction's).
    """
    path = Path(path)
    hf_image_processor = to_transformers(image_processor)
    hf_image_processor.save_pretrained(str(path))
    SAVERS[config.kind](path, config, hf_image_processor, tokenizer, qformer_tokenizer)


def _save_retrieval(path: Path, config: Blip2Config, image_processor: Any, tokenizer: Any, _: Any) -> None:
    tokenizer.save_pretrained(str(path))


def _save_generation(path: Path, config: Blip2Config, image_processor: Any, tokenizer: Any, _: Any) -> None:
    from transformers import Blip2Processor

    Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=config.qformer.num_query_tokens
    ).save_pretrained(str(path))


def _save_instruct(
    path: Path, config: Blip2Config, image_processor: Any, tokenizer: Any, qformer_tokenizer: Any
) -> None:
    """transformers' `InstructBlipProcessor` (both tokenizers, the image processor); for a video model
    what its `InstructBlipVideoProcessor.save_pretrained` writes, written directly (its video processor
    needs torchvision, which we do not): the LLM's tokenizer, the Q-Former's in `qformer_tokenizer/`, and
    `processor_config.json` with the image processor's settings as the video processor's (they process
    frames alike)."""
    from transformers import InstructBlipProcessor

    if qformer_tokenizer is None:
        raise ValueError("an InstructBLIP model is saved with its Q-Former tokenizer")
    if not config.video_frames:
        InstructBlipProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            qformer_tokenizer=qformer_tokenizer,
            num_query_tokens=config.qformer.num_query_tokens,
        ).save_pretrained(str(path))
        return
    tokenizer.save_pretrained(str(path))
    qformer_tokenizer.save_pretrained(str(path / QFORMER_TOKENIZER))
    settings = {k: v for k, v in image_processor.to_dict().items() if k != "image_processor_type"}
    video = {**settings, "do_sample_frames": False, "video_processor_type": "InstructBlipVideoVideoProcessor"}
    processor = {
        "num_query_tokens": config.qformer.num_query_tokens,
        "processor_class": "InstructBlipVideoProcessor",
        "video_processor": dict(sorted(video.items())),
    }
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


# how each model kind's processors are saved (transformers' processor class of the kind)
SAVERS = {"retrieval": _save_retrieval, "generation": _save_generation, "instruct": _save_instruct}
