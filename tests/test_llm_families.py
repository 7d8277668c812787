"""Every LLM family against transformers' own BLIP-2: OPT, GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma,
Gemma2, Phi-3 and T5, each its tiny random `text_config` from `blip2.presets.TINY_LLMS`.

Oracle: `Blip2ForConditionalGeneration` built with that family's text config (it accepts any
`AutoModelForCausalLM` / `AutoModelForSeq2SeqLM` config, and every family here builds there), weights
random and livelier than the default (which repeat one token whatever the input), saved as transformers
writes it and loaded with `blip2.load`. Per family:

* the stage-2 training loss (prompt masked, padding on either side) and its logits equal transformers'
  forward with `labels` on the same text;
* greedy and 3-beam generations, with and without a text prompt, two images at once, give transformers'
  tokens, through the plain path and through every speed path `Decoding` has on CPU ("fast", and
  "static" for decoder-only LMs; an encoder-decoder LM's "static", and that of an LM generating past
  its sliding window, runs over its dynamic cache instead);
* export: a model of that family we build ourselves, saved with `save_pretrained`, loads in
  `Blip2ForConditionalGeneration.from_pretrained` unchanged and computes our logits and tokens; what
  transformers saves of it loads back into exactly our tensors.

Gemma2 has no SDPA attention in newer transformers (SDPA lacks its attention-logit soft-capping): both
sides then build it with eager attention. Mistral's and Gemma2's sliding windows (6) are shorter than the inputs,
so the window is exercised; batched prompts are then laid out as transformers' `Blip2Processor` pads
them, `[<image> x Q][pads][prompt]`, as ours are (a window counts the pads between queries and prompt).

CI runs this file twice: with the newest transformers the pins allow and with the lowest
(`scripts/test.sh`); every family here exists in both.
"""

from __future__ import annotations

import parity_inputs
import pytest
import tiny_hf
import torch
import transformers
from parity_inputs import ended, eos_ending_rows_apart
from transformers import Blip2ForConditionalGeneration

import blip2
from blip2 import llm_families
from blip2.data.batching import Preprocessor, TextSpec
from blip2.errors import UserError
from blip2.generation import Decoding
from blip2.interop.checkpoint import build_model
from blip2.pipelines import Captioner
from blip2.presets import TINY_LLMS, preset
from blip2.processing import ImageProcessor
from blip2.tasks.stage2 import Stage2Task

