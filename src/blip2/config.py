"""Configuration dataclasses and named presets.

One frozen dataclass per component, a `Blip2Config` that holds them, and presets by name: the public
checkpoints (real sizes) and tiny models for tests. No torch import here, so configs can be read and
written anywhere. Every config round-trips through JSON (`to_dict` / `from_dict`).

The frozen towers (image encoder, LLM) are transformers models; their architecture is stored as a
transformers config dict (`model_type` plus the fields that differ from that class's defaults), so a
preset can build random weights of the real size without a download.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from blip2.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DTYPES = ("float32", "bfloat16", "float16")

# the model kinds a config can describe (`Blip2Config.kind`); each has its model type (`blip2.models`),
# its user-facing object (`blip2.pipelines`) and its checkpoint layouts (`blip2.interop`)
KINDS = ("retrieval", "generation", "instruct")


@dataclass(frozen=True)
class VisionConfig:
    """The frozen image encoder.

    Attributes:
        hf_config: transformers config of the tower (`model_type` + fields). `blip_2_vision_model` is the
            EVA ViT-g of the released checkpoints (its `post_layernorm` is the paper's `ln_vision`);
            `clip_vision_model` is used as LAVIS uses CLIP ViT-L (23 of 24 blocks: the preset sets
            `num_hidden_layers=23`); any other vision backbone (ResNet, ConvNeXt, ViT) works, a 4-D
            feature map becoming a token grid.
        image_size: side of the square input in pixels.
        image_mean, image_std: normalization of the processor.
        freeze: keep the tower frozen (eval mode, no gradients). False fine-tunes it, as the paper's
            caption and retrieval fine-tunings do (then features cannot come from a cache).
        freeze_ln_vision: also freeze `ln_vision` (trainable by default, as in the original code).
        dtype: precision of the frozen tower ("float32", "bfloat16", "float16").
        ln_vision_eps: eps of `ln_vision`; None: 1e-5 for a new LayerNorm, the tower's own for the EVA
            tower's reused `post_layernorm` (transformers: 1e-6; LAVIS checkpoints set 1e-5).
    """

    hf_config: dict[str, Any] = field(default_factory=lambda: {"model_type": "blip_2_vision_model"})
    image_size: int = 224
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    freeze: bool = True
    freeze_ln_vision: bool = False
    dtype: str = "float32"
    ln_vision_eps: float | None = None

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    @property
    def width(self) -> int:
        """Feature width of the tower's output tokens."""
        cfg = self.hf_config
        if "hidden_size" in cfg:
            return int(cfg["hidden_size"])
        if "hidden_sizes" in cfg:
            return int(cfg["hidden_sizes"][-1])
        defaults = {"blip_2_vision_model": 1408, "clip_vision_model": 768}
        if cfg["model_type"] in defaults:
            return defaults[cfg["model_type"]]
        raise ValueError(f"cannot tell the feature width of a {cfg['model_type']!r} tower: set hidden_size")


@dataclass(frozen=True)
class QFormerConfig:
    """The Querying Transformer (BERT-style, post-LayerNorm).

    Attributes:
        encoder_width: width of the image features the cross-attention reads (0 = the vision width).
        cross_attention_freq: layers `i` with `i % freq == 0` cross-attend to the image.
        num_query_tokens: number of learnable queries.
        text: the text side exists (word/position embeddings and the text feed-forward); stage-2
            checkpoints drop it.
        itg_head: the BERT LM head used for ITG (decoder tied to the word embeddings).
        instruction: the Q-Former reads an instruction beside the queries (InstructBLIP, Dai et al.
            2023): it needs its text side and has no ITG head.
        vocab_size: bert-base-uncased + `[DEC]` = 30523.
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    encoder_width: int = 0
    num_query_tokens: int = 32
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    text: bool = True
    itg_head: bool = True
    instruction: bool = False
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    dec_token_id: int = 30522


@dataclass(frozen=True)
class LLMConfig:
    """The frozen language model (stage 2).

    Attributes:
        hf_config: transformers config of the LM (`model_type` + fields); decoder-only models load with
            `AutoModelForCausalLM`, encoder-decoder ones (T5) with `AutoModelForSeq2SeqLM`.
        name: hub id or path of the pretrained LM and its tokenizer ("" for none).
        dtype: precision of the frozen LM (the paper: fp16 for OPT, bf16 for FlanT5).
        prompt: default caption prompt ("" for none).
        vqa_prompt: question template; `None` picks the paper's per-kind default.
        eos_text: text whose first token ends generation and training targets ("\\n" for OPT); `None`
            uses the tokenizer's EOS.
        image_token_id: the `<image>` placeholder id of the transformers layout (None: not set).
    """

    hf_config: dict[str, Any] = field(default_factory=lambda: {"model_type": "opt"})
    name: str = ""
    dtype: str = "float32"
    prompt: str = ""
    vqa_prompt: str | None = None
    eos_text: str | None = None
    image_token_id: int | None = None
    max_txt_len: int = 32

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    @property
    def is_encoder_decoder(self) -> bool:
        return self.model_type in ("t5", "mt5", "umt5", "bart", "mbart")

    @property
    def vqa_template(self) -> str:
        if self.vqa_prompt is not None:
            return self.vqa_prompt
        return "Question: {} Short answer:" if self.is_encoder_decoder else "Question: {} Answer:"


@dataclass(frozen=True)
class Blip2Config:
    """A whole BLIP-2 model: a retrieval (stage-1) model when `llm` is None, else a generation (stage-2)
    one (`kind`).

    Attributes:
        embed_dim: width of the ITC projections (`vision_proj`, `text_proj`).
        max_txt_len: Q-Former text length used by training and retrieval.
        tokenizer: hub id or path of the Q-Former's BERT tokenizer.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig | None = None
    embed_dim: int = 256
    max_txt_len: int = 32
    tokenizer: str = "bert-base-uncased"
    name: str = ""

    def __post_init__(self) -> None:
        if self.qformer.encoder_width == 0:
            object.__setattr__(
                self, "qformer", dataclasses.replace(self.qformer, encoder_width=self.vision.width)
            )
        q = self.qformer
        if q.instruction and (self.llm is None or not q.text or q.itg_head):
            raise ValueError(
                "a Q-Former that reads instructions prompts an LLM (llm set), has its text side "
                "(text=True) and no ITG head (itg_head=False)"
            )
        for dt in (self.vision.dtype, self.llm.dtype if self.llm else "float32"):
            if dt not in DTYPES:
                raise ValueError(f"unknown dtype {dt!r}: use one of {', '.join(DTYPES)}")

    @property
    def kind(self) -> str:
        """The model kind this config describes, one of `KINDS`: "retrieval" (stage 1: the Q-Former
        with its ITC / ITM / ITG heads, no LLM), "generation" (stage 2: the queries prompt a frozen
        LLM) or "instruct" (InstructBLIP: stage 2 with a Q-Former that also reads the instruction).
        The one place that tells the kinds apart; everything else looks the kind up in a table."""
        if self.llm is None:
            return "retrieval"
        return "instruct" if self.qformer.instruction else "generation"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blip2Config:
        d = dict(d)
        vision = dict(d.pop("vision", {}))
        for k in ("image_mean", "image_std"):
            if k in vision:
                vision[k] = tuple(vision[k])
        llm = d.pop("llm", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"qformer"}
        if unknown:
            raise ValueError(f"unknown Blip2Config fields: {sorted(unknown)}")
        return cls(
            vision=VisionConfig(**vision),
            qformer=QFormerConfig(**d.pop("qformer", {})),
            llm=LLMConfig(**llm) if llm else None,
            **d,
        )

    @classmethod
    def from_json(cls, text: str) -> Blip2Config:
        return cls.from_dict(json.loads(text))


# ----------------------------------------------------------------------------------------------- presets

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
    side (vocabulary 30523) to read the instruction; the paper's short-answer question template."""
    config = _stage2(llm, llm_name, 224, name)
    is_t5 = config.llm.is_encoder_decoder
    return dataclasses.replace(
        config,
        qformer=QFormerConfig(itg_head=False, instruction=True),
        llm=dataclasses.replace(
            config.llm,
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
            value = dataclasses.replace(current, **value) if current is not None else section(**value)
        changes[key] = value
    given = overrides.get("qformer")
    explicit = isinstance(given, QFormerConfig) or (isinstance(given, dict) and "encoder_width" in given)
    if "vision" in changes and not explicit:  # the Q-Former reads the new tower's width, as when built anew
        changes["qformer"] = dataclasses.replace(changes.get("qformer", config.qformer), encoder_width=0)
    return dataclasses.replace(config, **changes)


def list_presets() -> list[str]:
    return sorted(PRESETS)
