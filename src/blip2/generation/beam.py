"""Beam search for the frozen LLM of the language bridge (`blip2.generation.Decoding`).

transformers' beam search repeats the inputs for every beam before anything runs: the `[soft
prompt][prompt]` prefix is prefilled (decoder-only) or encoded (encoder-decoder) `beams` times, though
every beam of an image sees the same prefix, and each step then goes through its general machinery
(input preparation, logits processors, stopping criteria). This search runs the same steps with:

* the prefix prefilled or encoded once per image, at batch `B`; the decoder-only LM's cache and the
  encoder's output are then repeated to `B x beams` rows, each image's beams adjacent;
* one LM call per step on the running beams, a float32 log-softmax, EOS held back before
  `min_new_tokens`, `repetition_penalty` on the beam's tokens, and the search's own bookkeeping;
* the cache reordered by the beam each running beam continues (for an encoder-decoder LM only the
  decoder's self-attention: the cross-attention keys and values are the same for all of an image's
  beams).

The search is transformers' (`GenerationMixin._beam_search`, 5.x), step for step and in the same
tensor operations, so it gives the same tokens (`tests/test_beam.py`). Each step, per image:

1. every running beam's score (the sum of its tokens' log-probabilities) plus each next token's
   log-probability; the `2 x beams` best continuations over all of the image's beams (`1 + #EOS` times
   `beams` with several EOS ids). At the first step only beam 0 counts: the others start at -1e9;
2. a continuation ends when its token is an EOS or it reaches `max_new_tokens`; the `beams` best that
   did not end are the next running beams;
3. those that ended among the first `beams` continuations become hypotheses scored `sum of
   log-probabilities / length ** length_penalty` (the length counts the new tokens, EOS included); the
   image keeps its `beams` best hypotheses;
4. an image stops taking hypotheses once it has `beams` of them and its best running beam, scored as
   a hypothesis of the current length (of `max_new_tokens` with `early_stopping="never"` and a positive
   `length_penalty`), cannot beat the worst of them; with `early_stopping=True`, as soon as it has
   `beams` hypotheses. The search ends when no image takes more, or at `max_new_tokens`.

The result is each image's `num_return_sequences` best hypotheses, best first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer, StaticLayer

from blip2.generation import greedy as lean
from blip2.models import onednn
from blip2.models.language import forward_params, position_ids

# generate options the search implements (sampling settings are inert without do_sample)
_HANDLED = {
    "max_new_tokens",
    "min_new_tokens",
    "repetition_penalty",
    "eos_token_id",
    "pad_token_id",
    "num_beams",
    "num_return_sequences",
    "length_penalty",
    "early_stopping",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
}
_SEARCH = ("num_beams", "num_return_sequences")
_NEUTRAL = {k: v for k, v in lean.NEUTRAL.items() if k not in _SEARCH}
# fields of the LM's generation config that would change beam search (besides greedy search's)
_CONFIG_NEUTRAL = {
    **{k: v for k, v in lean.CONFIG_NEUTRAL.items() if k not in _SEARCH},
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "low_memory": False,
}
_SETTING_DEFAULTS = {"length_penalty": 1.0, "early_stopping": False}


def _setting(llm: nn.Module, options: dict[str, Any], key: str) -> Any:
    """A search setting: from `options`, else the LM's generation config, else transformers' default."""
    value = options.get(key)
    if value is None:
        value = getattr(getattr(llm, "generation_config", None), key, None)
    return _SETTING_DEFAULTS[key] if value is None else value


def supports(llm: nn.Module, options: dict[str, Any]) -> bool:
    """Whether `beam_search` does exactly what `llm.generate(**options)` would.

    True for beam search (`num_beams` > 1, no sampling) with `max_new_tokens` >= 1, `min_new_tokens`,
    `repetition_penalty`, `length_penalty`, `early_stopping`, `num_return_sequences` (at most
    `num_beams`), EOS and pad ids, when the LM's own generation config adds nothing that changes it.
    """
    beams = options.get("num_beams")
    if not isinstance(beams, int) or beams < 2:
        return False
    if not isinstance(options.get("max_new_tokens"), int) or options["max_new_tokens"] < 1:
        return False
    returned = options.get("num_return_sequences", 1)
    if not isinstance(returned, int) or not 1 <= returned <= beams:
        return False
    config = getattr(llm, "generation_config", None)
    if "num_return_sequences" not in options and getattr(config, "num_return_sequences", 1) not in (1, None):
        return False  # transformers refuses it (it checks it before it reads num_beams)
    if _setting(llm, options, "early_stopping") not in (True, False, "never"):
        return False
    if not isinstance(_setting(llm, options, "length_penalty"), int | float):
        return False
    return lean.options_supported(llm, options, _HANDLED, _NEUTRAL, _CONFIG_NEUTRAL)


class Beams:
    """The state of a beam search over `batch` images, and its step: transformers' algorithm.

    Args:
        batch, beams: images and beams per image.
        max_new_tokens, min_new_tokens, repetition_penalty, length_penalty, early_stopping,
            num_return_sequences, eos_token_id, pad_token_id: as in transformers' `generate`.
        start: the decoder's start token of an encoder-decoder LM (its first input, which the
            repetition penalty counts), None for a decoder-only LM.
    """

    def __init__(
        self,
        batch: int,
        beams: int,
        device: torch.device,
        *,
        max_new_tokens: int,
        min_new_tokens: int,
        repetition_penalty: float,
        length_penalty: float,
        early_stopping: bool | str,
        num_return_sequences: int,
        eos_token_id: int | list[int] | None,
        pad_token_id: int | None,
        start: int | None,
    ):
        eos = (
            [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        )
        self.batch, self.beams, self.device = batch, beams, device
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.penalty, self.length_penalty, self.early_stopping = (
            repetition_penalty,
            length_penalty,
            early_stopping,
        )
        self.returned = num_return_sequences
        self.eos = torch.tensor(list(eos), dtype=torch.long, device=device)
        self.lead = 0 if start is None else 1  # columns of the sequences before the new tokens
        self.keep = max(2, 1 + len(eos)) * beams  # continuations looked at per image and step
        self.top = torch.arange(self.keep, device=device) < beams  # those that may become hypotheses
        fill = -1 if not eos else (pad_token_id or eos[0])  # what transformers fills unused places with
        length = self.lead + max_new_tokens
        # running beams: their tokens (B, beams, lead + max_new_tokens) and summed log-probabilities
        self.running = torch.full((batch, beams, length), fill, dtype=torch.long, device=device)
        if start is not None:
            self.running[:, :, 0] = start
        self.running_scores = torch.zeros(batch, beams, device=device)
        self.running_scores[:, 1:] = -1e9  # the first step continues beam 0 only
        # hypotheses: tokens, scores, number of new tokens, whether the place holds one
        self.hyps = self.running.clone()
        self.hyp_scores = torch.full((batch, beams), -1e9, device=device)
        self.hyp_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
        self.improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)  # may still take hypotheses
        self.offset = torch.arange(batch, device=device)[:, None] * beams  # first row of each image
        self.count = 0  # new tokens so far
        self.done = False

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """One step from the running beams' next-token logits `(B * beams, V)`.

        Returns:
            `(tokens, origin)`: the new running beams' last tokens `(B * beams,)` and the rows (of the
            previous running beams) they continue, by which the cache is reordered.
        """
        b, k, t = self.batch, self.beams, self.count
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B * k, V)
        if self.penalty != 1.0:
            history = self.running[:, :, : self.lead + t].reshape(b * k, -1)
            log_probs = lean.repetition_penalty(log_probs, history, self.penalty)
        if t < self.min_new_tokens and self.eos.numel():
            log_probs[:, self.eos] = -float("inf")
        vocab = log_probs.shape[-1]
        scores = log_probs.view(b, k, vocab) + self.running_scores[:, :, None]
        top_scores, top_index = torch.topk(scores.view(b, k * vocab), k=self.keep)  # (B, keep)
        source, token = top_index // vocab, top_index % vocab  # beam continued, token added
        candidates = torch.take_along_dim(self.running, source[:, :, None], dim=1)  # (B, keep, L)
        candidates[:, :, self.lead + t] = token
        if t + 1 >= self.max_new_tokens:
            ended = torch.ones_like(token, dtype=torch.bool)
        else:
            ended = torch.isin(token, self.eos)  # (B, keep)

        # the best continuations that did not end run on
        running_scores = top_scores + ended.to(torch.float32) * -1.0e9
        best = torch.topk(running_scores, k=k)[1]  # (B, k)
        self.running = torch.take_along_dim(candidates, best[:, :, None], dim=1)
        self.running_scores = torch.take_along_dim(running_scores, best, dim=1)
        origin = torch.take_along_dim(source, best, dim=1) + self.offset  # (B, k) rows continued

        # those that ended among the first `beams` become hypotheses, if better than the image's
        just_ended = ended & self.top[None, :]
        final = top_scores / ((t + 1) ** self.length_penalty)
        full = torch.all(self.finished, dim=-1, keepdim=True) & (self.early_stopping is True)
        final += full.to(torch.float32) * -1.0e9
        final += (~self.improvable).to(torch.float32) * -1.0e9
        final += (~just_ended) * -1.0e9
        merged_scores = torch.cat([self.hyp_scores, final], dim=1)  # (B, k + keep)
        kept = torch.topk(merged_scores, k=k)[1]
        lengths = torch.full_like(token, t + 1)
        self.hyps = torch.take_along_dim(torch.cat([self.hyps, candidates], dim=1), kept[:, :, None], dim=1)
        self.hyp_scores = torch.take_along_dim(merged_scores, kept, dim=1)
        self.hyp_lengths = torch.take_along_dim(torch.cat([self.hyp_lengths, lengths], dim=1), kept, dim=1)
        self.finished = torch.take_along_dim(torch.cat([self.finished, just_ended], dim=1), kept, dim=1)

        # whether the running beams could still beat the hypotheses
        self.count = t + 1
        never = self.early_stopping == "never" and self.length_penalty > 0.0
        best_length = self.max_new_tokens if never else self.count
        best_possible = self.running_scores[:, :1] / (best_length**self.length_penalty)
        worst = torch.where(self.finished, torch.min(self.hyp_scores, dim=1, keepdim=True)[0], -1.0e9)
        self.improvable &= torch.any(best_possible > worst, dim=-1, keepdim=True)
        all_full = torch.all(self.finished) & (self.early_stopping is True)
        self.done = not bool(torch.any(self.improvable) & ~all_full & ~torch.all(ended))
        return self.running[:, :, self.lead + t].reshape(b * k), origin.reshape(b * k)

    def result(self) -> Tensor:
        """`(B * num_return_sequences, T)` new tokens of each image's best hypotheses, best first, cut to
        the longest (the places past a shorter one's EOS hold the pad id, or the EOS)."""
        n = self.returned
        longest = int(self.hyp_lengths[:, :n].max())
        tokens = self.hyps[:, :n].reshape(self.batch * n, -1)
        return tokens[:, self.lead : self.lead + longest]


@torch.no_grad()
def beam_search(
    llm: nn.Module,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    min_new_tokens: int | None = None,
    repetition_penalty: float | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    num_return_sequences: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    params: frozenset[str] | None = None,
    static_cache: Callable[[int, int, torch.dtype, torch.device], Any] | None = None,
    step: Callable | None = None,
    **inert: Any,
) -> Tensor:
    """Beam search from `inputs_embeds`: the new tokens `(B * num_return_sequences, T)`, each image's
    best first, `T <= max_new_tokens`.

    Args:
        llm: a transformers causal or encoder-decoder LM.
        inputs_embeds: decoder-only: `(B, P, E)` `[queries][left-padded prompt]`; encoder-decoder: the
            encoder's input.
        attention_mask: `(B, P)` its padding mask.
        num_beams, max_new_tokens, min_new_tokens, repetition_penalty, length_penalty, early_stopping,
            num_return_sequences, eos_token_id, pad_token_id: as in transformers' `generate` (None:
            the LM's generation config, else transformers' default).
        params: the LM's `forward` argument names (`forward_params`; looked up when None).
        static_cache: decoder-only: `(batch, length, dtype, device) -> StaticCache`, to decode the
            `B x beams` rows over a preallocated cache (fixed shapes per step; the prefix is still
            prefilled once per image, then copied in); None: the LM's dynamic cache.
        step: with `static_cache`, the decode step to call (`greedy.decode_step`, or a compiled one).
        inert: sampling-only options (temperature, top_p, ...) that beam search ignores.
    """
    del inert
    options = {"length_penalty": length_penalty, "early_stopping": early_stopping}
    is_enc_dec = bool(getattr(llm.config, "is_encoder_decoder", False))
    search = Beams(
        inputs_embeds.shape[0],
        num_beams,
        inputs_embeds.device,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or 0,
        repetition_penalty=repetition_penalty or 1.0,
        length_penalty=_setting(llm, options, "length_penalty"),
        early_stopping=_setting(llm, options, "early_stopping"),
        num_return_sequences=num_return_sequences or 1,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        start=llm.config.decoder_start_token_id if is_enc_dec else None,
    )
    params = forward_params(llm) if params is None else params
    if is_enc_dec:
        return _encoder_decoder(llm, inputs_embeds, attention_mask, search, params)
    if static_cache is not None:
        step = step or lean.decode_step(llm, params)
        return _decoder_only_static(llm, inputs_embeds, attention_mask, search, params, static_cache, step)
    return _decoder_only(llm, inputs_embeds, attention_mask, search, params)


def reorder(cache: Any, origin: Tensor, start: int, end: int | None = None) -> None:
    """Reorder a decoder-only LM's cache in place: row `i` takes row `origin[i]`'s keys and values.

    Only the positions from `start` (the first new token) to `end` (default: all) move: before it lies
    the prefix, the same in every beam of an image, and a beam continues a beam of its own image.
    Layers of other kinds (sliding windows, ...) are reordered whole, by their own `reorder_cache`.
    """
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, StaticLayer):
            layer.reorder_cache(origin)
            continue
        for t in (layer.keys, layer.values):  # (B * k, heads, positions, head dim)
            t[:, :, start:end] = t[:, :, start:end].index_select(0, origin)


