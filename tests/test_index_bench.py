"""benchmarks/index_bench.py at a small scale: the rows it reports and the recall it computes, against
what exhaustive settings must give (the README's 100k and 1M figures come from this script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_index_bench_reports_exact_recall_at_exhaustive_settings():
    args = ["--images", "3000", "--texts", "20", "--strategy", "queries", "pooled"]
    args += ["--faiss", "Flat", "IVF{lists}_HNSW32,SQ8", "--nprobe", "256", "2", "--candidates", "100"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "index_bench.py"), *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"strategy"')]
    got = {(r["strategy"], r["faiss"], r["nprobe"]): r for r in rows}
    assert len(rows) == 6 and all(r["images"] == 3000 and r["p50_ms"] > 0 for r in rows)
    # every query embedding searched exactly (Flat), or every list probed: the exact top 10
    assert got["queries", "Flat", None]["recall_at_10"] == 1.0
    every_list = got["queries", "IVF256_HNSW32,SQ8", 256]
    assert every_list["recall_at_10"] == 1.0 and every_list["ef_search"] == 512  # quantizer: 2 x nprobe
    two_lists = got["queries", "IVF256_HNSW32,SQ8", 2]
    assert two_lists["ef_search"] == 16 and two_lists["recall_at_10"] < 1.0  # 2 of 256 lists miss some
