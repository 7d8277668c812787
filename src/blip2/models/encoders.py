"""Frozen image encoders behind one small interface.

`ImageEncoder(config)` wraps a transformers vision model:

* `features(pixel_values)` -> `(B, N, D)` image features, *before* `ln_vision` (what a feature cache
  stores; computed without autograd, in the tower's precision);
* `normalize(image_features)` -> image embeddings through `ln_vision`, the trainable LayerNorm of the
  paper;
* `forward(pixel_values)` = both.

The features of every tower are its last *built* block's tokens, and its own final norm (with any
pooling head) is not used: `ln_vision` takes its place. A vision transformer that a bridge reads at its
second-to-last layer is therefore built with one block fewer (the config's block count says which layer
is read; a pretrained checkpoint's extra block is left unread). Per family (`VisionConfig.hf_config`'s
`model_type`; the processor's mean and std per family: `blip2.config.IMAGE_NORMALIZATION`):

* `blip_2_vision_model` (transformers' `Blip2VisionModel`) is the 39-block EVA ViT-g of the released
  checkpoints (LAVIS drops the 40th block). Its `post_layernorm` *is* LAVIS's `ln_vision`: it is moved
  out of the tower and becomes `ln_vision`. All 257 tokens (CLS + patches). CLIP mean and std.
* `clip_vision_model` (`CLIPVisionModel`) as LAVIS uses CLIP ViT-L: 23 of 24 blocks (the second-to-last
  hidden state, as the paper), CLS + patch tokens, `post_layernorm` unused. CLIP mean and std.
* `siglip_vision_model` (`SiglipVisionModel`; also SigLIP2's fixed-resolution checkpoints, which are
  this class): patch tokens (SigLIP has no CLS); `post_layernorm` and the attention-pooling `head` are
  dropped. Build it with one block fewer, as LLaVA-OneVision does with SigLIP-so400m (it deletes the
  last block and the head). Mean and std 0.5.
* `siglip2_vision_model` (`Siglip2VisionModel`, SigLIP2 NaFlex): the same choice. NaFlex takes
  pre-cut patches with their grid (`pixel_attention_mask`, `spatial_shapes`); here the fixed square
  image is cut into its full `image_size / patch_size` grid (transformers' patch order: rows, columns,
  then each patch's pixels row-major with channels last), so no token is padding. Mean and std 0.5.
* `dinov2`, `dinov2_with_registers` (`Dinov2Model`, `Dinov2WithRegistersModel`): CLS (+ register) +
  patch tokens; the final `layernorm` is not used. Build it with one block fewer, as Prismatic's
  DINO-SigLIP reads DINOv2 at its second-to-last layer. ImageNet mean and std.
* `convnext` (`ConvNextModel`): the last stage's `(B, C, H, W)` map becomes an `H * W` token grid (its
  final LayerNorm only normalizes the pooled output, which is unused). ImageNet mean and std.
* `timm_wrapper` (transformers' `TimmWrapperModel` around `timm.create_model(architecture, **model_args)`,
  for towers transformers has no class for, e.g. EVA-CLIP `eva02_large_patch14_clip_224` or
  `eva_giant_patch14_clip_224`): `forward_features` tokens (or map), the model's final `norm` unused,
  no pooling. Needs the `timm` extra (timm imports torchvision). Give `model_args.depth` for one block
  fewer and `num_features` (or `model_args.embed_dim`) for the width. CLIP mean and std.
* any other transformers vision backbone (ResNet, ViT, ...): its `last_hidden_state` as given; a 4-D
  feature map becomes a token grid. CLIP mean and std unless the config sets its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from blip2.config import DTYPES, VisionConfig
from blip2.errors import UserError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EVA = "blip_2_vision_model"
CLIP = "clip_vision_model"
SIGLIP = ("siglip_vision_model", "siglip2_vision_model")
SIGLIP2 = "siglip2_vision_model"
DINOV2 = ("dinov2", "dinov2_with_registers")
TIMM = "timm_wrapper"


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


def _require_timm() -> None:
    try:
        import timm  # noqa: F401
    except ImportError as e:  # timm missing, or installed without the torchvision it imports
        raise UserError(
            f"a timm image encoder needs timm and torchvision ({e}): pip install 'blip2[timm]'"
        ) from None


def tower_class_and_config(cfg: VisionConfig) -> tuple[Any, Any]:
    """The transformers class (with `from_config` / `from_pretrained`) and config of the tower
    `cfg.hf_config` describes.

    Raises:
        UserError: an unknown `model_type`, or a timm tower without timm.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    hf = dict(cfg.hf_config)
    model_type = hf.pop("model_type")
    hf.pop("_name_or_path", None)
    if model_type == EVA:
        hf_cfg = transformers.Blip2VisionConfig(**hf)
        hf_cfg._attn_implementation = "sdpa"
        return transformers.Blip2VisionModel, hf_cfg
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"transformers knows no model_type {model_type!r} for the image encoder")
    if model_type == TIMM:
        _require_timm()
        hf.setdefault("do_pooling", False)
    return transformers.AutoModel, transformers.AutoConfig.for_model(model_type, **hf)