QUERIES = tiny_hf.SHAPES["a"]["queries"]
NEW_TOKENS = 6
ATOL = 1e-5
# family -> seed of a tiny model whose greedy text is not one token repeated, with and without a prompt
SEEDS = {
    "opt": 3,
    "gpt2": 1,
    "llama": 5,
    "mistral": 1,
    "qwen2": 1,
    "qwen3": 1,
    "gemma": 1,
    "gemma2": 1,
    "phi3": 1,
    "t5": 1,
}
FAMILIES = list(SEEDS)
assert set(FAMILIES) == set(TINY_LLMS)  # a family added to the presets is tested here


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they lose a lot (spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def text_config(family: str) -> transformers.PreTrainedConfig:
    """The family's tiny `text_config` as transformers builds it from the preset's fields."""
    fields = dict(TINY_LLMS[family])
    return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, transformers' model, ours loaded from its folder, two images' pixels)."""
    family = request.param
    seed = SEEDS[family]
    kind = "t5" if family == "t5" else "opt"  # the word tokenizer: EOS appended (T5) or BOS first
    hf, processor = tiny_hf.generation_model(kind, "a", seed=seed, text=text_config(family))
    parity_inputs.livelier(hf, seed + 1)
    folder = tiny_hf.save_generation(hf, processor, tmp_path_factory.mktemp(f"hf-{family}"))
    ours = blip2.load(folder).model.eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return family, hf.eval(), ours, pixels


def test_every_family_builds_in_transformers_blip2(pair):
    family, hf, ours, _ = pair
    assert hf.language_model.config.model_type == TINY_LLMS[family]["model_type"]
    assert ours.llm.config.model_type == TINY_LLMS[family]["model_type"]
    assert type(ours.llm) is type(hf.language_model)
    # SDPA where the LM class has it; else eager (Gemma2 in newer transformers: SDPA has no soft-capping)
    expected = "sdpa" if type(hf.language_model)._supports_sdpa else "eager"
    assert ours.llm.config._attn_implementation == hf.language_model.config._attn_implementation == expected


# ------------------------------------------------------------------------------------------ the loss


def _texts(hf) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Two training texts `[BOS] prompt caption [EOS]` right padded, and their prompt lengths."""
    text = hf.config.text_config
    rows = [[text.bos_token_id, 10, 11, 18, 19, 20, text.eos_token_id], [text.bos_token_id, 13, 21, 5, 2]]
    n = max(map(len, rows))
    ids = torch.tensor([r + [text.pad_token_id] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return ids, mask, [3, 2]


def test_stage2_loss_equals_transformers(pair):
    family, hf, ours, pixels = pair
    text = hf.config.text_config
    image = torch.full((2, QUERIES), hf.config.image_token_index)
    task = Stage2Task(ours)
    with torch.no_grad():
        if text.is_encoder_decoder:  # the encoder reads [queries][prefix], the decoder learns the rest
            ids = torch.tensor([[10, 11, 1, 0], [13, 14, 15, 1]])
            mask = (ids != 0).long()
            labels = torch.tensor([[18, 19, 20, 1], [21, 1, -100, -100]])
            ref = hf(pixel_values=pixels, input_ids=torch.cat([image, ids], 1),
                     attention_mask=torch.cat([torch.ones_like(image), mask], 1), labels=labels)  # fmt: skip
            got = task(pixels, ids, mask, labels=labels)
            assert (got.logits - ref.logits).abs().max() <= ATOL
        else:  # [queries][BOS prompt caption EOS][pads]: the prompt (BOS included) and pads are not counted
            ids, mask, prompt_lengths = _texts(hf)
            labels = ids.masked_fill(mask == 0, -100)
            for row, n in enumerate(prompt_lengths):
                labels[row, :n] = -100
            full_mask = torch.cat([torch.ones_like(image), mask], 1)
            ref = hf(pixel_values=pixels, input_ids=torch.cat([image, ids], 1), attention_mask=full_mask,
                     labels=torch.cat([torch.full_like(image, -100), labels], 1))  # fmt: skip
            got = task(pixels, ids, mask, prompt_lengths=torch.tensor(prompt_lengths))
            real = full_mask.bool()  # padded positions predict nothing
            # on CPU our float32 products run through oneDNN (`blip2.models.onednn`), transformers'
            # through MKL: the same sums rounded in another order, so ATOL relative to the logits' scale
            scale = max(1.0, ref.logits[real].abs().max().item())
            assert (got.logits[real] - ref.logits[real]).abs().max() <= ATOL * scale
            # left padding reads the same text: the same loss
            left = torch.stack([torch.roll(r, int((m == 0).sum())) for r, m in zip(ids, mask, strict=True)])
            left_mask = torch.stack([torch.roll(m, int((m == 0).sum())) for m in mask])
            again = task(
                pixels, left, left_mask, prompt_lengths=torch.tensor(prompt_lengths), return_logits=False
            )
            assert abs(again.loss.item() - ref.loss.item()) <= ATOL
    assert abs(got.loss.item() - ref.loss.item()) <= ATOL, family
    assert ref.loss.item() > 0


# ------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("prompted", [True, False], ids=["prompt", "no-prompt"])
@pytest.mark.parametrize("search", [{"num_beams": 1}, {"num_beams": 3}], ids=["greedy", "beam3"])
def test_generation_gives_the_tokens_of_transformers_on_every_path(pair, prompted, search):
    family, hf, ours, pixels = pair
    theirs_in, ours_in = parity_inputs.generation_inputs(hf, prompted, QUERIES, pads_first=False)
    with torch.no_grad():
        first = hf.generate(pixel_values=pixels, **theirs_in, max_new_tokens=NEW_TOKENS)
        eos = eos_ending_rows_apart(parity_inputs.new_tokens(hf, first, theirs_in, QUERIES))
        options = {"max_new_tokens": NEW_TOKENS, "eos_token_id": eos, **search}
        ref = parity_inputs.new_tokens(
            hf, hf.generate(pixel_values=pixels, **theirs_in, **options), theirs_in, QUERIES
        )
        got = ours.generate(pixels, **ours_in, **options).tolist()
        decoding = Decoding()
        for mode in ("transformers", "fast", "static"):
            assert decoding.generate(ours, pixels, **ours_in, mode=mode, **options).tolist() == got, mode
    # rows that ended are padded: transformers' beam search pads with the EOS when the pad id is 0 (T5),
    # ours always with the pad id; the tokens up to each row's EOS and the lengths must be equal
    assert len(got[0]) == len(ref[0]) and ended(got, eos) == ended(ref, eos), (family, prompted, search)
    # the comparison means something: more than one token, and the prompts lead to different text
    assert len({t for row in ref for t in row}) >= 2
    assert ref[0] != ref[1] or not prompted


def test_fast_paths_are_taken_not_fallen_back_from(pair, monkeypatch):
    """ "fast" and "static" run our own loops for every family (not transformers' `generate` behind
    them); an encoder-decoder LM has no static cache and runs "static" over its dynamic one."""
    family, hf, ours, pixels = pair
    from blip2.generation import beam, greedy

    calls: list[str] = []
    for module, name in ((greedy, "greedy"), (beam, "beam_search")):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(f"{_name}:{'static' if kwargs.get('static_cache') else 'dynamic'}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    monkeypatch.setattr(type(ours), "generate_from_embeds", lambda *a, **k: pytest.fail("fell back"))
    decoding = Decoding()
    for mode in ("fast", "static"):
        for beams in (1, 3):
            decoding.generate(ours, pixels, max_new_tokens=3, num_beams=beams, mode=mode)
    # no static cache for an encoder-decoder LM, nor past a sliding window (Mistral's and Gemma2's 6)
    static = not hf.config.text_config.is_encoder_decoder and family not in ("mistral", "gemma2")
    cache = "static" if static else "dynamic"
    assert calls == ["greedy:dynamic", "beam_search:dynamic", f"greedy:{cache}", f"beam_search:{cache}"]
    if family in ("mistral", "gemma2"):  # a window that covers the generation: the static cache again
        monkeypatch.setattr(ours.llm.config, "sliding_window", 64)
        calls.clear()
        decoding.generate(ours, pixels, max_new_tokens=3, num_beams=3, mode="static")
        assert calls == ["beam_search:static"]


@pytest.mark.slow
def test_compiled_decode_gives_the_tokens_of_transformers(pair):
    """decode_mode="compiled": the static-cache step (above, every family) through torch.compile, for
    the architectures compiling could break in their own way (rotary with grouped-query attention, per-head
    norms, scaled embeddings, fused projections); each compile takes a minute of CPU."""
    family, hf, ours, pixels = pair
    if family not in ("llama", "qwen3", "gemma", "phi3"):
        pytest.skip("the compiled step is the static one, checked for this family; compiled for four others")
    _, ours_in = parity_inputs.generation_inputs(hf, True, QUERIES)
    with torch.no_grad():
        for beams in (1, 3):
            plain = ours.generate(pixels, **ours_in, max_new_tokens=4, num_beams=beams)
            fast = Decoding().generate(
                ours, pixels, **ours_in, max_new_tokens=4, num_beams=beams, mode="compiled"
            )
            assert fast.tolist() == plain.tolist(), (family, beams)


# ------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    """A model of the family built by ourselves (`preset("tiny-<family>")`, every weight random) and
    saved with `Captioner.save_pretrained`."""
    family = request.param
    model = tiny_hf.randomize(build_model(preset(f"tiny-{family}"), init=True), seed=len(family)).eval()
    tok = tiny_hf.word_tokenizer("t5" if family == "t5" else "opt")
    pipe = Captioner(model, ImageProcessor(16), tok)
    folder = tmp_path_factory.mktemp(f"ours-{family}")
    pipe.save_pretrained(folder)
    return family, pipe, folder


def test_export_loads_in_transformers_and_computes_the_same(built, tmp_path):
    family, pipe, folder = built
    hf = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    assert hf.language_model.config.model_type == TINY_LLMS[family]["model_type"]
    processor = tiny_hf.Blip2Processor.from_pretrained(folder)
    decoder_only = not pipe.model.is_encoder_decoder
    texts, images = ["a photo of", "what is the sky ?"], tiny_hf.images(2)
    # the training layout: [<image> x Q][text][pads] (transformers' forward counts positions over pads,
    # so only right padding reads the same in both)
    processor.tokenizer.padding_side = "right"
    enc = processor(images=images, text=texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"][:, QUERIES:], enc["attention_mask"][:, QUERIES:]
    pixels = enc["pixel_values"]
    assert torch.equal(pipe.pixels(images), pixels)
    labels = None if decoder_only else torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100]])
    eos = hf.config.text_config.eos_token_id
    with torch.no_grad():
        ref = hf(**enc, labels=labels).logits
        got = Stage2Task(pipe.model)(pixels, ids, mask, labels=labels).logits
        real = enc["attention_mask"].bool() if decoder_only else torch.ones(ref.shape[:2], dtype=torch.bool)
        assert (got[real] - ref[real]).abs().max() <= ATOL
        if decoder_only:  # generation: the prompts left padded, [<image> x Q][pads][prompt]
            processor.tokenizer.padding_side = "left"
            enc = processor(images=images, text=texts, padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"][:, QUERIES:], enc["attention_mask"][:, QUERIES:]
        for beams in (1, 3):
            theirs = hf.generate(**enc, max_new_tokens=5, num_beams=beams)
            theirs = theirs[:, enc["input_ids"].shape[1] :] if decoder_only else theirs[:, 1:]
            ours = pipe.model.generate(pixels, ids, mask, max_new_tokens=5, eos_token_id=eos, num_beams=beams)
            assert ours.tolist() == theirs.tolist(), (family, beams)
    # what transformers writes of it loads back into exactly our tensors
    hf.save_pretrained(tmp_path / "theirs")
    again = blip2.load(tmp_path / "theirs", tokenizer=folder)
    ours_state, back = pipe.model.state_dict(), again.model.state_dict()
    assert sorted(ours_state) == sorted(back)
    assert all(torch.equal(ours_state[k], back[k]) for k in ours_state)
    assert again.config.llm.hf_config["model_type"] == TINY_LLMS[family]["model_type"]


# ------------------------------------------------------------------------------------------ conventions

CHAT = (  # a Qwen-style chat template (ChatML)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# family -> (special tokens: vocabulary order, what the tokenizer adds around a text, its named tokens)
TOKENIZERS = {
    "opt": (["<s>", "<pad>", "</s>", "<unk>"], "</s> $A", {"bos": "</s>", "eos": "</s>", "pad": "<pad>"}),
    "gpt2": (["<|endoftext|>"], "$A", {"bos": "<|endoftext|>", "eos": "<|endoftext|>"}),
    "llama": (["<unk>", "<s>", "</s>"], "<s> $A", {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}),
    "qwen2": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "$A",
        {"eos": "<|im_end|>", "pad": "<|endoftext|>"},
    ),
    "gemma": (
        ["<pad>", "<eos>", "<bos>", "<unk>"],
        "<bos> $A",
        {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"},
    ),
    "t5": (["<pad>", "</s>", "<unk>"], "$A </s>", {"eos": "</s>", "pad": "<pad>", "unk": "<unk>"}),
}


def family_tokenizer(family: str, chat: bool = False):
    """A word-level tokenizer with the family's special tokens and what it adds around a text (BOS
    first, EOS last or nothing), built offline (ids below the tiny LMs' vocabulary of 99)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials, template, named = TOKENIZERS[family]
    vocab = {
        t: i for i, t in enumerate([*specials, *tiny_hf.WORDS, "hi", "this", "user", "assistant", "system"])
    }
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=named.get("unk", specials[0])))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    used = [t for t in template.split() if t != "$A"]
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in used]
    )
    kw = {f"{k}_token": v for k, v in named.items()}
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT if chat else None, **kw)


