"""What users call: `blip2.load()` returns the object of the checkpoint's kind.

* `Captioner` (stage 2: a frozen LLM): `caption`, `ask`, `chat`, `stream`, `generate`;
  `InstructCaptioner` (InstructBLIP), the same with each prompt also read by the Q-Former, and a
  `Video` (a file or its frames) wherever an image goes;
* `Retriever` (stage 1: ITC / ITM heads): `match`, `similarity`, `pair_scores`, `search`,
  `embed_images`, `embed_texts`;

both `Pipeline`s (images to pixels, device, `save_pretrained`). Images are paths, PIL images, arrays or
tensors, one or a list; lists are cut into batches of `batch_size` and moved to the model's device and
dtype inside. Text longer than the model takes is truncated with a `TruncationWarning`; empty text is a
`UserError`.
"""

from blip2.pipelines.base import Pipeline, TruncationWarning
from blip2.pipelines.captioner import (
    ASK_DEFAULTS,
    CAPTION_DEFAULTS,
    GENERATION_OPTIONS,
    Captioner,
    check_generation_options,
)
from blip2.pipelines.instruct import InstructCaptioner, Video
from blip2.pipelines.load import load, pipeline_class, pipeline_for
from blip2.pipelines.retriever import Retriever, SearchHit

__all__ = [
    "ASK_DEFAULTS",
    "CAPTION_DEFAULTS",
    "GENERATION_OPTIONS",
    "Captioner",
    "InstructCaptioner",
    "Pipeline",
    "Retriever",
    "SearchHit",
    "TruncationWarning",
    "Video",
    "check_generation_options",
    "load",
    "pipeline_class",
    "pipeline_for",
]
