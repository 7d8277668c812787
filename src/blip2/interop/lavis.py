"""The LAVIS layout (Salesforce's original BLIP-2 code), both ways.

LAVIS checkpoints are `torch.load` files holding `{"model": state_dict}` (read here with
`weights_only=True`). What they hold depends on the model (LAVIS saves only trainable tensors):

* stage 1 (`blip2_pretrained.pth`, `blip2_pretrained_vitL.pth`): the Q-Former with its text side and
  ITG head (`Qformer.cls.*`, decoder tied to the word embeddings), `query_tokens`, `ln_vision`,
  `vision_proj`, `text_proj`, `itm_head`, `temp`; no image encoder;
* stage 2 (`blip2_pretrained_{opt2.7b,opt6.7b,flant5xl,flant5xxl}.pth`): the Q-Former *without* its
  text side, `query_tokens`, `ln_vision`, `opt_proj` / `t5_proj`; no image encoder, no LLM;
* fine-tuned with the image encoder unfrozen (`blip2_caption_*.pth`, `blip2_finetune_coco.pth`): the
  above plus `visual_encoder.*` at 364 px;
* InstructBLIP (`instruct_blip_{vicuna7b,vicuna13b,flanxl,flanxxl}_trimmed.pth`): the Q-Former *with*
  its text side (word and position embeddings, text feed-forward; no ITG head), `query_tokens`,
  `ln_vision`, `llm_proj` (Vicuna) / `t5_proj` (FlanT5); no image encoder, no LLM. LAVIS gives Vicuna's
  tokenizer a `[PAD]` token and grows the LLM's vocabulary to 32001 for it (`surgery.add_lavis_pad_token`).

The frozen parts a checkpoint lacks come from their own files: the EVA ViT-g from `eva_vit_g.pth`
(LAVIS layout, 40 blocks of which BLIP-2 keeps 39), CLIP ViT-L from `clip_vit_L.pth` (OpenAI layout,
24 blocks of which BLIP-2 keeps 23), the LLM from its transformers checkpoint (`facebook/opt-2.7b`,
`google/flan-t5-xl`, ...).

Layout differences from ours handled by the rules below: EVA's separate `q_bias` / `v_bias` (the key
bias is zero) against one qkv bias; OpenAI CLIP's fused `in_proj_weight` / `in_proj_bias` against
separate q/k/v projections; the tied ITG decoder; position embeddings of another grid size
(interpolated bicubically, as LAVIS's `interpolate_pos_embed` does).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor

from blip2.config import Blip2Config
from blip2.interop.hf import EVA_TOWER, qformer_layer_rules
from blip2.interop.keymap import CheckpointError, Rule, drop, rename, tied

CLIP_TOWER = "clip_vision_model"

# released LAVIS files -> the preset they belong to
FILES: dict[str, str] = {
    "blip2_pretrained.pth": "blip2-stage1-vit-g",
    "blip2_pretrained_vitL.pth": "blip2-stage1-vit-l",
    "blip2_finetune_coco.pth": "blip2-stage1-vit-g-coco",
    "blip2_pretrained_opt2.7b.pth": "blip2-opt-2.7b",
    "blip2_pretrained_opt6.7b.pth": "blip2-opt-6.7b",
    "blip2_pretrained_flant5xl.pth": "blip2-flan-t5-xl",
    "blip2_pretrained_flant5xxl.pth": "blip2-flan-t5-xxl",
    "blip2_caption_opt2.7b.pth": "blip2-opt-2.7b-coco",
    "blip2_caption_opt6.7b.pth": "blip2-opt-6.7b-coco",
    "blip2_caption_flant5xl.pth": "blip2-flan-t5-xl-coco",
    "instruct_blip_vicuna7b_trimmed.pth": "instructblip-vicuna-7b",
    "instruct_blip_vicuna13b_trimmed.pth": "instructblip-vicuna-13b",
    "instruct_blip_flanxl_trimmed.pth": "instructblip-flan-t5-xl",
    "instruct_blip_flanxxl_trimmed.pth": "instructblip-flan-t5-xxl",
}

# the frozen image encoder's own LAVIS file, by tower type
VISION_FILES: dict[str, str] = {EVA_TOWER: "eva_vit_g.pth", CLIP_TOWER: "clip_vit_L.pth"}


def llm_prefixes(config: Blip2Config) -> tuple[str, str]:
    """LAVIS names of the projection and the LLM: `opt_proj`/`opt_model`, `t5_proj`/`t5_model`,
    or `llm_proj`/`llm_model` (other decoder-only LMs, and every decoder-only LM of InstructBLIP:
    `blip2_vicuna_instruct`)."""
    assert config.llm is not None
    if config.kind == "instruct":
        kind = "t5" if config.llm.is_encoder_decoder else "llm"
    else:
        kind = {"opt": "opt", "t5": "t5"}.get(config.llm.model_type, "llm")
    return f"{kind}_proj", f"{kind}_model"


# ------------------------------------------------------------------------------------ vision towers


def _qkv_bias_to_ours(ts: list[Tensor]) -> list[Tensor]:
    q_bias, v_bias = ts
    return [torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])]


def _qkv_bias_to_lavis(ts: list[Tensor]) -> list[Tensor]:
    q_bias, k_bias, v_bias = ts[0].chunk(3)
    if k_bias.count_nonzero():
        raise CheckpointError("the vision tower's key bias is not zero, which the LAVIS layout cannot hold")
    return [q_bias, v_bias]


def interpolate_pos_embed(pos: Tensor, num_positions: int, align_corners: bool) -> Tensor:
    """Resize a `[1, 1 + g*g, D]` (or `[1 + g*g, D]`) position table to `num_positions` rows.

    The class token's row is kept; the patch grid is resized bicubically as LAVIS's
    `interpolate_pos_embed` does (EVA: `align_corners=False`; CLIP: `True`).
    """
    if pos.shape[-2] == num_positions:
        return pos
    squeeze = pos.dim() == 2
    pos = pos[None] if squeeze else pos
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(num_positions - 1)
    if old * old != pos.shape[1] - 1 or new * new != num_positions - 1:
        raise CheckpointError(f"cannot resize a position table of {pos.shape[1]} rows to {num_positions}")
    cls, grid = pos[:, :1], pos[:, 1:]
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=align_corners)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)  # (1, g'*g', D)
    out = torch.cat([cls, grid], dim=1)
    return out[0] if squeeze else out


def num_positions(config: Blip2Config) -> int:
    patch = int(config.vision.hf_config.get("patch_size", 14))
    return 1 + (config.vision.image_size // patch) ** 2


def eva_rules(config: Blip2Config, prefix: str = "visual_encoder") -> list[Rule]:
    """Our `Blip2VisionModel` tower <-> LAVIS's EVA ViT-g (`eva_vit.py`)."""
    n_pos = num_positions(config)
    t, b = "visual.tower", f"{prefix}.blocks.{{i}}"
    return [
        rename(f"{t}.embeddings.class_embedding", f"{prefix}.cls_token"),
        Rule(
            f"{t}.embeddings.position_embedding",
            f"{prefix}.pos_embed",
            to_ours=lambda ts: [interpolate_pos_embed(ts[0], n_pos, align_corners=False)],
        ),
        rename(f"{t}.embeddings.patch_embedding.{{p}}", f"{prefix}.patch_embed.proj.{{p}}"),
        rename(f"{t}.encoder.layers.{{i}}.layer_norm1.{{p}}", f"{b}.norm1.{{p}}"),
        rename(f"{t}.encoder.layers.{{i}}.layer_norm2.{{p}}", f"{b}.norm2.{{p}}"),
        rename(f"{t}.encoder.layers.{{i}}.self_attn.qkv.weight", f"{b}.attn.qkv.weight"),
        Rule(
            f"{t}.encoder.layers.{{i}}.self_attn.qkv.bias",
            (f"{b}.attn.q_bias", f"{b}.attn.v_bias"),
            to_ours=_qkv_bias_to_ours,
            to_theirs=_qkv_bias_to_lavis,
        ),
        rename(f"{t}.encoder.layers.{{i}}.self_attn.projection.{{p}}", f"{b}.attn.proj.{{p}}"),
        rename(f"{t}.encoder.layers.{{i}}.mlp.fc1.{{p}}", f"{b}.mlp.fc1.{{p}}"),
        rename(f"{t}.encoder.layers.{{i}}.mlp.fc2.{{p}}", f"{b}.mlp.fc2.{{p}}"),
    ]


