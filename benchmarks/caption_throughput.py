"""Batch-captioning throughput of `blip2 caption` on CPU with a tiny model, with and without loader
workers.

    python benchmarks/caption_throughput.py [--images 200] [--size 640x480] [--workers 0 2]

Builds a tiny random captioner (tests/usage_helpers.py) and N JPEGs of the given size, then runs the
command once per worker count into a fresh results file and prints images/s (the command's own
count: model time plus whatever image decoding is not overlapped). With a tiny model the run is bound
by decoding and resizing the images, which is what the workers take off the main process.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import usage_helpers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `blip2 caption` options")
    args = parser.parse_args()
    w, h = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = usage_helpers.save_captioner(root / "model")
        rng = np.random.default_rng(0)
        (root / "images").mkdir()
        for i in range(args.images):
            smooth = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
            Image.fromarray(smooth).resize((w, h), Image.BILINEAR).save(
                root / "images" / f"{i:05d}.jpg", quality=90
            )
        for run, workers in enumerate(args.workers):
            out = root / f"captions-{run}.jsonl"  # a fresh file each run (an old one would be resumed)
            cmd = [sys.executable, "-m", "blip2.cli", "caption", "--model", str(model), str(root / "images")]
            cmd += ["--out", str(out), "--workers", str(workers), "--batch-size", str(args.batch_size)]
            cmd += ["--no-progress", *args.extra]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            summary = result.stderr.strip().splitlines()[-1]
            rate = re.search(r"\(([\d.]+) images/s", summary)
            print(f"workers={workers}: {rate.group(1) if rate else '?'} images/s  [{summary}]")


if __name__ == "__main__":
    main()
