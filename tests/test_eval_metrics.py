"""Evaluation metrics: the official VQA rules case by case, VQA accuracy as LAVIS scores it,
pycocoevalcap parity, retrieval recall on score matrices with known answers, and ITM re-ranking
confined to the ITC top k."""

from __future__ import annotations

import json

import pytest
import torch

from blip2.errors import UserError
from blip2.eval.metrics import (
    caption_metrics,
    gqa_accuracy,
    itm_rerank,
    java_available,
    rerank_rows,
    retrieval_recall,
    simple_tokenize,
    vqa_accuracy,
    vqa_rule,
    vqa_rules,
    vqa_scores,
)
from blip2.eval.vqa_normalize import normalize_answer, normalize_punctuation, normalize_words

# ------------------------------------------------------------------------------ VQA normalization


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes, it is", "yes it is"),  # a mark next to a space is deleted
        ("(red) car", " red car"),  # ")" touches a space: deleted; "(" does not: a space
        ("t-shirt", "t shirt"),  # a mark between letters becomes a space
        ("black/white", "black white"),
        ("red-white 1,000", "redwhite 1000"),  # a digit-comma-digit anywhere: every mark deleted
        ('say "hi"!', "say hi "),  # quotes touch a space: deleted; "!" does not: a space
        ("12:30", "12:30"),  # the colon, apostrophe and '#' are not in the list
        ("it's #1", "it's #1"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        (".5", ".5"),
        ("yes.", "yes"),  # any other period goes
        ("st. louis", "st louis"),
        ("a.b", "ab"),
    ],
)
def test_punctuation_rules(text, expected):
    assert normalize_punctuation(text) == expected


def test_period_deletion_stops_after_32_as_the_official_script():
    assert normalize_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),  # lowercased, number words to digits
        ("none", "0"),
        ("zero ten eleven", "0 10 eleven"),  # only zero..ten (and none)
        ("the dog", "dog"),  # articles dropped
        ("an apple a day", "apple day"),
        ("another", "another"),
        ("dont know", "don't know"),  # contractions get their apostrophe
        ("youre right", "you're right"),
        ("im", "im"),  # the table's capitalized keys ("Im") never match lowercased words
        ("somebody'd", "somebodyd"),  # a quirk of the official table, kept
        ("  many   spaces ", "many spaces"),
    ],
)
def test_word_rules(text, expected):
    assert normalize_words(text) == expected


def test_full_normalization_chains_the_rules():
    assert normalize_answer(" The T-Shirt.\n") == "t shirt"
    assert normalize_answer("Two dogs, dont!") == "2 dogs don't"


# ------------------------------------------------------------------------------------ VQA accuracy


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("down", ["down"] * 10, 1.0),
        ("down", ["down"] * 3 + ["up"] * 7, 0.9),  # 3 of 10: (3 x 2/3 + 7 x 1) / 10
        ("down", ["down"] * 2 + ["up"] * 8, 0.6),  # (2 x 1/3 + 8 x 2/3) / 10
        ("down", ["down"] + ["up"] * 9, 0.3),  # (1 x 0 + 9 x 1/3) / 10
        ("left", ["down"] * 5 + ["up"] * 5, 0.0),
        ("two", ["2"] * 9 + ["3"], 1.0),
        # LAVIS: the prediction is always fully normalized, even when the humans agree
        ("two", ["2"] * 10, 1.0),
        ("yes.", ["yes"] * 10, 1.0),
        ("Yes", ["yes"] * 10, 1.0),
        (" yes\n", ["yes"] * 10, 1.0),  # newlines, tabs, outer spaces always cleaned
        ("T shirt", ["t-shirt"] * 3 + ["shirt"] * 7, 0.9),  # disagreeing answers: punctuation rules
        ("a dog", ["dog"] * 4 + ["cat"] * 6, 1.0),
        # ... but the answers never get the digit/article step (LAVIS's quirk, kept)
        ("dog", ["the dog"] * 4 + ["cat"] * 6, 0.0),
        ("two", ["two"] * 10, 0.0),
    ],
)
def test_vqa_accuracy(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected", "rule"),
    [
        # one answer per question: leave-one-out would leave nothing and score every answer 0
        ("dog", ["dog"], 1.0, "exact match"),
        ("Two.", ["2"], 1.0, "exact match"),
        ("two", ["Two"], 1.0, "exact match"),  # the fallbacks normalize the answers as the prediction
        ("cat", ["dog"], 0.0, "exact match"),
        ("cat", ["dog", "cat"], 1.0, "exact match"),
        ("cat", ["dog"] * 4 + ["cat"], 1 / 3, "min(1, matches/3)"),
        ("cat", ["dog"] * 4 + ["cat"] * 2, 2 / 3, "min(1, matches/3)"),
        ("cat", ["cat"] * 3, 1.0, "min(1, matches/3)"),
        ("cat", ["cat"] * 9, 1.0, "min(1, matches/3)"),
        ("cat", ["cat"] + ["dog"] * 9, 0.3, "leave-one-out"),
        ("cat", ["cat"] * 12, 1.0, "leave-one-out"),
    ],
)
def test_vqa_accuracy_with_fewer_than_ten_answers_uses_a_fallback(prediction, answers, expected, rule):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)
    assert vqa_rule(len(answers)) == rule


