"""The fast decode path and the bf16 Q-Former: same results as the plain path (correctness only; the
timings are in benchmarks/bench.py).

* `Decoding.generate` with greedy options runs `blip2.generation.greedy`; it must give the tokens
  the model's plain `generate` (transformers' `generate`) gives for OPT, GPT-2 and T5 LMs, batched with
  padded prompts, rows ending at different steps, `min_new_tokens` and `repetition_penalty`; the
  static-cache variant too.
* The Q-Former under bf16 autocast (fp32 master weights) agrees with fp32 within bf16 tolerance.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_stage2 import _prompts, images, make, pad

from blip2.generation import Decoding
from blip2.generation import greedy as decode
from blip2.models import RetrievalModel
from blip2.presets import preset
from blip2.tasks.stage1 import Stage1Task

KINDS = ["tiny-opt", "tiny-gpt2", "tiny-t5"]
OPTIONS = [
    {"max_new_tokens": 7},
    {"max_new_tokens": 7, "min_new_tokens": 4, "repetition_penalty": 1.5},
    {"max_new_tokens": 7, "do_sample": False, "num_beams": 1, "temperature": 0.7},  # inert settings
]


@pytest.fixture(scope="module", params=KINDS)
def lively(request):
    """A tiny model whose output depends on image and prompt, with an EOS it really emits (image 0's
    third greedy token), so batched rows end at different steps."""
    model = make(request.param, lively=True).eval()
    prompts = _prompts(model)
    first = model.generate(images(1), torch.tensor([prompts[0]]), max_new_tokens=3)
    model.eos_token_id = int(first[0, -1])
    return model, prompts


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "min-new-penalty", "inert"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fast_greedy_gives_the_tokens_of_transformers_generate(lively, options, side):
    model, prompts = lively
    px = images(3)
    ids, mask = pad(prompts, side, model.pad_token_id)
    decoding = Decoding()
    assert decode.supports(model.llm, {**options, "eos_token_id": 2, "pad_token_id": 1})
    plain = model.generate(px, ids, mask, **options)
    modes = ["fast"] if model.is_encoder_decoder else ["fast", "static"]
    for mode in modes:
        fast = decoding.generate(model, px, ids, mask, mode=mode, **options)
        assert fast.tolist() == plain.tolist(), mode
    # looking whether every row has ended only every 3rd step (as on CUDA, every 8th): same tokens
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(decode.CHECK_EVERY, "cpu", 3)
        for mode in modes:
            assert decoding.generate(model, px, ids, mask, mode=mode, **options).tolist() == plain.tolist()
    # the comparison means something: rows differ, and with no min_new_tokens some row ends early
    assert len({tuple(r) for r in plain.tolist()}) > 1
    if "min_new_tokens" not in options:
        assert (plain == model.eos_token_id).any()


def test_fast_greedy_is_the_default_and_one_prompt_serves_all_images(lively):
    model, prompts = lively
    px = images(2)
    assert Decoding().mode == "fast"
    calls = []
    hook = model.llm.register_forward_hook(lambda *_: calls.append(1))
    try:
        fast = Decoding().generate(model, px, torch.tensor([prompts[0]]), max_new_tokens=5)
        steps = len(calls)
        calls.clear()
        plain = model.generate(px, torch.tensor([prompts[0]]), max_new_tokens=5)
    finally:
        hook.remove()
    assert fast.tolist() == plain.tolist()
    if not model.is_encoder_decoder:  # prefill + one call per further token: no extra LM calls
        assert steps == fast.shape[1]


def test_eos_first_and_zero_tokens(lively):
    model, _ = lively
    px, decoding = images(1), Decoding()
    token = int(model.generate(px, max_new_tokens=1)[0, 0])
    model_eos = model.eos_token_id
    try:
        model.eos_token_id = token
        assert model.generate(px, max_new_tokens=5).tolist() == [[token]]
        for mode in ("fast", "transformers"):
            assert decoding.generate(model, px, max_new_tokens=5, mode=mode).tolist() == [[token]]
        with pytest.MonkeyPatch.context() as mp:  # looking every 3rd step: the steps past the end are cut
            mp.setitem(decode.CHECK_EVERY, "cpu", 3)
            modes = ["fast"] if model.is_encoder_decoder else ["fast", "static"]
            for mode in modes:
                assert decoding.generate(model, px, max_new_tokens=5, mode=mode).tolist() == [[token]], mode
        held = decoding.generate(model, px, max_new_tokens=5, min_new_tokens=3)
        assert held.tolist() == model.generate(px, max_new_tokens=5, min_new_tokens=3).tolist()
        assert token not in held[0, :3].tolist()
    finally:
        model.eos_token_id = model_eos


@pytest.mark.parametrize("mode", ["fast", "static"])
def test_rows_ending_at_different_steps_are_cut_where_greedy_search_stops(lively, mode):
    """An EOS list that ends each row at a different step (1, 3, 4): looking only every 3rd step runs
    past the end, and the extra steps are cut so the tokens equal transformers' (fewer than the max)."""
    model, _ = lively
    if model.is_encoder_decoder and mode == "static":
        pytest.skip("the static cache is for decoder-only LMs")
    px, decoding = images(3), Decoding()
    free = model.generate(px, max_new_tokens=7, eos_token_id=None)
    eos = sorted({int(free[0, 1]), int(free[1, 3]), int(free[2, 4])})
    plain = model.generate(px, max_new_tokens=7, eos_token_id=eos)
    assert plain.shape[1] < 7  # every row ended: greedy search stopped early
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(decode.CHECK_EVERY, "cpu", 3)
        assert decoding.generate(model, px, max_new_tokens=7, mode=mode, eos_token_id=eos).tolist() == (
            plain.tolist()
        )


