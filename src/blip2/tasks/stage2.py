"""Stage 2 (generative learning): the frozen LLM's language-modeling loss on a `LanguageBridge`.

Li et al. (2023), section 3.3. Decoder-only LM: next-token cross-entropy over the text after the soft
prompt, ignoring the queries, the padding and the prompt. Encoder-decoder LM: the paper's prefix-LM
loss (the encoder reads `[queries][prefix text]`, the decoder predicts the rest; `blip2.data.batching`
cuts each caption at a random word of its first half).

Task types: `Stage2Task` (task name `stage2`, pre-training), `CaptionTask` (`caption`, fine-tuning
with the model's caption prompt) and `VQATask` (`vqa`, question -> answer).

What trains (`model.trainable`): the whole bridge side (Q-Former, queries, `ln_vision`, projection),
the projection only, or the projection and the Q-Former; with a `lora` section, LoRA adapters in the
LLM too. `model.qformer_from` starts the bridge of a new LLM from another model's trained Q-Former
(MiniGPT-4's path: Zhu et al. 2023 trained only the projection into Vicuna from BLIP-2's Q-Former).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from blip2 import hub, losses
from blip2.config import DTYPES, Blip2Config, LLMConfig, VisionConfig
from blip2.errors import UserError
from blip2.losses import Gather
from blip2.models.bridge import LanguageBridge
from blip2.models.encoders import torch_dtype
from blip2.models.query_encoder import QueryEncoder
from blip2.presets import PRESETS, preset
from blip2.tasks.base import Task, load_saved

if TYPE_CHECKING:
    from blip2.data.batching import TextSpec
    from blip2.train.config import DataSection, TrainConfig

# the batch entries the loss reads
INPUTS = (
    "pixel_values",
    "input_ids",
    "attention_mask",
    "image_features",
    "labels",
    "prompt_lengths",
    "decoder_attention_mask",
)


@dataclass
class Stage2Output:
    loss: Tensor  # scalar LM loss
    # decoder-only: (B, Q + L, V) over [queries; text] in the caller's padding; encoder-decoder: (B, T, V)
    # decoder; None when the call asked for the loss only (`return_logits=False`)
    logits: Tensor | None


class Stage2Task(Task):
    """The language-modeling loss of a language bridge (pre-training).

    Args:
        model: the `LanguageBridge` to train.

    Attributes:
        caption_prompt: texts start with the model's caption prompt (`LLMConfig.prompt`) unless the data
            section sets `prompt`; False: no prompt.
        prefix_split: an encoder-decoder LM learns the prefix-LM objective (each caption cut at a
            random word of its first half: the encoder reads the prefix, the decoder the rest).
    """

    model: LanguageBridge
    caption_prompt: ClassVar[bool] = False
    prefix_split: ClassVar[bool] = True

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        image_features: Tensor | None = None,
        labels: Tensor | None = None,
        prompt_lengths: Tensor | int | None = None,
        decoder_attention_mask: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
        return_logits: bool = True,
    ) -> Stage2Output:
        """The stage-2 loss (arguments as in `LanguageBridge.forward`; the instruction the Q-Former
        reads, `qformer_input_ids`, only for an InstructBLIP model).

        Args:
            return_logits: False: the loss only (what training needs); a decoder-only LM then applies
                its output layer only from the first position that predicts a counted token on. The
                loss is the same.
        """
        out = self.model(
            pixel_values,
            input_ids,
            attention_mask,
            image_features=image_features,
            labels=labels,
            prompt_lengths=prompt_lengths,
            decoder_attention_mask=decoder_attention_mask,
            loss_only=not return_logits,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
        )
        if self.model.is_encoder_decoder:
            loss = losses.seq2seq_loss(out.logits, out.labels)
        else:
            loss = losses.lm_loss(out.logits, out.labels)
        return Stage2Output(loss=loss, logits=self.model.logits_as_given(out) if return_logits else None)

    # ---------------------------------------------------------------------------------- training loop

    def inputs(self, batch: dict[str, Tensor], gather: Gather, generator: torch.Generator) -> dict[str, Any]:
        return {**{k: batch[k] for k in INPUTS if k in batch}, "return_logits": False}  # the loss only

    def train(self, mode: bool = True) -> Stage2Task:
        """Training mode, except a frozen Q-Former (`model.trainable: projection`): it runs as at
        inference (no dropout), as the frozen towers do."""
        super().train(mode)
        if not any(p.requires_grad for p in self.model.qformer.parameters()):
            self.model.qformer.eval()
        return self

    def frozen_llm(self) -> nn.Module:
        return self.model.llm

    @classmethod
    def build_model(cls, cfg: TrainConfig) -> LanguageBridge:
        """The model to train (`Task.build_model`, or a new model around `model.qformer_from`'s
        Q-Former), with only the parts `model.trainable` names left trainable and the `lora` adapters
        added to the LLM."""
        m = cfg.model
        if m.qformer_from is not None:
            model = cls.reuse_qformer(cfg)
        else:
            model = super().build_model(cfg)
        trainable = m.trainable or ("projection" if m.qformer_from is not None else "all")
        if trainable != "all":
            keep = ("language_projection.",) + (
                ("qformer.", "query_tokens") if trainable != "projection" else ()
            )
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith(keep))
        if cfg.lora is not None:
            from blip2.interop import lora

            lo = cfg.lora
            lora.add_lora(model.llm, lo.rank, lo.alpha, lo.dropout, lo.target_modules)
        return model

    @classmethod
    def reuse_qformer(cls, cfg: TrainConfig) -> LanguageBridge:
        """The model `model.preset` / `model.config` names, its Q-Former, queries and `ln_vision`
        taken from the trained model `model.qformer_from` (and its image tower, when it is the same);
        the projection is new."""
        from blip2.tasks.base import vision_model_config

        config, tower = vision_model_config(cfg)
        if cls.new_model.__func__ is not Stage2Task.new_model.__func__ or config.kind != "generation":
            raise UserError(
                f"model.qformer_from starts a BLIP-2 language bridge (task stage2, caption or vqa with a "
                f"stage-2 preset or config), not task {cfg.task!r} with a {config.kind} model"
            )
        source_name = cfg.model.qformer_from
        source = load_saved(source_name, "model.qformer_from")
        if not isinstance(source, QueryEncoder):
            raise UserError(f"model.qformer_from: {source_name} holds no BLIP-2 Q-Former")
        old_q, new_width = source.config.qformer, config.vision.width
        if old_q.encoder_width != new_width:
            raise UserError(
                f"model.qformer_from: {source_name}'s Q-Former reads {old_q.encoder_width}-wide image features "
                f"and this model's image tower gives {new_width}-wide ones: use a tower of that width, or "
                "train a new Q-Former for this tower (stage 1)"
            )
        qformer = dataclasses.replace(old_q, text=False, itg_head=False, instruction=False)
        same_tower = _architecture(source.config.vision) == _architecture(config.vision)
        if same_tower:  # the source's trained tower, in this config's precision
            config = dataclasses.replace(
                config, vision=dataclasses.replace(source.config.vision, dtype=config.vision.dtype)
            )
        elif tower is None:
            raise UserError(
                f"model.qformer_from: {source_name}'s image tower is not the one this model describes, and "
                "nothing names pretrained weights for this one: set model.vision (a transformers folder or "
                "hub id of the tower), or describe the source's tower"
            )
        config = dataclasses.replace(config, qformer=qformer)
        llm_config, llm = _model_llm(config, cfg)
        vision = tower
        if same_tower:
            vision = copy.deepcopy(source.visual)
            vision.config = config.vision
            vision.tower.to(torch_dtype(config.vision.dtype))
        model = LanguageBridge(dataclasses.replace(config, llm=llm_config), vision_tower=vision, llm=llm)
        source_state = source.qformer.state_dict()
        model.qformer.load_state_dict({k: source_state[k] for k in model.qformer.state_dict()})
        with torch.no_grad():
            model.query_tokens.copy_(source.query_tokens)
            if not same_tower:  # a new tower of the same width: its trained normalization still fits
                model.visual.ln_vision.load_state_dict(source.visual.ln_vision.state_dict())
        return model

    @classmethod
    def new_model(cls, config: Blip2Config, cfg: TrainConfig) -> LanguageBridge:
        if config.kind == "retrieval":
            raise UserError(f"task {cfg.task!r} needs a stage-2 model (one with an LLM)")
        _refuse_instruct(config, cfg)
        llm_config, llm = _model_llm(config, cfg)
        return LanguageBridge(dataclasses.replace(config, llm=llm_config), llm=llm)

    @classmethod
    def from_saved(cls, model: Any, cfg: TrainConfig) -> LanguageBridge:
        if getattr(model.config, "llm", None) is None:  # a stage-1 model: stage 2 starts from it
            llm_config, llm = llm_for_stage2(cfg.model.llm, None, cfg.model.overrides.get("llm"))
            return LanguageBridge.from_stage1(
                model, llm if llm is not None else llm_config, llm_config=llm_config
            )
        _refuse_instruct(model.config, cfg)
        _refuse_another_llm(model.config, cfg)
        return model

    @classmethod
    def saved_overrides(cls, model: nn.Module) -> frozenset[str]:
        """`model.overrides.llm` (`NEW_LLM_SETTINGS`) sets up the new LLM of stage 2 from a stage-1 model."""
        return frozenset({"llm"}) if getattr(model.config, "llm", None) is None else frozenset()

    @classmethod
    def text_spec(cls, cfg: TrainConfig, section: DataSection, config: Blip2Config) -> TextSpec:
        from blip2.data.batching import TextSpec

        llm = config.llm
        name = cfg.model.llm_tokenizer or llm.name or cfg.model.llm
        if not name:
            raise UserError("set model.llm_tokenizer: the tokenizer of the LLM (folder or hub id)")
        mode = "seq2seq" if llm.is_encoder_decoder else "causal"
        prompt = section.prompt if section.prompt is not None else (llm.prompt if cls.caption_prompt else "")
        tokenizer = _llm_tokenizer(name, llm)
        if llm.chat_template and not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"the LLM tokenizer {name!r} has no chat template, and model.overrides.llm.chat_template "
                "asks for one: use an instruct model's tokenizer (Qwen2.5-Instruct, Llama-3.2-Instruct, "
                "...) or set model.overrides.llm.chat_template to false"
            )
        return TextSpec(
            mode,
            tokenizer,
            max_len=section.max_len,
            prompt=prompt,
            eos_text=llm.eos_text,
            vqa_template=llm.vqa_template,
            prefix_split=cls.prefix_split and mode == "seq2seq",
            chat_template=llm.chat_template,
        )


class CaptionTask(Stage2Task):
    """Captioning fine-tuning: the LM loss on captions after the model's caption prompt."""

    caption_prompt = True
    prefix_split = False


