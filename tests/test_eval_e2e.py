"""`blip2 eval caption|vqa|retrieval` end to end: tiny models, tiny benchmark files written here in
each published layout, the command's predictions and metrics checked against the pipeline and the
metric functions computed independently."""

from __future__ import annotations

import json
from pathlib import Path

import eval_fixtures as fx
import pytest
import torch

import blip2
from blip2.cli import main
from blip2.eval.metrics import caption_metrics, normalize_answer, retrieval_recall

CAPTION_OPTS = dict(prompt="a photo of", num_beams=5, max_new_tokens=30, min_new_tokens=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    gen, itm = fx.generation_folder(root / "opt"), fx.retrieval_folder(root / "itm")
    return gen, itm, blip2.load(gen), blip2.load(itm)


def _read(path: Path):
    return json.loads(path.read_text())


def _eval(*args: str) -> int:
    return main(["eval", *args, "--workers", "0"])


def test_caption_coco_karpathy_test_file(models, tmp_path):
    gen, _, pipe, _ = models
    fx.coco_karpathy_test(tmp_path)  # writes the images
    images = [str(tmp_path / "coco" / "val2014" / fx.coco_name(i)) for i in fx.COCO_IDS]
    expected = pipe.caption(images, **CAPTION_OPTS)  # the paper's settings through the pipeline
    assert all(len(c.split()) >= 8 for c in expected)
    refs = [caps + ([expected[0]] if n == 0 else []) for n, caps in enumerate(fx.CAPTIONS)]
    items = [
        {"image": f"val2014/{fx.coco_name(i)}", "caption": r} for i, r in zip(fx.COCO_IDS, refs, strict=True)
    ]
    ann = tmp_path / "coco_karpathy_test.json"
    ann.write_text(json.dumps(items))
    out = tmp_path / "out"
    args = ["--model", str(gen), "--dataset", str(ann), "--images", str(tmp_path / "coco"), "--out", str(out)]
    assert _eval("caption", *args, "--batch-size", "4", "--no-java") == 0

    preds = _read(out / "predictions.json")
    assert [p["image_id"] for p in preds] == fx.COCO_IDS  # COCO ids from the file names
    assert [p["caption"] for p in preds] == expected
    record = _read(out / "metrics.json")
    want = caption_metrics(
        dict(zip(fx.COCO_IDS, expected, strict=True)), dict(zip(fx.COCO_IDS, refs, strict=True)), java=False
    )
    assert record["metrics"]["all"] == pytest.approx(want)
    assert record["metrics"]["all"]["Bleu_1"] > 0.2  # image 0's caption is among its references
    assert record["settings"] == {**CAPTION_OPTS}
    assert any("Java-free" in n for n in record["notes"])

    # `blip2 eval score` rescores the predictions file without the model: the same metrics
    rescored = tmp_path / "rescored.json"
    argv = ["eval", "score", str(out / "predictions.json"), "--dataset", str(ann), "--no-java"]
    assert main([*argv, "--out", str(rescored)]) == 0
    assert _read(rescored)["metrics"] == record["metrics"]


def test_caption_karpathy_dataset_split_resume_and_settings_guard(models, tmp_path, capsys):
    gen, _, _, _ = models
    ann = fx.karpathy_dataset_coco(tmp_path)
    out = tmp_path / "out"
    base = ["--model", str(gen), "--dataset", str(ann), "--images", str(tmp_path / "coco"), "--out", str(out)]
    fast = ["--no-java", "--max-new-tokens", "9", "--num-beams", "2", "--batch-size", "1"]
    assert _eval("caption", *base, *fast) == 0
    first = _read(out / "predictions.json")
    assert [p["image_id"] for p in first] == fx.COCO_IDS[1:]  # the test split only

    # an interrupted run: one prediction kept, a torn line after it; the rerun makes the other two
    part = out / "predictions.part-000.jsonl"
    lines = part.read_text().splitlines()
    part.write_text(lines[0] + "\n" + lines[1][:7])
    capsys.readouterr()
    assert _eval("caption", *base, *fast) == 0
    assert "1 predictions found, 2 to make" in capsys.readouterr().out
    assert _read(out / "predictions.json") == first

    # other settings must not silently mix with these predictions
    assert _eval("caption", *base, "--no-java", "--max-new-tokens", "5") == 2
    assert "different run" in capsys.readouterr().err
    assert _eval("caption", *base, "--no-java", "--max-new-tokens", "5", "--overwrite") == 0
    assert all(len(p["caption"].split()) <= 5 for p in _read(out / "predictions.json"))


def test_caption_nocaps_scores_each_domain(models, tmp_path):
    gen, _, _, _ = models
    ann = fx.nocaps_val(tmp_path)
    out = tmp_path / "out"
    args = [
        "--model",
        str(gen),
        "--dataset",
        str(ann),
        "--images",
        str(tmp_path / "nocaps" / "val"),
        "--out",
        str(out),
    ]
    assert _eval("caption", *args, "--no-java", "--max-new-tokens", "6", "--num-beams", "2") == 0
    record = _read(out / "metrics.json")
    assert set(record["metrics"]) == {"all", "in-domain", "near-domain", "out-domain"}
    preds = {p["image_id"]: p["caption"] for p in _read(out / "predictions.json")}
    near = caption_metrics({1: preds[1], 3: preds[3]}, {1: fx.CAPTIONS[1], 3: fx.CAPTIONS[3]}, java=False)
    assert record["metrics"]["near-domain"] == pytest.approx(near)
    assert (
        record["settings"]["max_new_tokens"] == 6 and record["settings"]["min_new_tokens"] == 6
    )  # min <= max


QUESTIONS = ["what is the sky ?", "what is on the couch ?", "what is red ?", "what is the cat ?"]


@pytest.mark.parametrize("prefix", ["v2_", ""], ids=["vqav2", "okvqa"])
def test_vqa_official_files_score_the_official_accuracy(models, tmp_path, prefix):
    gen, _, pipe, _ = models
    fx.write_images(tmp_path / "coco" / "val2014", [fx.coco_name(i) for i in fx.COCO_IDS])
    images = [str(tmp_path / "coco" / "val2014" / fx.coco_name(i)) for i in fx.COCO_IDS]
    expected = pipe.ask(images, QUESTIONS)  # the model's template, 5 beams, 10 tokens, OPT length penalty 0
    assert all(expected)
    other = "zebra"
    human = [normalize_answer(e) for e in expected]  # human answers come normalized (lowercase words)
    answers = [
        [human[0]] * 10,  # 100
        [human[1]] * 2 + [other] * 8,  # 60
        [other] * 10,  # 0
        [human[2] + "."] * 3 + [other] * 7,  # 90 once the answers' punctuation is normalized
    ]
    expected[3] = expected[2]  # question 3 is scored against question 2's answer text (see below)
    q_file, a_file = fx.vqav2(tmp_path, QUESTIONS[:3] + [QUESTIONS[2]], answers, prefix=prefix)
    out = tmp_path / "out"
    args = ["--model", str(gen), "--dataset", str(q_file), "--answers", str(a_file)]
    assert _eval("vqa", *args, "--images", str(tmp_path / "coco" / "val2014"), "--out", str(out)) == 0

    preds = _read(out / "predictions.json")
    assert [p["answer"] for p in preds] == expected
    assert [p["question_id"] for p in preds] == [i * 1000 + n for n, i in enumerate(fx.COCO_IDS)]
    record = _read(out / "metrics.json")
    assert record["metrics"] == {"accuracy": 62.5, "questions": 4.0, "other": 50.0, "yes/no": 75.0}
    assert record["settings"]["length_penalty"] == 0.0 and record["settings"]["num_beams"] == 5
    assert record["settings"]["prompt"] == pipe.config.llm.vqa_template


def test_vqa_plain_list_with_few_answers_scores_without_leave_one_out(models, tmp_path):
    gen, _, pipe, _ = models
    names = [fx.coco_name(i) for i in fx.COCO_IDS]
    fx.write_images(tmp_path / "images", names)
    expected = pipe.ask([str(tmp_path / "images" / n) for n in names], QUESTIONS, max_new_tokens=4)
    human = [normalize_answer(e) for e in expected]
    items = [
        {"image": names[0], "question": QUESTIONS[0], "answer": human[0]},  # one answer, right: 1
        {"image": names[1], "question": QUESTIONS[1], "answers": ["zebra"]},  # one answer, wrong: 0
        {"image": names[2], "question": QUESTIONS[2], "answers": [human[2]] * 2 + ["zebra"] * 3},  # 2/3
        {"image": names[3], "question": QUESTIONS[3], "answers": [human[3]] * 3 + ["zebra"] * 7},  # 0.9
    ]
    ann = tmp_path / "vqa.json"
    ann.write_text(json.dumps(items))
    out = tmp_path / "out"
    args = ["--model", str(gen), "--dataset", str(ann), "--images", str(tmp_path / "images")]
    assert _eval("vqa", *args, "--out", str(out), "--max-new-tokens", "4") == 0
    assert [p["answer"] for p in _read(out / "predictions.json")] == expected
    record = _read(out / "metrics.json")
    assert record["metrics"] == {"accuracy": round(100 * (1 + 0 + 2 / 3 + 0.9) / 4, 2), "questions": 4.0}
    assert record["scoring"] == {"exact match": 2, "min(1, matches/3)": 1, "leave-one-out": 1}
    assert any(
        "without leave-one-out: 2 by exact match, 1 by min(1, matches/3)" in n for n in record["notes"]
    )


def test_instructblip_is_evaluated_with_its_own_zero_shot_settings(tmp_path):
    """InstructBLIP's prompts reach the Q-Former and the LLM, with the paper's settings: "A short image
    description:" for captions (beam 5, up to 256 tokens, repetition penalty 1.5), "Question: {} Short
    answer:" for VQA (beam 5, up to 10 tokens, length penalty -1)."""
    from blip2.eval.settings import caption_settings, vqa_settings

    folder = fx.instruct_folder(tmp_path / "instruct")
    pipe = blip2.load(folder)
    assert pipe.config.kind == "instruct"
    names = [fx.coco_name(i) for i in fx.COCO_IDS]
    fx.write_images(tmp_path / "images", names)
    images = [str(tmp_path / "images" / n) for n in names]
    vqa = vqa_settings("instruct")
    assert vqa == {
        "prompt": "Question: {} Short answer:",
        "num_beams": 5,
        "max_new_tokens": 10,
        "min_new_tokens": 1,
        "length_penalty": -1.0,
    }
    template = vqa.pop("prompt")
    expected = pipe.generate(images, [template.format(q) for q in QUESTIONS], **{**vqa, "max_new_tokens": 4})
    assert expected != pipe.generate(
        images, [template.format("what") for _ in QUESTIONS], **{**vqa, "max_new_tokens": 4}
    )
    ann = tmp_path / "vqa.json"
    ann.write_text(
        json.dumps(
            [{"image": n, "question": q, "answer": "yes"} for n, q in zip(names, QUESTIONS, strict=True)]
        )
    )
    args = ["--model", str(folder), "--dataset", str(ann), "--images", str(tmp_path / "images")]
    assert _eval("vqa", *args, "--out", str(tmp_path / "vqa"), "--max-new-tokens", "4") == 0
    assert [p["answer"] for p in _read(tmp_path / "vqa" / "predictions.json")] == expected
    record = _read(tmp_path / "vqa" / "metrics.json")
    assert record["settings"] == {**vqa_settings("instruct"), "max_new_tokens": 4}

    caption = caption_settings("instruct")
    assert caption["prompt"] == "A short image description:" and caption["max_new_tokens"] == 256
    items = [{"image": n, "caption": "a photo"} for n in names]
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps(items))
    args = ["--model", str(folder), "--dataset", str(ann), "--images", str(tmp_path / "images")]
    assert _eval("caption", *args, "--out", str(tmp_path / "cap"), "--max-new-tokens", "6", "--no-java") == 0
    prompt = caption.pop("prompt")
    want = pipe.generate(images, [prompt] * 4, **{**caption, "max_new_tokens": 6})
    assert [p["caption"] for p in _read(tmp_path / "cap" / "predictions.json")] == want