@pytest.mark.parametrize(
    ("family", "bos", "eos"),
    [("opt", True, False), ("gpt2", False, False), ("llama", True, False), ("qwen2", False, False),
     ("gemma", True, False), ("t5", False, True)],
)  # fmt: skip
def test_what_each_family_tokenizer_adds(family, bos, eos):
    tok = family_tokenizer(family)
    assert (llm_families.adds_bos(tok), llm_families.adds_eos(tok)) == (bos, eos)
    # a decoder-only target ends with the EOS once: appended unless the tokenizer appends it itself
    assert llm_families.target_suffix(tok, None) == ("" if eos else tok.eos_token)
    assert llm_families.target_suffix(tok, "\n") == "\n"  # OPT's BLIP-2 checkpoints end at a newline


def test_a_tokenizer_without_pad_pads_with_its_eos_else_unk(tmp_path):
    """Through the loader every command uses (`blip2.tokenizers.llm_tokenizer`)."""
    from blip2.tokenizers import llm_tokenizer

    for family, pad in (
        ("llama", "</s>"),
        ("gpt2", "<|endoftext|>"),
        ("qwen2", "<|endoftext|>"),
        ("opt", "<pad>"),
    ):
        family_tokenizer(family).save_pretrained(tmp_path / family)
        assert llm_tokenizer(str(tmp_path / family)).pad_token == pad, family
    no_eos = family_tokenizer("llama")
    no_eos.eos_token = None
    assert llm_families.ensure_pad_token(no_eos).pad_token == "<unk>"
    bare = family_tokenizer("gpt2")
    bare.eos_token = bare.bos_token = None
    with pytest.raises(UserError, match="has no pad, EOS or unknown token"):
        llm_families.ensure_pad_token(bare)


