"""The command line on tiny checkpoints saved to disk: caption (files, folders, globs, shards, lists;
bad files; resume after SIGKILL; torchrun with 2 processes), ask, match, search, clear errors."""

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
import usage_helpers as uh

from blip2.cli import main
from blip2.data.inputs import Item
from blip2.data.jsonl import ResultsFile
from blip2.errors import UserError
from blip2.pipelines.batch import merge_parts, part_paths

FAST = ["--num-beams", "1", "--max-new-tokens", "4", "--no-progress"]
SUBPROCESS_TIMEOUT = 300  # the machine is shared and loaded: be generous


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> str:
    return str(uh.save_captioner(tmp_path_factory.mktemp("captioner")))


@pytest.fixture(scope="module")
def retriever(tmp_path_factory) -> str:
    return str(uh.save_retriever(tmp_path_factory.mktemp("retriever")))


def read_results(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line must be valid JSON


def blip2_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "blip2.cli", *args]


def test_caption_inputs_of_every_kind(captioner, tmp_path, capsys):
    folder = uh.make_images(tmp_path / "folder" / "sub", 3, prefix="f")
    globbed = uh.make_images(tmp_path / "globbed", 2, prefix="g")
    listed = uh.make_images(tmp_path / "listed", 2, prefix="l")
    (tmp_path / "list.txt").write_text("# images\n" + "\n".join(str(p) for p in listed) + "\nmissing.png\n")
    shard_images = uh.make_images(tmp_path / "shard_src", 2, prefix="s")
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for p in shard_images:
            tar.add(p, arcname=f"{p.stem}.png")
            caption = tmp_path / f"{p.stem}.txt"
            caption.write_text("a caption")
            tar.add(caption, arcname=f"{p.stem}.txt")  # not an image: not captioned
    out = tmp_path / "captions.jsonl"
    argv = ["caption", "--model", captioner, str(tmp_path / "folder"), str(tmp_path / "globbed" / "*.png")]
    argv += [str(tmp_path / "list.txt"), str(tmp_path / "shard-000.tar"), "--out", str(out), *FAST]
    assert main(argv + ["--workers", "1", "--batch-size", "3"]) == 1  # missing.png failed
    records = read_results(out)
    keys = [r["image"] for r in records]
    expected = [str(p) for p in folder + globbed + listed]
    expected += [str(tmp_path / "missing.png")]  # relative to the list file
    expected += [f"{tmp_path / 'shard-000.tar'}#{p.stem}.png" for p in shard_images]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    by_key = {r["image"]: r for r in records}
    assert "not found" in by_key[str(tmp_path / "missing.png")]["error"]
    assert all(r.get("caption") for k, r in by_key.items() if not k.endswith("missing.png"))
    # the command's summary line
    err = capsys.readouterr().err
    assert f"{len(expected)} images" in err and "1 errors" in err
    # a rerun does nothing and writes nothing (and still reports the failed input)
    assert main(argv) == 1
    assert read_results(out) == records
    assert "0 images" in capsys.readouterr().err


def test_caption_to_stdout_and_api_agree(captioner, tmp_path, capsys):
    paths = uh.make_images(tmp_path, 3)
    assert main(["caption", "--model", captioner, *map(str, paths), "--workers", "0", *FAST]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    import blip2

    expected = blip2.load(captioner).caption(paths, num_beams=1, max_new_tokens=4)
    assert [r["caption"] for r in records] == expected


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_caption_decode_mode_gives_the_same_captions(captioner, tmp_path, capsys, monkeypatch, mode):
    from blip2.cli.options import DECODE_MODES
    from blip2.generation.decoding import Decoding

    assert DECODE_MODES == Decoding.MODES  # the command line's copy (it imports no torch) is current
    paths = uh.make_images(tmp_path, 3)
    argv = ["caption", "--model", captioner, *map(str, paths), "--workers", "0", *FAST]
    assert main(argv) == 0
    plain = [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]
    static_calls = []
    real = Decoding._static

    def counted(self, *args, **kwargs):  # the real static-cache path, counted
        static_calls.append(self.mode)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Decoding, "_static", counted)
    assert main([*argv, "--decode-mode", mode]) == 0
    assert [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()] == plain
    assert static_calls and set(static_calls) == {mode}


