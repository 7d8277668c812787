"""The frozen language model of stage 2: building, freezing and the tensor plumbing around it.

Stage 2 keeps the LLM a plain transformers model (`AutoModelForCausalLM` for decoder-only models such
as OPT, GPT-2, Llama or Qwen; `AutoModelForSeq2SeqLM` for encoder-decoder ones such as T5/FlanT5) and
feeds it `inputs_embeds`: the projected Q-Former queries followed by the embedded text. Everything here
is a small pure function over that model or over token-id tensors; nothing tokenizes.

Padding conventions (all handled here so callers can pad either way):

* decoder-only training: any padding side; the model moves it to the *right* (`[queries][text][pads]`,
  so each row's first text token, a target when there is no prompt, is predicted from the last query),
  and positions come from the attention mask (`position_ids`);
* decoder-only generation: prompts are moved to *left* padding (`[queries][pads][prompt]`), so every
  row's new tokens follow its last real token;
* encoder-decoder: the encoder text is moved to *right* padding (`[queries][prompt][pads]`), so T5's
  relative positions between queries and text do not depend on the padding.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from blip2.config import LLMConfig
from blip2.errors import UserError
from blip2.models.encoders import dtype_name, torch_dtype


def transformers_config(cfg: LLMConfig) -> Any:
    """The transformers config object of `cfg.hf_config`, every given field kept as given."""
    import transformers

    hf = dict(cfg.hf_config)
    model_type = hf.pop("model_type")
    hf.pop("_name_or_path", None)
    hf_cfg = transformers.AutoConfig.for_model(model_type, **hf)
    for key, value in hf.items():  # what a config class rewrites on the way in (T5 in transformers 5.x
        if getattr(hf_cfg, key, value) != value:  # forces tie_word_embeddings=True): the given value wins
            setattr(hf_cfg, key, value)
    return hf_cfg


def auto_class(hf_cfg: Any) -> Any:
    """`AutoModelForSeq2SeqLM` for an encoder-decoder config, else `AutoModelForCausalLM`."""
    import transformers

    if hf_cfg.is_encoder_decoder:
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def lm_class(hf_cfg: Any) -> type:
    """The transformers LM class `auto_class(hf_cfg)` builds for the config (`LlamaForCausalLM`, ...).

    Raises:
        UserError: transformers has no causal (decoder-only) or sequence-to-sequence LM of this model
            type (an image model, an encoder such as CLIP's text tower, ...).
    """
    try:
        return auto_class(hf_cfg)._model_mapping[type(hf_cfg)]
    except KeyError:
        raise UserError(
            f"the LLM's model type {hf_cfg.model_type!r} is neither a causal LM (AutoModelForCausalLM) nor a "
            "sequence-to-sequence LM (AutoModelForSeq2SeqLM) in transformers, so it cannot be BLIP-2's "
            "language model: use a decoder-only LM such as Llama or Qwen2, or an encoder-decoder one such as T5"
        ) from None


def attention_implementation(hf_cfg: Any) -> str:
    """ "sdpa" (PyTorch's fused attention), or "eager" for an LM class that has none (Gemma2: SDPA has
    no attention-logit soft-capping); the same choice transformers' own BLIP-2 makes."""
    return "sdpa" if getattr(lm_class(hf_cfg), "_supports_sdpa", False) else "eager"


def check_usable(llm: nn.Module) -> None:
    """Refuse (`UserError`, one sentence) an LM the bridge cannot drive: one whose `forward` takes no
    `inputs_embeds` (the soft visual prompt goes in as embeddings) or that has no input embeddings."""
    name = type(llm).__name__
    if "inputs_embeds" not in forward_params(llm):
        raise UserError(
            f"the language model {name} takes no inputs_embeds, so the image queries cannot be fed to it "
            "as a soft prompt: use an LM whose forward accepts inputs_embeds (every transformers "
            "AutoModelForCausalLM / AutoModelForSeq2SeqLM of Llama, Qwen2, Gemma, Phi-3, OPT, GPT-2, T5, ...)"
        )
    try:
        table = llm.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        table = None
    if not isinstance(table, nn.Embedding):
        raise UserError(f"the language model {name} has no input embedding table to embed the prompt with")


def build_llm(cfg: LLMConfig) -> nn.Module:
    """Build the transformers LM described by `cfg.hf_config` with random weights (SDPA attention where
    the LM class has it: `attention_implementation`).

    Pretrained weights: `blip2.interop.checkpoint.load_pretrained_llm`, or the caller's own
    `from_pretrained`, passed to the model instead.

    Raises:
        UserError: the model type is no causal or sequence-to-sequence LM (`lm_class`).
    """
    hf_cfg = transformers_config(cfg)
    llm = auto_class(hf_cfg).from_config(hf_cfg, attn_implementation=attention_implementation(hf_cfg))
    return tie_input_embeddings(llm)


def tie_input_embeddings(llm: nn.Module) -> nn.Module:
    """An encoder-decoder LM's encoder and decoder read its one shared input table (T5/FlanT5).

    transformers 5.x unties them along with the LM head when `tie_word_embeddings=False` (FlanT5's
    separate head), and a folder transformers saved holds `shared.weight` only: loaded untied, the
    encoder's and decoder's tables would stay random. Decoder-only LMs are returned as they are.
    """
    if is_encoder_decoder(llm):
        llm.set_input_embeddings(llm.get_input_embeddings())
    return llm


def freeze(llm: nn.Module, dtype: str | torch.dtype | None = None) -> nn.Module:
    """Freeze every parameter of `llm` (no gradients, no updates) and cast it to `dtype` if given.

    The module is *not* put in eval mode: as in LAVIS, the LLM's dropout follows the model's train/eval
    mode. Gradients still flow *through* it to its inputs (the projected queries).
    """
    llm.requires_grad_(False)
    if dtype is not None:
        llm.to(torch_dtype(dtype))
    return llm


def is_encoder_decoder(llm: nn.Module) -> bool:
    return bool(getattr(llm.config, "is_encoder_decoder", False))


def embedding_width(llm: nn.Module) -> int:
    """Width of the LM's input embeddings (what the projected queries must match)."""
    return int(llm.get_input_embeddings().embedding_dim)


def llm_dtype(llm: nn.Module) -> torch.dtype:
    return llm.get_input_embeddings().weight.dtype


def start_token_id(llm: nn.Module) -> int | None:
    """The token generation starts from when there is no prompt (None: the queries alone).

    The LM's BOS (`config.bos_token_id`, else its generation config's), as transformers' BLIP-2 and
    LAVIS's empty prompt give. transformers 5.x configs no longer carry a default BOS: a T5/FlanT5
    config has none at all, and an encoder-decoder LM then starts from its EOS, the one token its
    tokenizer makes of an empty prompt (LAVIS's `t5_tokenizer("")`; the BLIP-2 conversion sets
    `bos_token_id` to that same id).
    """
    generation = getattr(llm, "generation_config", None)
    for source in (llm.config, generation):
        bos = getattr(source, "bos_token_id", None)
        if bos is not None:
            return int(bos)
    if not is_encoder_decoder(llm):
        return None
    eos = getattr(llm.config, "eos_token_id", None)
    if eos is None:
        eos = getattr(generation, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def position_limit(llm: nn.Module) -> int | None:
    """The most positions the LM reads: its `max_position_embeddings` (GPT-2's `n_positions`), the size
    of a learned position table (OPT, GPT-2) or the context a rotary model was made for (Llama, Qwen);
    None for relative position buckets, which have no limit (T5/FlanT5)."""
    config = llm.config
    if getattr(config, "relative_attention_num_buckets", None) is not None:
        return None
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def sliding_window(llm: nn.Module) -> int | None:
    """The attention window of an LM whose layers (some or all) see only the last positions (Mistral,
    Gemma2), None when every layer sees the whole sequence (Llama; Qwen2 with `use_sliding_window`
    off)."""
    config = llm.config
    window = getattr(config, "sliding_window", None)
    layers = getattr(config, "layer_types", None)
    if not isinstance(window, int) or getattr(config, "use_sliding_window", True) is False:
        return None
    if layers and "sliding_attention" not in layers:
        return None
    return window


def forward_params(llm: nn.Module) -> frozenset[str]:
    """The argument names of the LM's `forward`: whether it takes `position_ids` (which decoder-only
    models get derived from the mask here) or `logits_to_keep`, and what its cache argument is called."""
    return _forward_params(type(llm))


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:  # inspect is slow: once per LM class
    return frozenset(inspect.signature(cls.forward).parameters)


def llm_config_from_model(llm: nn.Module, **fields: Any) -> LLMConfig:
    """An `LLMConfig` describing a given transformers LM (architecture, name, dtype); `fields` override."""
    hf = {"model_type": llm.config.model_type, **llm.config.to_diff_dict()}
    hf = {k: v for k, v in hf.items() if not k.startswith("_") or k == "_name_or_path"}
    for k in ("dtype", "torch_dtype", "transformers_version", "architectures", "attn_implementation"):
        hf.pop(k, None)
    head = llm.get_output_embeddings()
    if head is not None:  # the real tying (T5 configs in transformers 5.x always claim it)
        hf["tie_word_embeddings"] = head.weight is llm.get_input_embeddings().weight
    hf.pop("scale_decoder_outputs", None)  # T5 derives it from tie_word_embeddings
    name = getattr(llm.config, "_name_or_path", "") or ""
    base = {"hf_config": hf, "name": name, "dtype": dtype_name(llm_dtype(llm))}
    return LLMConfig(**{**base, **fields})


# ------------------------------------------------------------------------------------------ token plumbing


def move_padding(input_ids: Tensor, attention_mask: Tensor, side: str) -> tuple[Tensor, Tensor]:
    """Move each row's padding to the `"left"` or `"right"` without reordering its tokens.

    Args:
        input_ids: `(B, L)` token ids.
        attention_mask: `(B, L)` 1 for tokens, 0 for padding (on either side, or both).
        side: where the padding goes.

    Returns:
        `(input_ids, attention_mask)` rearranged, same shapes.
    """
    order = padding_order(attention_mask, side)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def padding_order(attention_mask: Tensor, side: str) -> Tensor:
    """`(B, L)` column order that moves each row's padding to `side` (apply with `gather(1, order)`)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    key = (attention_mask != 0).long() if side == "left" else (attention_mask == 0).long()
    return torch.sort(key, dim=1, stable=True).indices  # (B, L) pads first (left) or last (right)


def position_ids(attention_mask: Tensor) -> Tensor:
    """`(B, L)` positions counted over real tokens only (0 at each row's first token; pads get 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0).masked_fill(attention_mask == 0, 0)


def pad_after_eos(
    sequences: Tensor, eos_token_id: int | list[int] | None, pad_token_id: int | None
) -> Tensor:
    """Replace everything after each row's first EOS with `pad_token_id` (`(B, T)` generated ids).

    transformers fills finished rows with the pad id, except in beam search when that id is 0 (T5),
    where it uses the EOS; this makes every search mode pad the same way.
    """
    if eos_token_id is None or pad_token_id is None:
        return sequences
    is_eos = torch.isin(sequences, torch.as_tensor(eos_token_id, device=sequences.device).view(-1))
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # (B, T): strictly after the first EOS
    return sequences.masked_fill(after, pad_token_id)


def causal_lm_labels(
    input_ids: Tensor, attention_mask: Tensor | None = None, prompt_lengths: Tensor | int | None = None
) -> Tensor:
    """Labels for the decoder-only LM loss: the text ids, -100 on padding and on prompt tokens.

    Args:
        input_ids: `(B, L)` text ids (prompt + target, e.g. `[BOS] a photo of a dog \\n`).
        attention_mask: `(B, L)` padding mask (either side); None = no padding.
        prompt_lengths: the number of leading real tokens of each row that are prompt (BOS included,
            as LAVIS counts it); an int for all rows or a `(B,)` tensor; None = no prompt.

    Returns:
        `(B, L)` labels; the query positions are added by the model.
    """
    labels = input_ids.clone()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels = labels.masked_fill(attention_mask == 0, -100)
    if prompt_lengths is not None:
        rank = attention_mask.long().cumsum(-1)  # (B, L): 1 at each row's first real token
        lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).view(-1, 1)
        labels = labels.masked_fill(rank <= lengths, -100)
    return labels