def _batch(family: str, prompt: str, chat: bool = False, eos_text: str | None = None) -> tuple[list, dict]:
    """Two training samples of the family collated the way `blip2 train` collates them."""
    tok = llm_families.ensure_pad_token(family_tokenizer(family, chat=chat))
    mode = "seq2seq" if family == "t5" else "causal"
    spec = TextSpec(mode, tok, prompt=prompt, eos_text=eos_text, chat_template=chat)
    pre = Preprocessor(spec, images=ImageProcessor(16), augment=False)
    samples = [
        {"key": str(i), "image_id": i, "prompt": prompt, "target": t}
        for i, t in enumerate(["two cat", "a dog"])
    ]
    batch = pre.collate(samples)
    return [tok.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()], batch


def test_training_texts_follow_each_family():
    # Llama: <s> first, counted in the prompt; </s> last; padded right with the EOS (masked)
    rows, batch = _batch("llama", "a photo of")
    assert rows == [
        ["<s>", "a", "photo", "of", "two", "cat", "</s>"],
        ["<s>", "a", "photo", "of", "a", "dog", "</s>"],
    ]
    assert batch["prompt_lengths"].tolist() == [4, 4]
    # GPT-2 / Qwen: nothing first; the prompt is its words only; the EOS ends the target
    rows, batch = _batch("gpt2", "a photo of")
    assert rows[1] == ["a", "photo", "of", "a", "dog", "<|endoftext|>"] and batch[
        "prompt_lengths"
    ].tolist() == [3, 3]
    # no prompt: the target follows the queries (OPT's BOS is then a target, as in LAVIS)
    rows, batch = _batch("opt", "", eos_text="\n")
    assert rows[1][0] == "</s>" and batch["prompt_lengths"].tolist() == [0, 0]
    rows, _ = _batch("gemma", "")
    assert rows == [["<bos>", "two", "cat", "<eos>"], ["<bos>", "a", "dog", "<eos>"]]
    # T5: the prompt in the encoder, the target in the decoder, each ended by the tokenizer's </s>
    rows, batch = _batch("t5", "a photo of")
    tok = family_tokenizer("t5")
    assert rows[0] == ["a", "photo", "of", "</s>"]
    assert tok.convert_ids_to_tokens(batch["labels"][1].tolist()) == ["a", "dog", "</s>"]


