"""The image index at scale, on synthetic embeddings: build time, peak memory, query latency and
recall@10 against exact search, for the two ways to find ITC candidates.

    python benchmarks/index_bench.py --images 1000000 --store /tmp/1m.index --write-only  # ~16 GB, once
    python benchmarks/index_bench.py --store /tmp/1m.index --strategy pooled --faiss Flat --candidates 100 1000
    python benchmarks/index_bench.py --images 100000 --strategy queries pooled   # a new store in /tmp

The embeddings go through the real store (`blip2.index.store.SegmentWriter`, float16, memory-mapped)
and are searched by `blip2.index.Index.itc`, the ITC stage of `Index.search` (ITM re-ranking reads
images and is not measured here). Synthetic but clustered like real ones: `--clusters` topic centres;
each image mixes two topics (its Q query vectors each near one of them, 3 in 4 near the first); a text
is near one topic. Every vector is unit-normalized, as the model's are.

Strategies: `pooled` indexes one vector per image (the mean query, normalized) and scores FAISS's
`candidates` best exactly (max over the Q query vectors); `queries` indexes all N x Q query vectors
(the exact top k is among the first k distinct images of an exhaustive search, but the index is Q times
larger). Exact search (every image scored) is the reference for recall@10.

Peak memory is the process's peak resident set (VmHWM, reset before each phase); it counts the pages
of the memory-mapped store the phase touched. Prints one JSON line per measurement and a table.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from blip2.index import Index
from blip2.index.search import lists
from blip2.index.store import SegmentWriter, Store

WRITE_CHUNK = 8192


def reset_peak() -> None:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def centres(clusters: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g), dim=-1)


def noise_pool(dim: int, g: torch.Generator, size: int = 1 << 16) -> torch.Tensor:
    """Unit Gaussian noise directions; a vector's noise is the sum of two drawn from here (2^32 pairs):
    as random as fresh draws for this purpose, and cheap enough to make 32 million vectors on 2 cores."""
    return torch.randn(size, dim, generator=g) / math.sqrt(2 * dim)


def synthetic_images(n: int, q: int, topics: torch.Tensor, noise: float, pool: torch.Tensor, g: torch.Generator
                     ) -> torch.Tensor:  # fmt: skip
    """`(n, Q, E)` unit query vectors of n images."""
    k = topics.shape[0]
    first, second = torch.randint(k, (n,), generator=g), torch.randint(k, (n,), generator=g)
    pick = torch.rand(n, q, generator=g) < 0.75
    topic = torch.where(pick, first[:, None], second[:, None])  # (n, Q)
    a, b = torch.randint(len(pool), (2, n, q), generator=g)
    x = topics[topic] + noise * (pool[a] + pool[b])
    return torch.nn.functional.normalize(x, dim=-1)


def write_store(path: Path, n: int, q: int, dim: int, topics: torch.Tensor, noise: float, seed: int) -> dict:
    """Write synthetic images into the index at `path` (new, or one a killed run left: it is merged and
    continued in a new segment, as `blip2 index build` resumes) until it holds n; returns the timing."""
    if Store.is_index(path):
        store = Store.open(path)
        store.merge_segments()
        have = len(store.entries())
    else:
        store, have = Store.create(path, model="synthetic", fingerprint="synthetic", queries=q, dim=dim), 0
    writer = SegmentWriter(store, store.next_segment())
    g = torch.Generator().manual_seed(seed + have)
    pool = noise_pool(dim, g)
    reset_peak()
    start, made = time.perf_counter(), 0.0
    for i in range(have, n, WRITE_CHUNK):
        t = time.perf_counter()
        feats = synthetic_images(min(WRITE_CHUNK, n - i), q, topics, noise, pool, g)
        made += time.perf_counter() - t
        writer.append([f"images/{j:07d}.jpg" for j in range(i, i + len(feats))], [None] * len(feats), feats)
    writer.close()
    t = time.perf_counter()
    store.merge_segments()
    merge = time.perf_counter() - t
    total = time.perf_counter() - start
    return {"phase": "write", "images": n - have, "seconds": round(total - made, 1), "generate_s": round(made, 1),
            "merge_s": round(merge, 1), "peak_rss_gb": round(peak_gb(), 2)}  # fmt: skip


def texts(count: int, topics: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    k, dim = topics.shape
    x = topics[torch.randint(k, (count,), generator=g)] + noise * torch.randn(
        count, dim, generator=g
    ) / math.sqrt(dim)
    return torch.nn.functional.normalize(x, dim=-1)


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p))


def time_texts(
    index: Index, text: torch.Tensor, candidates: int | None
) -> tuple[list[float], list[list[int]]]:
    """Search the index for each of the `(T, E)` texts alone by ITC (`Index.itc`, top 10), after a warm-up
    and with the peak RSS reset: the seconds each took and the positions each found."""
    index.itc(text[:3], top_k=10, candidates=candidates)  # warm up
    reset_peak()
    times, found = [], []
    for i in range(len(text)):
        t = time.perf_counter()
        pos, _ = index.itc(text[i : i + 1], top_k=10, candidates=candidates)
        times.append(time.perf_counter() - t)
        found.append(pos[0].tolist())
    return times, found


def measure(index: Index, text: torch.Tensor, truth: torch.Tensor, strategy: str, factory: str, nprobes: list[int],
            candidates: list[int], threads: int, reuse: bool = False) -> list[dict]:  # fmt: skip
    """Build the FAISS index of `strategy` and `factory` (or, with `reuse`, load the one an earlier run saved
    for the same setting: `faiss_build_s` is then the load), then search every text at each setting."""
    import faiss

    index.store.meta.update(strategy=strategy, faiss=factory)
    index._faiss = None
    if not reuse:
        (index.store.path / "faiss.json").unlink(missing_ok=True)
    reset_peak()
    t = time.perf_counter()
    built = index.faiss_index()
    build_s = time.perf_counter() - t
    build_peak = peak_gb()
    default_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)  # one query at a time: threads only contend on a shared machine
    rows = []
    ivf = faiss.try_extract_index_ivf(built)
    for nprobe in nprobes if ivf is not None else [0]:
        if ivf is not None:
            Index._tune(faiss, built, nprobe)  # nprobe lists, quantizer efSearch max(16, 2 * nprobe)
        for c in candidates:
            times, positions = time_texts(index, text, c)
            found = [len(set(p) & set(t)) / 10 for p, t in zip(positions, truth.tolist(), strict=True)]
            quantizer = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
            ef = quantizer.hnsw.efSearch if hasattr(quantizer, "hnsw") else None
            rows.append({"strategy": strategy, "faiss": factory, "nprobe": nprobe or None, "ef_search": ef, "candidates": c,
                         "images": len(index), "faiss_build_s": round(build_s, 1), "faiss_peak_rss_gb": round(build_peak, 2),
                         "p50_ms": round(1000 * percentile(times, 50), 2), "p99_ms": round(1000 * percentile(times, 99), 2),
                         "recall_at_10": round(float(np.mean(found)), 4), "search_peak_rss_gb": round(peak_gb(), 2)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    faiss.omp_set_num_threads(default_threads)
    return rows


def estimate_build(index: Index, factory: str, images: int) -> dict:
    """The `queries` FAISS build when it does not fit a run: train `factory` as `Index` does, add the query
    vectors of the first `images` images, and extrapolate the add to the whole index (linear in vectors)."""
    import faiss

    from blip2.index.search import ADD_CHUNK, TRAIN_ITERATIONS, TRAIN_PER_LIST

    q, dim = index.store.meta["queries"], index.store.meta["dim"]
    built = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(built)
    ivf.cp.niter = TRAIN_ITERATIONS
    sample = np.sort(np.random.default_rng(0).permutation(len(index))[: TRAIN_PER_LIST * ivf.nlist // q])
    reset_peak()
    t = time.perf_counter()
    built.train(np.ascontiguousarray(index.vectors(sample).numpy().reshape(-1, dim)))
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    for start in range(0, images, ADD_CHUNK):
        built.add(
            np.ascontiguousarray(
                index.vectors(np.arange(start, min(start + ADD_CHUNK, images))).numpy().reshape(-1, dim)
            )
        )
    add_s = time.perf_counter() - t
    return {"phase": "estimate", "faiss": factory, "train_s": round(train_s, 1), "added_images": images,
            "add_s": round(add_s, 1), "estimated_build_s": round(train_s + add_s * len(index) / images),
            "codes_gb": round(len(index) * q * (dim + 8) / 2**30, 1), "peak_rss_gb": round(peak_gb(), 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--images", type=int, default=100_000, help="images in the store (written if it holds fewer)"
    )
    p.add_argument("--queries", type=int, default=32, help="query vectors per image (Q)")
    p.add_argument("--dim", type=int, default=256, help="embedding size (E)")
    p.add_argument("--clusters", type=int, default=2000, help="topic centres")
    p.add_argument("--noise", type=float, default=1.0, help="spread of a vector around its topic")
    p.add_argument("--texts", type=int, default=200, help="test queries (latency and recall)")
    p.add_argument(
        "--store", default=None, help="index folder (kept and reused; default: a new temporary one)"
    )
    p.add_argument("--strategy", nargs="+", default=["pooled"], choices=["pooled", "queries"])
    p.add_argument(
        "--faiss",
        nargs="+",
        default=["Flat", "IVF{lists}_HNSW32,SQ8"],
        help="index_factory strings ({lists}: the default lists for the size)",
    )
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--candidates", type=int, nargs="+", default=[50, 100, 200, 400])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--write-only", action="store_true", help="write the store and stop (measure in a later run)"
    )
    p.add_argument(
        "--reuse-faiss",
        action="store_true",
        help="search with the FAISS index an earlier run saved in the store for the same setting (latency only)",
    )
    p.add_argument("--estimate", type=int, default=0, metavar="IMAGES",
                   help="only estimate the build of each --faiss for `queries` from adding this many images")  # fmt: skip
    p.add_argument(
        "--query-threads", type=int, default=1, help="FAISS threads while searching one text (default 1)"
    )
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    topics = centres(args.clusters, args.dim, args.seed)
    if args.store is None:
        import tempfile

        args.store = tempfile.mkdtemp(prefix="index_bench_") + "/bench.index"
    path = Path(args.store)
    if (
        not Store.is_index(path)
        or len(Store.open(path).entries()) < args.images
        or Store.open(path).segments(".jsonl")
    ):
        print(
            json.dumps(write_store(path, args.images, args.queries, args.dim, topics, args.noise, args.seed)),
            flush=True,
        )
    if args.write_only:
        return 0
    t = time.perf_counter()
    index = Index.open(path)
    open_s = time.perf_counter() - t
    text = texts(args.texts, topics, args.noise, args.seed)
    cached = path / f"truth-{len(index)}-{args.texts}-{args.seed}.pt"  # the exact top 10, kept
    if cached.is_file():
        truth = torch.load(cached)
    else:
        reset_peak()
        t = time.perf_counter()
        truth, _ = index.itc(text, top_k=10, candidates=None)  # exact: every image scored
        exact_s = time.perf_counter() - t
        torch.save(truth, cached)
        print(json.dumps({"phase": "exact", "images": len(index), "open_s": round(open_s, 1),
                          "exact_ms_per_text": round(1000 * exact_s / len(text), 1), "peak_rss_gb": round(peak_gb(), 2)}), flush=True)  # fmt: skip
    if args.estimate:
        n = len(index) * args.queries
        for factory in args.faiss:
            print(json.dumps(estimate_build(index, factory.replace("{lists}", str(lists(n))), args.estimate)))
        return 0
    rows = []
    for strategy in args.strategy:
        n = len(index) * (args.queries if strategy == "queries" else 1)
        for factory in args.faiss:
            factory = factory.replace("{lists}", str(lists(n)))
            rows += measure(
                index,
                text,
                truth,
                strategy,
                factory,
                args.nprobe,
                args.candidates,
                args.query_threads,
                args.reuse_faiss,
            )
    print(
        f"\n{len(index)} images, Q={args.queries}, E={args.dim}, float16 store; {args.texts} texts",
        file=sys.stderr,
    )
    print(
        "strategy faiss               nprobe cand  build_s  p50_ms  p99_ms  recall@10  peak_GB",
        file=sys.stderr,
    )
    for r in rows:
        print(f"{r['strategy']:8s} {r['faiss']:19s} {r['nprobe'] or '-':>6} {r['candidates']:4d} {r['faiss_build_s']:8.1f} "
              f"{r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['recall_at_10']:10.4f} {max(r['faiss_peak_rss_gb'], r['search_peak_rss_gb']):8.2f}",
              file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