def test_options_the_loop_does_not_cover_go_to_transformers():
    model = make("tiny-opt", lively=True).eval()
    base = {"max_new_tokens": 4, "eos_token_id": 2, "pad_token_id": 1}
    assert decode.supports(model.llm, base)
    for extra in (
        {"num_beams": 3},
        {"do_sample": True},
        {"return_dict_in_generate": True},
        {"no_repeat_ngram_size": 2},
        {"max_length": 9},
        {"num_return_sequences": 2},
    ):
        assert not decode.supports(model.llm, {**base, **extra}), extra
    assert not decode.supports(model.llm, {"eos_token_id": 2})  # no max_new_tokens: transformers' default
    model.llm.generation_config.no_repeat_ngram_size = 2  # the LM's own config changes greedy search
    try:
        assert not decode.supports(model.llm, base)
    finally:
        model.llm.generation_config.no_repeat_ngram_size = 0
    # beams still work (through transformers), and sampling is not silently made greedy
    out = model.generate(images(2), max_new_tokens=4, num_beams=2, num_return_sequences=2)
    assert out.shape[0] == 4
    decoding = Decoding()
    out = decoding.generate(model, images(2), max_new_tokens=4, num_beams=2, num_return_sequences=2)
    assert (
        out.tolist()
        == model.generate(images(2), max_new_tokens=4, num_beams=2, num_return_sequences=2).tolist()
    )
    with pytest.raises(ValueError, match="decode_mode"):
        decoding.generate(model, images(1), max_new_tokens=2, mode="quick")
    with pytest.raises(ValueError, match="decode_mode"):
        Decoding(mode="quick")


# ------------------------------------------------------------------------------------ bf16 Q-Former


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("name", KINDS)
def test_bf16_autocast_prefix_agrees_with_fp32(name):
    model = make(name, lively=True).eval()
    px = images(2)
    ref = model.prefix(px)
    model.autocast_dtype = torch.bfloat16
    got = model.prefix(px)
    assert got.dtype == ref.dtype  # cast to the LLM's dtype either way
    assert model.qformer.layers[0].self_attn.query.weight.dtype == torch.float32  # fp32 master weights
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.004); a few layers compound it
    assert 0 < relative_error(got, ref) < 3e-2


def test_bf16_autocast_stage1_losses_and_gradients_agree_with_fp32():
    torch.manual_seed(0)
    config = preset("tiny-stage1")
    config = dataclasses.replace(
        config, qformer=dataclasses.replace(config.qformer, dropout=0.0, attention_dropout=0.0)
    )
    model = RetrievalModel(config).train()
    g = torch.Generator().manual_seed(1)
    px = torch.randn(4, 3, 16, 16, generator=g)
    ids = torch.randint(1000, 2000, (4, 7), generator=g)
    ids[:, 0] = config.qformer.cls_token_id
    mask = torch.ones_like(ids)
    mask[2:, 5:] = 0

    def run(dtype):
        model.autocast_dtype = dtype
        model.zero_grad(set_to_none=True)
        out = Stage1Task(model)(ids, mask, px, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.qformer.parameters() if p.grad is not None])
        return out, grad

    ref, ref_grad = run(None)
    got, grad = run(torch.bfloat16)
    assert grad.dtype == torch.float32  # gradients land on the fp32 master weights
    for field in ("loss_itc", "loss_itm", "loss_itg"):
        a, b = getattr(got, field).item(), getattr(ref, field).item()
        assert abs(a - b) <= 2e-2 * abs(b), field
    cosine = torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0).item()
    assert cosine > 0.99


