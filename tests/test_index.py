"""The image index (`blip2 index`, `blip2 search --index`, `blip2.index.Index`) on a tiny random retriever:
the same ranking as searching the folder; resume after SIGKILL; torchrun; another model refused;
add, remove, re-add; odd file names and shard members; one-sentence errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import usage_helpers as uh
from train_utils import torchrun

import blip2
from blip2.cli import main
from blip2.data.inputs import expand_inputs
from blip2.index import Index

SUBPROCESS_TIMEOUT = 300  # the machine is shared and loaded: be generous


@pytest.fixture(scope="module")
def retriever(tmp_path_factory) -> str:
    return str(uh.save_retriever(tmp_path_factory.mktemp("retriever")))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    uh.make_images(folder, 12)
    return folder


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def blip2_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "blip2.cli", *args]


def stored(index: Index) -> dict[str, torch.Tensor]:
    """Every image's stored query embeddings, by key."""
    return dict(zip(index.paths, index.vectors(range(len(index))), strict=True))


def test_index_search_ranks_as_searching_the_folder(retriever, images, tmp_path, capsys):
    out = tmp_path / "photos.index"
    build = ["index", "build", str(images), "--model", retriever, "--out", str(out), "--batch-size", "5"]
    assert main([*build, "--precision", "float32"]) == 0
    assert "12 images embedded" in capsys.readouterr().err
    for query in ("a dog", "two red cats on a sofa"):
        assert (
            main(
                [
                    "search",
                    "--model",
                    retriever,
                    query,
                    str(images),
                    "--top-k",
                    "6",
                    "--rerank",
                    "4",
                    "--json",
                ]
            )
            == 0
        )
        exact = json_lines(capsys.readouterr().out)
        assert main(["search", "--index", str(out), query, "--top-k", "6", "--rerank", "4", "--json"]) == 0
        indexed = json_lines(capsys.readouterr().out)
        assert [h["image"] for h in indexed] == [h["image"] for h in exact]
        assert [h["itm"] is None for h in indexed] == [False] * 4 + [True] * 2
        for a, b in zip(indexed, exact, strict=True):
            assert a["itc"] == pytest.approx(b["itc"], abs=1e-5)
            assert a["score"] == pytest.approx(b["score"], abs=1e-5) and a["itm"] == pytest.approx(
                b["itm"], abs=1e-5
            )

    # float16 storage (the default): the same images, cosines within 1e-3
    pipe = blip2.load(retriever)
    half = pipe.index([str(images)], tmp_path / "half.index", batch_size=4)
    assert half.store.meta["dtype"] == "float16" and len(half) == 12
    full = Index.open(out)
    text = pipe.embed_texts(["a dog"])
    (pos16, cos16), (pos32, cos32) = half.itc(text, top_k=12), full.itc(text, top_k=12)
    assert torch.allclose(cos16, cos32, atol=2e-3)
    assert sorted(half.paths[i] for i in pos16[0]) == sorted(full.paths[i] for i in pos32[0])
    assert (tmp_path / "half.index" / "segments" / "000000.vec").stat().st_size * 2 == (
        out / "segments" / "000000.vec"
    ).stat().st_size


def test_faiss_candidates_by_query_vectors_find_the_exact_top_k(retriever, images, tmp_path):
    """With every query vector in FAISS (`queries`), k candidates hold the exact best k images."""
    pipe = blip2.load(retriever)
    index = pipe.index(str(images), tmp_path / "q.index", strategy="queries", dtype="float32")
    assert index.factory() == "Flat" and index.faiss_index().ntotal == 12 * index.store.meta["queries"]
    text = pipe.embed_texts(["a dog", "a bird in the sky"])
    exact_pos, exact_cos = index.itc(text, top_k=3, candidates=None)
    pos, cos = index.itc(text, top_k=3, candidates=3)  # FAISS proposes 3 of the 12
    assert torch.equal(pos, exact_pos) and torch.allclose(cos, exact_cos)
    expected = pipe.similarity([str(p) for p in sorted(images.iterdir())], ["a dog", "a bird in the sky"])
    assert torch.allclose(exact_cos, expected.T.sort(dim=1, descending=True).values[:, :3], atol=1e-5)
    hits = index.search(pipe, "a dog", top_k=2, rerank=2, candidates=3)
    ranked = pipe.search([str(p) for p in sorted(images.iterdir())], "a dog", top_k=2, rerank=2)
    assert [index.paths[h.index] for h in hits] == [str(sorted(images.iterdir())[h.index]) for h in ranked]


