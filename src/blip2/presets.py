"""Named presets: the public checkpoints at their real sizes, and tiny models for tests.

`preset(name, **overrides)` gives a preset's `Blip2Config` with fields replaced; `list_presets()` the
names (`blip2 presets` prints them). A preset builds random weights of the real size without a download;
a pretrained checkpoint of the same name (`blip2.load("Salesforce/blip2-opt-2.7b")`) fills them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.errors import UserError

EVA_VIT_G = {"model_type": "blip_2_vision_model"}  # 39 blocks, 1408 wide, 16 heads, patch 14, eps 1e-6
CLIP_VIT_L = {  # OpenAI CLIP ViT-L/14 without its last block (LAVIS uses the second-to-last layer)
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def _opt(hidden: int, ffn: int, name: str) -> dict[str, Any]:
    return {
        "model_type": "opt",
        "hidden_size": hidden,
        "word_embed_proj_dim": hidden,
        "ffn_dim": ffn,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 50304,  # 50272 + <image>, padded to a multiple of 64 (the transformers checkpoints)
        "max_position_embeddings": 2048,
        "bos_token_id": 2,
        "eos_token_id": 50118,  # "\n" ends a caption
        "pad_token_id": 1,
        "_name_or_path": name,
    }


def _flan_t5(d_model: int, d_ff: int, heads: int, name: str) -> dict[str, Any]:
    return {
        "model_type": "t5",
        "d_model": d_model,
        "d_kv": 64,
        "d_ff": d_ff,
        "num_layers": 24,
        "num_decoder_layers": 24,
        "num_heads": heads,
        "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu",  # exact GELU, as LAVIS and the transformers conversion set it
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "decoder_start_token_id": 0,
        "_name_or_path": name,
    }


def _stage1(image_size: int = 224, vision: dict | None = None, name: str = "") -> Blip2Config:
    return Blip2Config(
        vision=VisionConfig(
            hf_config={**(vision or EVA_VIT_G), "image_size": image_size}, image_size=image_size
        ),
        qformer=QFormerConfig(),
        name=name,
    )


def _stage2(llm: dict, llm_name: str, image_size: int, name: str, prompt: str = "") -> Blip2Config:
    is_t5 = llm["model_type"] == "t5"
    return Blip2Config(
        vision=VisionConfig(
            hf_config={**EVA_VIT_G, "image_size": image_size}, image_size=image_size, dtype="float16"
        ),
        qformer=QFormerConfig(text=False, itg_head=False),
        llm=LLMConfig(
            hf_config=llm,
            name=llm_name,
            dtype="bfloat16" if is_t5 else "float16",
            prompt=prompt,
            eos_text=None if is_t5 else "\n",
            image_token_id=32100 if is_t5 else 50265,
        ),
        name=name,
    )


def _vicuna(hidden: int, ffn: int, layers: int, heads: int, name: str) -> dict[str, Any]:
    """Vicuna v1.1 as InstructBLIP uses it: a Llama with `[PAD]` added (vocabulary 32001)."""
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": 32001,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 32000,
        "_name_or_path": name,
    }


def _instruct(llm: dict, llm_name: str, name: str) -> Blip2Config:
    """InstructBLIP (Dai et al., 2023): the stage-2 layout at 224 px with a Q-Former that keeps its text
    side (vocabulary 30523) to read the instruction; the paper's prompts: "A short image description:"
    for captions, the short-answer question template."""
    config = _stage2(llm, llm_name, 224, name)
    is_t5 = config.llm.is_encoder_decoder
    return dataclasses.replace(
        config,
        qformer=QFormerConfig(itg_head=False, instruction=True),
        llm=dataclasses.replace(
            config.llm,
            prompt="A short image description:",
            vqa_prompt="Question: {} Short answer:",
            eos_text=None,  # the LM's EOS (Vicuna's "</s>", FlanT5's "</s>"), as transformers ends
            image_token_id=32100 if is_t5 else None,
            max_txt_len=128,
        ),
    )


def _tiny_vision(image_size: int = 16) -> VisionConfig:
    return VisionConfig(
        hf_config={
            "model_type": "blip_2_vision_model",
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 4,
            "initializer_range": 0.02,  # transformers' default (1e-10) makes a random tower output constants
        },
        image_size=image_size,
    )


def _tiny_qformer(**kw: Any) -> QFormerConfig:
    base = dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=37,
        cross_attention_freq=1,
        num_query_tokens=8,
        max_position_embeddings=64,
    )
    return QFormerConfig(**{**base, **kw})


TINY_LLMS: dict[str, dict[str, Any]] = {
    "opt": {
        "model_type": "opt",
        "vocab_size": 99,
        "hidden_size": 16,
        "word_embed_proj_dim": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "ffn_dim": 32,
        "max_position_embeddings": 128,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 99,
        "n_embd": 16,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 128,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "t5": {
        "model_type": "t5",
        "vocab_size": 99,
        "d_model": 16,
        "d_kv": 4,
        "d_ff": 32,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "decoder_start_token_id": 0,
    },
}
# the decoder-only families of the Llama line: 2 layers, 16 wide, grouped-query attention (4 heads, 2 KV
# heads), ids as above; each family's own twist kept (Qwen2's QKV bias, Qwen3's and Gemma's per-head
# norms and head width, Gemma's scaled embeddings, Gemma2's sliding window and soft-capping, Phi-3's
# fused projections), and Mistral's and Gemma2's sliding window small enough to matter in a tiny test
_LLAMA_LIKE = {
    "vocab_size": 99,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 2,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
TINY_LLMS.update(
    {
        "llama": {"model_type": "llama", **_LLAMA_LIKE},
        "mistral": {"model_type": "mistral", **_LLAMA_LIKE, "sliding_window": 6},
        "qwen2": {"model_type": "qwen2", **_LLAMA_LIKE},
        "qwen3": {"model_type": "qwen3", **_LLAMA_LIKE, "head_dim": 4},
        "gemma": {"model_type": "gemma", **_LLAMA_LIKE, "head_dim": 4},
        "gemma2": {
            "model_type": "gemma2",
            **_LLAMA_LIKE,
            "head_dim": 4,
            "query_pre_attn_scalar": 4,
            "sliding_window": 6,
        },
        "phi3": {"model_type": "phi3", **_LLAMA_LIKE},
    }
)


def _tiny_stage2(kind: str) -> Blip2Config:
    return Blip2Config(
        vision=_tiny_vision(),
        qformer=_tiny_qformer(text=False, itg_head=False),
        llm=LLMConfig(hf_config=dict(TINY_LLMS[kind])),
        embed_dim=16,
        name=f"tiny-{kind}",
    )


def _tiny_instruct(kind: str) -> Blip2Config:
    config = _tiny_stage2(kind)
    qformer = _tiny_qformer(vocab_size=30523, itg_head=False, instruction=True)
    return dataclasses.replace(config, qformer=qformer, name=f"tiny-instruct-{kind}")


PRESETS: dict[str, Any] = {
    # stage 1 (Q-Former with ITC / ITM / ITG heads)
    "blip2-stage1-vit-g": lambda: _stage1(224, name="blip2-stage1-vit-g"),
    "blip2-stage1-vit-g-coco": lambda: _stage1(364, name="blip2-stage1-vit-g-coco"),
    "blip2-stage1-vit-l": lambda: _stage1(224, CLIP_VIT_L, name="blip2-stage1-vit-l"),
    # stage 2 (Q-Former as soft visual prompts for a frozen LLM)
    "blip2-opt-2.7b": lambda: _stage2(
        _opt(2560, 10240, "facebook/opt-2.7b"), "facebook/opt-2.7b", 224, "blip2-opt-2.7b"
    ),
    "blip2-opt-6.7b": lambda: _stage2(
        _opt(4096, 16384, "facebook/opt-6.7b"), "facebook/opt-6.7b", 224, "blip2-opt-6.7b"
    ),
    "blip2-opt-2.7b-coco": lambda: _stage2(
        _opt(2560, 10240, "facebook/opt-2.7b"), "facebook/opt-2.7b", 364, "blip2-opt-2.7b-coco", "a photo of"
    ),
    "blip2-opt-6.7b-coco": lambda: _stage2(
        _opt(4096, 16384, "facebook/opt-6.7b"), "facebook/opt-6.7b", 364, "blip2-opt-6.7b-coco", "a photo of"
    ),
    "blip2-flan-t5-xl": lambda: _stage2(
        _flan_t5(2048, 5120, 32, "google/flan-t5-xl"), "google/flan-t5-xl", 224, "blip2-flan-t5-xl"
    ),
    "blip2-flan-t5-xl-coco": lambda: _stage2(
        _flan_t5(2048, 5120, 32, "google/flan-t5-xl"),
        "google/flan-t5-xl",
        364,
        "blip2-flan-t5-xl-coco",
        "a photo of",
    ),
    "blip2-flan-t5-xxl": lambda: _stage2(
        _flan_t5(4096, 10240, 64, "google/flan-t5-xxl"), "google/flan-t5-xxl", 224, "blip2-flan-t5-xxl"
    ),
    # InstructBLIP (the Q-Former also reads the instruction)
    "instructblip-vicuna-7b": lambda: _instruct(
        _vicuna(4096, 11008, 32, 32, "lmsys/vicuna-7b-v1.1"), "lmsys/vicuna-7b-v1.1", "instructblip-vicuna-7b"
    ),
    "instructblip-vicuna-13b": lambda: _instruct(
        _vicuna(5120, 13824, 40, 40, "lmsys/vicuna-13b-v1.1"),
        "lmsys/vicuna-13b-v1.1",
        "instructblip-vicuna-13b",
    ),
    "instructblip-flan-t5-xl": lambda: _instruct(
        _flan_t5(2048, 5120, 32, "google/flan-t5-xl"), "google/flan-t5-xl", "instructblip-flan-t5-xl"
    ),
    "instructblip-flan-t5-xxl": lambda: _instruct(
        _flan_t5(4096, 10240, 64, "google/flan-t5-xxl"), "google/flan-t5-xxl", "instructblip-flan-t5-xxl"
    ),
    # tiny models for tests
    "tiny-stage1": lambda: Blip2Config(
        vision=_tiny_vision(), qformer=_tiny_qformer(), embed_dim=16, name="tiny-stage1"
    ),
    "tiny-opt": lambda: _tiny_stage2("opt"),
    "tiny-gpt2": lambda: _tiny_stage2("gpt2"),
    "tiny-t5": lambda: _tiny_stage2("t5"),
    **{
        f"tiny-{kind}": functools.partial(_tiny_stage2, kind)
        for kind in TINY_LLMS
        if kind not in ("opt", "gpt2", "t5")
    },
    "tiny-instruct-opt": lambda: _tiny_instruct("opt"),
    "tiny-instruct-t5": lambda: _tiny_instruct("t5"),
    # the Q-Former shape of MiniLM-L6-H384 (the offline stand-in for bert-base-uncased)
    "minilm-stage1": lambda: Blip2Config(
        vision=_tiny_vision(),
        qformer=QFormerConfig(
            hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, num_query_tokens=8
        ),
        embed_dim=64,
        name="minilm-stage1",
    ),
}


class ConfigError(UserError, ValueError):
    """An unknown preset or config field (a `UserError`: one sentence on the command line)."""


SECTIONS = {"vision": VisionConfig, "qformer": QFormerConfig, "llm": LLMConfig}


def preset(name: str, /, **overrides: Any) -> Blip2Config:
    """The named preset's config, with fields replaced.

    ```python
    blip2.preset("tiny-stage1", embed_dim=32, qformer={"num_layers": 4})
    ```

    Args:
        name: a preset (`list_presets()`, `blip2 presets`).
        overrides: `Blip2Config` fields. A section (`vision`, `qformer`, `llm`) takes a dict of its own
            fields to replace (or a whole `VisionConfig` / `QFormerConfig` / `LLMConfig`, or None
            for no LLM).

    Raises:
        ConfigError: an unknown preset name or field (one sentence listing the known ones).
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    config = PRESETS[name]()
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(Blip2Config)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ConfigError(f"Blip2Config has no field {key!r}; its fields are {', '.join(sorted(fields))}")
        section = SECTIONS.get(key)
        if section is not None and isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(section)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(
                    f"{section.__name__} has no field {unknown[0]!r}; its fields are {', '.join(sorted(known))}"
                )
            current = getattr(config, key)
            tower = value.get("hf_config", {}).get("model_type") if key == "vision" else None
            if tower is not None and tower != current.model_type:
                # another tower family: the processor's normalization follows it unless given
                value = {"image_mean": None, "image_std": None, **value}
            value = dataclasses.replace(current, **value) if current is not None else section(**value)
        changes[key] = value
    given = overrides.get("qformer")
    explicit = isinstance(given, QFormerConfig) or (isinstance(given, dict) and "encoder_width" in given)
    if "vision" in changes and not explicit:  # the Q-Former reads the new tower's width, as when built anew
        changes["qformer"] = dataclasses.replace(changes.get("qformer", config.qformer), encoder_width=0)
    return dataclasses.replace(config, **changes)