def test_bad_files_never_kill_the_batch(captioner, tmp_path):
    folder = tmp_path / "mixed"
    good = uh.make_images(folder, 4) + uh.unusual_images(folder)
    bad = uh.bad_files(folder)
    out = tmp_path / "captions.jsonl"
    argv = ["caption", "--model", captioner, str(folder), "--out", str(out), "--workers", "2", *FAST]
    assert main(argv + ["--batch-size", "4"]) == 1  # exit status 1: some inputs failed
    by_key = {r["image"]: r for r in read_results(out)}
    assert len(by_key) == len(good) + len(bad)
    for p in good:
        assert by_key[str(p)].get("caption"), p.name
    for p, word in bad.items():
        error = by_key[str(p)]["error"]
        assert word in error and p.name in error
        assert "Traceback" not in error and "\n" not in error


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_captions_of_an_uninterrupted_run(captioner, tmp_path):
    paths = uh.make_images(tmp_path / "images", 30)
    out = tmp_path / "captions.jsonl"
    settings = ["--batch-size", "1", "--workers", "0", "--num-beams", "2", "--max-new-tokens", "12"]
    cmd = blip2_command("caption", "--model", captioner, str(tmp_path / "images"), *settings)
    proc = subprocess.Popen(cmd + ["--out", str(out)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    done_before = out.read_text().count("\n")
    assert 3 <= done_before < len(paths)
    with open(out, "a") as f:  # a write torn by the kill: half a line, no newline
        f.write('{"image": "' + str(paths[-1])[:10])
    subprocess.run(cmd + ["--out", str(out)], check=True, timeout=SUBPROCESS_TIMEOUT, capture_output=True)
    records = read_results(out)
    assert sorted(r["image"] for r in records) == sorted(map(str, paths))  # each exactly once
    # the same captions as one run that was never interrupted, with the same settings
    whole = tmp_path / "uninterrupted.jsonl"
    subprocess.run(cmd + ["--out", str(whole)], check=True, timeout=SUBPROCESS_TIMEOUT, capture_output=True)
    expected = {r["image"]: r["caption"] for r in read_results(whole)}
    assert {r["image"]: r.get("caption") for r in records} == expected


def test_torchrun_two_processes_merge_into_one_file(captioner, tmp_path):
    paths = uh.make_images(tmp_path / "images", 13)
    out = tmp_path / "captions.jsonl"
    done = {"image": str(paths[0]), "caption": "done before"}
    out.write_text(json.dumps(done) + "\n")  # a resumed run: this one is not captioned again
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "blip2.cli", "caption", "--model", captioner, str(tmp_path / "images")]
    cmd += ["--out", str(out), "--workers", "1", "--batch-size", "2", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, timeout=SUBPROCESS_TIMEOUT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_results(out)
    assert [r["image"] for r in records].count(str(paths[0])) == 1 and records[0] == done
    assert sorted(r["image"] for r in records) == sorted(map(str, paths))
    assert all(r.get("caption") for r in records)
    assert not part_paths(out)  # the ranks' parts were merged and removed
    assert "rank 0 of 2" in result.stderr


def test_merge_skips_lines_already_merged(tmp_path):
    """A crash during a merge leaves parts and a half-merged file: the next merge adds only the rest."""
    items = [Item(f"k{i}", f"k{i}") for i in range(4)]
    out = tmp_path / "c.jsonl"
    out.write_text(json.dumps({"image": "k1", "caption": "one"}) + "\n")
    Path(f"{out}.part-0").write_text(
        "".join(json.dumps({"image": k, "caption": k}) + "\n" for k in ("k1", "k3"))
    )
    Path(f"{out}.part-1").write_text(json.dumps({"image": "k0", "error": "bad"}) + '\n{"image": "k2"')
    assert merge_parts(out, items) == 2
    assert [r["image"] for r in read_results(out)] == ["k1", "k0", "k3"]  # input order after the old lines
    assert not part_paths(out)


def test_results_file_repairs_only_results_files(tmp_path):
    """A torn results line is cut; any other existing file is refused and left byte for byte."""
    good = tmp_path / "c.jsonl"
    good.write_text(json.dumps({"image": "k0", "caption": "a"}) + '\n{"image": "k1", "cap')
    assert ResultsFile(good).done == {"k0"}
    assert good.read_text() == json.dumps({"image": "k0", "caption": "a"}) + "\n"
    others = {
        "notes.txt": b"first line\nlast line without newline",
        "notes2.txt": b"first line\nsecond line\n",
        "img.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\n\x00\x01\x02",
        "torn.jsonl": json.dumps({"image": "k0"}).encode() + b"\nnot a record",
        "list.jsonl": b'{"image": "k0"}\n[1, 2]\n',
    }
    for name, data in others.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(UserError, match="not a blip2 results file"):
            ResultsFile(path)
        assert path.read_bytes() == data, name


def test_ask_match_search(captioner, retriever, tmp_path, capsys):
    paths = uh.make_images(tmp_path, 4)
    assert main(["ask", "--model", captioner, str(paths[0]), "what is it ?", "what is the sky ?"]) == 0
    answers = capsys.readouterr().out.splitlines()
    import blip2

    pipe = blip2.load(captioner)
    assert answers == pipe.ask([paths[0]] * 2, ["what is it ?", "what is the sky ?"])
    assert (
        main(["ask", "--model", captioner, str(paths[0]), "what is it ?", "--stream", "--num-beams", "1"])
        == 0
    )
    assert capsys.readouterr().out.strip() == pipe.ask(paths[0], "what is it ?", num_beams=1)

    assert main(["match", "--model", retriever, str(paths[0]), "a dog", "two cats", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["a dog", "two cats"]
    assert all(0 < r["itm"] < 1 and -1 <= r["itc"] <= 1 for r in rows)

    (tmp_path / "broken.png").write_bytes(b"nope")
    search = ["search", "--model", retriever, "a dog", str(tmp_path), "--top-k", "3", "--rerank", "2"]
    assert main([*search, "--json"]) == 1  # broken.png was left out
    captured = capsys.readouterr()
    hits = [json.loads(line) for line in captured.out.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["score"] >= hits[1]["score"] and hits[2]["itm"] is None and hits[2]["score"] is None
    assert "broken.png is not an image file" in captured.err
    ranked = blip2.load(retriever).search(paths, "a dog", top_k=3, rerank=2)
    assert [h["image"] for h in hits] == [str(paths[h.index]) for h in ranked]


def test_user_errors_are_one_sentence(captioner, retriever, tmp_path, capsys):
    image = uh.make_images(tmp_path, 1)[0]
    cases = [
        (["caption", "--model", str(tmp_path / "nowhere"), str(image)], "does not exist"),
        (["caption", "--model", retriever, str(image)], "needs a stage-2 (generative) checkpoint"),
        (["match", "--model", captioner, str(image), "a dog"], "needs a stage-1 (retrieval) checkpoint"),
        (["caption", "--model", captioner, str(tmp_path / "*.gif")], "no file matches"),
        (["ask", "--model", captioner, str(tmp_path / "x.png"), "what ?"], "not found"),
        (["ask", "--model", captioner, str(image), " "], "empty"),
    ]
    cases.append(
        (["caption", "--model", captioner, str(image), "--num-beams", "0"], "num_beams must be 1 or more")
    )
    sampling = ["--do-sample", "--temperature", "0"]
    cases.append(
        (["ask", "--model", captioner, str(image), "what ?", *sampling], "temperature must be more than 0")
    )
    cases.append(
        (["caption", "--model", captioner, str(image), "--min-new-tokens", "40"], "must not be more than")
    )
    notes = tmp_path / "notes.txt"
    notes.write_text("keep\nthis last line")
    cases.append(
        (["caption", "--model", captioner, str(image), "--out", str(notes)], "not a blip2 results file")
    )
    (tmp_path / "broken_model").mkdir()
    (tmp_path / "broken_model" / "config.json").write_text("{not json")
    cases.append((["caption", "--model", str(tmp_path / "broken_model"), str(image)], "could not load"))
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and "Traceback" not in err and "\n" not in err, err
    assert notes.read_text() == "keep\nthis last line"


@pytest.mark.slow
def test_torchrun_every_rank_says_rank_0s_refusal_of_the_results_file(captioner, tmp_path):
    """Rank 0 alone prepares the results file; when it refuses it (here a folder), every rank must stop
    with that sentence. Before, rank 0 exited and rank 1 waited for it in a barrier."""
    uh.make_images(tmp_path / "images", 2)
    out = tmp_path / "a-folder"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "blip2.cli", "caption", "--model", captioner, str(tmp_path / "images")]
    cmd += ["--out", str(out), "--workers", "0", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, timeout=SUBPROCESS_TIMEOUT, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    sentence = f"error: {out} is a folder: give --out a file name such as captions.jsonl"
    assert result.stderr.count(sentence) == 2, result.stderr[-3000:]  # (the ranks' lines may interleave)


def test_instructblip_from_the_command_line(tmp_path, capsys):
    """`blip2 ask` and `blip2 caption` on an InstructBLIP folder answer as its Python API does (the
    question is also the Q-Former's instruction)."""
    import eval_fixtures as fx

    import blip2

    folder = str(fx.instruct_folder(tmp_path / "instruct"))
    pipe = blip2.load(folder)
    paths = uh.make_images(tmp_path / "images", 2)
    questions = ["what is the sky ?", "what is red ?"]
    assert main(["ask", "--model", folder, str(paths[0]), *questions, "--num-beams", "1"]) == 0
    answers = capsys.readouterr().out.splitlines()
    assert answers == pipe.ask([paths[0]] * 2, questions, num_beams=1)
    assert len(set(answers)) == 2  # each question reached the model
    out = tmp_path / "captions.jsonl"
    assert main(["caption", "--model", folder, *map(str, paths), "--out", str(out), *FAST]) == 0
    rows = read_results(out)
    assert [r["caption"] for r in rows] == pipe.caption(paths, num_beams=1, max_new_tokens=4)
