"""The demo's evaluation on held-out images: retrieval R@1 (ITC, ITC + ITM re-ranking), zero-shot
captions (CIDEr-D, attribute accuracy, exact captions), zero-shot VQA per question kind, and the chance
level of each (`blip2.demo.run` calls these after training)."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blip2.demo import world as W


def images_of(root: str, keys: Sequence[str]) -> list:
    from PIL import Image

    return [Image.open(os.path.join(root, k + ".png")).convert("RGB") for k in keys]


@dataclass
class HeldOut:
    """The held-out test set as every evaluation of the demo's world reads it."""

    images: list  # PIL images, in the order of the test examples
    scenes: list[W.Scene]
    refs: list[list[str]]  # each image's captions (the first is the canonical one)
    vqa: list[dict]  # {index (of the image), kind, question, answer}, every question of every image
    unseen: list[int]  # images of scenes never seen in training
    unseen_questions: list[int]  # questions about those images

    @property
    def canonical(self) -> list[str]:
        return [r[0] for r in self.refs]

    @classmethod
    def load(cls, data_dir: str, test: Sequence[W.Example]) -> HeldOut:
        vqa = [
            {"index": i, "kind": kind, "question": q, "answer": a}
            for i, e in enumerate(test)
            for kind, q, a in e.questions
        ]
        return cls(
            images=images_of(data_dir, [e.key for e in test]),
            scenes=[e.scene for e in test],
            refs=[e.captions for e in test],
            vqa=vqa,
            unseen=[i for i, e in enumerate(test) if e.heldout],
            unseen_questions=[j for j, q in enumerate(vqa) if test[q["index"]].heldout],
        )


@torch.no_grad()
def evaluate_retrieval(pipe: Any, images: list, captions: list[str], k: int) -> dict[str, float]:
    """R@1 both ways over the gallery, ITC alone and ITC top-k + ITM re-ranking.

    One canonical caption per image; a retrieved item is a hit when its canonical caption equals the
    query's (several images may show the same scene).
    """
    from blip2.eval.metrics import itm_rerank, retrieval_recall

    model = pipe.model
    pixels = pipe.pixels(images)
    emb = model.embed_image(pixels)
    ids, mask = pipe._text(captions)
    text_feats = model.embed_text(ids, mask)
    sims = model.itc_scores(emb.image_feats, text_feats).float()  # (N, N)

    def itm(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        logits = model.itm_logits(ids[txt], mask[txt], image_embeds=emb.image_embeds[img])
        return logits[:, 1].float()

    i2t_itm, t2i_itm = itm_rerank(sims, itm, k=k)
    same = [[j for j, c in enumerate(captions) if c == ci] for ci in captions]
    out = {}
    for name, (i2t, t2i) in {"_itc": (sims, sims.T), "": (i2t_itm, t2i_itm)}.items():
        # each direction as "rows retrieve columns; any column with the row's caption is right"
        out[f"retrieval_i2t_r1{name}"] = (
            retrieval_recall(i2t, same, list(range(len(captions))))["txt_r1"] / 100
        )
        out[f"retrieval_t2i_r1{name}"] = (
            retrieval_recall(t2i, same, list(range(len(captions))))["txt_r1"] / 100
        )
    return out


def evaluate_generation(
    pipe: Any, images: list, scenes: list[W.Scene], refs: list[list[str]], vqa: list[dict], beams: int
) -> tuple[dict[str, float], list[str], list[str]]:
    """Zero-shot captions (CIDEr-D, attribute accuracy, exact) and VQA accuracy (exact match)."""
    caps = []
    for i in range(0, len(images), 64):
        caps += pipe.caption(images[i : i + 64], num_beams=beams, max_new_tokens=12)
    answers = []
    for i in range(0, len(vqa), 64):
        chunk = vqa[i : i + 64]
        answers += pipe.ask(
            [images[q["index"]] for q in chunk], [q["question"] for q in chunk], num_beams=beams
        )
    metrics = {**caption_scores(caps, scenes, refs), **vqa_scores(answers, vqa)}
    return metrics, caps, answers


def vqa_scores(answers: Sequence[str], vqa: Sequence[dict]) -> dict[str, float]:
    """Exact-match VQA accuracy, overall and per question kind (`vqa_accuracy_<kind>`)."""
    right = [a.strip() == q["answer"] for a, q in zip(answers, vqa, strict=True)]
    out = {"vqa_accuracy": sum(right) / max(1, len(right))}
    for kind in W.QUESTIONS:
        hits = [r for r, q in zip(right, vqa, strict=True) if q["kind"] == kind]
        if hits:
            out[f"vqa_accuracy_{kind}"] = sum(hits) / len(hits)
    return out


def caption_scores(caps: list[str], scenes: list[W.Scene], refs: list[list[str]]) -> dict[str, float]:
    """CIDEr-D (pure-Python path), attribute accuracy and exact-caption rate of captions."""
    from blip2.eval.metrics import caption_metrics

    cider = caption_metrics(
        {i: c for i, c in enumerate(caps)}, {i: r for i, r in enumerate(refs)}, java=False
    )["CIDEr"]
    facts = [W.caption_facts(c, s) for c, s in zip(caps, scenes, strict=True)]
    return {
        "caption_cider": cider,
        "caption_attribute_accuracy": sum(r for r, _ in facts) / sum(n for _, n in facts),
        "caption_exact": sum(W.caption_exact(c, s) for c, s in zip(caps, scenes, strict=True)) / len(caps),
    }


def chance_levels(
    captions: list[str], scenes: list[W.Scene], refs: list[list[str]], vqa: list[dict], seed: int
):
    """Chance: random ranking (expected R@1), a random grammar caption per image, a random answer of
    the question's kind."""
    n = len(captions)
    r1 = sum(captions.count(c) for c in captions) / n / n
    rng = random.Random(seed)
    world = W.World()
    random_caps = [rng.choice(W.captions(rng.choice(world.scenes))) for _ in scenes]
    caps = caption_scores(random_caps, scenes, refs)
    vqa_chance = sum(1 / len(W.ANSWERS[q["kind"]]) for q in vqa) / len(vqa)
    return {
        "retrieval_i2t_r1": r1,
        "retrieval_t2i_r1": r1,
        "retrieval_i2t_r1_itc": r1,
        "retrieval_t2i_r1_itc": r1,
        **caps,
        "vqa_accuracy": vqa_chance,
        **{f"vqa_accuracy_{kind}": 1 / len(W.ANSWERS[kind]) for kind in W.QUESTIONS},
    }