def test_vqa_rules_counts_the_rule_of_each_question():
    assert vqa_rules([["a"], ["a"] * 10, ["a", "b"], ["a"] * 5]) == {
        "exact match": 2,
        "leave-one-out": 1,
        "min(1, matches/3)": 1,
    }
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("a", [])


def test_vqa_scores_overall_and_per_answer_type():
    preds = {1: "yes", 2: "2", 3: "red"}
    answers = {1: ["yes"] * 10, 2: ["2"] * 2 + ["3"] * 8, 3: ["blue"] * 10}
    types = {1: "yes/no", 2: "number", 3: "other"}
    got = vqa_scores(preds, answers, types)
    assert got == {"accuracy": 53.33, "questions": 3.0, "number": 60.0, "other": 0.0, "yes/no": 100.0}
    with pytest.raises(UserError, match="no annotation"):
        vqa_scores({9: "yes"}, answers)


def test_gqa_exact_match_normalizes_the_prediction():
    got = gqa_accuracy({"a": "The dog.", "b": "dogs", "c": "Yes"}, {"a": "dog", "b": "dog", "c": "yes"})
    assert got == {"accuracy": 66.67, "questions": 3.0}


# ---------------------------------------------------------------------------------------- captions

PREDICTIONS = {
    391895: "A man riding a motorcycle on a dirt road.",
    522418: "A woman cutting a large cake with a knife.",
    184613: "Two dogs playing with a frisbee in the grass!",
}
REFERENCES = {
    391895: [
        "A man with a red helmet on a small moped on a dirt road. ",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
    ],
    522418: [
        "A woman wearing a net on her head cutting a cake. ",
        "A woman cutting a large white sheet cake.",
        "A woman marking a cake with the back of a chef's knife. ",
    ],
    184613: [
        "A child holding a flowered umbrella and petting a yak.",
        "Two dogs play with a red frisbee on the lawn.",
        "A couple of dogs playing in the grass with a frisbee.",
    ],
}


@pytest.mark.skipif(not java_available(), reason="pycocoevalcap's tokenizer and METEOR need Java")
def test_caption_metrics_equal_pycocoevalcap_on_coco_files(tmp_path):
    """pycocoevalcap's own pipeline (COCO files -> pycocotools -> PTB tokenizer -> scorers, as
    COCOEvalCap.evaluate runs it; SPICE left out: its models are not installed here)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    gt = {
        "info": {},
        "licenses": [],
        "type": "captions",
        "images": [{"id": i} for i in REFERENCES],
        "annotations": [
            {"image_id": i, "id": 10 * i + j, "caption": c}
            for i, caps in REFERENCES.items()
            for j, c in enumerate(caps)
        ],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(
        json.dumps([{"image_id": i, "caption": c} for i, c in PREDICTIONS.items()])
    )
    coco = COCO(str(tmp_path / "gt.json"))
    res = coco.loadRes(str(tmp_path / "res.json"))
    ids = res.getImgIds()
    tok = PTBTokenizer()
    g = tok.tokenize({i: coco.imgToAnns[i] for i in ids})
    r = tok.tokenize({i: res.imgToAnns[i] for i in ids})
    bleu = Bleu(4).compute_score(g, r, verbose=0)[0]
    expected = {f"Bleu_{n + 1}": b for n, b in enumerate(bleu)}
    expected["METEOR"] = Meteor().compute_score(g, r)[0]
    expected["ROUGE_L"] = Rouge().compute_score(g, r)[0]
    expected["CIDEr"] = Cider().compute_score(g, r)[0]

    got = caption_metrics(PREDICTIONS, REFERENCES, java=True, spice=False)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert 0.3 < got["CIDEr"] and 0.1 < got["Bleu_4"] < 1  # a fixture that exercises every n-gram order


def test_java_free_path_scores_simply_tokenized_text():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    assert simple_tokenize("A man's helmet, (red) -- on a dirt-road!") == "a man's helmet red on a dirt road"
    tokenized_refs = {i: [simple_tokenize(c) for c in caps] for i, caps in REFERENCES.items()}
    tokenized_res = {i: [simple_tokenize(c)] for i, c in PREDICTIONS.items()}
    keys = {i: str(n) for n, i in enumerate(PREDICTIONS)}
    g = {keys[i]: v for i, v in tokenized_refs.items()}
    r = {keys[i]: v for i, v in tokenized_res.items()}
    got = caption_metrics(PREDICTIONS, REFERENCES, java=False)
    assert set(got) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert got["Bleu_4"] == pytest.approx(Bleu(4).compute_score(g, r, verbose=0)[0][3], abs=1e-12)
    assert got["CIDEr"] == pytest.approx(Cider().compute_score(g, r)[0], abs=1e-12)
    assert got["CIDEr"] > 0.3


def test_caption_metrics_refuse_what_they_cannot_score():
    with pytest.raises(UserError, match="no references"):
        caption_metrics({1: "a cat"}, {2: ["a cat"]}, java=False)


# --------------------------------------------------------------------------------------- retrieval


def _planted(n_queries: int, n_cand: int, correct: list[list[int]], ranks: list[int]) -> torch.Tensor:
    """Scores where query q's best correct candidate has exactly `ranks[q]` wrong ones above it."""
    scores = torch.zeros(n_queries, n_cand)
    for q in range(n_queries):
        wrong = [c for c in range(n_cand) if c not in correct[q]]
        scores[q, wrong] = torch.arange(len(wrong), 0, -1, dtype=torch.float)  # len(wrong) .. 1
        scores[q, correct[q]] = -5.0
        scores[q, correct[q][-1]] = len(wrong) - ranks[q] + 0.5
    return scores


