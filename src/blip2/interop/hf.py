"""The transformers layout: `Blip2ForConditionalGeneration` (stage 2), `Blip2ForImageTextRetrieval`
(stage 1), `InstructBlipForConditionalGeneration` (InstructBLIP) and
`InstructBlipVideoForConditionalGeneration` (InstructBLIP for video: the same weights under the same
keys, another config class), configs and state-dict keys, both ways.

Our modules line up with transformers' one to one, except:

* the vision tower's `post_layernorm` is our `visual.ln_vision` (moved out of the tower);
* the Q-Former's input LayerNorm `qformer.layernorm` (InstructBLIP: `qformer.embeddings.layernorm`) is
  our `qformer.embeddings.norm`, and the text embeddings, which BLIP-2 keeps at the top level
  (`embeddings.*`, retrieval model only) and InstructBLIP in its Q-Former (`qformer.embeddings.*`), are
  our `qformer.embeddings.{word,position}`;
* transformers has no place for the ITC temperature (`temp`), the ITG head (`qformer.lm_head`) or, in
  the generation model, the Q-Former's text side: `extra_keys` lists them, and a saved directory keeps
  them in a separate file beside `model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.errors import UserError
from blip2.interop.keymap import Rule, rename

EVA_TOWER = "blip_2_vision_model"
GENERATION = "Blip2ForConditionalGeneration"
RETRIEVAL = "Blip2ForImageTextRetrieval"
INSTRUCT = "InstructBlipForConditionalGeneration"
VIDEO = "InstructBlipVideoForConditionalGeneration"
VIDEO_FRAMES = 4  # the frames per clip transformers' video model is made for

# Q-Former layer parts: ours (after `qformer.layers.{i}.`) -> transformers (after
# `qformer.encoder.layer.{i}.`). LAVIS uses the same names with `self` for `attention`.
QFORMER_LAYER: dict[str, str] = {
    "self_attn.query": "attention.{attn}.query",
    "self_attn.key": "attention.{attn}.key",
    "self_attn.value": "attention.{attn}.value",
    "self_attn.out": "attention.output.dense",
    "self_attn.norm": "attention.output.LayerNorm",
    "cross_attn.query": "crossattention.{attn}.query",
    "cross_attn.key": "crossattention.{attn}.key",
    "cross_attn.value": "crossattention.{attn}.value",
    "cross_attn.out": "crossattention.output.dense",
    "cross_attn.norm": "crossattention.output.LayerNorm",
    "query_ffn.fc1": "intermediate_query.dense",
    "query_ffn.fc2": "output_query.dense",
    "query_ffn.norm": "output_query.LayerNorm",
    "text_ffn.fc1": "intermediate.dense",
    "text_ffn.fc2": "output.dense",
    "text_ffn.norm": "output.LayerNorm",
}

# bookkeeping fields of transformers configs that do not describe the architecture
_BOOKKEEPING = {
    "transformers_version",
    "architectures",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "attn_implementation",
    "_attn_implementation_autoset",
}


def qformer_layer_rules(theirs_prefix: str, attn: str) -> list[Rule]:
    """Rules for every Q-Former layer part: `qformer.layers.{i}.<ours>` <-> `<prefix>.{i}.<theirs>`."""
    return [
        rename(
            f"qformer.layers.{{i}}.{ours}.{{p}}", f"{theirs_prefix}.{{i}}.{theirs.format(attn=attn)}.{{p}}"
        )
        for ours, theirs in QFORMER_LAYER.items()
    ]


def rules(kind: str = "generation") -> list[Rule]:
    """Our keys <-> transformers' keys for a model kind (`Blip2Config.kind`; the BLIP-2 classes share
    theirs; the most specific templates first)."""
    stored = LAYOUTS[kind]
    text = stored.text_embeddings
    return [
        rename("visual.ln_vision.{p}", "vision_model.post_layernorm.{p}"),
        rename("visual.tower.{rest}", "vision_model.{rest}"),
        rename("query_tokens", "query_tokens"),
        rename("qformer.embeddings.norm.{p}", f"{stored.qformer_norm}.{{p}}"),
        rename("qformer.embeddings.word.weight", f"{text}.word_embeddings.weight"),
        rename("qformer.embeddings.position.weight", f"{text}.position_embeddings.weight"),
        *qformer_layer_rules("qformer.encoder.layer", attn="attention"),
        rename("vision_proj.{p}", "vision_projection.{p}"),
        rename("text_proj.{p}", "text_projection.{p}"),
        rename("itm_head.{p}", "itm_head.{p}"),
        rename("language_projection.{p}", "language_projection.{p}"),
        rename("llm.{rest}", "language_model.{rest}"),
    ]


@dataclass(frozen=True)
class Layout:
    """How one model kind is stored in transformers' layout.

    Attributes:
        architecture: transformers' class name (`config.json`'s `architectures`).
        extra: our keys that class has no place for (stored beside `model.safetensors`).
        text_input: the class feeds text to the Q-Former (`use_qformer_text_input`), so the Q-Former
            must have its text side.
        model_type: the `model_type` of the class's config ("blip-2", "instructblip").
        qformer_norm: where the Q-Former's input LayerNorm lives.
        text_embeddings: where the Q-Former's word and position embeddings live.
    """

    architecture: str
    extra: re.Pattern[str]
    text_input: bool
    model_type: str = "blip-2"
    qformer_norm: str = "qformer.layernorm"
    text_embeddings: str = "embeddings"


LAYOUTS = {
    "retrieval": Layout(RETRIEVAL, re.compile(r"temp\Z|qformer\.lm_head\."), text_input=True),
    "generation": Layout(
        GENERATION,
        re.compile(
            r"qformer\.lm_head\.|qformer\.embeddings\.(word|position)\.|qformer\.layers\.\d+\.text_ffn\."
        ),
        text_input=False,
    ),
    "instruct": Layout(
        INSTRUCT,
        re.compile(r"qformer\.lm_head\."),  # nothing: an instruction-reading Q-Former has no ITG head
        text_input=True,
        model_type="instructblip",
        qformer_norm="qformer.embeddings.layernorm",
        text_embeddings="qformer.embeddings",
    ),
}
# an "instruct" model with `video_frames` set: InstructBLIP's keys in transformers' video class
VIDEO_LAYOUT = dataclasses.replace(LAYOUTS["instruct"], architecture=VIDEO, model_type="instructblipvideo")


def layout(config: Blip2Config) -> Layout:
    """How a model of `config` is stored in transformers' layout."""
    return VIDEO_LAYOUT if config.video_frames else LAYOUTS[config.kind]