class VQATask(Stage2Task):
    """VQA fine-tuning: the LM loss on answers after their question (`LLMConfig.vqa_template`)."""

    prefix_split = False


def _architecture(vision: VisionConfig) -> tuple[dict[str, Any], int]:
    """What makes two image towers the same one: their transformers config (where it came from aside)
    and input size."""
    hf_config = {k: v for k, v in vision.hf_config.items() if k != "_name_or_path"}
    return hf_config, vision.image_size


def _model_llm(config: Blip2Config, cfg: TrainConfig) -> tuple[LLMConfig, nn.Module | None]:
    """The LLM of a new stage-2 model: the one `model.llm` names in place of the config's, else the
    config's own. A named LLM takes `model.overrides.llm` (again) on top, as from a stage-1 folder
    (`NEW_LLM_SETTINGS`: its architecture comes from where `model.llm` points)."""
    if cfg.model.llm is None:
        return llm_for_stage2(None, config.llm)
    return llm_for_stage2(cfg.model.llm, config.llm, cfg.model.overrides.get("llm"))


def _refuse_instruct(config: Blip2Config, cfg: TrainConfig) -> None:
    if config.kind == "instruct":
        raise UserError(
            f"task {cfg.task!r} trains BLIP-2's language bridge, and {config.name or 'this model'} is an "
            "InstructBLIP model: use task: instruct"
        )


