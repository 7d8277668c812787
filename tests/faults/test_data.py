"""Data faults at scale, injected through the real entry points (the CLI, `train(cfg)`, torchrun):
feature-cache keys of two img2dataset folders, the cache written into the data folder, resume on
another world size, shards by URL and `pipe:` command."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import shutil
import sys
import tarfile
import threading

import pytest
import torch
from train_utils import blip2_cli, caption, image_bytes, make_caption_json, make_shards, torchrun

from blip2.data.features import FeatureStore
from blip2.errors import UserError
from blip2.train import checkpoint
from blip2.train.config import load_config
from blip2.train.feature_cache import cache_features
from blip2.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY1 = os.path.join(ROOT, "configs", "tiny-stage1.yaml")
RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_runs.py")
NO_DROPOUT = ["model.overrides.qformer.dropout=0.0", "model.overrides.qformer.attention_dropout=0.0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _img2dataset(folder: str, first_image: int, shards: int = 2, per_shard: int = 8) -> str:
    """img2dataset-style shards `00000.tar ...` with keys `000000000 ...` (the same in every folder);
    the images and captions are those of numbers `first_image + n` (different per folder)."""
    os.makedirs(folder, exist_ok=True)
    n = 0
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for _ in range(per_shard):
                for ext, data in (
                    ("jpg", image_bytes(first_image + n)),
                    ("txt", caption(first_image + n).encode()),
                ):
                    info = tarfile.TarInfo(f"{n:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
    return os.path.join(folder, "{00000.." + f"{shards - 1:05d}" + "}.tar")


def _shard_overrides(pattern: str, out, *extra: str) -> list[str]:
    return [
        f"data.path={pattern}",
        f"train.output_dir={out}",
        "data.augment=false",
        "train.save_every=0",
        "train.save_final=false",
        "train.log_every=1",
        *extra,
    ]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.find(str(run_dir)))[0]


def _losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [m["loss"] for m in map(json.loads, f) if "loss" in m]


def _one_sentence(p) -> str:
    """The error line of a CLI run that failed as a user error (exit 2, no traceback)."""
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = re.findall(r"error: [^\r\n]*", p.stderr)  # (a progress bar may share its line)
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------- item 2: cache keys


@pytest.mark.slow
def test_cache_of_two_folders_with_equal_shard_names_and_keys_trains_like_the_images(tmp_path):
    a = _img2dataset(str(tmp_path / "a"), first_image=0)
    b = _img2dataset(str(tmp_path / "b"), first_image=100)
    both = f"{a}::{b}"
    cache = tmp_path / "cache"
    over = _shard_overrides(both, tmp_path / "images", "train.max_steps=6", *NO_DROPOUT)
    p = blip2_cli(["cache-features", TINY1, *over, "--out", str(cache), "--num-workers", "0"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "cached 32 images" in p.stdout  # 16 per folder, none overwriting another
    assert len(FeatureStore(str(cache))) == 32

    train(load_config(TINY1, over))
    cached = _shard_overrides(
        both, tmp_path / "cached", "train.max_steps=6", f"data.features={cache}", *NO_DROPOUT
    )
    keys: list[str] = []
    train(load_config(TINY1, cached), hooks=[lambda s: keys.extend(s.keys)])
    assert {k.split("/")[0] for k in keys} == {"a", "b"}  # samples of both folders, told apart
    la, lb = _losses(tmp_path / "images"), _losses(tmp_path / "cached")
    assert len(la) == 6
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)
    wa, wb = _weights(tmp_path / "images"), _weights(tmp_path / "cached")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)

    # a cache of folder a only does not cover b's records: training refuses (one sentence)
    only_a = tmp_path / "cache_a"
    cache_features(load_config(TINY1, _shard_overrides(a, tmp_path / "x")), str(only_a), num_workers=0)
    p = blip2_cli(["train", TINY1, *_shard_overrides(both, tmp_path / "refused", f"data.features={only_a}")])
    line = _one_sentence(p)
    assert "has no features for image b/0000" in line and "cache-features" in line
    # and a cache made from other data (folder b's images replaced, same names and keys) is refused too
    _img2dataset(str(tmp_path / "b"), first_image=200)
    with pytest.raises(UserError, match="made from other data"):
        train(load_config(TINY1, _shard_overrides(both, tmp_path / "other", f"data.features={cache}")))


# ---------------------------------------------------------------------------------- item 3: cache --out


def _snapshot(folder) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_cache_into_the_data_folder_deletes_nothing_and_reruns_over_its_own_output(tmp_path):
    data = tmp_path / "data"
    make_shards(str(data), shards=2, per_shard=4)
    for s in range(2):  # shards named like the cache's own parts used to be
        os.rename(data / f"{s:05d}.tar", data / f"part-{s:05d}.tar")
    (data / "meta.json").write_text('{"source": "the user\'s own file"}')
    pattern = str(data / "part-{00000..00001}.tar")
    before = _snapshot(data)

    p = blip2_cli(["cache-features", TINY1, f"data.path={pattern}", "--out", str(data), "--num-workers", "0"])
    line = _one_sentence(p)
    assert "did not write" in line and "part-00000.tar" in line
    assert _snapshot(data) == before  # nothing deleted, nothing changed, nothing added

    cfg = load_config(TINY1, [f"data.path={pattern}"])
    cache = tmp_path / "cache"
    assert cache_features(cfg, str(cache), batch_size=3, part_size=3, num_workers=0)["images"] == 8
    first = set(os.listdir(cache))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and set(manifest["files"]) | {"manifest.json"} == first
    # a rerun over its own output replaces it (fewer parts now: the old extra parts go, nothing stale)
    assert cache_features(cfg, str(cache), batch_size=8, part_size=8, num_workers=0)["images"] == 8
    assert len(FeatureStore(str(cache))) == 8
    assert not [n for n in os.listdir(cache) if n.startswith("part-r000-00001")]
    # a rerun after an interrupted one (its manifest unfinished, a part and a temporary file left over)
    (cache / "manifest.json").write_text(json.dumps({"written_by": "blip2 cache-features", "files": []}))
    (cache / "part-r001-00007.npy.tmp").write_bytes(b"half")
    assert cache_features(cfg, str(cache), num_workers=0)["images"] == 8
    assert "part-r001-00007.npy.tmp" not in os.listdir(cache)
    # a file of the user's in the cache folder: refused, kept
    (cache / "notes.txt").write_text("mine")
    p = blip2_cli(["cache-features", TINY1, f"data.path={pattern}", "--out", str(cache)])
    assert "notes.txt" in _one_sentence(p)
    assert (cache / "notes.txt").read_text() == "mine" and len(FeatureStore(str(cache))) == 8


# ------------------------------------------------------------------------ item 4: resume on 1 rank after 2


def _json_overrides(ann, root, out, *extra) -> list[str]:
    return [
        "data.kind=captions",
        f"data.path={ann}",
        f"data.images={root}",
        f"train.output_dir={out}",
        "train.save_every=0",
        "train.save_final=false",
        "train.log_every=1",
        "optim.warmup_steps=0",
        *NO_DROPOUT,
        *extra,
    ]


def _run_keys(cfg, **kw) -> list[str]:
    keys: list[str] = []
    train(cfg, hooks=[lambda s: keys.extend(s.keys)], **kw)
    return keys


@pytest.mark.slow
def test_json_resume_on_one_rank_after_two_continues_at_the_global_sample(tmp_path):
    ann, root = make_caption_json(str(tmp_path / "data"), n=16)  # one epoch: 4 global batches of 4
    two = tmp_path / "two"
    p = torchrun(
        [RUNS, TINY1, str(tmp_path / "keys"), "--stop-after", "3"]
        + _json_overrides(ann, root, two, "train.batch_size=2", "train.max_steps=6"),
        nproc=2,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"keys.rank{r}.json")) for r in (0, 1)]
    first = [k for (_, k0), (_, k1) in zip(*ranks, strict=True) for k in k0 + k1]  # global batches in order
    assert len(first) == 12

    # 1 rank, the same per-rank batch (a global batch of 2 instead of 4): it goes on at sample 12 of the
    # epoch, exactly where one process with batch 2 would be after 6 steps
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    rest = _run_keys(
        load_config(TINY1, _json_overrides(ann, root, resumed, "train.batch_size=2", "train.max_steps=7")),
        resume="auto",
    )
    alone = _run_keys(
        load_config(
            TINY1, _json_overrides(ann, root, tmp_path / "alone", "train.batch_size=2", "train.max_steps=10")
        )
    )
    assert first + rest == alone  # the same samples in the same order: none twice, none missed
    assert len(set(alone[:16])) == 16  # (the oracle itself sees each sample once per epoch)

    # 1 rank, the same global batch: the whole run equals one uninterrupted process (weights too)
    same = tmp_path / "same"
    shutil.copytree(two, same)
    rest4 = _run_keys(
        load_config(TINY1, _json_overrides(ann, root, same, "train.batch_size=4", "train.max_steps=6")),
        resume="auto",
    )
    one = _run_keys(
        load_config(
            TINY1, _json_overrides(ann, root, tmp_path / "one", "train.batch_size=4", "train.max_steps=6")
        )
    )
    assert first + rest4 == one
    # the losses match; the weights within what Adam makes of float noise (gradients summed over 2 ranks
    # in another order; parameters with almost no gradient move by up to ~lr x noise/eps): 1e-4 against
    # a movement of ~6e-3 in 6 steps of lr 1e-3
    torch.testing.assert_close(
        torch.tensor(_losses(same)), torch.tensor(_losses(tmp_path / "one")), rtol=1e-5, atol=0
    )
    wa, wb = _weights(tmp_path / "one"), _weights(same)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-4, msg=name)


# ------------------------------------------------------------------------ item 8: shards by URL and pipe:


class _Server:
    """`http.server` on 127.0.0.1 serving a folder, in a thread."""

    def __init__(self, folder: str):
        handler = functools.partial(_QuietHandler, directory=folder)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    s = _Server(str(tmp_path / "shards"))
    yield s
    s.close()


def _remote(server, folder) -> str:
    """Shards 0-1 by URL, 2-3 by `pipe:cat`: the same files as `folder/{00000..00003}.tar`."""
    return f"{server.url}/{{00000..00001}}.tar::pipe:cat {folder}/{{00002..00003}}.tar"


@pytest.mark.slow
def test_url_and_pipe_shards_train_like_local_files_and_resume(tmp_path, server):
    local = make_shards(str(tmp_path / "shards"), shards=4, per_shard=8)
    folder = str(tmp_path / "shards")
    remote = _remote(server, folder)
    extra = ("train.max_steps=6", "data.shuffle_shards=2")
    p = blip2_cli(["train", TINY1, *_shard_overrides(remote, tmp_path / "remote", *extra)])
    assert p.returncode == 0, p.stderr[-3000:]
    train(load_config(TINY1, _shard_overrides(local, tmp_path / "local", *extra)))
    wa, wb = _weights(tmp_path / "local"), _weights(tmp_path / "remote")
    for name in wa:
        assert torch.equal(wb[name], wa[name]), name  # the same samples, order and augmentation

    # stopped mid-group and resumed: the group's shards are read again and the used samples skipped
    cfg = load_config(TINY1, _shard_overrides(remote, tmp_path / "split", *extra))
    train(cfg, stop_after=3)
    assert checkpoint.load(checkpoint.find(str(tmp_path / "split")))[1]["positions"][0]["streams"]["0"][2] > 0
    train(cfg, resume="auto")
    for name, w in _weights(tmp_path / "split").items():
        assert torch.equal(w, wa[name]), name

    # unshuffled remote shards are streamed sample by sample; resume skips what was used
    plain = ("train.max_steps=5", "data.shuffle=false")
    whole = _run_keys(load_config(TINY1, _shard_overrides(remote, tmp_path / "p1", *plain)))
    cfg = load_config(TINY1, _shard_overrides(remote, tmp_path / "p2", *plain))
    assert _run_keys(cfg, stop_after=2) + _run_keys(cfg, resume="auto") == whole
    assert whole[:8] == [f"{server.url}/00000/{i:09d}" for i in range(8)]  # file order, unshuffled


def test_a_failing_command_or_unreachable_url_is_one_sentence_and_a_cut_shard_is_skipped(tmp_path, server):
    make_shards(str(tmp_path / "shards"), shards=2, per_shard=8)
    folder = tmp_path / "shards"
    missing = f"pipe:cat {folder}/nothing.tar::{server.url}/00000.tar"
    p = blip2_cli(["train", TINY1, *_shard_overrides(missing, tmp_path / "r1", "data.num_workers=2")])
    line = _one_sentence(p)  # raised in a DataLoader worker, still one sentence
    assert "pipe:cat" in line and "nothing.tar" in line and "exited with status 1" in line

    for url, said in (
        (f"{server.url}/00009.tar", "HTTP 404"),
        ("http://127.0.0.1:9/00000.tar", "cannot reach"),
    ):
        with pytest.raises(UserError, match=said):
            train(load_config(TINY1, _shard_overrides(f"{url}::{server.url}/00000.tar", tmp_path / "r2")))

    # a shard cut off mid-way (the download or command stops early) keeps its first samples: skipped,
    # counted, never fatal
    size = os.path.getsize(folder / "00001.tar")
    cut = f"{server.url}/00000.tar::pipe:head -c {size // 2} {folder}/00001.tar"
    keys: list[str] = []
    result = train(
        load_config(TINY1, _shard_overrides(cut, tmp_path / "r3", "train.max_steps=6", "data.shuffle=false")),
        hooks=[lambda s: keys.extend(s.keys)],
    )
    assert result.steps == 6 and result.skipped.get("shard", 0) >= 1
    kept = {k for k in keys if k.startswith("pipe:head")}  # the samples before the cut
    assert 0 < len(kept) < 8


@pytest.mark.slow
def test_two_ranks_on_url_and_pipe_shards_and_no_shard_resume_on_another_world_size(tmp_path, server):
    make_shards(str(tmp_path / "shards"), shards=4, per_shard=8)
    remote = _remote(server, str(tmp_path / "shards"))
    run = tmp_path / "two"
    p = torchrun(
        [RUNS, TINY1, str(tmp_path / "keys"), "--stop-after", "2"]
        + _shard_overrides(remote, run, "train.max_steps=6", "data.shuffle_shards=2"),
        nproc=2,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"keys.rank{r}.json")) for r in (0, 1)]
    seen = [k for r in ranks for _, keys in r for k in keys]
    assert len(seen) == len(set(seen)) == 2 * 2 * 4  # each rank its own shards, 2 steps of 4
    p = blip2_cli(["train", TINY1, *_shard_overrides(remote, run, "train.max_steps=6"), "--resume", "auto"])
    line = _one_sentence(p)
    assert "2 ranks" in line and "same world size" in line


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x"]))


def test_training_from_a_cache_whose_image_folder_moved_is_one_sentence(tmp_path):
    """The cache is keyed by the images' bytes, so training from it still reads the images: a moved
    image folder is refused up front. Before, every record was skipped as an unreadable image and the
    run died with a misleading "records in a row could not be used"."""
    ann, root = make_caption_json(str(tmp_path / "data"), n=8)
    data = ["data.kind=captions", f"data.path={ann}", "data.augment=false"]
    cfg = load_config(TINY1, [*data, f"data.images={root}", "train.max_steps=1"])
    cache_features(cfg, str(tmp_path / "cache"), batch_size=8, num_workers=0)
    shutil.move(root, str(tmp_path / "moved"))
    p = blip2_cli(
        ["train", TINY1, *data, f"data.images={root}", f"data.features={tmp_path / 'cache'}"]
        + ["train.max_steps=1", f"train.output_dir={tmp_path / 'run'}"]
    )
    line = _one_sentence(p)
    assert f"the image folder {root} does not exist" in line
    assert "keyed by the images' bytes" in line and "data.images" in line
