"""Tiny models and tiny benchmark files in the published layouts, for the evaluation tests.

Every file is written by the test in the layout real users point the tool at (see
docs/evaluation.md): COCO Karpathy flattened test file, Karpathy's `dataset_coco.json`, NoCaps (COCO
layout with domains), Flickr30K test, VQAv2 and OK-VQA questions + annotations, GQA test-dev.
"""

from __future__ import annotations

import json
from pathlib import Path

import tiny_hf
import torch

COCO_IDS = [391895, 522418, 184613, 318219]
CAPTIONS = [
    ["a cat on a couch", "a cat sitting on the red couch", "the cat is on a couch"],
    ["two dogs on a couch", "two dog on the couch", "dogs on a red couch"],
    ["the sky is blue", "a blue sky", "blue sky photo"],
    ["a red photo", "what a red photo", "a photo of red"],
]


def generation_folder(path: Path, seed: int = 3) -> Path:
    """A tiny transformers OPT BLIP-2 whose output embeddings favour real words (a random tiny LM
    otherwise generates padding), so captions and answers are non-empty text."""
    model, processor = tiny_hf.generation_model("opt", "a", seed=seed)
    tok = processor.tokenizer
    words = torch.tensor([tok.convert_tokens_to_ids(w) for w in tiny_hf.WORDS])
    with torch.no_grad():
        table = model.language_model.get_input_embeddings().weight  # tied with the LM head
        keep = torch.zeros(table.shape[0], dtype=torch.bool)
        keep[words] = True
        table[~keep] = 0.0
    return tiny_hf.save_generation(model, processor, path)


def instruct_folder(path: Path, seed: int = 1) -> Path:
    """A tiny transformers InstructBLIP (OPT) whose LM favours real words, as `generation_folder`."""
    model, processor = tiny_hf.instruct_model("opt", "a", seed=seed)
    tok = processor.tokenizer
    words = torch.tensor([tok.convert_tokens_to_ids(w) for w in tiny_hf.WORDS])
    with torch.no_grad():
        table = model.language_model.get_input_embeddings().weight
        keep = torch.zeros(table.shape[0], dtype=torch.bool)
        keep[words] = True
        table[~keep] = 0.0
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def retrieval_folder(path: Path, seed: int = 4) -> Path:
    model, tok = tiny_hf.retrieval_model("a", seed=seed)
    return tiny_hf.save_retrieval(model, tok, path)


def coco_name(image_id: int, subtype: str = "val2014") -> str:
    return f"COCO_{subtype}_{image_id:012d}.jpg"


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, tiny_hf.images(len(names)), strict=True):
        image.save(folder / name, format="PNG")  # lossless; PIL reads by content, not by suffix


def _dump(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def coco_karpathy_test(root: Path) -> Path:
    """`coco_karpathy_test.json`: images under `val2014/`, five (here three) captions each."""
    write_images(root / "coco" / "val2014", [coco_name(i) for i in COCO_IDS])
    items = [
        {"image": f"val2014/{coco_name(i)}", "caption": c} for i, c in zip(COCO_IDS, CAPTIONS, strict=True)
    ]
    return _dump(root / "coco_karpathy_test.json", items)


def karpathy_dataset_coco(root: Path) -> Path:
    """Karpathy's original `dataset_coco.json` with a train image that the test split must skip."""
    write_images(root / "coco" / "val2014", [coco_name(i) for i in COCO_IDS])
    images = []
    for n, (i, caps) in enumerate(zip(COCO_IDS, CAPTIONS, strict=True)):
        images.append(
            {
                "filepath": "val2014",
                "filename": coco_name(i),
                "imgid": n,
                "split": "train" if n == 0 else "test",
                "cocoid": i,
                "sentids": list(range(3 * n, 3 * n + 3)),
                "sentences": [
                    {"tokens": c.split(), "raw": c, "imgid": n, "sentid": 3 * n + j}
                    for j, c in enumerate(caps)
                ],
            }
        )
    return _dump(root / "dataset_coco.json", {"dataset": "coco", "images": images})


def nocaps_val(root: Path) -> Path:
    """`nocaps_val_4500_captions.json`: COCO layout, Open Images file names, a domain per image."""
    names = [f"{n:016x}.jpg" for n in range(4)]
    write_images(root / "nocaps" / "val", names)
    domains = ["in-domain", "near-domain", "out-domain", "near-domain"]
    images = [
        {"id": n, "open_images_id": name[:-4], "file_name": name, "height": 20, "width": 30, "domain": d}
        for n, (name, d) in enumerate(zip(names, domains, strict=True))
    ]
    anns = [
        {"image_id": n, "id": 10 * n + j, "caption": c}
        for n, caps in enumerate(CAPTIONS)
        for j, c in enumerate(caps)
    ]
    return _dump(root / "nocaps_val_4500_captions.json", {"images": images, "annotations": anns})


def flickr30k_test(root: Path) -> Path:
    """`flickr30k_test.json` (flattened Karpathy test split, as the original code ships it)."""
    names = [f"{1000092795 + n}.jpg" for n in range(4)]
    write_images(root / "flickr30k" / "flickr30k-images", names)
    items = [{"image": f"flickr30k-images/{n}", "caption": c} for n, c in zip(names, CAPTIONS, strict=True)]
    return _dump(root / "flickr30k_test.json", items)


def vqav2(
    root: Path, questions: list[str], answers: list[list[str]], prefix: str = "v2_"
) -> tuple[Path, Path]:
    """VQAv2 (`prefix="v2_"`) or OK-VQA (`prefix=""`) questions + annotations files, val2014 images."""
    write_images(root / "coco" / "val2014", [coco_name(i) for i in COCO_IDS])
    qs, anns = [], []
    for n, (q, ans) in enumerate(zip(questions, answers, strict=True)):
        image_id = COCO_IDS[n % len(COCO_IDS)]
        qid = image_id * 1000 + n
        qs.append({"image_id": image_id, "question": q, "question_id": qid})
        anns.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "question_type": "what is the",
                "answer_type": "yes/no" if n % 2 else "other",
                "multiple_choice_answer": ans[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(ans)
                ],
            }
        )
    head = {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014"}
    qname = f"{prefix}OpenEnded_mscoco_val2014_questions.json"
    aname = f"{prefix}mscoco_val2014_annotations.json"
    return _dump(root / qname, {**head, "questions": qs}), _dump(root / aname, {**head, "annotations": anns})


def gqa_testdev(root: Path, questions: list[str], answers: list[str]) -> Path:
    """GQA `testdev_balanced_questions.json` (a dict keyed by question id), images `images/{imageId}.jpg`."""
    image_ids = [f"n{161313 + n}" for n in range(len(questions))]
    write_images(root / "gqa" / "images", [f"{i}.jpg" for i in image_ids])
    data = {
        str(201307251 + n): {
            "imageId": image_ids[n],
            "question": q,
            "answer": a,
            "fullAnswer": f"the answer is {a}.",
            "isBalanced": True,
            "types": {"structural": "query", "semantic": "attr", "detailed": "weatherVerify"},
        }
        for n, (q, a) in enumerate(zip(questions, answers, strict=True))
    }
    return _dump(root / "testdev_balanced_questions.json", data)
