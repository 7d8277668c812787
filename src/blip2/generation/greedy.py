"""A lean greedy decode loop for the frozen LLM of the language bridge (`blip2.generation.Decoding`).

transformers' `generate` is general: every step it rebuilds model inputs, runs a list of logits
processors and stopping criteria, and updates bookkeeping for features a caption never uses. For a
small LM that Python overhead is most of the time per token. This loop does only what greedy decoding
with the options captioning uses needs, on the same model and the same key/value cache:

* prefill once with `inputs_embeds` (the projected queries and the prompt), keeping only the last
  position's logits;
* then one token per step through the LM with its cache, in float32 for the penalties, argmax;
* `min_new_tokens` (EOS forbidden before it), `repetition_penalty` (over the generated tokens, as
  transformers applies it to generation from `inputs_embeds`), EOS (one id or several), finished rows
  filled with the pad id, stop when every row has finished.

It gives the tokens transformers' greedy search gives (`tests/test_decode.py` checks it for OPT,
GPT-2 and T5 LMs, batched with left padding). `supports` says which `generate` options it covers;
anything else goes to beam search (`blip2.generation.beam`) or transformers (sampling, scores, ...).

Static cache (decoder-only LMs): `greedy(..., static_cache=...)` decodes over a transformers
`StaticCache` sized to the prompt plus `max_new_tokens`, and every decode step has the same shapes, so
the step (`decode_step`) can be compiled. The functions here keep no state: the caches and compiled steps belong to `Decoding`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from blip2.models import onednn
from blip2.models.language import forward_params, position_ids

# generate options the loop implements, and the values that keep it greedy
_HANDLED = {"max_new_tokens", "min_new_tokens", "repetition_penalty", "eos_token_id", "pad_token_id"}
NEUTRAL: dict[str, Any] = {
    "num_beams": 1,
    "do_sample": False,
    "num_return_sequences": 1,
    "use_cache": True,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "streamer": None,
}
# sampling-only settings: inert under greedy search (transformers ignores them with a warning)
_INERT = {"temperature", "top_p", "top_k", "min_p", "typical_p", "length_penalty", "early_stopping"}
# fields of the LM's own generation config that would change what greedy search does
CONFIG_NEUTRAL: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "num_return_sequences": 1,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "encoder_repetition_penalty": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "guidance_scale": None,
    "watermarking_config": None,
    "stop_strings": None,
    "max_time": None,
    "cache_implementation": None,
}
# how often (in steps) the loop looks whether every row has ended, per device type: looking waits for
# the device, so on CUDA the host queues a few steps ahead instead (the tokens are the same)
CHECK_EVERY = {"cuda": 8}
_CONFIG_DEFAULTS = {"min_new_tokens": None, "repetition_penalty": 1.0, "max_length": 20}


def supports(llm: nn.Module, options: dict[str, Any]) -> bool:
    """Whether `greedy` does exactly what `llm.generate(**options)` would.

    True for greedy search with `max_new_tokens`, `min_new_tokens`, `repetition_penalty`, EOS and pad
    ids, when the LM's own generation config adds nothing that changes greedy search.
    """
    return options_supported(llm, options, _HANDLED | _INERT, NEUTRAL, CONFIG_NEUTRAL)


def options_supported(
    llm: nn.Module,
    options: dict[str, Any],
    handled: set[str],
    neutral: dict[str, Any],
    config_neutral: dict[str, Any],
) -> bool:
    """Whether a lean loop that implements the `handled` options does what `llm.generate(**options)`
    would: every other option has its `neutral` value, `max_new_tokens` is given, and the LM's own
    generation config has the `config_neutral` value of each field (unless `options` set it) and the
    defaults of the fields transformers reads when they are not passed (`min_new_tokens`, ...)."""
    for key, value in options.items():
        if key in handled:
            continue
        if key not in neutral or value != neutral[key]:
            return False
    if "max_new_tokens" not in options:
        return False
    config = getattr(llm, "generation_config", None)
    if config is None:
        return True
    for key, default in config_neutral.items():
        value = getattr(config, key, default)
        if key in options:
            value = options[key]
        if value is not None and value != default:
            return False
    for key, default in _CONFIG_DEFAULTS.items():  # used by transformers only when not passed
        if key in options or key == "max_length":
            continue
        if getattr(config, key, default) not in (default, None):
            return False
    return True


def cache_key(params: frozenset[str]) -> str:
    """The name of the cache argument (`cache` from transformers 5.2x, `past_key_values` before)."""
    return "cache" if "cache" in params else "past_key_values"


def out_cache(out: Any) -> Any:
    """The cache an LM call returned (`out.cache` or `out.past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def last_logits_only(params: frozenset[str]) -> dict[str, Any]:
    """The argument that makes a prefill compute only the last position's logits, where the LM has it."""
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def repetition_penalty(scores: Tensor, history: Tensor, penalty: float) -> Tensor:
    """`(N, V)` scores with each row's `history` tokens `(N, T)` penalized as transformers does:
    divided by `penalty` where positive, multiplied where negative."""
    if not history.shape[1]:
        return scores
    picked = scores.gather(1, history)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, history, picked)


class Selector:
    """Picks the next token from float32 logits: penalties, EOS held back, finished rows padded."""

    def __init__(
        self,
        batch: int,
        device: torch.device,
        eos_token_id: int | list[int] | None,
        pad_token_id: int | None,
        min_new_tokens: int,
        repetition_penalty: float,
        history: Tensor | None,
        check_every: int | None = None,
    ):
        eos = (
            [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        )
        self.eos = torch.tensor(list(eos), dtype=torch.long, device=device)
        self.pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
        self.min_new_tokens = min_new_tokens
        self.penalty = repetition_penalty
        self.history = (
            history if history is not None else torch.empty(batch, 0, dtype=torch.long, device=device)
        )
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.finished_at = torch.full((batch,), -1, dtype=torch.long, device=device)  # step of the EOS
        self.count = 0
        # `trim` cuts the steps that ran past the end between two looks
        self.check_every = check_every or CHECK_EVERY.get(device.type, 1)

    def __call__(self, logits: Tensor) -> Tensor:
        """`(B, V)` logits of the next position -> `(B,)` tokens."""
        scores = logits.float()
        if self.penalty != 1.0:
            scores = repetition_penalty(scores, self.history, self.penalty)
        if self.count < self.min_new_tokens and self.eos.numel():
            scores[:, self.eos] = -float("inf")
        token = scores.argmax(dim=-1)  # (B,)
        if self.pad is not None:
            token = torch.where(self.unfinished, token, self.pad)
        if self.eos.numel():
            ended = self.unfinished & torch.isin(token, self.eos)
            self.finished_at = torch.where(ended, self.count, self.finished_at)
            self.unfinished &= ~ended
        if self.penalty != 1.0:
            self.history = torch.cat([self.history, token[:, None]], dim=1)
        self.count += 1
        return token

    def done(self) -> bool:
        """Whether every row has ended (checked only every `check_every` steps)."""
        if self.count % self.check_every:
            return False
        return self.eos.numel() > 0 and not bool(self.unfinished.any())

    def trim(self, tokens: Tensor) -> Tensor:
        """`(B, T)` tokens cut where greedy search stops: after the step where the last row ended."""
        if not self.eos.numel() or self.check_every == 1:
            return tokens
        if bool(self.unfinished.any()):
            return tokens
        return tokens[:, : int(self.finished_at.max()) + 1]


@torch.no_grad()
def greedy(
    llm: nn.Module,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    params: frozenset[str] | None = None,
    static_cache: Callable[[int, int, torch.dtype, torch.device], Any] | None = None,
    step: Callable | None = None,
    check_every: int | None = None,
    **inert: Any,
) -> Tensor:
    """Greedy decoding from `inputs_embeds`; the new tokens `(B, T)`, `T <= max_new_tokens`.

    Args:
        llm: a transformers causal or encoder-decoder LM.
        inputs_embeds: decoder-only: `(B, P, E)` `[queries][left-padded prompt]`; encoder-decoder: the
            encoder's input.
        attention_mask: `(B, P)` its padding mask.
        max_new_tokens, min_new_tokens, repetition_penalty, eos_token_id, pad_token_id: as in
            transformers' `generate` (rows that end early are filled with `pad_token_id`, or the EOS).
        params: the LM's `forward` argument names (`forward_params`; looked up when None).
        static_cache: decoder-only: `(batch, length, dtype, device) -> StaticCache`, to decode over a
            preallocated cache (fixed shapes per step); None: the LM's dynamic cache.
        step: with `static_cache`, the decode step to call (`decode_step`, or a compiled one).
        check_every: look whether every row has ended every this many steps (default `CHECK_EVERY` of
            the device type, else 1). The tokens are the same either way.
        inert: sampling-only options (temperature, top_p, ...) that greedy search ignores.
    """
    del inert
    params = forward_params(llm) if params is None else params
    b = inputs_embeds.shape[0]
    device = inputs_embeds.device
    is_enc_dec = bool(getattr(llm.config, "is_encoder_decoder", False))
    history = None
    if is_enc_dec:
        start = llm.config.decoder_start_token_id
        history = torch.full((b, 1), start, dtype=torch.long, device=device)  # the decoder's inputs so far
    select = Selector(
        b,
        device,
        eos_token_id,
        pad_token_id,
        min_new_tokens or 0,
        repetition_penalty or 1.0,
        history,
        check_every,
    )
    if max_new_tokens <= 0:
        return torch.empty(b, 0, dtype=torch.long, device=device)
    if is_enc_dec:
        return _greedy_encoder_decoder(llm, inputs_embeds, attention_mask, max_new_tokens, select, params)
    if static_cache is not None:
        step = step or decode_step(llm, params)
        return _greedy_static(
            llm, inputs_embeds, attention_mask, max_new_tokens, select, params, static_cache, step
        )
    return _greedy_decoder(llm, inputs_embeds, attention_mask, max_new_tokens, select, params)


def _greedy_decoder(
    llm: nn.Module, embeds: Tensor, mask: Tensor, steps: int, select: Selector, params: frozenset[str]
) -> Tensor:
    cache_arg, extra = cache_key(params), last_logits_only(params)
    takes_positions = "position_ids" in params
    pos = position_ids(mask)
    kwargs: dict[str, Any] = {"position_ids": pos} if takes_positions else {}
    with onednn.linears(embeds.device):
        out = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **kwargs, **extra)
    cache, next_pos = out_cache(out), pos[:, -1:] + 1
    tokens = [select(out.logits[:, -1])]
    for _ in range(steps - 1):
        if select.done():
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if takes_positions:
            kwargs["position_ids"] = next_pos
        out = llm(
            input_ids=tokens[-1][:, None], attention_mask=mask, use_cache=True, **{cache_arg: cache}, **kwargs
        )
        cache, next_pos = out_cache(out), next_pos + 1
        tokens.append(select(out.logits[:, -1]))
    return select.trim(torch.stack(tokens, dim=1))


def _greedy_encoder_decoder(
    llm: nn.Module, embeds: Tensor, mask: Tensor, steps: int, select: Selector, params: frozenset[str]
) -> Tensor:
    cache_arg = cache_key(params)
    encoder_outputs = llm.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
    token = select.history[:, -1]  # the decoder start token
    cache = None
    tokens: list[Tensor] = []
    for _ in range(steps):
        out = llm(
            encoder_outputs=encoder_outputs,
            attention_mask=mask,
            decoder_input_ids=token[:, None],
            use_cache=True,
            **({cache_arg: cache} if cache is not None else {}),
        )
        cache = out_cache(out)
        token = select(out.logits[:, -1])
        tokens.append(token)
        if select.done():
            break
    return select.trim(torch.stack(tokens, dim=1))


def _greedy_static(
    llm: nn.Module,
    embeds: Tensor,
    mask: Tensor,
    steps: int,
    select: Selector,
    params: frozenset[str],
    static_cache: Callable[[int, int, torch.dtype, torch.device], Any],
    step: Callable,
) -> Tensor:
    """Decoder-only decoding over a `StaticCache`: fixed-shape steps (a full-length mask buffer)."""
    b, p = mask.shape
    total = -(-(p + steps) // 32) * 32  # rounded up: fewer distinct shapes to compile
    cache_arg, extra = cache_key(params), last_logits_only(params)
    cache = static_cache(b, total, embeds.dtype, embeds.device)
    full = torch.zeros(b, total, dtype=mask.dtype, device=mask.device)  # filled in place, never reshaped
    full[:, :p] = mask
    pos = position_ids(mask)
    kwargs: dict[str, Any] = {"position_ids": pos} if "position_ids" in params else {}
    with onednn.linears(embeds.device):
        out = llm(
            inputs_embeds=embeds,
            attention_mask=full[:, :p],
            cache_position=torch.arange(p, device=mask.device),
            use_cache=True,
            **{cache_arg: cache},
            **kwargs,
            **extra,
        )
    tokens = [select(out.logits[:, -1])]
    next_pos = pos[:, -1:] + 1
    for i in range(steps - 1):
        if select.done():
            break
        at = p + i
        full[:, at] = 1
        cache_position = torch.full((1,), at, dtype=torch.long, device=mask.device)
        logits = step(tokens[-1][:, None], full, next_pos, cache_position, cache)
        tokens.append(select(logits))
        next_pos = next_pos + 1
    return select.trim(torch.stack(tokens, dim=1))


def decode_step(llm: nn.Module, params: frozenset[str]) -> Callable:
    """One static-cache decode step `(token, mask, positions, cache_position, cache) -> (B, V)` float32
    logits (what `Decoding` compiles)."""
    cache_arg, takes_positions = cache_key(params), "position_ids" in params

    def step(token: Tensor, mask: Tensor, positions: Tensor, cache_position: Tensor, cache: Any) -> Tensor:
        kwargs = {"position_ids": positions} if takes_positions else {}
        out = llm(
            input_ids=token,
            attention_mask=mask,
            cache_position=cache_position,
            use_cache=True,
            **{cache_arg: cache},
            **kwargs,
        )
        return out.logits[:, -1].float()  # a copy: compiled graphs reuse their output buffers

    return step
