"""Generation faults: past the LLM's position limit (issue 13, item 11) and the static decode cache
after a change of dtype, over many shapes (item 12)."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
import tiny_hf
import torch
import usage_helpers as uh
from test_decode import static_cache_keys
from test_stage2 import images, make
from transformers import OPTConfig, StaticCache

import blip2
from blip2.errors import UserError
from blip2.generation import Decoding

POSITIONS = 64  # the LM's position table; the captioner has 8 queries and prompts start with </s>
QUERIES = tiny_hf.SHAPES["a"]["queries"]


@pytest.fixture(scope="module")
def short_captioner(tmp_path_factory) -> str:
    """The usage tests' captioner with a 64-position OPT."""
    text = OPTConfig(**{**tiny_hf.text_config("opt").to_diff_dict(), "max_position_embeddings": POSITIONS})
    return str(uh.save_captioner(tmp_path_factory.mktemp("short"), text=text))


# ------------------------------------------------------------------------------ item 11: position limit


def test_cli_refuses_more_new_tokens_than_the_lm_has_positions_with_one_sentence(short_captioner, tmp_path):
    image = uh.make_images(tmp_path, 1)[0]
    out = tmp_path / "captions.jsonl"
    argv = ["caption", "--model", short_captioner, str(image), "--out", str(out), "--no-progress"]
    argv += ["--max-new-tokens", "60", "--min-new-tokens", "60", "--num-beams", "1"]
    run = subprocess.run(
        [sys.executable, "-m", "blip2.cli", *argv], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if not line.startswith("notice:")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"at most {POSITIONS} positions" in lines[0] and "at most 55 new tokens" in lines[0], lines[0]
    assert not out.exists() or out.read_text() == ""  # refused before any image was captioned


def test_api_generates_up_to_the_limit_and_refuses_one_token_more(short_captioner):
    pipe = blip2.load(short_captioner)
    image = tiny_hf.images(1)[0]
    # 8 queries + </s> + 55 new tokens = 64 positions: fits, every token generated
    ids = pipe.model.generate(pipe.pixels([image]), max_new_tokens=55, min_new_tokens=55, num_beams=1)
    assert ids.shape == (1, 55)
    for options in ({"num_beams": 1}, {"num_beams": 2}):
        with pytest.raises(UserError, match=f"at most {POSITIONS} positions"):
            pipe.caption(image, max_new_tokens=56, min_new_tokens=56, **options)
        with pytest.raises(UserError, match="at most 55 new tokens"):
            pipe.model.generate(pipe.pixels([image]), max_new_tokens=56, **options)
    # a longer prompt leaves less room
    with pytest.raises(UserError, match="the 3-token prompt .* at most 53 new tokens"):
        pipe.caption(image, prompt="a photo", max_new_tokens=54)
    assert isinstance(pipe.caption(image, prompt="a photo", max_new_tokens=53, num_beams=1), str)


def test_max_length_instead_of_max_new_tokens_is_checked_against_the_limit_too(short_captioner):
    pipe = blip2.load(short_captioner)
    image = tiny_hf.images(1)[0]
    # transformers' max_length counts the 8 queries and the </s> prompt: 64 leaves 55 new tokens
    options = {"num_beams": 1, "max_length": POSITIONS, "min_length": POSITIONS}
    ids = pipe.model.generate(pipe.pixels([image]), **options)
    assert ids.shape == (1, POSITIONS - QUERIES - 1)
    pipe.check_generation_length([""], {"max_length": POSITIONS})
    words = "at most {} positions, .* max_length={} need {}: ask for a max_length of at most {}"
    with pytest.raises(UserError, match=words.format(POSITIONS, *[POSITIONS + 1] * 2, POSITIONS)):
        pipe.check_generation_length([""], {"max_length": POSITIONS + 1})
    too_long = {"num_beams": 1, "max_length": 80, "min_length": 80}  # was an IndexError
    with pytest.raises(UserError, match=words.format(POSITIONS, 80, 80, POSITIONS)):
        pipe.generate([image], [""], **too_long)


def test_gpt2_limit_is_its_n_positions_and_t5_has_none():
    gpt2 = make("tiny-gpt2").eval()  # n_positions 128
    with pytest.raises(UserError, match="at most 128 positions"):
        gpt2.generate(images(1), max_new_tokens=128 - QUERIES)  # + its BOS: one too many
    assert gpt2.generate(images(1), max_new_tokens=128 - QUERIES - 1, min_new_tokens=119).shape == (1, 119)
    t5 = make("tiny-t5").eval()  # relative positions: no limit
    assert t5.generate(images(1), max_new_tokens=140, min_new_tokens=140).shape == (1, 140)


# ------------------------------------------------------------------------------ item 12: static cache


def test_static_decode_after_a_change_of_dtype_gives_the_plain_tokens():
    model, decoding = make("tiny-opt", lively=True).eval(), Decoding()
    px = images(2)
    first = decoding.generate(model, px, max_new_tokens=6, mode="static")
    assert first.tolist() == model.generate(px, max_new_tokens=6).tolist()
    model.to(torch.bfloat16)
    bf16 = decoding.generate(model, px.bfloat16(), max_new_tokens=6, mode="static")
    assert bf16.tolist() == decoding.generate(model, px.bfloat16(), max_new_tokens=6, mode="fast").tolist()
    model.to(torch.float32)  # and back: the float32 cache again
    assert decoding.generate(model, px, max_new_tokens=6, mode="static").tolist() == first.tolist()


def _live_static_caches() -> int:
    gc.collect()
    return sum(isinstance(o, StaticCache) for o in gc.get_objects())


def test_static_caches_are_bounded_and_freed_with_their_holder():
    before = _live_static_caches()
    model, decoding = make("tiny-opt").eval(), Decoding(mode="static")
    for batch in (1, 2, 3):
        for new_tokens in (4, 40, 80):  # cache lengths rounded up to 32, 64, 96
            decoding.generate(model, images(batch), max_new_tokens=new_tokens)
    assert _live_static_caches() - before <= decoding.max_static_caches
    assert len(static_cache_keys(decoding)) <= decoding.max_static_caches
    # the most recent shape is kept: reusing it makes no new cache
    kept = _live_static_caches()
    decoding.generate(model, images(3), max_new_tokens=80)
    assert _live_static_caches() == kept
    llm = weakref.ref(model.llm)
    del model, decoding
    gc.collect()
    assert llm() is None and _live_static_caches() == before


# ------------------------------------------------------- a FlanT5 folder as transformers saves it


def test_a_t5_folder_saved_by_transformers_loads_for_stage2_training_with_its_input_table(tmp_path):
    """transformers 5.x saves a T5's one input table as `shared.weight` only; the encoder and decoder
    must read it (not freshly initialized tables of their own)."""
    from transformers import T5ForConditionalGeneration

    from blip2.tasks.stage2 import llm_for_stage2

    hf = tiny_hf.randomize(T5ForConditionalGeneration(tiny_hf.text_config("t5")), seed=4).eval()
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight))  # FlanT5's own head
    hf.config.tie_word_embeddings = False
    hf.save_pretrained(tmp_path / "flan")
    _, llm = llm_for_stage2(str(tmp_path / "flan"), None)
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        ref = hf(input_ids=ids, decoder_input_ids=torch.tensor([[0, 8, 9]])).logits
        got = llm.eval()(input_ids=ids, decoder_input_ids=torch.tensor([[0, 8, 9]])).logits
    assert torch.equal(llm.encoder.embed_tokens.weight, hf.shared.weight)
    assert torch.allclose(got, ref, atol=1e-5)
