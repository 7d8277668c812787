"""blip2: BLIP-2 (Li et al., 2023) on PyTorch: a frozen image encoder and a frozen LLM bridged by a
trainable Q-Former. Stage-1 and stage-2 models, losses, checkpoint interop, training and inference.

`blip2.load(checkpoint)` returns the object of the checkpoint's kind: a `Captioner` for a stage-2
model (caption, ask, chat, stream, generate), a `Retriever` for a stage-1 one (match, similarity,
search, embeddings). `blip2.preset(name, **overrides)` gives a named `Blip2Config` with fields replaced.
"""

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.presets import list_presets, preset

__version__ = "0.1.0"

_PIPELINES = ("load", "Captioner", "Retriever", "Pipeline", "SearchHit", "TruncationWarning", "Video")


def __getattr__(name: str):  # `load` and the pipelines import torch: only when asked for
    if name in _PIPELINES:
        from blip2 import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'blip2' has no attribute {name!r}")


__all__ = [
    "Blip2Config",
    "Captioner",
    "LLMConfig",
    "Pipeline",
    "QFormerConfig",
    "Retriever",
    "SearchHit",
    "TruncationWarning",
    "VisionConfig",
    "Video",
    "list_presets",
    "load",
    "preset",
    "__version__",
]
