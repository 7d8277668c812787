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
