"""The command line's own behaviour, without a model: `python -m blip2.cli --help` imports no torch,
`section.key=value` overrides anywhere on the line, `blip2 train --help` lists the config, and
`blip2 eval score` rescoring predictions files against the benchmarks' annotation files."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import eval_fixtures as fx
import pytest

from blip2.cli import main
from blip2.eval import datasets
from blip2.eval.metrics import caption_metrics
from blip2.train import config

ROOT = Path(__file__).resolve().parents[1]
TINY1 = str(ROOT / "configs" / "tiny-stage1.yaml")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`blip2 ARGV` in this process: (exit code, stdout, stderr); argparse's exits count as codes."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_python_m_blip2_cli_help_imports_no_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "blip2.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "cache-features" in result.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "blip2.cli" in imported  # the log is the import log of the command
    assert not [m for m in imported if m.split(".")[0] in ("torch", "transformers")]


# ----------------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "argv",
    [
        ["train", TINY1, "--resume", "auto", "train.max_steps=-1"],
        ["train", TINY1, "train.max_steps=-1", "--resume", "auto"],
        ["train", TINY1, "train.max_steps=-5", "--stop-after", "1", "train.max_steps=-1"],  # the last wins
        ["cache-features", TINY1, "--out", "{tmp}/cache", "train.max_steps=-1"],
        ["cache-features", TINY1, "train.max_steps=-5", "--out", "{tmp}/cache", "train.max_steps=-1"],
    ],
)
def test_overrides_before_or_after_the_options_reach_the_config(argv, tmp_path, capsys):
    code, _, err = cli(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in argv))
    assert code == 2 and "unrecognized" not in err
    assert err.strip() == "error: train.max_steps must be at least 0, not -1"  # the override was applied


def test_words_that_are_not_overrides_are_still_refused(capsys):
    code, _, err = cli(capsys, "train", TINY1, "--resume", "auto", "max_steps")
    assert code == 2 and "unrecognized arguments: max_steps" in err
    code, _, err = cli(capsys, "presets", "tiny-stage1", "a=b")  # a command without overrides
    assert code == 2 and "unrecognized arguments: a=b" in err


def test_train_help_lists_every_config_section_and_field(capsys):
    code, out, _ = cli(capsys, "train", "--help")
    assert code == 0
    assert "task: stage1 | retrieval | stage2 | caption | vqa" in out
    for section, cls in [
        ("model", config.ModelSection),
        ("data", config.DataSection),
        ("optim", config.OptimSection),
        ("train", config.TrainSection),
    ]:
        assert f"\n  {section}: " in out
        for f in dataclasses.fields(cls):
            assert f"\n    {f.name} = " in out, f"{section}.{f.name}"
    assert "max_steps = 0: optimizer steps (0: from `epochs`" in out  # the field's docstring line
    assert 'precision = "bfloat16"' in out  # its default


# ----------------------------------------------------------------------------------- eval score


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_eval_score_captions_without_a_model(tmp_path, capsys):
    ann = fx.coco_karpathy_test(tmp_path)
    captions = ["a cat on a red couch", "two dogs", "a blue sky", "a photo"]
    preds = _write(
        tmp_path / "predictions.json",
        [{"image_id": i, "caption": c} for i, c in zip(fx.COCO_IDS, captions, strict=True)],
    )
    record = tmp_path / "metrics.json"
    code, out, _ = cli(
        capsys, "eval", "score", str(preds), "--dataset", str(ann), "--no-java", "--out", str(record)
    )
    assert code == 0
    want = caption_metrics(
        dict(zip(fx.COCO_IDS, captions, strict=True)),
        dict(zip(fx.COCO_IDS, fx.CAPTIONS, strict=True)),
        java=False,
    )
    printed = json.loads(out)
    assert printed["metrics"]["all"] == pytest.approx(want)
    assert any("Java-free" in n for n in printed["notes"])
    written = json.loads(record.read_text())
    assert (
        written["task"] == "caption" and written["images"] == 4 and written["metrics"] == printed["metrics"]
    )


def test_eval_score_vqa_and_gqa_without_a_model(tmp_path, capsys):
    questions = ["what is it ?", "is it red ?", "what is it ?", "is it red ?"]
    answers = [["cat"] * 10, ["dog"] * 2 + ["zebra"] * 8, ["zebra"] * 10, ["red"] * 3 + ["zebra"] * 7]
    q_file, a_file = fx.vqav2(tmp_path, questions, answers)
    qids = [i * 1000 + n for n, i in enumerate(fx.COCO_IDS)]
    preds = _write(
        tmp_path / "vqa.json",
        [{"question_id": q, "answer": a} for q, a in zip(qids, ["Cat", "dog", "cat", "red."], strict=True)],
    )
    code, out, _ = cli(
        capsys, "eval", "score", str(preds), "--dataset", str(q_file), "--answers", str(a_file)
    )
    assert code == 0
    assert json.loads(out)["metrics"] == {"accuracy": 62.5, "questions": 4.0, "other": 50.0, "yes/no": 75.0}

    gqa = fx.gqa_testdev(tmp_path, questions[:2], ["x", "y"])
    preds = _write(
        tmp_path / "gqa.json",
        [{"questionId": str(201307251 + n), "prediction": p} for n, p in enumerate("Xz")],
    )
    code, out, _ = cli(capsys, "eval", "score", str(preds), "--dataset", str(gqa))
    assert code == 0 and json.loads(out)["metrics"] == {"accuracy": 50.0, "questions": 2.0}


def test_eval_score_retrieval_from_the_top_ten_lists(tmp_path, capsys):
    ann = fx.flickr30k_test(tmp_path)
    data = datasets.retrieval_set(str(ann))
    image_to_text = [
        [0, 5, 6],  # right first
        [0, 1, 3, 2],  # right (3, 4, 5) third
        [0, 1, 2],  # no right text in the list
        [9, 1, 2],  # right first
    ]
    text_to_image = [[t // 3, (t // 3 + 1) % 4] for t in range(12)]
    text_to_image[0] = [1, 0]  # text 0: its image second
    preds = {"texts": data.texts, "images": data.images}
    preds |= {"image_to_text": image_to_text, "text_to_image": text_to_image}
    path = _write(tmp_path / "predictions.json", preds)
    code, out, _ = cli(capsys, "eval", "score", str(path), "--dataset", str(ann))
    assert code == 0
    scores = json.loads(out)["metrics"]
    assert (scores["txt_r1"], scores["txt_r5"], scores["txt_r10"]) == (50.0, 75.0, 75.0)
    assert scores["img_r1"] == pytest.approx(100 * 11 / 12) and scores["img_r5"] == 100.0


def test_eval_score_mistakes_are_one_sentence(tmp_path, capsys):
    ann = fx.coco_karpathy_test(tmp_path)
    q_file, _ = fx.vqav2(tmp_path, ["what ?"], [["a"] * 10])
    short = _write(tmp_path / "short.json", [{"image_id": fx.COCO_IDS[0], "caption": "a cat"}])
    vqa = _write(tmp_path / "vqa.json", [{"question_id": fx.COCO_IDS[0] * 1000, "answer": "a"}])
    cases = [
        ([str(tmp_path / "missing.json"), "--dataset", str(ann)], "predictions file not found"),
        ([str(ann), "--dataset", str(ann)], "is not a predictions file"),
        ([str(short), "--dataset", str(ann)], "3 of the 4 samples"),
        ([str(vqa), "--dataset", str(q_file)], "holds no answers to score against: give --answers"),
    ]
    for argv, words in cases:
        code, _, err = cli(capsys, "eval", "score", *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