def test_retrieval_recall_on_planted_ranks():
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(4)]  # 4 images x 5 captions
    txt2img = [t // 5 for t in range(20)]
    i2t = _planted(4, 20, img2txt, ranks=[0, 3, 7, 12])
    t2i = _planted(20, 4, [[i] for i in txt2img], ranks=[t % 4 for t in range(20)])
    got = retrieval_recall(i2t, img2txt, txt2img, scores_t2i=t2i)
    assert (got["txt_r1"], got["txt_r5"], got["txt_r10"]) == (25.0, 50.0, 75.0)
    assert (got["img_r1"], got["img_r5"], got["img_r10"]) == (25.0, 100.0, 100.0)
    assert got["txt_r_mean"] == pytest.approx(50.0) and got["img_r_mean"] == pytest.approx(75.0)
    assert got["r_mean"] == pytest.approx(62.5) and got["agg_metrics"] == got["txt_r_mean"]


def test_retrieval_recall_ties_count_against_the_model_and_default_is_transpose():
    scores = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # image 0: its text ties with a wrong one
    got = retrieval_recall(scores, [[0], [1]], [0, 1])
    assert got["txt_r1"] == 50.0  # the tie is not a hit
    assert got["img_r1"] == 100.0  # columns: text 0 gives image 0 1.0 > 0.0, text 1 image 1 2.0 > 1.0
    with pytest.raises(ValueError, match="do not fit"):
        retrieval_recall(scores, [[0]], [0, 1])


def test_itm_rerank_changes_the_ranking_only_inside_the_top_k():
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(5, 40, generator=g)
    table = torch.randn(5, 40, generator=g) * 3  # ITM logits of every (image, text) pair
    calls = []

    def itm(image_idx, text_idx):
        calls.append((image_idx.clone(), text_idx.clone()))
        return table[image_idx, text_idx]

    k = 8
    i2t, t2i = itm_rerank(sims, itm, k=k, batch_size=7)
    assert (
        max(len(c[0]) for c in calls) <= 7 and sum(len(c[0]) for c in calls) == 5 * k + 40 * 5
    )  # k > 5 images: all
    top = sims.topk(k, dim=1).indices
    for row in range(5):  # image -> text direction
        order = i2t[row].argsort(descending=True)
        assert set(order[:k].tolist()) == set(top[row].tolist())  # the same k candidates on top
        inside = top[row]
        torch.testing.assert_close(i2t[row, inside], table[row, inside] + sims[row, inside])
        itc_order = sims[row].argsort(descending=True)
        assert order[k:].tolist() == itc_order[k:].tolist()  # the rest: untouched ITC order
    assert not torch.equal(i2t.argsort(dim=1, descending=True), sims.argsort(dim=1, descending=True))
    # text -> image (5 images, all re-scored): the scorer still receives (image, text) pairs
    top_t = sims.T.topk(5, dim=1).indices
    for row in range(40):
        torch.testing.assert_close(t2i[row, top_t[row]], table[top_t[row], row] + sims[top_t[row], row])
    # k covering everything is plain ITM + ITC
    full = rerank_rows(sims, itm, range(5), k=40)
    torch.testing.assert_close(full, table + sims)
    # a shard of rows gives those rows of the whole
    torch.testing.assert_close(rerank_rows(sims, itm, [3, 1], k=k), i2t[[3, 1]])