def _prefill(llm: nn.Module, embeds: Tensor, mask: Tensor, params: frozenset[str]) -> tuple[Tensor, Any]:
    """The prefix through the LM once per image: its last position's logits `(B, V)` and its cache."""
    kwargs = {"position_ids": position_ids(mask)} if "position_ids" in params else {}
    with onednn.linears(embeds.device):
        out = llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            use_cache=True,
            **kwargs,
            **lean.last_logits_only(params),
        )
    return out.logits[:, -1], lean.out_cache(out)


def _decoder_only(
    llm: nn.Module, embeds: Tensor, mask: Tensor, search: Beams, params: frozenset[str]
) -> Tensor:
    cache_arg, k, p = lean.cache_key(params), search.beams, mask.shape[1]
    takes_positions = "position_ids" in params
    next_pos = position_ids(mask)[:, -1:].repeat_interleave(k, dim=0) + 1  # (B * k, 1)
    kwargs: dict[str, Any] = {}
    # the prefix once per image, then its cache repeated for the beams: (B * k) rows
    logits, cache = _prefill(llm, embeds, mask, params)
    cache.batch_repeat_interleave(k)
    logits = logits.repeat_interleave(k, dim=0)  # (B * k, V)
    mask = mask.repeat_interleave(k, dim=0)
    while True:
        tokens, origin = search(logits)
        if search.done:
            return search.result()
        reorder(cache, origin, start=p)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if takes_positions:
            kwargs["position_ids"] = next_pos
        out = llm(
            input_ids=tokens[:, None], attention_mask=mask, use_cache=True, **{cache_arg: cache}, **kwargs
        )
        cache, next_pos = lean.out_cache(out), next_pos + 1
        logits = out.logits[:, -1]


