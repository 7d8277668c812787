"""benchmarks/bench.py's rows that the GPU script adds (`caption256`, `t5`, `e2e`) run on CPU at small
sizes and check what they must before timing: identical tokens against transformers (a T5 LLM too),
and `blip2 caption`'s captions equal to the same model's called in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_rows_run_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    args = ["--quick", "--rows", "caption256,t5,e2e", "--threads", "1", "--repeats", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), *args],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    rows = {r["row"]: r for r in result["rows"]}
    dataset, t5 = rows["caption greedy, dataset batch"], rows["caption greedy, T5 LLM (cpu-t5)"]
    assert dataset["batch"] == 32 and t5["batch"] == 8
    for r in (dataset, t5):
        assert r["agreement"].startswith("100% rows token-identical") and r["ratio"] > 0
    (e2e,) = [r for name, r in rows.items() if name.startswith("blip2 caption end to end")]
    assert e2e["agreement"].startswith("100% of batch 1's captions")
    assert "captions (1 distinct)" not in e2e["agreement"]  # the images get different captions
    assert e2e["batch"] == 32 and e2e["ours"]["throughput"] > 0 and e2e["model_only"]["throughput"] > 0
    assert e2e["ratio_to_model_only"] > 0 and "--workers" in e2e["command"]
    assert e2e["ratio_to_dataset_row"] > 0  # the same batch as the dataset caption row