def extra_keys(config: Blip2Config) -> re.Pattern[str]:
    """Our keys transformers has no place for (stored beside `model.safetensors`)."""
    return layout(config).extra


def has_counterpart(config: Blip2Config) -> bool:
    """Whether transformers has a class for this model (EVA ViT-g tower; a Q-Former with a text side
    where the class reads text)."""
    if config.vision.model_type != EVA_TOWER:
        return False
    return config.qformer.text or not layout(config).text_input


def architecture(config: Blip2Config) -> str:
    return layout(config).architecture


# ------------------------------------------------------------------------------------------ configs


def _arch_dict(sub: Any) -> dict[str, Any]:
    d = sub.to_diff_dict() if hasattr(sub, "to_diff_dict") else dict(sub)
    d = {k: v for k, v in d.items() if k not in _BOOKKEEPING}
    d["model_type"] = sub.model_type if hasattr(sub, "model_type") else d["model_type"]
    return d


def config_from_transformers(hf: dict[str, Any] | Any, name: str = "") -> Blip2Config:
    """Our `Blip2Config` from a transformers BLIP-2 or InstructBLIP `config.json` (a dict or a config).

    InstructBLIP (`model_type` "instructblip") gives an "instruct" config, InstructBLIP for video
    ("instructblipvideo") one with `video_frames` (and the `<video>` token as `image_token_id`); for
    BLIP-2, the retrieval class (`architectures: ["Blip2ForImageTextRetrieval"]`, or a Q-Former with
    its text input and no real LM) gives a stage-1 config, the generation classes a stage-2 one.
    """
    import transformers

    if isinstance(hf, dict):
        config_classes = {
            "blip-2": transformers.Blip2Config,
            "instructblip": transformers.InstructBlipConfig,
            "instructblipvideo": transformers.InstructBlipVideoConfig,
        }
        if hf.get("model_type", "blip-2") not in config_classes:
            raise UserError(
                f"config.json describes a {hf.get('model_type')!r} model, not BLIP-2 (model_type 'blip-2') "
                "or InstructBLIP ('instructblip', 'instructblipvideo')"
            )
        d = {k: v for k, v in hf.items() if k not in ("architectures", "transformers_version")}
        archs = hf.get("architectures") or []
        hf = config_classes[hf.get("model_type", "blip-2")](**d)
    else:
        archs = hf.architectures or []
    q = hf.qformer_config
    if q.hidden_act != "gelu":
        raise UserError(f"the Q-Former uses hidden_act {q.hidden_act!r}; only 'gelu' is supported")
    video = hf.model_type == "instructblipvideo"
    instruct = video or hf.model_type == "instructblip"
    retrieval = not instruct and (RETRIEVAL in archs or (not archs and q.use_qformer_text_input))
    vision = {**_arch_dict(hf.vision_config), "model_type": EVA_TOWER}  # InstructBLIP's is the same tower
    qformer = QFormerConfig(
        hidden_size=q.hidden_size,
        num_layers=q.num_hidden_layers,
        num_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size,
        cross_attention_freq=q.cross_attention_frequency,
        encoder_width=hf.vision_config.hidden_size,
        num_query_tokens=hf.num_query_tokens,
        vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings,
        layer_norm_eps=q.layer_norm_eps,
        dropout=q.hidden_dropout_prob,
        attention_dropout=q.attention_probs_dropout_prob,
        text=bool(retrieval or instruct),
        itg_head=False,
        instruction=instruct,
        pad_token_id=q.pad_token_id if q.pad_token_id is not None else 0,
    )
    llm = None
    if not retrieval:
        image_token = hf.video_token_index if video else hf.image_token_index
        llm = LLMConfig(hf_config=_arch_dict(hf.text_config), image_token_id=image_token)
    return Blip2Config(
        vision=VisionConfig(hf_config=vision, image_size=hf.vision_config.image_size),
        qformer=qformer,
        llm=llm,
        embed_dim=getattr(hf, "image_text_hidden_size", Blip2Config.embed_dim),
        name=name,
        video_frames=VIDEO_FRAMES if video else 0,
    )


