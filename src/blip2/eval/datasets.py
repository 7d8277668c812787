"""Benchmark annotation files in their published layouts -> evaluation samples.

Captioning and retrieval sets go through the training engineer's `blip2.data.annotations` readers
(flattened Karpathy lists, Karpathy's `dataset_*.json`, official COCO captions); this module groups
their per-caption records by image and adds what evaluation needs on top (COCO image ids for the
results file, NoCaps domains). VQA files are read here: scoring needs the question ids, all ten human
answers and the answer types, which training records do not keep.

Layouts (see docs/evaluation.md):
- captions: `coco_karpathy_test.json` / `flickr30k_test.json` (list of `{"image", "caption": [...]}`),
  `dataset_coco.json` / `dataset_flickr30k.json` (Karpathy, with a split), `captions_val2014.json`
  or NoCaps' `nocaps_val_4500_captions.json` (COCO layout; NoCaps adds `domain` per image);
- VQA: VQAv2 / OK-VQA questions + annotations files; GQA `testdev_balanced_questions.json`; or a
  plain list `[{"image", "question", "answers": [...]}]`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from blip2.data.annotations import _read_json as read_json  # one reader, one message for annotation files
from blip2.data.annotations import load_records
from blip2.errors import UserError

LAYOUTS = ("auto", "karpathy-flat", "karpathy", "coco")


@dataclass(frozen=True)
class CaptionSample:
    """One image of a captioning benchmark.

    Attributes:
        id: the image id written to the results file (COCO/NoCaps id; for file lists the number in the
            file name when every name has a distinct one, else the image's position).
        image: path of the image file.
        references: the human captions.
        domain: NoCaps' `in-domain` / `near-domain` / `out-domain`, else None.
    """

    id: Hashable
    image: str
    references: list[str]
    domain: str | None = None


@dataclass(frozen=True)
class VqaSample:
    """One question of a VQA benchmark.

    Attributes:
        id: the question id (`question_id`; GQA: the key of the questions dict).
        image: path of the image file.
        question: the question text.
        answers: the human answers (VQAv2/OK-VQA: ten; GQA: the one short answer; empty when the
            split has no public answers, e.g. VQAv2 test-dev).
        answer_type: VQAv2's `yes/no`, `number` or `other`; GQA's structural type; else None.
    """

    id: Hashable
    image: str
    question: str
    answers: list[str] = field(default_factory=list)
    answer_type: str | None = None


@dataclass(frozen=True)
class RetrievalSet:
    """A retrieval test set: images, texts and which belong together."""

    images: list[str]
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[int]


def detect_layout(data: Any, path: str) -> str:
    """`karpathy-flat` (a list), `karpathy` (Karpathy's dataset_*.json) or `coco` (images+annotations)."""
    if isinstance(data, list):
        return "karpathy-flat"
    if isinstance(data, dict) and "images" in data:
        if "annotations" in data:
            return "coco"
        if data["images"] and "sentences" in data["images"][0]:
            return "karpathy"
    raise UserError(
        f"{path} is not a caption annotation file this tool knows (a list of {{'image', 'caption'}}, "
        "Karpathy's dataset_*.json, or a COCO/NoCaps captions file); see docs/evaluation.md"
    )


_KINDS = {"karpathy-flat": "captions", "karpathy": "karpathy", "coco": "coco"}


def _grouped(path: str, images: str, layout: str, split: str) -> tuple[Any, str, dict[str, list[Any]]]:
    data = read_json(path)
    layout = detect_layout(data, path) if layout == "auto" else layout
    if layout not in _KINDS:
        raise UserError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    groups: dict[str, list[Any]] = {}
    for rec in load_records(_KINDS[layout], path, images=images, split=split):
        groups.setdefault(rec.key, []).append(rec)
    return data, layout, groups


def _file_number_ids(keys: list[str]) -> list[int] | None:
    """COCO-style ids from file names (`COCO_val2014_000000391895.jpg` -> 391895), if all distinct."""
    nums = [re.search(r"(\d+)\.\w+$", os.path.basename(k)) for k in keys]
    if any(m is None for m in nums):
        return None
    ids = [int(m.group(1)) for m in nums if m is not None]
    return ids if len(set(ids)) == len(ids) else None


def caption_samples(
    path: str, images: str = "", layout: str = "auto", split: str = "test"
) -> list[CaptionSample]:
    """Images with their reference captions, in file order.

    Args:
        path: the annotation file (layouts in the module docstring).
        images: the folder image paths are relative to.
        layout: one of `LAYOUTS` (default: detected).
        split: the Karpathy split (`dataset_*.json` only).
    """
    data, layout, groups = _grouped(path, images, layout, split)
    keys = list(groups)
    domains: dict[Any, str] = {}
    if layout == "coco":
        ids: list[Hashable] = [groups[k][0].image_id for k in keys]
        domains = {im["id"]: im["domain"] for im in data["images"] if "domain" in im}
    else:
        ids = list(_file_number_ids(keys) or range(len(keys)))
    return [
        CaptionSample(
            id=i,
            image=groups[k][0].image,
            references=[r.text for r in groups[k]],
            domain=domains.get(i),
        )
        for i, k in zip(ids, keys, strict=True)
    ]


def retrieval_set(path: str, images: str = "", layout: str = "auto", split: str = "test") -> RetrievalSet:
    """A retrieval test set (COCO 5k / Flickr30K 1k Karpathy test): every caption is a text query,
    every image an image query; an image's captions are its correct texts."""
    _, _, groups = _grouped(path, images, layout, split)
    image_paths, texts, img2txt, txt2img = [], [], [], []
    for i, recs in enumerate(groups.values()):
        image_paths.append(recs[0].image)
        img2txt.append(list(range(len(texts), len(texts) + len(recs))))
        texts.extend(r.text for r in recs)
        txt2img.extend([i] * len(recs))
    return RetrievalSet(image_paths, texts, img2txt, txt2img)


def _join(root: str, rel: str) -> str:
    return rel if os.path.isabs(rel) or not root else os.path.join(root, rel)


def vqa_samples(
    questions: str,
    answers: str | None = None,
    images: str = "",
    image_pattern: str | None = None,
) -> tuple[list[VqaSample], str]:
    """Questions (and their human answers) of a VQA benchmark, and the metric that scores them.

    Args:
        questions: VQAv2/OK-VQA questions file, GQA's questions dict, or a plain list
            `[{"image", "question", "answers" | "answer", "question_id"?}]`.
        answers: VQAv2/OK-VQA annotations file (omit for splits without public answers).
        images: the image folder.
        image_pattern: image file name from `image_id` and `data_subtype` (VQAv2/OK-VQA; default
            `COCO_{data_subtype}_{image_id:012d}.jpg`) or from `image_id` (GQA; default
            `{image_id}.jpg`).

    Returns:
        `(samples, metric)` with metric `"vqa"` (official accuracy) or `"gqa"` (exact match).
    """
    data = read_json(questions)
    if isinstance(data, dict) and "questions" in data:  # VQAv2 / OK-VQA
        subtype = data.get("data_subtype", "val2014")
        pattern = image_pattern or "COCO_{data_subtype}_{image_id:012d}.jpg"
        anns = {}
        if answers:
            anns = {a["question_id"]: a for a in read_json(answers).get("annotations", [])}
        samples = []
        for q in data["questions"]:
            ann = anns.get(q["question_id"], {})
            if answers and not ann:
                raise UserError(
                    f"question {q['question_id']} has no entry in {answers}; are the files a pair?"
                )
            rel = pattern.format(image_id=q["image_id"], data_subtype=subtype)
            samples.append(
                VqaSample(
                    id=q["question_id"],
                    image=_join(images, rel),
                    question=q["question"],
                    answers=[a["answer"] for a in ann.get("answers", [])],
                    answer_type=ann.get("answer_type"),
                )
            )
        return samples, "vqa"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "imageId" in v for v in data.values()):
        pattern = image_pattern or "{image_id}.jpg"
        samples = [
            VqaSample(
                id=qid,
                image=_join(images, pattern.format(image_id=q["imageId"])),
                question=q["question"],
                answers=[q["answer"]] if "answer" in q else [],
                answer_type=(q.get("types") or {}).get("structural"),
            )
            for qid, q in data.items()
        ]
        return samples, "gqa"
    if isinstance(data, list):
        samples = []
        for n, it in enumerate(data):
            if "image" not in it or "question" not in it:
                raise UserError(f"entry {n} of {questions} needs 'image' and 'question'")
            ans = it.get("answers") or ([it["answer"]] if "answer" in it else [])
            ans = [a["answer"] if isinstance(a, dict) else a for a in ans]
            samples.append(
                VqaSample(it.get("question_id", n), _join(images, it["image"]), it["question"], ans)
            )
        return samples, "vqa"
    raise UserError(
        f"{questions} is not a VQA questions file this tool knows (VQAv2/OK-VQA questions, GQA "
        "questions, or a list of {'image', 'question', 'answers'}); see docs/evaluation.md"
    )
