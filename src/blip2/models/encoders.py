"""Frozen image encoders behind one small interface.

`ImageEncoder(config)` wraps a transformers vision model:

* `features(pixel_values)` -> `(B, N, D)` image features, *before* `ln_vision` (what a feature cache
  stores; computed without autograd, in the tower's precision);
* `normalize(image_features)` -> image embeddings through `ln_vision`, the trainable LayerNorm of the
  paper;
* `forward(pixel_values)` = both.

Towers:
* `blip_2_vision_model` (transformers' `Blip2VisionModel`) is the 39-block EVA ViT-g of the released
  checkpoints. Its `post_layernorm` *is* LAVIS's `ln_vision`: it is moved out of the tower and becomes
  `ln_vision` (so nothing is normalized twice and no extra block is dropped).
* `clip_vision_model` (`CLIPVisionModel`) as LAVIS uses CLIP ViT-L: the tower is built with one block
  fewer (23 of 24: the second-to-last hidden state), its final LayerNorm is not used, and a new
  `ln_vision` follows.
* any other transformers vision backbone (ResNet, ConvNeXt, ViT, ...): its `last_hidden_state`; a 4-D
  feature map `(B, C, H, W)` becomes an `H * W` token grid. A new `ln_vision` follows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from blip2.config import DTYPES, VisionConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16` (a `torch.dtype` passes through); the one dtype map of the models."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return TORCH_DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"` (a dtype outside `DTYPES` -> `"float32"`)."""
    return {v: k for k, v in TORCH_DTYPES.items()}.get(dtype, "float32")


def build_tower(cfg: VisionConfig) -> nn.Module:
    """Build the transformers vision model described by `cfg.hf_config` (random weights)."""
    import transformers

    hf = dict(cfg.hf_config)
    model_type = hf.pop("model_type")
    hf.pop("_name_or_path", None)
    if model_type == "blip_2_vision_model":
        hf_cfg = transformers.Blip2VisionConfig(**hf)
        hf_cfg._attn_implementation = "sdpa"
        return transformers.Blip2VisionModel(hf_cfg)
    hf_cfg = transformers.AutoConfig.for_model(model_type, **hf)
    return transformers.AutoModel.from_config(hf_cfg)


class ImageEncoder(nn.Module):
    """A frozen transformers vision tower plus the trainable `ln_vision`."""

    def __init__(self, cfg: VisionConfig, tower: nn.Module | None = None):
        super().__init__()
        self.config = cfg
        self.tower = tower if tower is not None else build_tower(cfg)
        if cfg.model_type == "blip_2_vision_model":
            self.ln_vision = self.tower.post_layernorm
            self.tower.post_layernorm = nn.Identity()
            if cfg.ln_vision_eps is not None:
                self.ln_vision.eps = cfg.ln_vision_eps
        else:
            if cfg.model_type == "clip_vision_model":
                # only the pooled output used it (transformers 5 dropped the `vision_model` wrapper)
                getattr(self.tower, "vision_model", self.tower).post_layernorm = nn.Identity()
            eps = 1e-5 if cfg.ln_vision_eps is None else cfg.ln_vision_eps
            self.ln_vision = nn.LayerNorm(cfg.width, eps=eps)
        self.frozen = cfg.freeze
        self.tower.requires_grad_(not self.frozen)
        self.tower.to(torch_dtype(cfg.dtype))
        self.ln_vision.requires_grad_(not cfg.freeze_ln_vision)
        if self.frozen:
            self.tower.eval()

    @property
    def width(self) -> int:
        return self.config.width

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if self.frozen:
            self.tower.eval()  # frozen: never in training mode (no dropout, fixed norms)
        return self

    def features(self, pixel_values: Tensor) -> Tensor:
        """Tower features `(B, N, D)` before `ln_vision`, in the tower's dtype (no autograd when frozen)."""
        param = next(self.tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.tower(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype))
        h = out.last_hidden_state
        if h.dim() == 4:  # (B, C, H, W) feature map -> (B, H*W, C) tokens
            h = h.flatten(2).transpose(1, 2)
        return h

    def normalize(self, image_features: Tensor) -> Tensor:
        """Image embeddings: `ln_vision` applied in its own precision (fp32 by default), as LAVIS does."""
        return self.ln_vision(image_features.to(self.ln_vision.weight.dtype))

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.normalize(self.features(pixel_values))
