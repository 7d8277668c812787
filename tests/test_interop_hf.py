"""transformers checkpoints through `blip2.load`, against transformers itself on the same inputs.

Oracle: tiny `Blip2ForConditionalGeneration` (OPT and T5 LMs) and `Blip2ForImageTextRetrieval`, every
weight random, saved with their processor exactly as transformers writes them. Two config shapes
(see `tiny_hf.SHAPES`). Parity: pixel values, vision features, query outputs, LM logits (<= 1e-5 in
float32; measured 0.0), greedy and beam-search generations token for token, ITM and ITC scores.
Round trips: ours -> ours (every tensor), ours -> transformers -> ours (every tensor transformers holds).
"""

from __future__ import annotations

import dataclasses

import pytest
import tiny_hf
import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

import blip2
from blip2.interop.checkpoint import build_model
from blip2.pipelines import Captioner, Retriever
from blip2.presets import preset
from blip2.processing import ImageProcessor
from blip2.tasks.stage2 import Stage2Task
from blip2.tokenizers import qformer_tokenizer

ATOL = 1e-5
PROMPTS = ["a photo of", "question : what is the sky ? answer :"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> None:
    keys = sorted(a) if keys is None else sorted(keys)
    assert sorted(a) == sorted(b) if keys is None else set(keys) <= set(a) & set(b)
    for k in keys:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module", params=[("opt", "a"), ("opt", "b"), ("t5", "a"), ("t5", "b")], ids="-".join)
def generation(request, tmp_path_factory):
    kind, shape = request.param
    model, processor = tiny_hf.generation_model(kind, shape, seed=len(kind) + ord(shape))
    folder = tiny_hf.save_generation(model, processor, tmp_path_factory.mktemp(f"hf-{kind}-{shape}"))
    return kind, shape, model, processor, folder, blip2.load(folder)


@pytest.fixture(scope="module", params=["a", "b"])
def retrieval(request, tmp_path_factory):
    model, tok = tiny_hf.retrieval_model(request.param, seed=ord(request.param))
    folder = tiny_hf.save_retrieval(model, tok, tmp_path_factory.mktemp(f"hf-itm-{request.param}"))
    return model, tok, folder, blip2.load(folder)


def _inputs(kind, shape, processor, pipe):
    images = tiny_hf.images(2)
    processor.tokenizer.padding_side = "left" if kind == "opt" else "right"
    enc = processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")
    q = tiny_hf.SHAPES[shape]["queries"]
    return images, enc, enc["input_ids"][:, q:], enc["attention_mask"][:, q:]


# ------------------------------------------------------------------------------------------ stage 2


def test_generation_model_parity(generation):
    kind, shape, hf, processor, _, pipe = generation
    images, enc, ids, mask = _inputs(kind, shape, processor, pipe)
    pixels = enc["pixel_values"]
    assert torch.equal(pipe.pixels(images), pixels)  # processor parity: bit for bit
    # the prompt layout is transformers' after its image tokens: [<image> x Q][pad][</s>][prompt]
    image_id = hf.config.image_token_index
    assert (enc["input_ids"][:, : tiny_hf.SHAPES[shape]["queries"]] == image_id).all()
    assert pipe.config.llm.image_token_id == image_id
    ours = pipe.model
    with torch.no_grad():
        vision = hf.vision_model(pixel_values=pixels).last_hidden_state
        assert max_diff(ours.encode_image(pixels), vision) <= ATOL
        queries = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=vision)
        assert max_diff(ours.query_output(pixels), queries.last_hidden_state) <= ATOL
        if kind == "opt":
            ref = hf(**enc).logits
            got = Stage2Task(ours)(pixels, ids, mask).logits
            real = enc["attention_mask"].bool()  # padded positions carry no prediction
            assert max_diff(got[real], ref[real]) <= ATOL
        else:
            labels = torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100]])
            ref = hf(**enc, labels=labels).logits
            got = Stage2Task(ours)(pixels, ids, mask, labels=labels).logits
            assert max_diff(got, ref) <= ATOL