def _split3(ts: list[Tensor]) -> list[Tensor]:
    return list(ts[0].chunk(3))


def _cat3(ts: list[Tensor]) -> list[Tensor]:
    return [torch.cat(ts)]


def clip_rules(config: Blip2Config, prefix: str = "visual_encoder") -> list[Rule]:
    """Our `CLIPVisionModel` tower <-> LAVIS's OpenAI-layout CLIP ViT-L (`clip_vit.py`)."""
    n_pos = num_positions(config)
    t, b = "visual.tower", f"{prefix}.transformer.resblocks.{{i}}"
    attn = f"{t}.encoder.layers.{{i}}.self_attn"
    return [
        rename(f"{t}.embeddings.class_embedding", f"{prefix}.class_embedding"),
        Rule(
            f"{t}.embeddings.position_embedding.weight",
            f"{prefix}.positional_embedding",
            to_ours=lambda ts: [interpolate_pos_embed(ts[0], n_pos, align_corners=True)],
        ),
        rename(f"{t}.embeddings.patch_embedding.weight", f"{prefix}.conv1.weight"),
        rename(f"{t}.pre_layrnorm.{{p}}", f"{prefix}.ln_pre.{{p}}"),
        Rule(
            (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
            f"{b}.attn.in_proj_weight",
            to_ours=_split3,
            to_theirs=_cat3,
        ),
        Rule(
            (f"{attn}.q_proj.bias", f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"),
            f"{b}.attn.in_proj_bias",
            to_ours=_split3,
            to_theirs=_cat3,
        ),
        rename(f"{attn}.out_proj.{{p}}", f"{b}.attn.out_proj.{{p}}"),
        rename(f"{t}.encoder.layers.{{i}}.layer_norm1.{{p}}", f"{b}.ln_1.{{p}}"),
        rename(f"{t}.encoder.layers.{{i}}.layer_norm2.{{p}}", f"{b}.ln_2.{{p}}"),
        rename(f"{t}.encoder.layers.{{i}}.mlp.fc1.{{p}}", f"{b}.mlp.c_fc.{{p}}"),
        rename(f"{t}.encoder.layers.{{i}}.mlp.fc2.{{p}}", f"{b}.mlp.c_proj.{{p}}"),
    ]


def vision_rules(config: Blip2Config, prefix: str = "visual_encoder") -> list[Rule]:
    if config.vision.model_type == EVA_TOWER:
        return eva_rules(config, prefix)
    if config.vision.model_type == CLIP_TOWER:
        return clip_rules(config, prefix)
    raise CheckpointError(
        f"LAVIS has no {config.vision.model_type!r} image encoder (EVA ViT-g or CLIP ViT-L)"
    )


def vision_depth(config: Blip2Config) -> int:
    return int(
        config.vision.hf_config.get("num_hidden_layers", 39 if config.vision.model_type == EVA_TOWER else 12)
    )


def vision_base_state(state: dict[str, Tensor], config: Blip2Config) -> dict[str, Tensor]:
    """An image encoder's own LAVIS file (`eva_vit_g.pth`, `clip_vit_L.pth`) as `visual_encoder.*` keys.

    BLIP-2 uses the second-to-last layer: blocks at or beyond the configured depth (EVA's 40th, CLIP's
    24th) are dropped here, explicitly, as LAVIS's model has no place for them. So are the heads
    LAVIS ignores in those files (`ln_post`, `proj` of CLIP; `norm`, `head`, `fc_norm` of EVA).
    """
    depth = vision_depth(config)
    block = re.compile(r"(?:blocks|transformer\.resblocks)\.(\d+)\.")
    unused = ("ln_post.", "proj", "norm.", "head.", "fc_norm.")
    out = {}
    for k, v in state.items():
        k = k.removeprefix("visual_encoder.").removeprefix("visual.")
        m = block.match(k)
        if (m and int(m.group(1)) >= depth) or k.startswith(unused) and not m:
            continue
        out[f"visual_encoder.{k}"] = v
    return out


# ------------------------------------------------------------------------------------------ the model


def rules(config: Blip2Config, vision: bool = True) -> list[Rule]:
    """Our keys <-> LAVIS's keys for a whole model described by `config`; without `vision`, for all of
    it but the image encoder's tower (which then comes from elsewhere)."""
    q = config.qformer
    out = (vision_rules(config) if vision else []) + [
        rename("visual.ln_vision.{p}", "ln_vision.{p}"),
        rename("query_tokens", "query_tokens"),
        rename("qformer.embeddings.norm.{p}", "Qformer.bert.embeddings.LayerNorm.{p}"),
        drop("Qformer.bert.embeddings.position_ids"),
        rename("qformer.embeddings.position.weight", "Qformer.bert.embeddings.position_embeddings.weight"),
        *qformer_layer_rules("Qformer.bert.encoder.layer", attn="self"),
    ]
    word = "Qformer.bert.embeddings.word_embeddings.weight"
    head = "Qformer.cls.predictions"
    if q.text and q.itg_head:
        out += [
            tied("qformer.embeddings.word.weight", [word, f"{head}.decoder.weight"]),
            tied("qformer.lm_head.bias", [f"{head}.bias", f"{head}.decoder.bias"]),
            rename("qformer.lm_head.dense.{p}", f"{head}.transform.dense.{{p}}"),
            rename("qformer.lm_head.norm.{p}", f"{head}.transform.LayerNorm.{{p}}"),
        ]
    else:
        out.append(rename("qformer.embeddings.word.weight", word))
    return out + HEADS[config.kind](config)


def _retrieval_heads(config: Blip2Config) -> list[Rule]:
    """Stage 1's ITC projections, ITM head and temperature: the same names in both layouts."""
    return [rename(f"{name}.{{p}}", f"{name}.{{p}}") for name in ("vision_proj", "text_proj", "itm_head")] + [
        rename("temp", "temp")
    ]


def _language_heads(config: Blip2Config) -> list[Rule]:
    """Stage 2's projection into the LLM and the LLM itself (`opt_*`, `t5_*` or `llm_*`)."""
    proj, model = llm_prefixes(config)
    return [rename("language_projection.{p}", f"{proj}.{{p}}"), rename("llm.{rest}", f"{model}.{{rest}}")]


# each model kind's own parts after the shared query encoder (InstructBLIP's are BLIP-2's: `llm_*` for
# Vicuna, `t5_*` for FlanT5; its Q-Former's text side is mapped with the rest of the Q-Former)
HEADS = {"retrieval": _retrieval_heads, "generation": _language_heads, "instruct": _language_heads}


def unwrap(checkpoint: object, source: str) -> dict[str, Tensor]:
    """The state dict inside a LAVIS file (`{"model": ...}`) or a bare one."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise CheckpointError(
            f"{source} holds no state dict of tensors (a LAVIS file holds {{'model': ...}})"
        )
    return checkpoint