def _encoder_decoder(
    llm: nn.Module, embeds: Tensor, mask: Tensor, search: Beams, params: frozenset[str]
) -> Tensor:
    cache_arg, k = lean.cache_key(params), search.beams
    # the encoder once per image, its output repeated for the beams: (B * k) rows
    encoder_outputs = llm.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
    encoder_outputs.last_hidden_state = encoder_outputs.last_hidden_state.repeat_interleave(k, dim=0)
    mask = mask.repeat_interleave(k, dim=0)
    tokens = search.running[:, :, 0].reshape(-1)  # the decoder's start token
    cache = None
    while True:
        out = llm(
            encoder_outputs=encoder_outputs,
            attention_mask=mask,
            decoder_input_ids=tokens[:, None],
            use_cache=True,
            **({cache_arg: cache} if cache is not None else {}),
        )
        cache = lean.out_cache(out)
        tokens, origin = search(out.logits[:, -1])
        if search.done:
            return search.result()
        # the cross-attention keys and values are the same for all of an image's beams
        getattr(cache, "self_attention_cache", cache).reorder_cache(origin)


def _decoder_only_static(
    llm: nn.Module,
    embeds: Tensor,
    mask: Tensor,
    search: Beams,
    params: frozenset[str],
    static_cache: Callable[[int, int, torch.dtype, torch.device], Any],
    step: Callable,
) -> Tensor:
    """`_decoder_only` over a `StaticCache` of `B x beams` rows (fixed-shape steps, a full-length mask
    buffer), reordered in place: its tensors keep their addresses for a compiled step."""
    k, (b, p) = search.beams, mask.shape
    total = -(-(p + search.max_new_tokens) // 32) * 32  # rounded up: fewer distinct shapes to compile
    logits, prefix = _prefill(llm, embeds, mask, params)
    cache = static_cache(b * k, total, embeds.dtype, embeds.device)
    for i, layer in enumerate(prefix.layers):  # the prefix's keys and values, once per beam
        keys, values = layer.keys.repeat_interleave(k, dim=0), layer.values.repeat_interleave(k, dim=0)
        cache.update(keys, values, i, {"cache_position": torch.arange(p, device=mask.device)})
    full = torch.zeros(b * k, total, dtype=mask.dtype, device=mask.device)  # filled in place, never reshaped
    full[:, :p] = mask.repeat_interleave(k, dim=0)
    next_pos = position_ids(mask)[:, -1:].repeat_interleave(k, dim=0) + 1  # (B * k, 1)
    logits = logits.repeat_interleave(k, dim=0)  # (B * k, V)
    at = p  # the cache position of the next token
    while True:
        tokens, origin = search(logits)
        if search.done:
            return search.result()
        reorder(cache, origin, start=p, end=at)
        full[:, at] = 1
        cache_position = torch.full((1,), at, dtype=torch.long, device=mask.device)
        logits = step(tokens[:, None], full, next_pos, cache_position, cache)
        next_pos, at = next_pos + 1, at + 1