def test_chat_template_wraps_prompts_in_training_and_generation(tmp_path):
    """`LLMConfig.chat_template`: the prompt as one user turn with the assistant's turn opened; the
    template's own special tokens, none added; the loss starts after the opened assistant turn."""
    rows, batch = _batch("qwen2", "what is this ?", chat=True)
    opened = ["<|im_start|>", "user", "what", "is", "this", "?", "<|im_end|>", "<|im_start|>", "assistant"]
    assert rows[0] == [*opened, "two", "cat", "<|im_end|>"]
    assert batch["prompt_lengths"].tolist() == [len(opened)] * 2
    # generation: the same opened turn, left padded, through the captioner
    config = preset("tiny-qwen2", llm={"chat_template": True})
    tok = family_tokenizer("qwen2", chat=True)
    pipe = Captioner(build_model(config, init=True), ImageProcessor(16), tok)
    enc = pipe._encode_prompts(["what is this ?", "hi"])
    assert tok.convert_ids_to_tokens(enc["input_ids"][0].tolist()) == opened
    assert enc["attention_mask"][1].tolist()[:3] == [0, 0, 0]  # "hi" is 3 tokens shorter: padded left
    assert len(pipe.caption(tiny_hf.images(1)[0], max_new_tokens=2, num_beams=1).split()) <= 2
    pipe.save_pretrained(tmp_path)  # the setting and the template travel with the model
    again = blip2.load(tmp_path)
    assert again.config.llm.chat_template and again._encode_prompts(["hi"])["input_ids"].tolist() == (
        pipe._encode_prompts(["hi"])["input_ids"].tolist()
    )
    # a tokenizer without a chat template: one sentence
    plain = Captioner(build_model(config, init=True), ImageProcessor(16), family_tokenizer("qwen2"))
    with pytest.raises(UserError, match="has no chat template"):
        plain.caption(tiny_hf.images(1)[0], max_new_tokens=2)