def test_vqa_test_dev_without_answers_writes_predictions_only(models, tmp_path):
    gen, _, _, _ = models
    q_file, _ = fx.vqav2(tmp_path, QUESTIONS[:2], [["x"] * 10] * 2)
    out = tmp_path / "out"
    args = ["--model", str(gen), "--dataset", str(q_file), "--images", str(tmp_path / "coco" / "val2014")]
    assert (
        _eval("vqa", *args, "--out", str(out), "--max-new-tokens", "3", "--prompt", "question : {} answer :")
        == 0
    )
    assert len(_read(out / "predictions.json")) == 2
    record = _read(out / "metrics.json")
    assert record["metrics"] == {} and "no public answers" in record["notes"][0]
    assert record["settings"]["prompt"] == "question : {} answer :"


def test_gqa_testdev_exact_match(models, tmp_path):
    gen, _, pipe, _ = models
    fx.gqa_testdev(tmp_path, QUESTIONS[:2], ["x", "y"])  # the images
    images = [str(tmp_path / "gqa" / "images" / f"n{161313 + n}.jpg") for n in range(2)]
    expected = pipe.ask(images, QUESTIONS[:2], max_new_tokens=4)
    ann = fx.gqa_testdev(tmp_path, QUESTIONS[:2], [normalize_answer(expected[0]), "zebra"])
    out = tmp_path / "out"
    args = ["--model", str(gen), "--dataset", str(ann), "--images", str(tmp_path / "gqa" / "images")]
    assert _eval("vqa", *args, "--out", str(out), "--max-new-tokens", "4") == 0
    preds = _read(out / "predictions.json")
    assert preds == [{"questionId": str(201307251 + n), "prediction": expected[n]} for n in range(2)]
    assert _read(out / "metrics.json")["metrics"] == {"accuracy": 50.0, "questions": 2.0}


