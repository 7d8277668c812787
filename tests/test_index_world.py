"""`benchmarks/index_world.py` runs end to end (the README's figures through a real model come from it):
world images rendered to a folder, `blip2 index build`, the ITC rows and the whole `Index.search`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import usage_helpers as uh

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "index_world.py"


def test_index_world_benchmark_measures_the_index_against_exact_search(tmp_path):
    model = uh.save_retriever(tmp_path / "retriever")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(model), "--images", "150", "--texts", "6",
         "--search-texts", "2", "--dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    build = next(r for r in lines if r.get("phase") == "build")
    assert build["wall_s"] > 0 and build["peak_rss_gb"] > 0
    rows = [r for r in lines if "strategy" in r]
    assert [r["strategy"] for r in rows][:2] == ["queries", "exhaustive"]
    exhaustive = rows[1]
    assert exhaustive["candidates"] == 150 and exhaustive["recall_at_10"] == 1.0
    # exhaustive FAISS over every query vector: the exact top 10, float16 ties aside
    assert rows[0]["faiss"] == "Flat" and rows[0]["recall_at_10"] >= 0.9
    search = rows[-1]
    assert search["strategy"] == "Index.search" and search["texts"] == 2 and search["p50_ms"] > 0
    assert "150 world images" in done.stderr