def _refuse_another_llm(config: Blip2Config, cfg: TrainConfig) -> None:
    """A stage-2 model keeps its LLM: `model.llm` naming another one is refused rather than ignored (a
    preset counts as the LLM it names)."""
    wanted = cfg.model.llm
    if wanted is None:
        return
    named = preset(wanted).llm.name if wanted in PRESETS and preset(wanted).llm is not None else wanted
    if named != config.llm.name:
        own = config.llm.name or "its built-in one"
        raise UserError(
            f"model.llm: model.init_from {cfg.model.init_from} is a stage-2 model and keeps its own LLM "
            f"({own}); remove model.llm, or start stage 2 from a stage-1 model to attach {wanted}"
        )


# `LLMConfig` fields `model.overrides.llm` may set for an LLM that `model.llm` names (its architecture
# and weights come from there), with the types they take
NEW_LLM_SETTINGS: dict[str, type | tuple[type, ...]] = {
    "dtype": str,
    "prompt": str,
    "vqa_prompt": (str, type(None)),
    "eos_text": (str, type(None)),
    "max_txt_len": int,
    "chat_template": bool,
}


def llm_for_stage2(
    name: str | None, base: LLMConfig | None, settings: dict[str, Any] | None = None
) -> tuple[LLMConfig, nn.Module | None]:
    """The LLM of a stage-2 model: its `LLMConfig` and, for a pretrained LM, the loaded module.

    `name` is a preset (its LLM), a transformers LM folder or hub id, or None for `base` (the model's
    own `LLMConfig`). A preset LLM without a `name` is built with random weights (tiny presets); one
    with a name is loaded from it, keeping the preset's conventions (dtype, prompt, EOS text).

    A folder or hub id in place of `base` (a preset's or config's LLM) is another LLM: its `LLMConfig`
    is `name` with that LM's architecture; from `base` it keeps what concerns the model rather than the
    old LLM's family (`prompt`, `max_txt_len`, and `dtype` where the LM's config records none: else
    that one); the family's conventions start from their defaults (`eos_text` and `vqa_prompt` None:
    the tokenizer's EOS and the per-kind template, `blip2.llm_families`; no chat template, no image
    token). `settings` (`model.overrides.llm`, the fields of `NEW_LLM_SETTINGS`) set any of these
    before the LLM loads (its `dtype` too).
    """
    settings = _checked_settings(settings if settings is not None else {})
    if name in PRESETS:
        base = preset(name).llm
        if base is None:
            raise UserError(f"preset {name!r} has no LLM; use a stage-2 preset for model.llm")
        name = None
    if name is None and base is None:
        raise UserError(
            "stage 2 from a stage-1 model needs model.llm (a preset like blip2-opt-2.7b or a folder)"
        )
    from blip2.interop.checkpoint import load_pretrained_llm, pretrained_llm_config, recorded_dtype

    if name is None:  # the config's own LLM
        base = dataclasses.replace(base, **settings)
        if not base.name:
            return base, None
        path = hub.resolve(base.name)
        llm_config = pretrained_llm_config(path, base)
    else:  # another LLM
        path = hub.resolve(name)
        kept = {} if base is None else {"prompt": base.prompt, "max_txt_len": base.max_txt_len}
        llm_config = pretrained_llm_config(path, LLMConfig(name=name, **kept))
        if base is not None:
            llm_config = dataclasses.replace(llm_config, dtype=recorded_dtype(path) or base.dtype)
        llm_config = dataclasses.replace(llm_config, **settings)
    return llm_config, load_pretrained_llm(path, llm_config)


