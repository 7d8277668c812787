"""The Python API on tiny checkpoints saved to disk: `blip2.load(folder)` -> caption, ask, chat,
streaming, match, similarity, embeddings, search; unusual images; clear errors for wrong use."""

from __future__ import annotations

import warnings

import pytest
import torch
import usage_helpers as uh
from PIL import Image

import blip2
from blip2.errors import UserError
from blip2.pipelines import TruncationWarning

GREEDY = {"num_beams": 1, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return blip2.load(uh.save_captioner(tmp_path_factory.mktemp("captioner")))


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    return blip2.load(uh.save_retriever(tmp_path_factory.mktemp("retriever")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return uh.make_images(tmp_path_factory.mktemp("images"), 5)


def test_caption_one_and_many_in_any_form(captioner, images):
    one = captioner.caption(images[0], **GREEDY)
    assert isinstance(one, str) and one.split()  # words, not an empty string
    many = captioner.caption(images, **GREEDY)
    assert isinstance(many, list) and len(many) == 5 and many[0] == one
    assert len(set(many)) > 1  # the caption depends on the image
    pil = Image.open(images[1])
    assert captioner.caption(pil, **GREEDY) == many[1]
    # batching inside does not change results
    captioner.batch_size = 2
    try:
        assert captioner.caption(images, **GREEDY) == many
    finally:
        captioner.batch_size = 16
    batch = torch.rand(3, 3, 20, 24)  # a (B, C, H, W) tensor is three images
    assert len(captioner.caption(batch, **GREEDY)) == 3
    assert isinstance(captioner.caption(batch[0], **GREEDY), str)


def test_generation_options_reach_generate(captioner, images):
    short = captioner.caption(images[0], num_beams=1, max_new_tokens=2)
    long = captioner.caption(images[0], num_beams=1, max_new_tokens=8, min_new_tokens=8)
    assert len(short.split()) == 2 and len(long.split()) == 8
    beams = captioner.caption(images[0], num_beams=3, max_new_tokens=6, length_penalty=1.0)
    assert isinstance(beams, str) and beams
    torch.manual_seed(0)
    sampled = captioner.caption(images, do_sample=True, top_p=0.9, temperature=5.0, max_new_tokens=6)
    assert len(sampled) == 5 and sampled != captioner.caption(images, **GREEDY)
    rep = captioner.caption(images[0], num_beams=1, max_new_tokens=6, repetition_penalty=100.0)
    words = rep.split()
    assert len(words) == len(set(words))  # a huge repetition penalty forbids repeats


def test_decode_mode_picks_how_the_captioner_decodes_the_same_text(captioner, images):
    plain = captioner.caption(images[:2], decode_mode="transformers", **GREEDY)
    assert captioner.decoding.mode == "fast"  # the captioner's own policy, not the model's
    for mode in ("fast", "static"):
        assert captioner.caption(images[:2], decode_mode=mode, **GREEDY) == plain, mode
    assert captioner.caption(images[0], **GREEDY) == plain[0]
    with pytest.raises(ValueError, match="unknown decode_mode 'quick'"):
        captioner.caption(images[0], decode_mode="quick", **GREEDY)


def test_streaming_yields_the_greedy_caption_piece_by_piece(captioner, images):
    pieces = list(captioner.caption(images[0], stream=True, max_new_tokens=6))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == captioner.caption(images[0], **GREEDY)
    answer = "".join(captioner.ask(images[0], "what is it ?", stream=True)).strip()
    assert answer == captioner.ask(images[0], "what is it ?", num_beams=1)
    with pytest.raises(UserError, match="greedy decoding or sampling"):
        list(captioner.caption(images[0], stream=True, num_beams=3))


def test_ask_and_chat(captioner, images):
    answer = captioner.ask(images[0], "what is the sky ?", max_new_tokens=4)
    assert isinstance(answer, str) and answer
    answers = captioner.ask(images[:3], ["what is the sky ?", "what is on the couch ?", "what is it ?"])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert len(captioner.ask(images[:3], "what is it ?")) == 3  # one question for every image
    history = [("what is the sky ?", answer)]
    prompt = captioner.chat_prompt("what is it ?", history)
    assert prompt == f"Question: what is the sky ? Answer: {answer}. Question: what is it ? Answer:"
    assert (
        captioner.chat(images[0], "what is it ?", history, num_beams=1)
        == captioner.generate([images[0]], [prompt], num_beams=1, max_new_tokens=10, min_new_tokens=1)[0]
    )
    assert captioner.chat(images[0], "what is it ?") == captioner.ask(images[0], "what is it ?")


def test_text_limits_on_generation(captioner, images):
    with pytest.raises(UserError, match="empty"):
        captioner.ask(images[0], "   ")
    with pytest.warns(TruncationWarning, match="cut to fit the model's 32-token prompt"):
        assert isinstance(captioner.ask(images[0], "what is it " * 40, max_new_tokens=2), str)
    # every prompt path is cut to the LLM's text length (an uncut one overflows the position table)
    long_prompt = "word " * 300
    with pytest.warns(TruncationWarning, match="cut to the model's 32"):
        assert isinstance(captioner.caption(images[0], long_prompt, **GREEDY), str)
    with pytest.warns(TruncationWarning, match="cut to the model's 32"):
        assert isinstance(captioner.generate(images[:2], [long_prompt, "a"], **GREEDY)[0], str)
    with pytest.warns(TruncationWarning, match="cut to the model's 32"):
        assert isinstance(
            "".join(captioner.caption(images[0], long_prompt, stream=True, max_new_tokens=2)), str
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits is not cut and warns nothing
        captioner.caption(images[0], "word " * 10, **GREEDY)
    with pytest.warns(TruncationWarning, match="turn"):
        long_history = [("what is the sky ?", "blue red blue")] * 30
        captioner.chat(images[0], "what is it ?", long_history, max_new_tokens=2)


def test_generation_options_out_of_range_are_one_sentence(captioner, images):
    bad = [
        ({"num_beams": 0}, "num_beams must be 1 or more"),
        ({"max_new_tokens": 0}, "max_new_tokens must be 1 or more"),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "must not be more than max_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be more than 0"),
        ({"do_sample": True, "temperature": 0.0}, "temperature must be more than 0 when sampling"),
        ({"top_p": 1.5}, "top_p must be more than 0 and at most 1"),
        ({"num_beams": "2"}, "num_beams must be a whole number"),
    ]
    for options, words in bad:
        with pytest.raises(UserError, match=words):
            captioner.caption(images[0], **options)
    with pytest.raises(UserError, match="temperature"):
        list(captioner.caption(images[0], stream=True, do_sample=True, temperature=0.0))


def test_match_similarity_and_embeddings(retriever, images):
    texts = ["a dog on a couch", "two cats", "the sky", "a red photo", "blue"]
    probs = retriever.match(images, texts)
    assert probs.shape == (5,) and ((probs > 0) & (probs < 1)).all()
    one_by_one = torch.stack([retriever.match(i, t)[0] for i, t in zip(images, texts, strict=True)])
    assert torch.allclose(probs, one_by_one, atol=1e-5)  # per pair, batching does not leak
    sim = retriever.similarity(images, texts[:3])
    assert sim.shape == (5, 3) and (sim.abs() <= 1 + 1e-5).all()
    img = retriever.embed_images(images)
    txt = retriever.embed_texts(texts[:3])
    q = uh.tiny_hf.SHAPES["a"]["queries"]
    assert img.shape == (5, q, 16) and txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(5, q), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    # similarity is the best query's cosine with the text
    assert torch.allclose(sim, torch.einsum("iqe,te->iqt", img, txt).max(dim=1).values, atol=1e-5)
    with pytest.raises(UserError, match="2 images and 3 texts"):
        retriever.match(images[:2], texts[:3])


def test_search_ranks_by_itm_after_itc(retriever, images):
    hits = retriever.search(images, "a dog on a couch", top_k=5, rerank=3)
    assert sorted(h.index for h in hits) == list(range(5))
    sims = retriever.similarity(images, "a dog on a couch")[:, 0]
    top3_by_itc = set(sims.argsort(descending=True)[:3].tolist())
    assert {h.index for h in hits[:3]} == top3_by_itc  # ITM re-ranks the ITC shortlist
    assert [h.itm for h in hits[:3]] == sorted((h.itm for h in hits[:3]), reverse=True)
    assert all(h.itm is None for h in hits[3:])
    probs = retriever.match(images, "a dog on a couch")
    assert all(abs(h.itm - probs[h.index].item()) < 1e-5 for h in hits[:3])


def test_search_over_an_index_re_ranks_with_the_pixels_given(retriever, images):
    """`blip2 search`'s path: an index of features, the candidates' pixels read again on demand."""
    index = retriever.embed_images(images)
    asked: list[list[int]] = []

    def pixels(indices: list[int]):
        asked.append(list(indices))
        return retriever.pixels([images[i] for i in indices])

    hits = retriever.search(index, "a dog on a couch", top_k=5, rerank=3, pixels=pixels)
    expected = retriever.search(images, "a dog on a couch", top_k=5, rerank=3)
    assert [(h.index, h.score is None) for h in hits] == [(h.index, h.score is None) for h in expected]
    assert [h.score for h in hits[:3]] == pytest.approx([h.score for h in expected[:3]], abs=1e-5)
    assert sorted(i for part in asked for i in part) == sorted(h.index for h in hits[:3])
    assert all(h.itm is None for h in retriever.search(index, "a dog on a couch", top_k=5, rerank=3))


def test_text_limits_on_retrieval(retriever, images):
    with pytest.raises(UserError, match="empty"):
        retriever.embed_texts(["a dog", ""])
    with pytest.warns(TruncationWarning, match="cut to the model's"):
        retriever.match(images[0], "dog " * 100)


def test_each_kind_has_only_what_it_can_do(captioner, retriever):
    """`blip2.load` returns the checkpoint's kind: a captioner cannot search, a retriever cannot caption."""
    assert isinstance(captioner, blip2.Captioner) and isinstance(retriever, blip2.Retriever)
    generative = ("caption", "ask", "chat", "chat_prompt", "stream", "generate")
    retrieval = ("match", "similarity", "pair_scores", "search", "embed_images", "embed_texts")
    for method in generative:
        assert callable(getattr(captioner, method)) and not hasattr(retriever, method)
    for method in retrieval:
        assert callable(getattr(retriever, method)) and not hasattr(captioner, method)
    assert repr(retriever).startswith("Retriever(") and "match" in repr(retriever)
    assert "stage-2 (generative) checkpoint" in blip2.Captioner.checkpoint_kind


def test_preset_with_overrides():
    config = blip2.preset("tiny-stage1", embed_dim=12, qformer={"num_layers": 3}, name="mine")
    base = blip2.preset("tiny-stage1")
    assert (config.embed_dim, config.qformer.num_layers, config.name) == (12, 3, "mine")
    assert config.qformer.hidden_size == base.qformer.hidden_size and config.vision == base.vision
    wider = blip2.preset("tiny-stage1", vision={"hf_config": {**base.vision.hf_config, "hidden_size": 64}})
    assert wider.qformer.encoder_width == 64  # the Q-Former reads the new tower's width
    assert blip2.preset("tiny-opt", llm=None).llm is None
    assert blip2.Blip2Config.from_json(config.to_json()) == config
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        blip2.preset("nope")
    with pytest.raises(UserError, match="Blip2Config has no field 'layers'"):
        blip2.preset("tiny-stage1", layers=3)
    with pytest.raises(UserError, match="QFormerConfig has no field 'layers'"):
        blip2.preset("tiny-stage1", qformer={"layers": 3})


def test_unusual_images_are_captioned(captioner, retriever, tmp_path):
    paths = uh.unusual_images(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no image warning either
        captions = captioner.caption(paths, **GREEDY)
    assert len(captions) == len(paths) and all(c.split() for c in captions)
    assert retriever.embed_images(paths).shape[0] == len(paths)


def test_missing_model_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        blip2.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a BLIP-2 folder"):
        blip2.load(tmp_path / "empty")


def test_code_shipped_in_a_checkpoint_is_never_run(tmp_path):
    """A tokenizer config that points at Python code beside it (`auto_map`) loads without running it:
    `trust_remote_code` is never passed."""
    import json

    folder = uh.save_captioner(tmp_path / "model")
    marker = tmp_path / "code_ran"
    (folder / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    pipe = blip2.load(folder)
    assert pipe.caption(uh.make_images(tmp_path / "im", 1)[0], num_beams=1, max_new_tokens=2)
    assert not marker.exists()
    assert "EvilTokenizer" not in type(pipe.llm_tokenizer).__name__
