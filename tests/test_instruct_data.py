"""Instruction-tuning data: templates per record, square-root mixtures that resume on any world size."""

from __future__ import annotations

import json
import os

import pytest
import torch

from blip2.data.annotations import Record, load_records
from blip2.data.instructions import TEMPLATES, instruction_pair, mixture_order, sqrt_weights
from blip2.data.json_dataset import MixtureSampler
from blip2.errors import UserError


def test_sqrt_weights_follow_the_paper():
    assert sqrt_weights([400, 100, 25]) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    with pytest.raises(UserError, match="needs examples"):
        sqrt_weights([10, 0])


def test_a_mixed_epoch_draws_datasets_by_the_square_root_of_their_sizes():
    sizes = [4000, 1000, 250]
    counts = torch.zeros(3)
    for epoch in range(4):
        order = mixture_order(sizes, seed=3, epoch=epoch)
        assert order.shape == (sum(sizes),)
        counts += torch.bucketize(order, torch.tensor([4000, 5000]), right=True).bincount(minlength=3)
    share = counts / counts.sum()
    assert share.tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7], abs=0.01)  # sizes alone: 0.76/0.19/0.05


def test_each_dataset_is_walked_without_repeats_until_it_runs_out():
    sizes = [300, 20]
    order = mixture_order(sizes, seed=0, epoch=0)
    big = order[order < 300]
    small = order[order >= 300] - 300
    assert len(big) < 300 and len(set(big.tolist())) == len(big)  # subsampled, never twice
    assert len(small) > 20  # the small one repeats ...
    first = small[:20].tolist()
    assert sorted(first) == list(range(20))  # ... but only after every example came once
    assert sorted(small[20:40].tolist()) == list(range(20))


def test_the_order_depends_on_seed_and_epoch_only():
    a = mixture_order([50, 7], seed=1, epoch=2)
    assert torch.equal(a, mixture_order([50, 7], seed=1, epoch=2))
    assert not torch.equal(a, mixture_order([50, 7], seed=1, epoch=3))
    assert not torch.equal(a, mixture_order([50, 7], seed=2, epoch=2))
    plain = mixture_order([50, 7], seed=1, epoch=2, shuffle=False)
    assert plain[plain < 50][:5].tolist() == [0, 1, 2, 3, 4]


def test_a_resumed_mixture_on_another_world_size_sees_the_same_examples():
    one = iter(MixtureSampler([40, 9], 4, 0, 1, seed=5))
    first = [i for _ in range(6) for _, i in next(one)]
    two = [iter(MixtureSampler([40, 9], 2, r, 2, seed=5, start=(0, 12))) for r in range(2)]
    rest = [i for _ in range(3) for it in two for _, i in next(it)]
    assert first[:8] == mixture_order([40, 9], 5, 0)[:8].tolist()
    assert rest == first[12:24]


def test_records_become_instruction_answer_pairs():
    vqa = Record("a.jpg", None, question="what color is the cat?", answers=["black", "dark"])
    cap = Record("b.jpg", None, text="a cat on a mat")
    own = Record("c.jpg", None, instruction="Count the cats.", text="two")
    instructions = {instruction_pair(vqa, i)[0] for i in range(200)}
    assert instructions == {t.format("what color is the cat?") for t in TEMPLATES["vqa"]}
    assert {instruction_pair(vqa, i)[1] for i in range(20)} == {"black"}
    assert {instruction_pair(cap, i) for i in range(200)} == {
        (t, "a cat on a mat") for t in TEMPLATES["caption"]
    }
    assert instruction_pair(own, 0) == ("Count the cats.", "two")
    with pytest.raises(UserError, match="neither a caption nor a question"):
        instruction_pair(Record("d.jpg", None), 0)


def test_ones_own_instruction_list_is_read_as_it_is(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"image": "x.jpg", "instruction": "Is it day?", "answer": "yes"}]))
    (rec,) = load_records("instructions", str(path), images="imgs")
    assert (rec.image, rec.key) == (os.path.join("imgs", "x.jpg"), "x.jpg")
    assert instruction_pair(rec, 3) == ("Is it day?", "yes")
    path.write_text(json.dumps([{"image": "x.jpg", "question": "Is it day?", "answer": "yes"}]))
    with pytest.raises(UserError, match="entry 0 of .* needs 'image', 'instruction' and 'answer'"):
        load_records("instructions", str(path))


def test_instruction_batches_carry_the_instruction_for_the_llm_and_the_qformer(tmp_path):
    from train_utils import make_llm_tokenizer
    from transformers import AutoTokenizer

    from blip2.data.batching import BadSample, Preprocessor, TextSpec
    from blip2.processing import ImageProcessor
    from blip2.tokenizers import qformer_tokenizer

    llm_tok = AutoTokenizer.from_pretrained(make_llm_tokenizer(str(tmp_path / "tok")))
    qtok = qformer_tokenizer()
    image = str(tmp_path / "x.png")
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    spec = TextSpec("causal", llm_tok, templates=TEMPLATES, qformer_tokenizer=qtok, instruction_max_len=6)
    pre = Preprocessor(spec, images=ImageProcessor(8), augment=False)
    recs = [
        Record("x", image, instruction="is it red?", text="yes"),
        Record("x", image, question="What Color?", answers=["red"]),
        Record("x", image, text="A Red Square."),
    ]
    samples = [pre.load(r, seed) for r, seed in zip(recs, (0, 1, 2), strict=True)]
    assert samples[0]["prompt"] == "is it red?" and samples[0]["target"] == "yes"
    assert samples[1]["prompt"] == TEMPLATES["vqa"][1].format("What Color?")
    assert (samples[2]["prompt"], samples[2]["target"]) == (TEMPLATES["caption"][2], "a red square")
    batch = pre.collate(samples)
    q = batch["qformer_input_ids"]
    assert q.shape[0] == 3 and q.shape[1] <= 6  # truncated to the instruction budget ...
    long = qtok(samples[2]["instruction"]).input_ids
    assert q[2].tolist() == [long[0], *long[-5:]]  # ... on the left, as InstructBLIP: [CLS] + the end
    first = qtok(samples[0]["instruction"]).input_ids
    assert q[0, : len(first)].tolist() == first and batch["qformer_attention_mask"][0].sum() == len(first)
    # the LLM text: instruction then answer, the instruction out of the loss
    ids, n = batch["input_ids"][0], int(batch["prompt_lengths"][0])
    assert llm_tok.decode(ids[:n], skip_special_tokens=True) == "is it red?"
    assert llm_tok.decode(ids[n:], skip_special_tokens=True).strip() == "yes"
    with pytest.raises(BadSample, match="neither a caption nor a question"):
        pre.load(Record("x", image), 0)
