"""`Decoding`: the opt-in speed paths of BLIP-2 generation, the policy that picks one, and their state.

`LanguageBridge.generate` is the plain path: transformers' `generate` on `[soft prompt][prompt]`
embeddings. For the options captioning uses, most of its time is overhead, not arithmetic, and
`Decoding.generate(model, ...)` removes it, reusing the model's own steps (`generation_inputs`,
`generate_from_embeds`) around a faster image side, greedy loop and beam search:

* "fast": greedy search runs the lean loop of `blip2.generation.greedy` with the LM's dynamic cache,
  beam search the search of `blip2.generation.beam` (the prefix prefilled once per image, shared by
  its beams);
* "static": both over a preallocated `StaticCache` (decoder-only LMs whose attention window, if any,
  covers the whole generation; others decode as "fast"): fixed shapes per step; on CUDA
  the step is compiled into a CUDA graph, and the image side (tower, Q-Former, projection) is
  replayed from a CUDA graph captured once per batch shape (`GraphCache`);
* "compiled": "static" with the step compiled by `torch.compile` on any device; on CPU the step
  becomes inductor kernels over frozen, prepacked weights (`_frozen`: a second copy of the LM's weights
  in memory) and fused eager attention (`_eager_attention`), its products oneDNN ops from a batch of
  `onednn.MIN_ROWS` rows on (`blip2.models.onednn`, traced); the image side stays eager there
  (compiled, it measured slower), its products through oneDNN too. The first call of each batch shape
  compiles, so it pays off over many batches;
* "transformers": always the model's plain `generate`.

Options neither loop implements (sampling, scores, ...) always go to the plain path; the tokens are
the same either way. The state (static caches, compiled steps, image-side graphs) lives
here, one `Decoding` per loaded model, held by whoever picks the policy (`blip2.pipelines.Captioner`):
it goes when its holder goes, and a copy (`copy.deepcopy`, pickling) starts with empty caches.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from blip2.generation import beam
from blip2.generation import greedy as lean
from blip2.generation.graphs import GraphCache
from blip2.models import onednn
from blip2.models.language import forward_params, pad_after_eos, sliding_window

if TYPE_CHECKING:
    from blip2.models.bridge import LanguageBridge

# the compiled CPU decode step checks only its tensors (shapes, dtypes, ...) before each call, not the
# LM's module attributes and globals: the step's code does not change them, and checking them costs
# about a sixth of a small LM's step on one CPU thread (None: every guard, as torch.compile does)
GUARD_FILTER = getattr(torch.compiler, "keep_tensor_guards_unsafe", None)


def _own_code(fn: Callable) -> Callable:
    """`fn` with a code object of its own. torch.compile keeps its graphs per code object, and every LM's
    step shares `decode_step`'s code: with the tensor-only guards above, a second LM whose tensors have the
    first one's shapes would otherwise run the first LM's graph (other weights, other architecture)."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


# inductor's freezing for compiled CPU inference: weights become constants, which lets it prepack them for
# oneDNN's matrix products. Dynamo reads the flag from inductor's global config when it traces, so
# `_frozen` sets it around each call (a few microseconds; the flag only matters when a call compiles).
# A frozen graph does not see a weight changed later, in place or replaced, so each compiled function is
# kept with `_weights` of what it read and compiled again when that changes. It holds its own
# (prepacked) copy of the weights.
def _frozen(fn: Callable) -> Callable:
    config = torch._inductor.config

    def run(*args: Any) -> Any:
        before, config.freezing = config.freezing, True
        try:
            return fn(*args)
        finally:
            config.freezing = before

    return run


def _eager_attention(llm: nn.Module, fn: Callable) -> Callable:
    """`fn` run with the LM's attention set to transformers' "eager" implementation (plain matrix
    products and a softmax) instead of SDPA. Compiled, the eager math becomes a few fused inductor
    kernels, where SDPA's CPU kernel costs about 0.3 ms a call for a one-token query (beam search:
    about a tenth of the step). Only tracing reads the setting: each call sets it and puts it back."""
    config = llm.config

    def run(*args: Any) -> Any:
        before = config._attn_implementation
        config._attn_implementation = "eager"
        try:
            return fn(*args)
        finally:
            config._attn_implementation = before

    return run