def build_tower(cfg: VisionConfig) -> nn.Module:
    """Build the transformers vision model described by `cfg.hf_config` (random weights)."""
    import transformers

    cls, hf_cfg = tower_class_and_config(cfg)
    return transformers.AutoModel.from_config(hf_cfg) if cls is transformers.AutoModel else cls(hf_cfg)


def _drop_final_norm(tower: nn.Module, model_type: str) -> None:
    """Replace what follows the last block (final norm, pooling head) that `ln_vision` stands in for."""
    body = getattr(tower, "vision_model", tower)  # transformers 5 dropped most `vision_model` wrappers
    if model_type == CLIP or model_type in SIGLIP:
        body.post_layernorm = nn.Identity()
    if model_type in SIGLIP and getattr(body, "use_head", False):
        body.use_head = False
        del body.head
    if model_type in DINOV2:
        tower.layernorm = nn.Identity()
    if model_type == TIMM and isinstance(getattr(tower.timm_model, "norm", None), nn.LayerNorm):
        tower.timm_model.norm = nn.Identity()


def siglip2_patches(pixel_values: Tensor, patch_size: int) -> dict[str, Tensor]:
    """SigLIP2 NaFlex inputs of square images: every patch of the full grid, none padding.

    Returns:
        `pixel_values` `(B, gh * gw, p * p * C)` in transformers' patch order, `spatial_shapes`
        `(B, 2)` = `(gh, gw)`, `pixel_attention_mask` `(B, gh * gw)` of ones.
    """
    b, c, h, w = pixel_values.shape
    if h % patch_size or w % patch_size:
        raise UserError(
            f"a SigLIP2 tower needs an image_size that is a multiple of its patch size {patch_size}"
        )
    gh, gw = h // patch_size, w // patch_size
    patches = pixel_values.reshape(b, c, gh, patch_size, gw, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(
        b, gh * gw, patch_size * patch_size * c
    )  # (B, N, p*p*C)
    device = pixel_values.device
    return {
        "pixel_values": patches,
        "spatial_shapes": torch.tensor([[gh, gw]], device=device).expand(b, 2),
        "pixel_attention_mask": torch.ones(b, gh * gw, dtype=torch.long, device=device),
    }


class ImageEncoder(nn.Module):
    """A frozen transformers vision tower plus the trainable `ln_vision`."""

    def __init__(self, cfg: VisionConfig, tower: nn.Module | None = None):
        super().__init__()
        self.config = cfg
        self.tower = tower if tower is not None else build_tower(cfg)
        if cfg.model_type == EVA:
            self.ln_vision = self.tower.post_layernorm
            self.tower.post_layernorm = nn.Identity()
            if cfg.ln_vision_eps is not None:
                self.ln_vision.eps = cfg.ln_vision_eps
        else:
            _drop_final_norm(self.tower, cfg.model_type)
            if cfg.model_type == TIMM and self.tower.timm_model.num_features != cfg.width:
                raise UserError(
                    f"the timm model {cfg.hf_config.get('architecture')!r} gives "
                    f"{self.tower.timm_model.num_features}-wide features: set num_features to that"
                )
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
        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        if self.config.model_type == SIGLIP2:
            inputs = siglip2_patches(pixel_values, self.tower.config.patch_size)
        else:
            inputs = {"pixel_values": pixel_values}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            h = self.tower(**inputs).last_hidden_state
        if h.dim() == 4:  # (B, C, H, W) feature map -> (B, H*W, C) tokens
            h = h.flatten(2).transpose(1, 2)
        return h

    def normalize(self, image_features: Tensor) -> Tensor:
        """Image embeddings: `ln_vision` applied in its own precision (fp32 by default), as LAVIS does."""
        return self.ln_vision(image_features.to(self.ln_vision.weight.dtype))

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.normalize(self.features(pixel_values))
