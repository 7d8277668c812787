"""Configuration dataclasses.

One frozen dataclass per component and a `Blip2Config` that holds them (named presets of it:
`blip2.presets`). No torch import here, so configs can be read and
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

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# the image normalization (mean, std) each tower family was trained with: the processor's default for a
# `VisionConfig` that does not set its own (any other family: CLIP's, as for EVA ViT-g and timm's EVA-CLIP)
IMAGE_NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "blip_2_vision_model": (CLIP_MEAN, CLIP_STD),
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
    "siglip_vision_model": (HALF, HALF),
    "siglip2_vision_model": (HALF, HALF),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD),
    "convnext": (IMAGENET_MEAN, IMAGENET_STD),
}

# transformers' default width of each family's output tokens (used when `hf_config` does not set it)
_DEFAULT_WIDTH = {
    "blip_2_vision_model": 1408,
    "clip_vision_model": 768,
    "siglip_vision_model": 768,
    "siglip2_vision_model": 768,
    "dinov2": 768,
    "dinov2_with_registers": 768,
    "convnext": 768,
}

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
            `num_hidden_layers=23`); SigLIP, SigLIP2, DINOv2, ConvNeXt, a timm model (`timm_wrapper`)
            and any other vision backbone (ResNet, ViT) work, a 4-D feature map becoming a token grid
            (the features each family gives: `blip2.models.encoders`).
        image_size: side of the square input in pixels.
        image_mean, image_std: normalization of the processor; None: the tower family's
            (`IMAGE_NORMALIZATION`: 0.5 / 0.5 for SigLIP, ImageNet's for DINOv2 and ConvNeXt, CLIP's
            otherwise).
        freeze: keep the tower frozen (eval mode, no gradients). False fine-tunes it, as the paper's
            caption and retrieval fine-tunings do (then features cannot come from a cache).
        freeze_ln_vision: also freeze `ln_vision` (trainable by default, as in the original code).
        dtype: precision of the frozen tower ("float32", "bfloat16", "float16").
        ln_vision_eps: eps of `ln_vision`; None: 1e-5 for a new LayerNorm, the tower's own for the EVA
            tower's reused `post_layernorm` (transformers: 1e-6; LAVIS checkpoints set 1e-5).
    """

    hf_config: dict[str, Any] = field(default_factory=lambda: {"model_type": "blip_2_vision_model"})
    image_size: int = 224
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    freeze: bool = True
    freeze_ln_vision: bool = False
    dtype: str = "float32"
    ln_vision_eps: float | None = None

    def __post_init__(self) -> None:
        mean, std = IMAGE_NORMALIZATION.get(self.model_type, (CLIP_MEAN, CLIP_STD))
        if self.image_mean is None:
            object.__setattr__(self, "image_mean", mean)
        if self.image_std is None:
            object.__setattr__(self, "image_std", std)

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    @property
    def width(self) -> int:
        """Feature width of the tower's output tokens (a timm model: `model_args.embed_dim` or
        `num_features`)."""
        cfg = self.hf_config
        if "hidden_size" in cfg:
            return int(cfg["hidden_size"])
        if "hidden_sizes" in cfg:
            return int(cfg["hidden_sizes"][-1])
        if "num_features" in cfg:
            return int(cfg["num_features"])
        if "embed_dim" in (cfg.get("model_args") or {}):
            return int(cfg["model_args"]["embed_dim"])
        if cfg["model_type"] in _DEFAULT_WIDTH:
            return _DEFAULT_WIDTH[cfg["model_type"]]
        setting = "num_features" if cfg["model_type"] == "timm_wrapper" else "hidden_size"
        raise ValueError(f"cannot tell the feature width of a {cfg['model_type']!r} tower: set {setting}")


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
        max_txt_len: the most LLM tokens a prompt (or a training text) keeps.
        chat_template: wrap every prompt, in training and generation, as one user turn in the
            tokenizer's chat template (instruct LLMs such as Qwen2.5-Instruct; `blip2.llm_families`).
    """

    hf_config: dict[str, Any] = field(default_factory=lambda: {"model_type": "opt"})
    name: str = ""
    dtype: str = "float32"
    prompt: str = ""
    vqa_prompt: str | None = None
    eos_text: str | None = None
    image_token_id: int | None = None
    max_txt_len: int = 32
    chat_template: bool = False

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
        video_frames: an InstructBLIP video model (transformers' `InstructBlipVideoForConditionalGeneration`
            layout) reading clips of this many frames by default; 0: an image model. The weights are the
            image model's, and either reads both (`InstructBridge`: 5-D pixels are video).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig | None = None
    embed_dim: int = 256
    max_txt_len: int = 32
    tokenizer: str = "bert-base-uncased"
    name: str = ""
    video_frames: int = 0

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
        if self.video_frames < 0 or (self.video_frames and not q.instruction):
            raise ValueError("video_frames is 0 (images) or the frames per clip of an InstructBLIP model")
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
