"""Generation parity, every LLM family against transformers: OPT, GPT-2, Llama, T5 and FlanT5 (a T5
config without a BOS, as google/flan-t5-* ship it) x with / without a prompt x greedy / beam search.

Oracle: a tiny random `Blip2ForConditionalGeneration` with that LM, saved as transformers writes it and
loaded with `blip2.load`; both generate from the same pixels and prompt ids, two images at once (prompts
of different lengths, padded as each LM kind needs), and must give the same new tokens. The EOS is a
token the oracle really emits mid-way, so rows end at different steps. Our plain `generate` runs
transformers' `generate` under our inputs; `Decoding.generate` runs greedy search in our own decode loop
(`blip2.generation.greedy`) and must give the same tokens.

CI runs this file twice: with the newest transformers the pins allow (the project venv) and with the
lowest (`scripts/test.sh`, `.venv-lowest`).
"""

from __future__ import annotations

import parity_inputs
import pytest
import tiny_hf
import torch
import transformers
from parity_inputs import ended, eos_ending_rows_apart
from transformers import GPT2Config, LlamaConfig, T5Config

import blip2
from blip2.generation import Decoding

QUERIES = tiny_hf.SHAPES["a"]["queries"]
NEW_TOKENS = 6


def _text_config(family: str) -> transformers.PreTrainedConfig:
    ids = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}
    if family == "opt":
        return tiny_hf.text_config("opt")
    if family == "gpt2":
        return GPT2Config(vocab_size=99, n_embd=16, n_layer=2, n_head=4, n_positions=64, **ids)
    if family == "llama":
        return LlamaConfig(
            vocab_size=99,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **ids,
        )
    if family == "t5":  # what transformers' BLIP-2 conversion writes: bos_token_id=1 (FlanT5's EOS)
        return tiny_hf.text_config("t5")
    # FlanT5's own config: no BOS at all
    return T5Config(
        vocab_size=99,
        d_model=16,
        d_kv=4,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


# family -> seed of a tiny model whose greedy text is not one token repeated, with and without a prompt
SEEDS = {"opt": 3, "gpt2": 1, "llama": 5, "t5": 1, "flan-t5": 7}
FAMILIES = list(SEEDS)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    family = request.param
    kind = "t5" if "t5" in family else "opt"
    seed = SEEDS[family]
    hf, processor = tiny_hf.generation_model(kind, "a", seed=seed, text=_text_config(family))
    parity_inputs.livelier(hf, seed + 1)  # the default weights repeat one token whatever the input
    folder = tiny_hf.save_generation(hf, processor, tmp_path_factory.mktemp(f"hf-{family}"))
    ours = blip2.load(folder).model.eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return family, hf, ours, pixels


@pytest.mark.parametrize("prompted", [True, False], ids=["prompt", "no-prompt"])
@pytest.mark.parametrize("search", [{"num_beams": 1}, {"num_beams": 3}], ids=["greedy", "beam3"])
def test_generate_gives_the_tokens_of_transformers(pair, prompted, search):
    family, hf, ours, pixels = pair
    theirs_in, ours_in = parity_inputs.generation_inputs(hf, prompted, QUERIES)
    with torch.no_grad():
        first = hf.generate(pixel_values=pixels, **theirs_in, max_new_tokens=NEW_TOKENS)
        eos = eos_ending_rows_apart(parity_inputs.new_tokens(hf, first, theirs_in, QUERIES))
        options = {"max_new_tokens": NEW_TOKENS, "eos_token_id": eos, **search}
        ref = hf.generate(pixel_values=pixels, **theirs_in, **options)
        ref = parity_inputs.new_tokens(hf, ref, theirs_in, QUERIES)
        got = ours.generate(pixels, **ours_in, **options).tolist()
        assert Decoding().generate(ours, pixels, **ours_in, **options).tolist() == got
    # rows that ended are padded: transformers' beam search pads with the EOS when the pad id is 0 (T5),
    # ours always with the pad id; the tokens up to each row's EOS and the lengths must be equal
    assert len(got[0]) == len(ref[0]) and ended(got, eos) == ended(ref, eos), (family, prompted, search)
    # the comparison means something: more than one token, and the prompts lead to different text (a
    # tiny random GPT-2 barely tells the two images apart without a prompt)
    assert len({t for row in ref for t in row}) >= 2
    assert ref[0] != ref[1] or not prompted
