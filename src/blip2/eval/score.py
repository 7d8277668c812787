"""`blip2 eval score`: a predictions file scored against a benchmark's annotations, without a model
(the metrics of `blip2 eval`, from its `predictions.json` or one in the same layout)."""

from __future__ import annotations

import json
import os
from typing import Any

from blip2.data.jsonl import hashable
from blip2.errors import UserError
from blip2.eval import datasets, metrics, runner


def read_predictions(path: str | os.PathLike[str]) -> Any:
    """The JSON of a predictions file; one sentence when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"predictions file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the predictions file {path} ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); check the file") from None


def score_predictions(
    predictions: str | os.PathLike[str],
    dataset: str | os.PathLike[str],
    *,
    answers: str | None = None,
    layout: str = "auto",
    split: str = "test",
    java: bool | None = None,
    spice: bool | None = None,
) -> dict[str, Any]:
    """Score a predictions file against a benchmark's annotations, without a model.

    Args:
        predictions: a `predictions.json` of `blip2 eval` (or one in the same layout: captions
            `[{image_id, caption}]`, VQA `[{question_id, answer}]`, GQA `[{questionId, prediction}]`,
            retrieval top-ten lists); its layout says what it holds.
        dataset: the annotation file the predictions were made on.
        answers: VQA: the official annotations (answers) file, when `dataset` is the questions file.
        layout, split: the caption / retrieval annotation layout and split (as `blip2 eval`).
        java, spice: see `metrics.caption_metrics`.

    Returns:
        The metrics record (`task`, `metrics`, `notes`, counts), as `blip2 eval` writes it.

    Raises:
        UserError: an unreadable or foreign predictions file, or predictions made on other data.
    """
    preds = read_predictions(predictions)
    record: dict[str, Any] = {"predictions": str(predictions), "dataset": str(dataset)}
    kind = _kind(preds, str(predictions))
    if kind == "caption":
        samples = datasets.caption_samples(dataset, "", layout, split)
        texts = _by_id(preds, "image_id", "caption", [s.id for s in samples], predictions, dataset)
        scores, notes = runner.score_captions(texts, samples, java=java, spice=spice)
        record |= {"task": "caption", "images": len(samples), "metrics": scores, "notes": notes}
    elif kind in ("vqa", "gqa"):
        samples, metric = datasets.vqa_samples(dataset, answers)
        if metric != kind:
            raise UserError(
                f"{predictions} holds {kind.upper()} answers but {dataset} is a {metric.upper()} "
                "questions file: give the file the predictions were made on"
            )
        id_field, text_field = ("questionId", "prediction") if kind == "gqa" else ("question_id", "answer")
        texts = _by_id(preds, id_field, text_field, [s.id for s in samples], predictions, dataset)
        scores, notes, rules = runner.score_vqa(texts, samples, metric)
        if not any(s.answers for s in samples):
            raise UserError(f"{dataset} holds no answers to score against: give --answers")
        record |= {"task": metric, "questions": len(samples), "metrics": scores, "notes": notes}
        if rules:
            record["scoring"] = rules
    else:
        data = datasets.retrieval_set(dataset, "", layout, split)
        if preds["texts"] != data.texts or len(preds["images"]) != len(data.images):
            raise UserError(
                f"{predictions} was made on other images or texts than {dataset}: give the "
                "annotation file the predictions were made on"
            )
        record |= {"task": "retrieval", "images": len(data.images), "texts": len(data.texts)}
        record |= {"metrics": _recalls(preds, data), "notes": ["recalls from the predictions' top ten lists"]}
    return record


def _kind(preds: Any, path: str) -> str:
    """caption, vqa, gqa or retrieval, from the layout of a predictions file."""
    if isinstance(preds, dict) and {"image_to_text", "text_to_image", "texts", "images"} <= set(preds):
        return "retrieval"
    if isinstance(preds, list) and preds and all(isinstance(p, dict) for p in preds):
        for kind, fields in (
            ("caption", {"image_id", "caption"}),
            ("vqa", {"question_id", "answer"}),
            ("gqa", {"questionId", "prediction"}),
        ):
            if all(fields <= set(p) for p in preds):
                return kind
    raise UserError(
        f"{path} is not a predictions file: expected a list of {{image_id, caption}}, {{question_id, "
        "answer}} or {questionId, prediction} objects, or the predictions.json of `blip2 eval retrieval`"
    )


def _by_id(
    preds: list[dict], id_field: str, text_field: str, ids: list[Any], predictions: Any, dataset: Any
) -> dict:
    """id -> predicted text for every sample id; a sample without a prediction is a `UserError`."""
    texts = {hashable(p[id_field]): str(p[text_field]) for p in preds}
    missing = [i for i in ids if i not in texts]
    if missing:
        raise UserError(
            f"{len(missing)} of the {len(ids)} samples of {dataset} have no prediction in "
            f"{predictions} (first: {missing[0]!r}): give the annotation file the predictions were made on"
        )
    return {i: texts[i] for i in ids}


def _recalls(preds: dict[str, Any], data: Any) -> dict[str, float]:
    """R@1/5/10 from the top ten lists: a query's rank is the place of its first right answer in its
    list (10, a miss at every k, when none is there)."""

    def ranks(tops: list[list[int]], right: list[list[int]]) -> list[int]:
        return [
            next((n for n, c in enumerate(top) if c in set(good)), 10)
            for top, good in zip(tops, right, strict=True)
        ]

    txt_ranks = ranks(preds["image_to_text"], data.img2txt)
    img_ranks = ranks(preds["text_to_image"], [[i] for i in data.txt2img])
    return metrics.recall_from_ranks(txt_ranks, img_ranks)