def _checked_settings(settings: Any) -> dict[str, Any]:
    """`model.overrides.llm`; a field that does not apply or a value of the wrong type is one
    sentence."""
    if not isinstance(settings, dict):
        raise UserError(
            f"model.overrides.llm is {settings!r}: give the LLM's settings, e.g. {{chat_template: true}}"
        )
    for key, value in settings.items():
        kind = NEW_LLM_SETTINGS.get(key)
        if kind is None:
            raise UserError(
                f"model.overrides.llm.{key} does not apply to an LLM that model.llm names (its architecture "
                f"comes from there): set {', '.join(NEW_LLM_SETTINGS)}"
            )
        wrong_type = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if wrong_type or (key == "dtype" and value not in DTYPES):
            expected = f"one of {', '.join(DTYPES)}" if key == "dtype" else _type_names(kind)
            raise UserError(f"model.overrides.llm.{key} is {value!r}: give {expected}")
    return settings


def _type_names(kind: type | tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "a whole number", str: "a text", type(None): "null"}
    return " or ".join(names[k] for k in (kind if isinstance(kind, tuple) else (kind,)))


def _llm_tokenizer(name: str, llm: LLMConfig) -> Any:
    """The LLM's tokenizer for training; anything missing, or a vocabulary larger than the LLM's
    embedding table (its ids would index past it), is one sentence naming the setting."""
    from blip2.tokenizers import llm_tokenizer

    if name in PRESETS and not getattr(preset(name).llm, "name", ""):
        vocab = llm.hf_config.get("vocab_size", "its")
        raise UserError(
            f"model.llm {name!r} is a small random LLM without a tokenizer: set model.llm_tokenizer to a "
            f"tokenizer folder whose ids fit its {vocab}-token vocabulary"
        )
    try:
        tokenizer = llm_tokenizer(name)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not load the LLM tokenizer {name!r} ({reason}): set model.llm_tokenizer to a local "
            "tokenizer folder, or connect to the Hugging Face hub"
        ) from None
    from blip2.models.language import transformers_config

    # the rows of the LLM's input embedding table
    rows = getattr(transformers_config(llm).get_text_config(), "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise UserError(
            f"the LLM tokenizer {name!r} has {len(tokenizer)} tokens and the LLM "
            f"{llm.name or llm.model_type!r} embeds only {rows}, so its ids would run past the LLM's "
            "embedding table: set model.llm_tokenizer to the LLM's own tokenizer"
        )
    return tokenizer
