"""The image index through a real model, on the built-in demo world's images: build time and memory of
`blip2 index build`, query latency, and recall@10 of the index's ITC candidates against exact search.

    python benchmarks/index_world.py --model runs/demo/model_stage1 --images 4000   # `blip2 demo --out runs/demo`

It renders `--images` world scenes (`blip2.demo.world`, every scene equally often, held-out ones too) as
PNG files into a folder, as a user's photo folder, and builds the index with the real command
(`python -m blip2.cli index build FOLDER --model M --out INDEX`, timed with its peak RSS). The text
queries are world captions drawn as the demo's test set draws them: a random paraphrase of a scene,
4 in 10 of them scenes no training image shows.

Rows (one JSON line each, and a table): the index's ITC stage (`Index.itc`, from a text embedding, one
text at a time, one FAISS thread) at the default settings; exhaustive (`candidates=None`: every image
scored); the inverted file an index above `FLAT_LIMIT` vectors gets (at two nprobe, and with its HNSW
quantizer exploring more list centres); one pooled vector per image; and the whole `Index.search`
(text embedding, ITC candidates, ITM re-ranking of the best 32, read again from disk). recall@10 is against exact search over the index's
stored (float16) embeddings; `recall_vs_folder` is against `blip2 search` over the folder (every image
embedded again, float32). `scene_p@10` is the share of the top 10 showing the caption's scene.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from index_bench import peak_gb, percentile, reset_peak, time_texts  # noqa: E402  (this script's folder)
from torch import Tensor

import blip2
from blip2.demo.world import World, captions, render, sample_examples
from blip2.index import Index
from blip2.index.search import CANDIDATES, NPROBE, import_faiss, lists
from blip2.losses import max_over_queries

HELDOUT_SHARE = 0.4  # of the text queries (as the demo's test set)


def render_folder(folder: Path, n: int, seed: int) -> list[str]:
    """Render n world images into `folder` (`000000.png`, ...); returns their scenes' canonical captions."""
    world, rng = World(), random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shown = []
    for i, ex in enumerate(sample_examples(world, n, "world", rng, world.scenes, questions_per_image=0)):
        render(ex.scene, rng).save(folder / f"{i:06d}.png", compress_level=1)
        shown.append(ex.captions[0])
    return shown


def queries(count: int, seed: int) -> tuple[list[str], list[str]]:
    """`count` text queries and their scenes' canonical captions."""
    world, rng = World(), random.Random(seed + 1)
    texts, scenes = [], []
    for i in range(count):
        pool = world.heldout_scenes if i < round(count * HELDOUT_SHARE) else world.train_scenes
        options = captions(rng.choice(pool))
        texts.append(rng.choice(options))
        scenes.append(options[0])
    return texts, scenes


def build(folder: Path, out: Path, model: str, batch_size: int) -> dict:
    """`blip2 index build` in a child process: wall time (model load included) and its peak RSS."""
    cmd = [sys.executable, "-m", "blip2.cli", "index", "build", str(folder), "--model", model,
           "--out", str(out), "--batch-size", str(batch_size)]  # fmt: skip
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"index build failed:\n{done.stderr}")
    embedded = re.search(r"embedded in ([\d.]+) s", done.stderr)
    return {"phase": "build", "command": " ".join(cmd[1:]), "wall_s": round(wall, 1),
            "embed_s": float(embedded.group(1)) if embedded else None,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}  # fmt: skip