def test_add_remove_and_add_again(retriever, images, tmp_path, capsys):
    pipe = blip2.load(retriever)
    out = tmp_path / "grow.index"
    more = uh.make_images(tmp_path / "more", 3, seed=9, prefix="more")
    index = pipe.index(str(images), out, model=retriever)
    before = stored(index)
    assert (
        main(["index", "add", str(out), str(tmp_path / "more"), "--batch-size", "2"]) == 0
    )  # the index's model
    assert len(Index.open(out)) == 15
    gone = [str(more[0]), str(sorted(images.iterdir())[0])]
    assert main(["index", "remove", str(out), *gone, "not/there.png"]) == 0
    assert "removed 2 images" in capsys.readouterr().err
    index = Index.open(out)
    assert len(index) == 13 and not set(gone) & set(index.paths)
    assert main(["index", "add", str(out), str(images), str(more[0])]) == 0  # 12 again, 1 back
    index = Index.open(out)
    assert sorted(index.paths) == sorted(map(str, [*sorted(images.iterdir()), *more]))  # each once
    after = stored(index)
    assert all(torch.allclose(after[k], v, atol=1e-3) for k, v in before.items())  # embedded again
    assert main(["index", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 15 and info["unused_rows"] == 13  # 2 removed, then 11 + 1 + 1 replaced
    hits = index.search(pipe, "a dog", top_k=15, rerank=0)
    assert sorted(index.paths[h.index] for h in hits) == sorted(index.paths)


def test_another_model_is_refused(retriever, images, tmp_path, capsys):
    out = tmp_path / "a.index"
    blip2.load(retriever).index(str(images), out)
    other = str(uh.save_retriever(tmp_path / "other", seed=8))
    capsys.readouterr()
    for argv in (
        ["search", "--index", str(out), "--model", other, "a dog"],
        ["index", "add", str(out), str(images), "--model", other],
        ["index", "build", str(images), "--model", other, "--out", str(out)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "was built with another model" in err and "\n" not in err
    assert len(Index.open(out)) == 12


def test_odd_file_names_and_shard_members_round_trip(retriever, tmp_path, capsys):
    folder = tmp_path / "odd"
    paths = uh.make_images(folder, 4)
    names = [b"new\nline.png", b"hash#tag.png", b"caf\xe9 latin-1.png", "späce 🐕.png".encode()]
    for p, raw in zip(paths, names, strict=True):
        os.rename(p, os.fsencode(folder) + b"/" + raw)
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for i, p in enumerate(uh.make_images(tmp_path / "members", 2, seed=4)):
            tar.add(p, arcname=f"{i:03d}.png")
    out = tmp_path / "odd.index"
    assert main(["index", "build", str(folder), str(shard), "--model", retriever, "--out", str(out)]) == 0
    keys = [it.key for it in expand_inputs([str(folder), str(shard)])]
    assert sorted(Index.open(out).paths) == sorted(keys) and len(keys) == 6
    capsys.readouterr()
    assert main(["search", "--index", str(out), "a dog", "--top-k", "6", "--rerank", "6", "--json"]) == 0
    hits = json_lines(capsys.readouterr().out)
    assert sorted(h["image"] for h in hits) == sorted(keys)
    assert all(h["itm"] is not None for h in hits)  # every file and member read again for ITM


def test_errors_are_one_sentence(retriever, images, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    cases = [
        (["search", "--index", str(tmp_path / "nowhere"), "a dog"], "there is no index at"),
        (["index", "info", str(tmp_path / "junk")], "is not a blip2 image index"),
        (["index", "add", str(tmp_path / "junk"), str(images)], "is not a blip2 image index"),
        (
            ["index", "build", str(images), "--model", retriever, "--out", str(tmp_path / "junk")],
            "give --out a new folder",
        ),
        (
            ["index", "build", str(tmp_path / "empty"), "--model", retriever, "--out", str(tmp_path / "x")],
            "hold no images",
        ),
        (["search", "--index", str(tmp_path / "junk"), "a dog", str(images)], "not both or neither"),
        (["search", "--index", str(tmp_path / "nowhere"), " "], "the query is empty"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "Traceback" not in err and "\n" not in err, err
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_build_killed_mid_run_resumes_without_duplicates(retriever, tmp_path):
    folder = tmp_path / "many"
    paths = uh.make_images(folder, 150)
    out = tmp_path / "killed.index"
    cmd = blip2_command(
        "index", "build", str(folder), "--model", retriever, "--batch-size", "1", "--out", str(out)
    )
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    seg_log = out / "segments" / "000000.jsonl"
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if seg_log.exists() and seg_log.read_text().count("\n") >= 5:
                break
            time.sleep(0.005)
        assert proc.poll() is None, (
            "the build ended before it could be killed: " + proc.stderr.read().decode()
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    done = seg_log.read_text().count("\n")
    assert 5 <= done < len(paths)
    with open(seg_log, "a") as f:  # a write torn by the kill: half a line
        f.write('{"image": "' + str(paths[-1])[:10])
    with open(out / "segments" / "000000.vec", "ab") as f:  # and half a batch of vectors
        f.write(b"\0" * 100)
    assert len(Index.open(out)) == 0  # nothing merged yet: a search sees a consistent, empty index
    subprocess.run(cmd, check=True, timeout=SUBPROCESS_TIMEOUT, capture_output=True)
    index = Index.open(out)
    assert sorted(index.paths) == sorted(map(str, paths))  # each exactly once
    assert sum(1 for _ in open(out / "entries.jsonl")) == len(paths) and not list(
        out.glob("segments/*.jsonl")
    )
    whole = blip2.load(retriever).index(str(folder), tmp_path / "whole.index")  # never interrupted
    expected = stored(whole)
    assert all(torch.equal(v, expected[k]) for k, v in stored(index).items())


@pytest.mark.slow
def test_torchrun_two_ranks_build_one_index(retriever, images, tmp_path):
    out = tmp_path / "ranks.index"
    p = torchrun(["-m", "blip2.cli", "index", "build", str(images), "--model", retriever, "--out", str(out),
                  "--batch-size", "2", "--device", "cpu"], timeout=SUBPROCESS_TIMEOUT)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on rank 0 of 2" in p.stderr
    index = Index.open(out)
    assert sorted(index.paths) == sorted(str(p) for p in images.iterdir())
    assert sorted(int(p.stem) for p in out.glob("segments/*.vec")) == [0, 1]  # one segment per rank
    assert not list(out.glob("segments/*.jsonl"))  # merged
    expected = stored(blip2.load(retriever).index(str(images), tmp_path / "one.index"))
    assert all(torch.allclose(v, expected[k], atol=1e-3) for k, v in stored(index).items())


@pytest.mark.parametrize("strategy", ["pooled", "queries"])
def test_an_inverted_file_proposes_and_the_exact_rescore_decides(tmp_path, strategy):
    """An approximate FAISS index (IVF) only proposes: the cosines returned are the exact max over queries."""
    from blip2.index.store import SegmentWriter, Store

    store = Store.create(tmp_path / "s.index", model="m", fingerprint="f", queries=4, dim=8, dtype="float32",
                         strategy=strategy, faiss="IVF4,Flat")  # fmt: skip
    feats = torch.nn.functional.normalize(
        torch.randn(300, 4, 8, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    writer = SegmentWriter(store, 0)
    writer.append([f"i{n}" for n in range(300)], [None] * 300, feats)
    writer.close()
    store.merge_segments()
    index = Index.open(store.path)
    assert index.factory() == "IVF4,Flat" and index.faiss_index().is_trained
    text = torch.nn.functional.normalize(
        torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    pos, cos = index.itc(text, top_k=5, candidates=40)
    exact = torch.einsum("iqe,te->tiq", feats, text).amax(dim=-1)  # (T, N)
    assert torch.allclose(cos, exact.gather(1, pos), atol=1e-6)
    assert (cos[:, :-1] >= cos[:, 1:]).all() and all(len(set(p.tolist())) == 5 for p in pos)
    best = index.itc(text, top_k=5, candidates=None)[1]
    assert (cos[:, 0] <= best[:, 0] + 1e-6).all()


def synthetic_store(path: Path, n: int, q: int, dim: int, seed: int = 0, **settings) -> torch.Tensor:
    """A store of n random images' unit query vectors `(n, Q, E)` (returned), keys `i<number>`."""
    from blip2.index.store import Store

    store = Store.create(path, model="m", fingerprint="f", queries=q, dim=dim, dtype="float32", **settings)
    feats = torch.nn.functional.normalize(
        torch.randn(n, q, dim, generator=torch.Generator().manual_seed(seed)), dim=-1
    )
    append(store, feats, 0)
    return feats


def append(store, feats: torch.Tensor, first: int) -> None:
    """Add images `i<first>`... in a new segment, as a build does."""
    from blip2.index.store import SegmentWriter

    writer = SegmentWriter(store, store.next_segment())
    writer.append([f"i{first + n}" for n in range(len(feats))], [None] * len(feats), feats)
    writer.close()
    store.merge_segments()


def recall_at_10(index: Index, text: torch.Tensor, candidates: int) -> float:
    found, _ = index.itc(text, top_k=10, candidates=candidates)
    exact, _ = index.itc(text, top_k=10, candidates=None)
    return (
        sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist(), strict=True)) / exact.numel()
    )


def test_the_same_weights_at_another_dtype_are_the_same_model(retriever, images, tmp_path, capsys):
    """The index records the model's dtype, and accepts its weights loaded at another one."""
    out = tmp_path / "fp32.index"
    assert (
        main(["index", "build", str(images), "--model", retriever, "--out", str(out), "--dtype", "float32"])
        == 0
    )
    assert main(["index", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_dtype"] == "float32"
    for dtype in ("bfloat16", "float16"):
        assert (
            main(["search", "--index", str(out), "a dog", "--dtype", dtype, "--rerank", "2", "--json"]) == 0
        ), dtype
        assert len(json_lines(capsys.readouterr().out)) == 10
    assert (
        main(
            [
                "index",
                "add",
                str(out),
                str(uh.make_images(tmp_path / "more", 1, seed=3)[0]),
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    assert len(Index.open(out)) == 13
    other = str(uh.save_retriever(tmp_path / "other", seed=8))  # other weights, at either dtype: refused
    capsys.readouterr()
    for dtype in ("float32", "bfloat16"):
        assert main(["search", "--index", str(out), "--model", other, "a dog", "--dtype", dtype]) == 2
        assert "was built with another model" in capsys.readouterr().err


def test_a_path_is_stored_absolute_whatever_its_spelling(retriever, images, tmp_path, monkeypatch, capsys):
    """`./a.png`, `/abs/a.png`, `../x/a.png` from another folder and a link to it are one image."""
    first = sorted(images.iterdir())[0]
    (tmp_path / "link.png").symlink_to(first)
    (tmp_path / "sub").mkdir()
    out = tmp_path / "paths.index"
    monkeypatch.chdir(images)
    assert main(["index", "build", f"./{first.name}", "--model", retriever, "--out", str(out)]) == 0
    assert Index.open(out).paths == [str(first.resolve())]
    monkeypatch.chdir(tmp_path / "sub")
    spellings = [str(first), os.path.relpath(first), "../link.png", f"{images}/./{first.name}"]
    for spelling in spellings:
        assert main(["index", "add", "../paths.index", spelling]) == 0
        index = Index.open(out)
        assert index.paths == [str(first.resolve())], spelling  # replaced, not listed twice
    assert index.faiss_index().ntotal == index.store.meta["queries"]
    assert main(["index", "remove", "../paths.index", "../link.png"]) == 0
    assert "removed 1 images" in capsys.readouterr().err and len(Index.open(out)) == 0


def test_add_and_remove_update_faiss_in_place_and_search_stays_exact(retriever, images, tmp_path, capsys):
    """`index add` adds the new vectors to the saved FAISS index and `index remove` removes them, without
    building it again; FAISS's candidates stay the exact top k."""
    pipe = blip2.load(retriever)
    out = tmp_path / "live.index"
    more = uh.make_images(tmp_path / "more", 4, seed=9, prefix="more")
    assert main(["index", "build", str(images), "--model", retriever, "--out", str(out)]) == 0
    built = json.loads((out / "faiss.json").read_text())
    assert built["built_on"] == 12 and built["factory"] == "Flat"
    steps = [
        ["add", str(out), *map(str, more)],
        ["remove", str(out), str(more[1]), str(sorted(images.iterdir())[3])],
        ["add", str(out), str(more[1]), str(more[2])],  # one back, one added again (replaced)
    ]
    text = pipe.embed_texts(["a dog", "a bird in the sky", "red"])
    for step in steps:
        assert main(["index", *step]) == 0
        index = Index.open(out)
        state = json.loads((out / "faiss.json").read_text())
        assert state["built_on"] == 12 and state["images"] == len(index)  # updated, not built again
        assert index.faiss_index().ntotal == len(index) * index.store.meta["queries"]
        for k in (3, len(index) - 1):
            assert torch.equal(
                index.itc(text, top_k=k, candidates=k)[0], index.itc(text, top_k=k, candidates=None)[0]
            )
    assert len(index) == 15


def test_an_inverted_file_grows_without_retraining_and_rebuild_retrains_it(tmp_path, capsys):
    import faiss

    from blip2.index.build import remove_images
    from blip2.index.store import Store

    path = tmp_path / "ivf.index"
    feats = synthetic_store(path, 300, 4, 8, faiss="IVF4,Flat", strategy="queries")
    index = Index.open(path)
    centroids = faiss.extract_index_ivf(index.faiss_index()).quantizer.reconstruct_n(0, 4)
    more = torch.nn.functional.normalize(
        torch.randn(1000, 4, 8, generator=torch.Generator().manual_seed(5)), dim=-1
    )
    append(Store.open(path), more, 300)
    assert remove_images(path, ["i0", "i7", "i350"]) == 3
    index = Index.open(path)
    ivf = faiss.extract_index_ivf(index.faiss_index())
    assert np.array_equal(ivf.quantizer.reconstruct_n(0, 4), centroids)  # trained once
    assert ivf.ntotal == 1297 * 4 and ivf.nprobe >= ivf.nlist  # every list probed: exhaustive
    text = torch.nn.functional.normalize(
        torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    assert torch.equal(
        index.itc(text, top_k=10, candidates=10)[0], index.itc(text, top_k=10, candidates=None)[0]
    )
    exact = torch.einsum("iqe,te->tiq", torch.cat([feats, more]), text).amax(dim=-1)  # (T, 1300)
    exact[:, [0, 7, 350]] = -2
    keys = [[index.paths[p] for p in row] for row in index.itc(text, top_k=10, candidates=10)[0].tolist()]
    assert keys == [[f"i{n}" for n in row] for row in exact.topk(10, dim=1).indices.tolist()]
    assert main(["index", "info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["faiss_built_on"] == 300 and "blip2 index rebuild" in info["advice"]
    assert main(["index", "rebuild", str(path)]) == 0
    assert main(["index", "info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["faiss_built_on"] == 1297 and "advice" not in info


def test_the_automatic_inverted_file_above_the_flat_limit(tmp_path):
    """The type a large index gets (`IVF<lists>_HNSW32,SQ8`), built here above a lowered limit: its HNSW
    quantizer explores twice the lists probed, and its candidates keep recall@10 against exact search."""
    import faiss

    path = tmp_path / "big.index"
    topics = torch.nn.functional.normalize(
        torch.randn(40, 32, generator=torch.Generator().manual_seed(2)), dim=-1
    )
    g = torch.Generator().manual_seed(3)
    feats = topics[torch.randint(40, (2000, 8), generator=g)] + 0.1 * torch.randn(2000, 8, 32, generator=g)
    from blip2.index.store import Store

    store = Store.create(path, model="m", fingerprint="f", queries=8, dim=32, flat_limit=1000)
    append(store, torch.nn.functional.normalize(feats, dim=-1), 0)
    index = Index.open(path)
    assert index.factory() == "IVF64_HNSW32,SQ8"  # 16,000 vectors: 64 lists (the power of two <= sqrt)
    ivf = faiss.extract_index_ivf(index.faiss_index())
    assert ivf.nlist == 64 and ivf.nprobe == 32
    assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 64
    text = torch.nn.functional.normalize(topics[:20] + 0.1 * torch.randn(20, 32, generator=g), dim=-1)
    assert recall_at_10(index, text, candidates=100) >= 0.95


def test_build_with_workers_from_a_list_file(retriever, images, tmp_path, capsys):
    """`--workers 2` decodes in loader processes; a `.txt` list names images (relative to the list's folder,
    or absolute; `#` comments)."""
    files = sorted(images.iterdir())
    listing = tmp_path / "lists" / "photos.txt"
    listing.parent.mkdir()
    lines = [
        "# my photos",
        *(os.path.relpath(p, listing.parent) for p in files[:6]),
        "",
        *map(str, files[6:]),
    ]
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "workers.index"
    argv = ["index", "build", str(listing), "--model", retriever, "--out", str(out), "--batch-size", "3"]
    assert main([*argv, "--workers", "2"]) == 0
    assert "12 images embedded" in capsys.readouterr().err
    index = Index.open(out)
    assert index.paths == [str(p.resolve()) for p in files]
    one = blip2.load(retriever).index(str(images), tmp_path / "one.index", batch_size=12)
    expected = stored(one)
    assert all(torch.allclose(v, expected[k], atol=1e-3) for k, v in stored(index).items())


def test_a_second_writer_is_refused_while_one_runs_and_readers_go_on(retriever, images, tmp_path, capsys):
    """A build holds the folder's lock: another `add` or `remove` is refused in one sentence, `info` reads
    what was merged, and the build ends with every image in. The build is held at a named pipe it reads
    as its last image, so it is still running when the second writer starts, however loaded the machine."""
    from PIL import Image

    out = tmp_path / "busy.index"
    gate = tmp_path / "gate.png"
    os.mkfifo(gate)
    (tmp_path / "list.txt").write_text(f"{gate}\n")
    cmd = blip2_command("index", "build", str(images), str(tmp_path / "list.txt"), "--model", retriever,
                        "--out", str(out), "--batch-size", "1")  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    seg_log = out / "segments" / "000000.jsonl"
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if seg_log.exists() and seg_log.read_text().count("\n") == 12:  # the folder's images written
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        for argv in (["index", "add", str(out), str(images)], ["index", "remove", str(out), "x.png"]):
            second = subprocess.run(blip2_command(*argv), capture_output=True, text=True,
                                    timeout=SUBPROCESS_TIMEOUT)  # fmt: skip
            err = second.stderr.strip()
            assert second.returncode == 2 and "\n" not in err and "Traceback" not in err, err
            assert "is being changed by another blip2 process" in err, err
        assert main(["index", "info", str(out), "--json"]) == 0  # a reader: nothing merged yet
        assert json.loads(capsys.readouterr().out)["images"] == 0
        with open(gate, "wb") as f:  # the last image: the build goes on
            Image.new("RGB", (9, 7), (200, 10, 10)).save(f, "PNG")
        assert proc.wait(timeout=SUBPROCESS_TIMEOUT) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    expected = sorted([*(str(p) for p in images.iterdir()), str(gate)])
    assert sorted(Index.open(out).paths) == expected
    assert main(["index", "info", str(out), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["images"] == 13 and facts["unused_rows"] == 0


def test_a_faiss_type_is_checked_and_rebuild_changes_it(retriever, images, tmp_path, capsys):
    out = tmp_path / "typed.index"
    build = ["index", "build", str(images), "--model", retriever, "--out", str(out)]

    def refused(argv: list[str], words: str) -> None:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "Traceback" not in err and "\n" not in err, err

    refused([*build, "--faiss", "NotAType"], "--faiss NotAType is not a FAISS index type")
    assert not out.exists()  # refused before anything was written
    # 12 images x 32 query vectors cannot train 1024 lists: said once the images are in
    refused([*build, "--faiss", "IVF1024,Flat"], "index rebuild")
    search = ["search", "--index", str(out), "a dog", "--candidates", "5"]  # fewer than the images: FAISS
    refused(search, "FAISS cannot build the index type IVF1024,Flat")
    refused(build, "was built with --precision float16 --strategy queries --faiss IVF1024,Flat")
    refused(["index", "rebuild", str(out), "--faiss", "NotAType"], "is not a FAISS index type")
    assert main(["index", "rebuild", str(out), "--faiss", "HNSW8"]) == 0
    assert "HNSW8, 12 images" in capsys.readouterr().err
    assert main(["index", "info", str(out), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["faiss"] == "HNSW8" and facts["images"] == 12
    assert json.loads((out / "index.json").read_text())["faiss"] == "HNSW8"
    assert main([*search, "--top-k", "3", "--json"]) == 0
    assert len(json_lines(capsys.readouterr().out)) == 3


def test_a_build_killed_before_index_json_is_resumed(retriever, images, tmp_path, capsys):
    """`Store.create` writes model.npy before index.json: a folder with only that is a build to redo."""
    out = tmp_path / "half.index"
    out.mkdir()
    (out / "model.npy.tmp").write_bytes(b"\x93NUMPY")  # killed while writing it
    assert main(["index", "build", str(images), "--model", retriever, "--out", str(out)]) == 0
    assert "12 images embedded" in capsys.readouterr().err
    assert len(Index.open(out)) == 12


def test_search_index_exits_1_when_an_image_cannot_be_read_again(retriever, tmp_path, capsys):
    folder = tmp_path / "few"
    paths = uh.make_images(folder, 4)
    out = tmp_path / "few.index"
    assert main(["index", "build", str(folder), "--model", retriever, "--out", str(out)]) == 0
    paths[0].write_bytes(b"no longer an image")
    capsys.readouterr()
    assert main(["search", "--index", str(out), "a dog", "--top-k", "4", "--json"]) == 1
    captured = capsys.readouterr()
    assert len(json_lines(captured.out)) == 4 and str(paths[0]) in captured.err  # ranked by ITC, reported