def test_generation_pads_decoder_only_prompts_left_and_encoder_decoder_prompts_right():
    for family, side in (("llama", "left"), ("gpt2", "left"), ("t5", "right")):
        config = preset(f"tiny-{family}")
        tok = llm_families.ensure_pad_token(family_tokenizer(family))
        pipe = Captioner(build_model(config, init=True), ImageProcessor(16), tok)
        enc = pipe._encode_prompts(["a photo of two", "hi"])
        real = tok.convert_ids_to_tokens(enc["input_ids"][1][enc["attention_mask"][1] == 1].tolist())
        assert real == tok.convert_ids_to_tokens(tok("hi")["input_ids"]), family
        ones = [1] * len(real)
        pads = [0] * (enc["attention_mask"].shape[1] - len(real))
        assert enc["attention_mask"][1].tolist() == (pads + ones if side == "left" else ones + pads), family


# ------------------------------------------------------------------------------------------ refusals


def test_an_lm_the_bridge_cannot_drive_is_one_sentence():
    from blip2.models import LanguageBridge

    config = preset("tiny-opt", llm={"hf_config": {"model_type": "vit", "hidden_size": 16}})
    with pytest.raises(UserError, match="neither a causal LM .* nor a sequence-to-sequence LM"):
        build_model(config, init=True)

    class NoEmbedsLM(transformers.GPT2LMHeadModel):  # a decoder that takes token ids only
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    fields = dict(TINY_LLMS["gpt2"])
    fields.pop("model_type")
    lm = NoEmbedsLM(transformers.GPT2Config(**fields))
    with pytest.raises(UserError, match="takes no inputs_embeds"):
        LanguageBridge(preset("tiny-gpt2"), llm=lm)