def list_presets() -> list[str]:
    return sorted(PRESETS)


# ----------------------------------------------------------------- tiny image encoders, one per family

# tiny random towers of each family `blip2.models.encoders` knows (16 px images, 4 px patches), for tests:
# `tiny_vision(family)` is its `VisionConfig`, and the presets `tiny-stage1-<family>` put it under the
# tiny Q-Former (the timm one needs the `timm` extra)
TINY_VISION: dict[str, dict[str, Any]] = {
    "eva": _tiny_vision().hf_config,
    "clip": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": 4,
    },
    "siglip": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": 4,
    },
    "siglip2": {
        "model_type": "siglip2_vision_model",
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": 4,
        "num_patches": 16,  # a 4 x 4 grid of position embeddings: 16 px at patch 4
    },
    "dinov2": {
        "model_type": "dinov2",
        "hidden_size": 32,
        "mlp_ratio": 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": 4,
    },
    "dinov2_with_registers": {
        "model_type": "dinov2_with_registers",
        "hidden_size": 32,
        "mlp_ratio": 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": 4,
        "num_register_tokens": 2,
    },
    "convnext": {
        "model_type": "convnext",
        "num_stages": 2,
        "hidden_sizes": [16, 32],
        "depths": [1, 1],
        "patch_size": 4,  # 16 px -> a 4 x 4 stem map -> 2 x 2 after the second stage
    },
    "timm-eva02": {
        "model_type": "timm_wrapper",
        "architecture": "eva02_tiny_patch14_224",
        "model_args": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4},
    },
}


def tiny_vision(family: str, image_size: int = 16) -> VisionConfig:
    """The tiny random `VisionConfig` of a `TINY_VISION` family."""
    hf_config = {**TINY_VISION[family], "image_size": image_size}
    if hf_config["model_type"] == "timm_wrapper":
        hf_config.pop("image_size")
    return VisionConfig(hf_config=hf_config, image_size=image_size)


PRESETS.update(
    {
        f"tiny-stage1-{family}": lambda family=family: Blip2Config(
            vision=tiny_vision(family), qformer=_tiny_qformer(), embed_dim=16, name=f"tiny-stage1-{family}"
        )
        for family in TINY_VISION
        if family != "eva"  # that is tiny-stage1
    }
)
