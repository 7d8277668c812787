"""blip2: BLIP-2 (Li et al., 2023) on PyTorch: a frozen image encoder and a frozen LLM bridged by a
trainable Q-Former. Stage-1 and stage-2 models, losses, checkpoint interop, training and inference."""

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig, list_presets, preset

__version__ = "0.1.0"


def __getattr__(name: str):  # `load` and `Pipeline` import torch: only when asked for
    if name in ("load", "Pipeline"):
        from blip2 import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'blip2' has no attribute {name!r}")


__all__ = [
    "Blip2Config",
    "LLMConfig",
    "Pipeline",
    "QFormerConfig",
    "VisionConfig",
    "list_presets",
    "load",
    "preset",
    "__version__",
]