def config_to_transformers(config: Blip2Config) -> Any:
    """The transformers config (`Blip2Config`, `InstructBlipConfig` or `InstructBlipVideoConfig`) of one
    of our configs (`has_counterpart(config)` must hold)."""
    import transformers

    if not has_counterpart(config):
        raise UserError(
            f"a model with a {config.vision.model_type!r} image encoder has no transformers BLIP-2 class"
        )
    stored = layout(config)
    v = {k: val for k, val in config.vision.hf_config.items() if k not in ("model_type", "_name_or_path")}
    v["image_size"] = config.vision.image_size
    q = config.qformer
    qformer = dict(
        vocab_size=q.vocab_size,
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=q.dropout,
        attention_probs_dropout_prob=q.attention_dropout,
        max_position_embeddings=q.max_position_embeddings,
        layer_norm_eps=q.layer_norm_eps,
        pad_token_id=q.pad_token_id,
        cross_attention_frequency=q.cross_attention_freq,
        encoder_hidden_size=q.encoder_width,
    )
    text = None
    if config.llm is not None:
        t = {k: val for k, val in config.llm.hf_config.items() if k != "_name_or_path"}
        text = transformers.AutoConfig.for_model(t.pop("model_type"), **t)
    image_token = config.llm.image_token_id if config.llm is not None else None
    if stored.model_type == "instructblipvideo":
        hf = transformers.InstructBlipVideoConfig(
            vision_config=transformers.InstructBlipVideoVisionConfig(**v),
            qformer_config=transformers.InstructBlipVideoQFormerConfig(**qformer),
            text_config=text,
            num_query_tokens=q.num_query_tokens,
            video_token_index=image_token,
        )
    elif stored.model_type == "instructblip":
        hf = transformers.InstructBlipConfig(
            vision_config=transformers.InstructBlipVisionConfig(**v),
            qformer_config=transformers.InstructBlipQFormerConfig(**qformer),
            text_config=text,
            num_query_tokens=q.num_query_tokens,
            image_token_index=image_token,
        )
    else:
        hf = transformers.Blip2Config(
            vision_config=transformers.Blip2VisionConfig(**v),
            qformer_config=transformers.Blip2QFormerConfig(
                **qformer, use_qformer_text_input=stored.text_input
            ),
            text_config=text,
            num_query_tokens=q.num_query_tokens,
            image_text_hidden_size=config.embed_dim,
            image_token_index=image_token,
        )
    hf.architectures = [stored.architecture]
    return hf