def overlap(found: list[int], truth: list[int]) -> float:
    return len(set(found) & set(truth)) / len(truth)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a stage-1 (retrieval) model: the demo's model_stage1/")
    p.add_argument("--images", type=int, default=4000, help="world images rendered and indexed")
    p.add_argument("--texts", type=int, default=200, help="text queries for the ITC rows")
    p.add_argument("--search-texts", type=int, default=40, help="text queries for the whole Index.search")
    p.add_argument("--batch-size", type=int, default=64, help="`index build --batch-size`")
    p.add_argument(
        "--dir", default=None, help="where the images and the index go (default: a new temp folder)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="index_world_"))
    folder, out = root / "images", root / "world.index"
    t = time.perf_counter()
    shown = render_folder(folder, args.images, args.seed)
    print(
        json.dumps({"phase": "render", "images": args.images, "seconds": round(time.perf_counter() - t, 1)})
    )
    built = build(folder, out, args.model, args.batch_size)
    print(json.dumps(built), flush=True)

    faiss = import_faiss()
    retriever = blip2.load(args.model)
    index = Index.open(out)
    scene = [shown[int(Path(path).stem)] for path in index.paths]  # each position's canonical caption
    texts, wanted = queries(args.texts, args.seed)
    retriever.embed_texts(texts[:3])  # warm up
    times = []
    for text in texts:
        t = time.perf_counter()
        retriever.embed_texts([text])
        times.append(time.perf_counter() - t)
    text = retriever.embed_texts(texts)
    print(json.dumps({"phase": "embed_text", "p50_ms": round(1000 * percentile(times, 50), 2),
                      "p99_ms": round(1000 * percentile(times, 99), 2)}))  # fmt: skip

    # the references: exact over the index's float16 vectors, and `blip2 search` over the folder (float32)
    t = time.perf_counter()
    truth, _ = index.itc(text, top_k=10, candidates=None)
    t_folder = time.perf_counter()
    feats = retriever.embed_images([str(path) for path in index.paths])  # (N, Q, E)
    folder_truth = max_over_queries(feats, text).T.topk(10, dim=1).indices  # (T, 10)
    print(json.dumps({"phase": "exact", "index_exact_ms_per_text": round(1000 * (t_folder - t) / len(texts), 2),
                      "folder_embed_s": round(time.perf_counter() - t_folder, 1),
                      "index_vs_folder_recall_at_10": round(float(np.mean(
                          [overlap(a, b) for a, b in zip(truth.tolist(), folder_truth.tolist(), strict=True)])), 4)}))  # fmt: skip

    def score(found: list[list[int]], reference: Tensor) -> float:  # recall@10 against `reference`
        return round(
            float(np.mean([overlap(f, t) for f, t in zip(found, reference.tolist(), strict=True)])), 4
        )

    def scene_precision(found: list[list[int]]) -> float:
        return round(
            float(np.mean([sum(scene[p] == wanted[i] for p in f) / len(f) for i, f in enumerate(found)])), 4
        )

    def itc_row(strategy: str, factory: str, nprobe: int, candidates: int | None, build_s: float) -> dict:
        """Time `Index.itc` one text at a time as the index is set up now, and score what it found."""
        times, found = time_texts(index, text, candidates)
        row = {"strategy": strategy, "faiss": factory, "nprobe": nprobe or None, "candidates": candidates or len(index),
               "faiss_build_s": round(build_s, 2), "p50_ms": round(1000 * percentile(times, 50), 2),
               "p99_ms": round(1000 * percentile(times, 99), 2), "recall_at_10": score(found, truth),
               "recall_vs_folder": score(found, folder_truth), "scene_p@10": scene_precision(found),
               "peak_rss_gb": round(peak_gb(), 2)}  # fmt: skip
        print(json.dumps(row), flush=True)
        return row

    def use(strategy: str, factory: str, nprobe: int) -> float:
        """Build the FAISS index of this setting, as `Index` builds it for an index of these settings (this
        one's own stay on disk); returns the seconds."""
        index.store.meta.update(strategy=strategy, faiss=factory)
        index._faiss = None
        (out / "faiss.json").unlink(missing_ok=True)
        t = time.perf_counter()
        built = index.faiss_index()
        ivf = faiss.try_extract_index_ivf(built)
        if ivf is not None:
            ivf.nprobe = nprobe
        return time.perf_counter() - t

    faiss.omp_set_num_threads(1)  # one query at a time (as index_bench measures)
    default = index.factory()
    rows = [itc_row("queries", default, 0, CANDIDATES, use("queries", default, 0))]  # the default
    rows.append(itc_row("exhaustive", "-", 0, None, 0.0))
    n = len(index) * index.store.meta["queries"]  # the settings an index above FLAT_LIMIT vectors gets
    ivf = f"IVF{lists(n)}_HNSW32,SQ8"
    ivf_build = use("queries", ivf, NPROBE)
    # its HNSW coarse quantizer explores efSearch list centres: FAISS's 16 is fewer than the 32 lists probed;
    # `Index` sets max(16, 2 * nprobe)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index.faiss_index()).quantizer)
    for nprobe, ef in ((8, 16), (NPROBE, 16), (NPROBE, max(16, 2 * NPROBE))):
        Index._tune(faiss, index.faiss_index(), nprobe)
        quantizer.hnsw.efSearch = ef
        rows.append(itc_row("queries", f"{ivf} efSearch={ef}", nprobe, CANDIDATES, ivf_build))
    pooled_build = use("pooled", "Flat", 0)
    for candidates in (CANDIDATES, 4 * CANDIDATES):
        rows.append(itc_row("pooled", "Flat", 0, candidates, pooled_build))

    # the whole search at the default settings (the FAISS index saved by the build, rebuilt)
    use("queries", default, 0)
    index = Index.open(out)
    index.search(retriever, texts[0], top_k=10)  # warm up
    reset_peak()
    times, found = [], []
    for i in range(min(args.search_texts, len(texts))):
        t = time.perf_counter()
        hits = index.search(retriever, texts[i], top_k=10)
        times.append(time.perf_counter() - t)
        found.append([h.index for h in hits])
    rows.append({"strategy": "Index.search", "faiss": default, "nprobe": None, "candidates": CANDIDATES,
                 "faiss_build_s": 0.0, "p50_ms": round(1000 * percentile(times, 50), 2),
                 "p99_ms": round(1000 * percentile(times, 99), 2), "recall_at_10": None, "recall_vs_folder": None,
                 "scene_p@10": scene_precision(found), "texts": len(found), "peak_rss_gb": round(peak_gb(), 2)})  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)

    print(f"\n{len(index)} world images, Q={index.store.meta['queries']}, E={index.store.meta['dim']}; "
          f"build {built['wall_s']} s wall (embedding {built['embed_s']} s), peak RSS {built['peak_rss_gb']} GB; "
          f"{len(texts)} texts", file=sys.stderr)  # fmt: skip
    print("strategy      faiss                          nprobe  cand build_s  p50_ms  p99_ms recall@10 vs_folder scene_p@10",
          file=sys.stderr)  # fmt: skip
    for r in rows:
        recall = "".join(
            "          " if r[k] is None else f" {r[k]:9.4f}" for k in ("recall_at_10", "recall_vs_folder")
        )
        print(f"{r['strategy']:13s} {r['faiss']:30s} {r['nprobe'] or '-':>6} {r['candidates']:5d} {r['faiss_build_s']:7.2f} "
              f"{r['p50_ms']:7.2f} {r['p99_ms']:7.2f}{recall} {r['scene_p@10']:10.4f}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