def _weights(*modules: nn.Module) -> tuple:
    """The version of the weights `modules` hold: each tensor's storage and in-place version counter
    (an optimizer step or `load_state_dict` bumps the counter, `.to(...)` or assignment the storage)."""
    return tuple((t.data_ptr(), t._version) for m in modules for t in (*m.parameters(), *m.buffers()))


class Decoding:
    """How BLIP-2 generation decodes, and the caches that make it fast.

    Args:
        mode: the default decode mode, one of `MODES` (see the module docstring).
        max_static_caches: static caches kept (each holds the keys and values of `batch x length`
            positions per layer); the least recently used goes first.
    """

    MODES = ("fast", "static", "compiled", "transformers")

    def __init__(self, mode: str = "fast", max_static_caches: int = 4):
        self.mode = self._check(mode)
        self.max_static_caches = max_static_caches
        self.prefix_graphs = GraphCache()  # the image side, per batch shape (CUDA only)
        self._static_caches: OrderedDict[tuple, Any] = OrderedDict()
        self._steps: dict[str, tuple] = {}  # device type -> (its LM, weights version, compiled step)

    def __deepcopy__(self, memo: dict) -> Decoding:
        return Decoding(self.mode, self.max_static_caches)  # caches belong to the original's LM

    def __getstate__(self) -> dict[str, Any]:
        return {"mode": self.mode, "max_static_caches": self.max_static_caches}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _check(self, mode: str) -> str:
        if mode not in self.MODES:
            raise ValueError(f"unknown decode_mode {mode!r}: use one of {self.MODES}")
        return mode

    @torch.no_grad()
    def generate(
        self,
        model: LanguageBridge,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        image_features: Tensor | None = None,
        mode: str | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
        **generate_kwargs: Any,
    ) -> Tensor:
        """`model.generate(pixel_values, input_ids, attention_mask, ...)`, the same tokens and outputs,
        decoded the `mode` way (default `self.mode`; a `ValueError` for an unknown one). An instruction
        for the Q-Former (`qformer_input_ids`, InstructBLIP) runs the image side without a graph.

        Greedy search with only `max_new_tokens`, `min_new_tokens`, `repetition_penalty`, EOS and pad
        ids runs the lean loop, beam search with these and `length_penalty`, `early_stopping` and
        `num_return_sequences` our beam search; any other options run the model's plain path.
        """
        mode = self._check(mode or self.mode)
        if qformer_input_ids is None:
            prefix = self.prefix(model, pixel_values, image_features, mode)  # (B, Q, E), once per image
        else:
            prefix = model.prefix(pixel_values, image_features, qformer_input_ids, qformer_attention_mask)
        embeds, mask, options = model.generation_inputs(prefix, input_ids, attention_mask, **generate_kwargs)
        if options.get("num_beams", 1) == 1:
            tokens = self.greedy(model.llm, embeds, mask, options, mode)  # None: options it lacks
        else:
            tokens = self.beams(model.llm, embeds, mask, options, mode)
        if tokens is None:
            return model.generate_from_embeds(embeds, mask, **options)
        return pad_after_eos(tokens, options["eos_token_id"], options.get("pad_token_id"))

    # ---------------------------------------------------------------------------------- image side

    def prefix(
        self, model: LanguageBridge, pixel_values: Tensor | None, image_features: Tensor | None, mode: str
    ) -> Tensor:
        """`model.prefix(...)`; in "static"/"compiled" mode on CUDA, replayed from a CUDA graph per batch
        shape (at small batches the host launching the tower's and Q-Former's kernels is the bottleneck)."""
        x = image_features if image_features is not None else pixel_values  # as `encode_image` picks
        parts = (model.visual, model.qformer, model.language_projection)
        training = any(m.training for p in parts for m in p.modules())  # dropout: run it as is
        if mode not in ("static", "compiled") or x is None or x.device.type != "cuda" or training:
            return model.prefix(pixel_values, image_features)

        def run(t: Tensor) -> Tensor:
            return model.prefix(image_features=t) if image_features is not None else model.prefix(t)

        tensors = [model.query_tokens, *(t for m in parts for t in (*m.parameters(), *m.buffers()))]
        return self.prefix_graphs(run, x, tensors, extra=(image_features is not None, model.autocast_dtype))

    # ---------------------------------------------------------------------------------- text side

    def greedy(
        self, llm: nn.Module, embeds: Tensor, mask: Tensor, options: dict[str, Any], mode: str
    ) -> Tensor | None:
        """The new tokens of greedy search over `[soft prompt][prompt]` embeddings `(B, P, E)` and their
        mask `(B, P)`, or None where `mode` or `options` (`generate`'s) call for transformers."""
        if mode == "transformers" or not lean.supports(llm, options):
            return None
        params = forward_params(llm)
        static = self._static(llm, params, embeds, mode, options["max_new_tokens"])
        return lean.greedy(llm, embeds, mask, params=params, **static, **options)

    def beams(
        self, llm: nn.Module, embeds: Tensor, mask: Tensor, options: dict[str, Any], mode: str
    ) -> Tensor | None:
        """The new tokens of beam search (`(B * num_return_sequences, T)`), or None where `mode` or
        `options` call for transformers; arguments as `greedy`'s."""
        if mode == "transformers" or not beam.supports(llm, options):
            return None
        params = forward_params(llm)
        static = self._static(llm, params, embeds, mode, options["max_new_tokens"])
        return beam.beam_search(llm, embeds, mask, params=params, **static, **options)

    def _static(
        self, llm: nn.Module, params: frozenset[str], embeds: Tensor, mode: str, new_tokens: int
    ) -> dict[str, Any]:
        """The static cache and decode step a loop takes in `mode`; none (the dynamic cache, as "fast")
        for "fast", for encoder-decoder LMs, and for an LM whose sliding attention window is shorter
        than the prompt and `new_tokens` (Mistral, Gemma2 past their window: a static cache's window
        layers hold only the window, which the beams' reordering and some transformers versions'
        masks do not follow)."""
        if mode == "fast" or getattr(llm.config, "is_encoder_decoder", False):
            return {}
        window = sliding_window(llm)
        if window is not None and window < embeds.shape[1] + new_tokens:
            return {}
        compile = mode == "compiled" or embeds.device.type == "cuda"
        step = self._compiled_step(llm, params, embeds.device.type) if compile else None

        def static_cache(batch: int, length: int, dtype: torch.dtype, device: torch.device) -> Any:
            return self._static_cache(llm, batch, length, dtype, device)

        return {"static_cache": static_cache, "step": step}

    def _static_cache(
        self, llm: nn.Module, batch: int, length: int, dtype: torch.dtype, device: torch.device
    ) -> Any:
        """A `StaticCache` per batch, length, dtype and device, reset and reused: a compiled step then
        sees the same (static-address) cache tensors on every call instead of recording a new graph.

        At most `max_static_caches` are kept, the least recently used dropped first. Their tensors take
        the dtype and device of the first call, hence the key: after `model.to(...)` the LM gets new
        ones.
        """
        from transformers import StaticCache

        key = (batch, length, dtype, torch.device(device))
        cache = self._static_caches.pop(key, None)
        if cache is None:
            cache = StaticCache(config=llm.config, max_cache_len=length)
        else:
            cache.reset()
        self._static_caches[key] = cache  # now the most recently used
        while len(self._static_caches) > self.max_static_caches:
            self._static_caches.popitem(last=False)
        return cache

    def _compiled_step(self, llm: nn.Module, params: frozenset[str], device: str) -> Callable:
        """The static-cache decode step compiled: into CUDA graphs on CUDA, frozen inductor kernels
        elsewhere (one per device type; `torch.compile` keeps a graph per batch shape)."""
        weights = _weights(llm) if device != "cuda" else None
        kept = self._steps.get(device)
        if kept is not None and kept[0] is llm and kept[1] == weights:
            return kept[2]
        step = _own_code(lean.decode_step(llm, params))
        if device == "cuda":  # replayed as CUDA graphs
            compiled = torch.compile(step, mode="reduce-overhead", fullgraph=False, dynamic=False)

            def run(*args: Any) -> Tensor:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
                return compiled(*args)

        else:  # tensor guards only (GUARD_FILTER), frozen weights (`_frozen`), attention as plain math
            # that inductor fuses (`_eager_attention`)
            options = {"guard_filter_fn": GUARD_FILTER} if GUARD_FILTER is not None else None
            compiled = _frozen(
                _eager_attention(llm, torch.compile(step, fullgraph=False, dynamic=False, options=options))
            )

            def run(*args: Any) -> Tensor:
                if args[0].shape[0] < onednn.MIN_ROWS:  # MKL's products are faster
                    return compiled(*args)
                with onednn.linears(device):  # traced: the step's products through oneDNN
                    return compiled(*args)

        self._steps[device] = (llm, weights, run)
        return run