@pytest.mark.parametrize("options", [{"do_sample": False}, {"num_beams": 3}], ids=["greedy", "beam3"])
def test_generation_token_identical(generation, options):
    kind, shape, hf, processor, _, pipe = generation
    _, enc, ids, mask = _inputs(kind, shape, processor, pipe)
    eos = hf.config.text_config.eos_token_id
    with torch.no_grad():
        ref = hf.generate(**enc, max_new_tokens=7, **options)
        got = pipe.model.generate(
            enc["pixel_values"], ids, mask, max_new_tokens=7, eos_token_id=eos, **options
        )
    ref = ref[:, enc["input_ids"].shape[1] :] if kind == "opt" else ref[:, 1:]  # new tokens only
    assert got.tolist() == ref.tolist()


def test_caption_and_ask_decode_what_transformers_generates(generation):
    kind, shape, hf, processor, _, pipe = generation
    images = tiny_hf.images(2)
    processor.tokenizer.padding_side = "left" if kind == "opt" else "right"
    enc = processor(images=images, text=["a photo of"] * 2, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(**enc, max_new_tokens=5, num_beams=2, min_new_tokens=1)
    ref = ref[:, enc["input_ids"].shape[1] :] if kind == "opt" else ref
    expected = [t.strip() for t in processor.tokenizer.batch_decode(ref, skip_special_tokens=True)]
    assert pipe.caption(images, prompt="a photo of", max_new_tokens=5, num_beams=2) == expected
    assert pipe.caption(images[0], prompt="a photo of", max_new_tokens=5, num_beams=2) == expected[0]
    answers = pipe.ask(images, ["what is the sky ?", "what is on the couch ?"], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_ours_to_ours_and_through_transformers(generation, tmp_path):
    kind, shape, hf, _, folder, pipe = generation
    pipe.save_pretrained(tmp_path / "ours")
    again = blip2.load(tmp_path / "ours")
    assert_same_state(pipe.model.state_dict(), again.model.state_dict())
    assert again.config == pipe.config
    # transformers loads our folder unchanged ...
    back = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    assert_same_state(hf.state_dict(), back.state_dict())
    assert back.config.image_token_index == hf.config.image_token_index
    # ... and what it writes loads back into exactly our tensors
    back.save_pretrained(tmp_path / "theirs")
    third = blip2.load(tmp_path / "theirs", tokenizer=tmp_path / "ours")
    assert_same_state(pipe.model.state_dict(), third.model.state_dict())


def test_dtype_applies_to_frozen_towers(generation):
    _, _, _, _, folder, _ = generation
    pipe = blip2.load(folder, dtype="bfloat16")
    assert pipe.model.visual.tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert pipe.model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert pipe.model.qformer.embeddings.norm.weight.dtype == torch.float32
    assert pipe.model.query_tokens.dtype == torch.float32


# ------------------------------------------------------------------------------------------ stage 1


def test_retrieval_parity(retrieval):
    hf, tok, _, pipe = retrieval
    images = tiny_hf.images(3, seed=1)
    texts = ["a dog on the couch", "two cats", "what is the sky"]
    pixels = tiny_hf.BlipImageProcessorPil(
        size={"height": hf.config.vision_config.image_size, "width": hf.config.vision_config.image_size}
    )(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(pipe.pixels(images), pixels)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        vision = hf.vision_model(pixel_values=pixels).last_hidden_state
        assert max_diff(pipe.model.encode_image(pixels), vision) <= ATOL
        queries = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=vision)
        assert max_diff(pipe.model.embed_image(pixels).query_output, queries.last_hidden_state) <= ATOL
        itm = hf(pixel_values=pixels, **enc, use_image_text_matching_head=True).logits_per_image
        itc = hf(pixel_values=pixels, **enc).logits_per_image  # (images, texts)
    assert max_diff(pipe.match(images, texts), itm.softmax(-1)[:, 1]) <= ATOL
    assert max_diff(pipe.similarity(images, texts), itc) <= ATOL
    assert pipe.similarity(images, texts).shape == (3, 3)
    # one image against several texts = the same pairs spelled out
    assert max_diff(pipe.match(images[0], texts), pipe.match([images[0]] * 3, texts)) == 0


def test_retrieval_round_trips(retrieval, tmp_path):
    hf, _, _, pipe = retrieval
    assert pipe.model.temp.item() == pytest.approx(0.07)  # transformers dropped it: LAVIS's initial value
    with torch.no_grad():
        pipe.model.temp.fill_(0.0123)  # ours keeps it beside transformers' weights
    pipe.save_pretrained(tmp_path / "ours")
    again = blip2.load(tmp_path / "ours")
    assert_same_state(pipe.model.state_dict(), again.model.state_dict())
    back = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "ours").eval()
    assert_same_state(hf.state_dict(), back.state_dict())
    back.save_pretrained(tmp_path / "theirs")
    third = blip2.load(tmp_path / "theirs", tokenizer=tmp_path / "ours")
    held = [k for k in pipe.model.state_dict() if k != "temp"]
    assert_same_state(pipe.model.state_dict(), third.model.state_dict(), keys=held)


# ------------------------------------------------------------------------ models built by ourselves


def _random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return tiny_hf.randomize(model, seed).eval()


def test_stage1_with_itg_head_round_trips(tmp_path):
    tok = qformer_tokenizer(tiny_hf.bert_tokenizer_dir())
    model = _random(build_model(preset("tiny-stage1"), init=True))
    assert model.qformer.lm_head is not None
    pipe = Retriever(model, ImageProcessor(16), tok)
    pipe.save_pretrained(tmp_path)
    again = blip2.load(tmp_path)
    assert_same_state(model.state_dict(), again.model.state_dict())  # ITG head and temp included
    hf = Blip2ForImageTextRetrieval.from_pretrained(tmp_path).eval()  # transformers ignores the extras
    assert torch.equal(hf.itm_head.weight, model.itm_head.weight)


def test_model_without_transformers_class_round_trips(tmp_path):
    from blip2.config import VisionConfig
    from blip2.presets import CLIP_VIT_L

    vision = VisionConfig(
        hf_config={**CLIP_VIT_L, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "image_size": 16, "patch_size": 4},
        image_size=16,
    )  # fmt: skip
    base = preset("tiny-stage1")
    config = dataclasses.replace(
        base, vision=vision, qformer=dataclasses.replace(base.qformer, encoder_width=0)
    )
    model = _random(build_model(config, init=True))
    tok = qformer_tokenizer(tiny_hf.bert_tokenizer_dir())
    Retriever(model, ImageProcessor(16), tok).save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()  # transformers has no BLIP-2 class with a CLIP tower
    again = blip2.load(tmp_path)
    assert_same_state(model.state_dict(), again.model.state_dict())


def test_saving_adds_the_image_token_and_grows_the_table(tmp_path):
    """A stage-2 model without `<image>` (LAVIS-style): saving adds it, growing the LM's table when the
    id does not fit, and transformers then computes what we compute."""
    tok = tiny_hf.word_tokenizer("opt")
    llm_cfg = {**preset("tiny-opt").llm.hf_config, "vocab_size": len(tok)}  # no room for <image>
    config = preset("tiny-opt")
    config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, hf_config=llm_cfg))
    model = _random(build_model(config, init=True), seed=3)
    pipe = Captioner(model, ImageProcessor(16), tok)
    pipe.save_pretrained(tmp_path)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert pipe.config.llm.image_token_id == image_id == llm_cfg["vocab_size"]
    rows = model.llm.get_input_embeddings().weight
    assert rows.shape[0] == 64 and torch.equal(rows[-1], rows[-2])  # padded to 64, new rows = mean
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    processor = tiny_hf.Blip2Processor.from_pretrained(tmp_path)
    processor.tokenizer.padding_side = "left"
    enc = processor(images=tiny_hf.images(2), text=PROMPTS, padding=True, return_tensors="pt")
    q = config.qformer.num_query_tokens
    with torch.no_grad():
        ref = hf.generate(**enc, max_new_tokens=5)[:, enc["input_ids"].shape[1] :]
        got = model.generate(enc["pixel_values"], enc["input_ids"][:, q:], enc["attention_mask"][:, q:],
                             max_new_tokens=5, eos_token_id=hf.config.text_config.eos_token_id)  # fmt: skip
    assert got.tolist() == ref.tolist()
