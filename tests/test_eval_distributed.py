"""Evaluation under torchrun (2 CPU processes, gloo): sharded generation and re-ranking merge into one
result equal to the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import eval_fixtures as fx
from train_utils import torchrun

SCRIPT = os.path.join(os.path.dirname(__file__), "eval_dist_checks.py")


def test_two_ranks_merge_into_the_single_process_result(tmp_path):
    fx.generation_folder(tmp_path / "opt")
    fx.retrieval_folder(tmp_path / "itm")
    fx.coco_karpathy_test(tmp_path)
    fx.vqav2(tmp_path, ["what is the sky ?", "what is red ?", "what is on the couch ?"], [["sky"] * 10] * 3)

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    one = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path), str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([SCRIPT, str(tmp_path), str(tmp_path / "two")], nproc=2, timeout=150)
    assert two.returncode == 0, two.stderr[-3000:]

    for task in ("caption", "vqa", "retrieval"):
        a, b = tmp_path / "one" / task, tmp_path / "two" / task
        assert json.loads((b / "predictions.json").read_text()) == json.loads(
            (a / "predictions.json").read_text()
        ), task
        assert (
            json.loads((b / "metrics.json").read_text())["metrics"]
            == json.loads((a / "metrics.json").read_text())["metrics"]
        )
    # each rank generated its own half
    parts = sorted(p.name for p in (tmp_path / "two" / "caption").glob("predictions.part-*.jsonl"))
    assert parts == ["predictions.part-000.jsonl", "predictions.part-001.jsonl"]
    sizes = [len((tmp_path / "two" / "caption" / p).read_text().splitlines()) for p in parts]
    assert sizes == [2, 2]