def test_compiled_decode_on_cpu_gives_the_tokens_of_transformers_generate():
    """decode_mode="compiled": the static-cache step through torch.compile (inductor on CPU, tensor
    guards only, frozen weights). A compilation: about 20 s on 2 cores with a cold inductor cache."""
    model = make("tiny-opt", lively=True).eval()
    prompts = _prompts(model)
    ids, mask = pad(prompts, "left", model.pad_token_id)
    px, decoding = images(3), Decoding()
    plain = model.generate(px, ids, mask, max_new_tokens=6)
    for _ in range(2):  # the second call reuses the compiled step
        assert (
            decoding.generate(model, px, ids, mask, max_new_tokens=6, mode="compiled").tolist()
            == plain.tolist()
        )
    # another batch size: the tensor guards pick (compile) the step for that shape, not the one above
    two = decoding.generate(model, px[:2], ids[:2], mask[:2], max_new_tokens=6, mode="compiled")
    assert two.tolist() == decoding.generate(model, px[:2], ids[:2], mask[:2], max_new_tokens=6).tolist()
    # the step's weights are frozen into it: a weight changed in place (an optimizer step, a load) is
    # seen all the same, by compiling again
    with torch.no_grad():
        model.llm.get_output_embeddings().weight.mul_(-1.0)
    flipped = model.generate(px, ids, mask, max_new_tokens=6)
    assert flipped.tolist() != plain.tolist()
    got = decoding.generate(model, px, ids, mask, max_new_tokens=6, mode="compiled")
    assert got.tolist() == flipped.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphed_prefix_and_compiled_decode_give_the_plain_results():
    """On CUDA, decode_mode static/compiled replays the image side from a CUDA graph and the decode
    step from a compiled one: same prefix (within fp32 tolerance) and the same tokens as the plain path."""
    model, decoding = make("tiny-opt", lively=True).eval().cuda(), Decoding()
    with torch.no_grad():
        for seed in (0, 1):  # the second call replays the graph captured by the first, on new pixels
            px = images(3, seed).cuda()
            graphed = decoding.prefix(model, px, None, "static")
            torch.testing.assert_close(graphed, model.prefix(px), rtol=1e-5, atol=1e-5)
    entries = list(decoding.prefix_graphs.graphs.values())
    assert len(entries) == 1 and entries[0] is not None  # captured once, not fallen back to eager
    px = images(3).cuda()
    plain = model.generate(px, max_new_tokens=6)
    for mode in ("fast", "static", "compiled"):
        assert decoding.generate(model, px, max_new_tokens=6, mode=mode).tolist() == plain.tolist(), mode
    # replaced weights are a new key: the old graph is not replayed on stale memory
    model.language_projection.weight = torch.nn.Parameter(model.language_projection.weight * 2)
    with torch.no_grad():
        torch.testing.assert_close(
            decoding.prefix(model, px, None, "static"), model.prefix(px), rtol=1e-5, atol=1e-5
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_cache_sees_in_place_updates_and_falls_back_when_capture_fails():
    from blip2.generation import GraphCache

    cache, w = GraphCache(), torch.ones(4, device="cuda")
    with torch.no_grad():
        assert torch.equal(cache(lambda t: t * w, torch.full((4,), 2.0, device="cuda"), [w]), w * 2)
        w.add_(1)  # an in-place update (an optimizer step) is what the replay reads
        assert torch.equal(cache(lambda t: t * w, torch.full((4,), 3.0, device="cuda"), [w]), w * 3)
        assert len(cache.graphs) == 1

        def syncs(t):  # waits for the host: cannot be captured
            return t * float(t.sum().item())

        with pytest.warns(UserWarning, match="without a CUDA graph"):
            out = cache(syncs, torch.ones(3, device="cuda"), [])
        assert torch.equal(out, torch.full((3,), 3.0, device="cuda"))
        assert torch.equal(cache(syncs, torch.ones(3, device="cuda"), []), out)  # plainly, no new warning
        assert torch.cuda.current_stream() == torch.cuda.default_stream()


def static_cache_keys(decoding: Decoding) -> list[tuple]:
    """The `(batch, length, dtype, device)` of the static caches `decoding` keeps, oldest first."""
    return list(decoding._static_caches)


def test_decoding_state_belongs_to_its_holder_and_a_copy_starts_empty():
    import copy
    import pickle

    model, decoding = make("tiny-opt", lively=True).eval(), Decoding()
    px = images(2)
    first = decoding.generate(model, px, max_new_tokens=4, mode="static")
    assert len(static_cache_keys(decoding)) == 1
    assert "_blip2_compiled_steps" not in model.llm.__dict__  # nothing kept inside the LM
    assert not hasattr(model, "decoding")  # the model holds no decode policy
    decoding.mode = "static"
    for twin in (copy.deepcopy(decoding), pickle.loads(pickle.dumps(decoding))):
        assert static_cache_keys(twin) == [] and (twin.mode, twin.max_static_caches) == ("static", 4)
        assert twin.generate(copy.deepcopy(model), px, max_new_tokens=4).tolist() == first.tolist()
    assert len(static_cache_keys(decoding)) == 1  # the original's caches are its own


def test_models_know_nothing_of_the_decode_policy():
    """The speed layer sits on top of the models: importing and building one loads no `blip2.generation`."""
    import subprocess
    import sys

    code = (
        "import sys; from blip2.presets import preset; from blip2.models import LanguageBridge; "
        "LanguageBridge(preset('tiny-opt')); print('blip2.generation' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"
