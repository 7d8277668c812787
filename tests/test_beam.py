"""Our beam search (`blip2.generation.beam`, run by `Decoding.generate` for `num_beams > 1`) gives the
tokens of transformers' beam search: fp32 tiny random OPT and T5 LMs, one and three images, 2 and 5
beams, length penalties, `early_stopping` settings, rows ending at different steps, several returned
sequences, padded prompts of different lengths. Options it does not implement go to transformers.
"""

from __future__ import annotations

import pytest
import torch
from test_stage2 import _prompts, images, make, pad

from blip2.generation import Decoding, beam

NEW_TOKENS = 7


@pytest.fixture(scope="module", params=["tiny-opt", "tiny-t5"])
def model(request):
    """A tiny model whose output depends on image and prompt (fp32, random weights)."""
    return make(request.param, lively=True).eval()


def ending_ids(model, px, ids, mask, beams: int) -> list[int]:
    """EOS ids that end beams at different steps: tokens of the 2nd, 4th and 5th step of different
    beams of the search without an EOS."""
    free = model.generate(
        px,
        ids,
        mask,
        max_new_tokens=NEW_TOKENS,
        num_beams=beams,
        num_return_sequences=beams,
        eos_token_id=None,
    )
    return sorted({int(free[0, 1]), int(free[-1, 3]), int(free[free.shape[0] // 2, 4])})


def inputs(model, batch: int):
    """`batch` images and padded prompts of different lengths (as each LM kind pads them)."""
    side = "right" if model.is_encoder_decoder else "left"
    ids, mask = pad(_prompts(model), side, model.pad_token_id)
    return images(batch), ids[:batch], mask[:batch]


def eos_at(row: list[int], eos: list[int]) -> int:
    """The position of a row's first EOS (its length when none)."""
    return next((i for i, t in enumerate(row) if t in eos), len(row))


@pytest.mark.parametrize("beams", [2, 5])
@pytest.mark.parametrize("batch", [1, 3])
def test_beam_search_gives_the_tokens_of_transformers(model, batch, beams):
    px, ids, mask = inputs(model, batch)
    eos = ending_ids(model, px, ids, mask, beams)
    decoding = Decoding()
    ended = ended_early = 0
    for length_penalty in (0.5, 1.0, 2.0):
        for extra in (
            {"eos_token_id": eos},  # rows end at different steps
            {"eos_token_id": eos[0], "num_return_sequences": 2},
            {"eos_token_id": eos, "early_stopping": True, "min_new_tokens": 2},
            {"eos_token_id": eos, "early_stopping": "never", "repetition_penalty": 1.5},
        ):
            options = {
                "max_new_tokens": NEW_TOKENS,
                "num_beams": beams,
                "length_penalty": length_penalty,
                **extra,
            }
            assert beam.supports(model.llm, {**options, "pad_token_id": model.pad_token_id})
            plain = model.generate(px, ids, mask, **options)
            for mode in ["fast"] if model.is_encoder_decoder else ["fast", "static"]:
                ours = decoding.generate(model, px, ids, mask, mode=mode, **options)
                assert ours.tolist() == plain.tolist(), (mode, options)
            assert ours.shape[0] == batch * options.get("num_return_sequences", 1)
            rows = plain.tolist()
            ended_early += any(eos_at(row, eos) < len(row) - 1 for row in rows)
            ended += any(eos_at(row, eos) < len(row) for row in rows)
    # the comparison means something: rows end with an EOS, some before others
    assert ended and ended_early


def test_the_prefix_runs_once_per_image(model):
    """The LM (decoder-only) or its encoder (encoder-decoder) sees the `[soft prompt][prompt]` prefix
    at batch 3, not 3 x beams; every later call runs the 3 x 4 beams one token at a time."""
    px, ids, mask = inputs(model, 3)
    eos = ending_ids(model, px, ids, mask, 4)
    seen: list[tuple[int, int]] = []  # (rows, positions) of each call's input embeddings

    def record(_module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = x if x is not None else kwargs.get("input_ids", kwargs.get("decoder_input_ids"))
        seen.append(tuple(x.shape[:2]))

    watched = model.llm.get_encoder() if model.is_encoder_decoder else model.llm
    hook = watched.register_forward_pre_hook(record, with_kwargs=True)
    try:
        Decoding().generate(model, px, ids, mask, max_new_tokens=5, num_beams=4, eos_token_id=eos)
    finally:
        hook.remove()
    prefix = mask.shape[1] + model.config.qformer.num_query_tokens
    assert seen[0] == (3, prefix)
    if model.is_encoder_decoder:
        assert len(seen) == 1
    else:
        assert seen[1:] and all(s == (12, 1) for s in seen[1:])


def test_options_beam_search_does_not_cover_go_to_transformers():
    model = make("tiny-opt", lively=True).eval()
    base = {"max_new_tokens": 4, "num_beams": 3, "eos_token_id": 2, "pad_token_id": 1}
    assert beam.supports(model.llm, base)
    for extra in (
        {"do_sample": True},
        {"num_return_sequences": 4},  # more than the beams: transformers says so
        {"return_dict_in_generate": True, "output_scores": True},
        {"no_repeat_ngram_size": 2},
        {"num_beams": 1},  # greedy search: the greedy loop's
    ):
        assert not beam.supports(model.llm, {**base, **extra}), extra
    assert not beam.supports(model.llm, {"num_beams": 3, "eos_token_id": 2})  # transformers' max_length
    model.llm.generation_config.no_repeat_ngram_size = 2  # the LM's own config changes the search
    try:
        assert not beam.supports(model.llm, base)
    finally:
        model.llm.generation_config.no_repeat_ngram_size = 0
    # those options still work, through transformers (which also raises what it raises)
    px, decoding = images(2), Decoding()
    calls = []
    original = model.llm.generate
    model.llm.generate = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        options = {
            "max_new_tokens": 4,
            "num_beams": 3,
            "return_dict_in_generate": True,
            "output_scores": True,
        }
        out = decoding.generate(model, px, **options)
        assert calls and out.sequences.tolist() == model.generate(px, **options).sequences.tolist()
        calls.clear()
        assert decoding.generate(model, px, max_new_tokens=4, num_beams=3).shape[0] == 2
        assert not calls  # the supported options ran our search
        with pytest.raises(ValueError, match="num_return_sequences"):
            decoding.generate(model, px, max_new_tokens=4, num_beams=2, num_return_sequences=3)
    finally:
        del model.llm.generate
    # mode "transformers" always runs transformers' search
    assert decoding.generate(model, px, max_new_tokens=4, num_beams=3, mode="transformers").tolist() == (
        model.generate(px, max_new_tokens=4, num_beams=3).tolist()
    )


def test_compiled_beam_search_on_cpu_gives_the_tokens_of_transformers():
    """decode_mode="compiled": the beams' static-cache step through torch.compile (inductor on CPU),
    the cache reordered in place between calls."""
    model = make("tiny-opt", lively=True).eval()
    px, ids, mask = inputs(model, 3)
    options = {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2, "length_penalty": 2.0}
    plain = model.generate(px, ids, mask, **options)
    decoding = Decoding()
    for _ in range(2):  # the second call reuses the compiled step and the static cache
        assert decoding.generate(model, px, ids, mask, mode="compiled", **options).tolist() == plain.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_beam_search_on_cuda_gives_the_tokens_of_transformers():
    model = make("tiny-opt", lively=True).eval().cuda()
    px, ids, mask = (t.cuda() for t in inputs(model, 3))
    eos = ending_ids(model, px, ids, mask, 4)
    decoding = Decoding()
    for options in (
        {"max_new_tokens": 6, "num_beams": 4, "eos_token_id": eos},
        {"max_new_tokens": 6, "num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.5},
    ):
        plain = model.generate(px, ids, mask, **options)
        for mode in ("fast", "static", "compiled", "compiled"):  # twice: the graphs replayed
            assert decoding.generate(model, px, ids, mask, mode=mode, **options).tolist() == plain.tolist(), (
                mode
            )


def test_the_lms_own_search_settings_apply_when_not_passed(model):
    """`length_penalty` and `early_stopping` from the LM's generation config, as transformers reads
    them when `generate` does not get them (its `num_return_sequences` goes to transformers, which
    refuses it)."""
    px, ids, mask = inputs(model, 3)
    eos = ending_ids(model, px, ids, mask, 3)
    config = model.llm.generation_config
    options = {"max_new_tokens": NEW_TOKENS, "num_beams": 3, "eos_token_id": eos}
    try:
        for config.length_penalty, config.early_stopping in ((1.0, False), (0.5, True), (2.0, "never")):
            assert beam.supports(model.llm, {**options, "pad_token_id": model.pad_token_id})
            plain = model.generate(px, ids, mask, **options)
            assert Decoding().generate(model, px, ids, mask, **options).tolist() == plain.tolist()
        config.num_return_sequences = 2
        assert not beam.supports(model.llm, options)
    finally:
        config.length_penalty, config.early_stopping, config.num_return_sequences = 1.0, False, 1
