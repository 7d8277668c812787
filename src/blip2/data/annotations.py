"""COCO-style JSON annotation files -> a flat list of `Record`s.

Layouts (see the project's formats reference):

* `captions`: a plain list `[{"image": path, "caption": str | [str, ...]}]` (one's own data; also the
  original code's flattened `coco_karpathy_*.json` / `flickr30k_*.json`); a caption list gives one record
  per caption;
* `karpathy`: Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`, filtered by `split`
  (`train` also takes `restval`);
* `coco`: the official COCO captions file (`images` + `annotations`), images under
  `file_name`;
* `vqa`: VQAv2 / OK-VQA questions + annotations (two files), or a plain list
  `[{"image", "question", "answer" | "answers"}]`;
* `retrieval`: like `captions`, and every caption of an image shares the image's integer id (the ITC
  positives of retrieval fine-tuning). An entry's optional `image_id` (as in the original code's
  `coco_karpathy_train.json`) groups entries instead of the image path: entries sharing it are one
  "image" for ITC positives and ITM negatives;
* `instructions`: one's own instruction data, a plain list `[{"image", "instruction", "answer"}]`
  (instruction tuning: the instruction is read as it is, no template).

Image paths are joined to an image root. Each record carries a `key` naming its image (the relative
path), which is also what the frozen-feature cache is indexed by.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from blip2.errors import UserError

KINDS = ("captions", "karpathy", "coco", "vqa", "retrieval", "instructions")


@dataclass
class Record:
    """One training example before any decoding.

    Attributes:
        key: names the image (relative path, or `shard/key` in tar shards); the feature-cache index key.
        image: a path or the encoded bytes (None when features come from a cache).
        text: the caption (captioning and stage-1/2 pre-training).
        question, answers: VQA; the first answer is the training target.
        instruction: one's own instruction (instruction tuning), its answer in `text`.
        image_id: integer id shared by the captions of one image (ITC positives), -1 when unknown.
    """

    key: str
    image: str | bytes | None
    text: str | None = None
    question: str | None = None
    answers: list[str] = field(default_factory=list)
    image_id: int = -1
    instruction: str | None = None


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); check the file") from None


def _ids(keys: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        out.setdefault(k, len(out))
    return out


def _join(root: str, path: str) -> str:
    return path if os.path.isabs(path) or not root else os.path.join(root, path)


def _caption_list(items: list, path: str, root: str) -> list[Record]:
    if not isinstance(items, list):
        raise UserError(f"{path} should hold a list of {{'image': ..., 'caption': ...}} entries")
    recs: list[Record] = []
    group = [str(it["image_id"]) if "image_id" in it else f"image:{it.get('image', '')}" for it in items]
    ids = _ids(group)
    for i, it in enumerate(items):
        if "image" not in it or "caption" not in it:
            raise UserError(f"entry {i} of {path} lacks an 'image' or 'caption' field")
        caps = it["caption"] if isinstance(it["caption"], list) else [it["caption"]]
        for c in caps:
            recs.append(Record(it["image"], _join(root, it["image"]), text=c, image_id=ids[group[i]]))
    return recs


def _karpathy(data: dict, root: str, split: str) -> list[Record]:
    splits = {"train", "restval"} if split == "train" else {split}
    recs = []
    for i, im in enumerate(data["images"]):
        if im.get("split") not in splits:
            continue
        rel = os.path.join(im.get("filepath", ""), im["filename"])
        for s in im["sentences"]:
            recs.append(Record(rel, _join(root, rel), text=s["raw"], image_id=i))
    return recs


def _coco(data: dict, root: str) -> list[Record]:
    files = {im["id"]: im["file_name"] for im in data["images"]}
    return [
        Record(
            files[a["image_id"]], _join(root, files[a["image_id"]]), text=a["caption"], image_id=a["image_id"]
        )
        for a in data["annotations"]
    ]


def _vqa_official(questions: dict, annotations: dict, root: str, image_pattern: str) -> list[Record]:
    answers = {a["question_id"]: a for a in annotations["annotations"]}
    recs = []
    for q in questions["questions"]:
        ann = answers.get(q["question_id"])
        if ann is None:
            continue
        ranked = [ann["multiple_choice_answer"]] + [a["answer"] for a in ann["answers"]]
        rel = image_pattern.format(image_id=q["image_id"])
        recs.append(
            Record(rel, _join(root, rel), question=q["question"], answers=ranked, image_id=q["image_id"])
        )
    return recs


def _vqa_list(items: list, path: str, root: str) -> list[Record]:
    ids = _ids(str(it.get("image", "")) for it in items)
    recs = []
    for i, it in enumerate(items):
        if "image" not in it or "question" not in it or not ("answer" in it or "answers" in it):
            raise UserError(f"entry {i} of {path} needs 'image', 'question' and 'answer' (or 'answers')")
        ans = it.get("answers") or [it["answer"]]
        ans = [a["answer"] if isinstance(a, dict) else a for a in ans]
        recs.append(
            Record(
                it["image"],
                _join(root, it["image"]),
                question=it["question"],
                answers=ans,
                image_id=ids[it["image"]],
            )
        )
    return recs


def _instruction_list(items: list, path: str, root: str) -> list[Record]:
    if not isinstance(items, list):
        raise UserError(f"{path} should hold a list of {{'image', 'instruction', 'answer'}} entries")
    ids = _ids(str(it.get("image", "")) for it in items if isinstance(it, dict))
    recs = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not all(
            isinstance(it.get(k), str) for k in ("image", "instruction", "answer")
        ):
            raise UserError(f"entry {i} of {path} needs 'image', 'instruction' and 'answer' strings")
        recs.append(
            Record(
                it["image"],
                _join(root, it["image"]),
                text=it["answer"],
                instruction=it["instruction"],
                image_id=ids[it["image"]],
            )
        )
    return recs


def load_records(
    kind: str,
    path: str,
    images: str = "",
    split: str = "train",
    questions: str = "",
    image_pattern: str = "COCO_train2014_{image_id:012d}.jpg",
) -> list[Record]:
    """Read an annotation file into records.

    Args:
        kind: one of `KINDS`.
        path: the annotation JSON (for official VQA: the annotations file).
        images: root folder the image paths are relative to.
        split: Karpathy split to keep.
        questions: official VQA questions file (with `kind="vqa"` and an official annotations `path`).
        image_pattern: official VQA image file name from `image_id` (relative to `images`).
    """
    if kind not in KINDS:
        raise UserError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    data = _read_json(path)
    if kind in ("captions", "retrieval"):
        recs = _caption_list(data, path, images)
    elif kind == "karpathy":
        recs = _karpathy(data, images, split)
    elif kind == "coco":
        recs = _coco(data, images)
    elif kind == "instructions":
        recs = _instruction_list(data, path, images)
    elif questions:
        recs = _vqa_official(_read_json(questions), data, images, image_pattern)
    else:
        recs = _vqa_list(data, path, images)
    if not recs:
        raise UserError(f"{path} gave no {kind} examples (split {split!r}); check the file and its kind")
    return recs