@pytest.mark.parametrize("which", ["flickr30k", "coco"])
def test_retrieval_itc_and_itm_rerank(models, tmp_path, which):
    _, itm, _, pipe = models
    if which == "flickr30k":
        ann, image_root = fx.flickr30k_test(tmp_path), tmp_path / "flickr30k"
        images = [str(image_root / "flickr30k-images" / f"{1000092795 + n}.jpg") for n in range(4)]
    else:
        ann, image_root = fx.coco_karpathy_test(tmp_path), tmp_path / "coco"
        images = [str(image_root / "val2014" / fx.coco_name(i)) for i in fx.COCO_IDS]
    texts = [c for caps in fx.CAPTIONS for c in caps]  # already clean: lowercase, no punctuation
    img2txt = [list(range(3 * i, 3 * i + 3)) for i in range(4)]
    txt2img = [t // 3 for t in range(12)]
    # independent reference: the pipeline's ITC cosines, and ITM logits of every pair
    sims = pipe.similarity(images, texts)
    model = pipe.model
    with torch.no_grad():
        embeds = model.encode_image(pipe.pixels(images))
        enc = pipe.qformer_tokenizer(texts, padding=True, return_tensors="pt")
        pairs = [(i, t) for i in range(4) for t in range(12)]
        logits = model.itm_logits(
            enc["input_ids"][[t for _, t in pairs]],
            enc["attention_mask"][[t for _, t in pairs]],
            image_embeds=embeds[[i for i, _ in pairs]],
        )[:, 1].view(4, 12)
    full = logits + sims

    base = ["--model", str(itm), "--dataset", str(ann), "--images", str(image_root), "--batch-size", "3"]
    assert (
        _eval("retrieval", *base, "--out", str(tmp_path / "all"), "--k", "128", "--itm-batch-size", "5") == 0
    )
    record = _read(tmp_path / "all" / "metrics.json")
    assert record["itc_only"] == pytest.approx(retrieval_recall(sims, img2txt, txt2img))
    assert record["metrics"] == pytest.approx(retrieval_recall(full, img2txt, txt2img))
    top = _read(tmp_path / "all" / "predictions.json")
    assert top["image_to_text"][0] == full[0].argsort(descending=True)[:10].tolist()
    assert top["text_to_image"][5] == full[:, 5].argsort(descending=True).tolist()

    assert _eval("retrieval", *base, "--out", str(tmp_path / "k2"), "--k", "2") == 0
    k2 = _read(tmp_path / "k2" / "predictions.json")
    for row in range(4):  # re-ranking with k=2 reorders only ITC's top two texts
        itc_top2 = set(sims[row].topk(2).indices.tolist())
        assert set(k2["image_to_text"][row][:2]) == itc_top2
        assert k2["image_to_text"][row][2:] == sims[row].argsort(descending=True)[2:10].tolist()


def test_eval_refuses_a_model_of_the_wrong_stage(models, tmp_path, capsys):
    _, itm, _, _ = models
    ann = fx.coco_karpathy_test(tmp_path)
    assert _eval("caption", "--model", str(itm), "--dataset", str(ann), "--out", str(tmp_path / "o")) == 2
    assert "needs a stage-2" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_unreadable_image_stops_eval_with_exit_1_naming_it(models, tmp_path, capsys, workers):
    """Exit 1 (some inputs failed) with one sentence naming the image, in the process or in a loader
    worker; a missing image stays a usage error (2)."""
    gen, _, _, _ = models
    ann = fx.coco_karpathy_test(tmp_path)
    broken = tmp_path / "coco" / "val2014" / fx.coco_name(fx.COCO_IDS[1])
    broken.write_bytes(b"not an image")
    args = ["--model", str(gen), "--dataset", str(ann), "--images", str(tmp_path / "coco"), "--no-java"]
    capsys.readouterr()
    code = main(["eval", "caption", *args, "--out", str(tmp_path / "o"), "--workers", workers])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [
        f"error: cannot evaluate: {broken} is not an image file PIL can read (replace or remove that image "
        "and rerun)"
    ]
    broken.unlink()
    assert main(["eval", "caption", *args, "--out", str(tmp_path / "o2"), "--workers", workers]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {broken} does not exist: check --images and the annotation file"]
