"""Faults of the command line, injected through `blip2 ...` (in-process `main` or a subprocess): help and
version without torch, `--threads` and the OpenMP wait policy, exit codes, devices a machine lacks,
file names that are not UTF-8, caption resume with other settings (`--retry-errors`, `--overwrite`),
search ranked by the shared ITM + ITC score, the shipped configs offline, and small usage errors that
must be one sentence."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import train_utils as tu
import usage_helpers as uh

import blip2
from blip2.cli import main
from blip2.errors import UserError
from blip2.eval.metrics import rerank_rows

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--num-beams", "1", "--max-new-tokens", "4", "--no-progress", "--workers", "0"]
TIMEOUT = 300  # the machine is shared and loaded


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> str:
    return str(uh.save_captioner(tmp_path_factory.mktemp("captioner")))


@pytest.fixture(scope="module")
def retriever(tmp_path_factory) -> str:
    return str(uh.save_retriever(tmp_path_factory.mktemp("retriever")))


def blip2_run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = TIMEOUT):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "blip2.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=full_env,
    )


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`blip2 ARGV` in this process (the console script's `main`): (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_sentence(stderr: str) -> str:
    """The error line of a failed command; asserts it is the only thing said (progress bars aside)."""
    lines = [ln.rsplit("it/s]", 1)[-1] for ln in stderr.replace("\r", "\n").splitlines()]  # no bars
    lines = [ln for ln in lines if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------ item 20: help, version


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys, time\n"
        "from blip2.cli import main\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "print('seconds', time.perf_counter() - start)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert "exit codes" in result.stdout and "--threads" in result.stdout and "--version" in result.stdout
    assert out[-1] == "False False"
    assert float(out[-2].split()[1]) < 1.0
    version = blip2_run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"blip2 {blip2.__version__}"


# ------------------------------------------------------------------------------ item 23: threads


def test_threads_option_and_short_spin_wait_policy():
    code = (
        "import os, sys\n"
        "from blip2.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "import torch\n"
        "e = os.environ\n"
        "print(rc, e.get('OMP_WAIT_POLICY', '-'), e.get('GOMP_SPINCOUNT', '-'), torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_NUM_THREADS"] = "2"

    def run(*argv: str, **extra: str) -> list[str]:
        r = subprocess.run(
            [sys.executable, "-c", code, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, **extra},
        )
        return r.stdout.splitlines()[-1].split()

    assert run("--threads", "1", "presets") == ["0", "-", "1000", "1"]
    # the user's choice wins: a wait policy or a spin count of their own is left alone
    assert run("presets", "--threads", "1", OMP_WAIT_POLICY="ACTIVE") == ["0", "ACTIVE", "-", "1"]
    assert run("presets", GOMP_SPINCOUNT="0") == ["0", "-", "0", "2"]
    assert run("presets") == ["0", "-", "1000", "2"]  # no --threads: torch's own count
    bad = blip2_run("--threads", "0", "presets")
    assert bad.returncode == 2 and "--threads must be 1 or more" in one_sentence(bad.stderr)


# ------------------------------------------------------------------------------ item 13: devices


def test_devices_this_machine_lacks_are_one_sentence(captioner, tmp_path, capsys):
    image = str(uh.make_images(tmp_path / "img", 1)[0])
    cases = [("tpu", "unknown device 'tpu'"), ("cuda:99", "cuda")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "CUDA"))
    for device, words in cases:
        code, _, err = cli(capsys, "caption", "--model", captioner, image, "--device", device, *FAST)
        assert code == 2 and words in one_sentence(err)
        with pytest.raises(UserError, match="device"):
            blip2.load(captioner, device=device)
    # train.device
    data, images = tu.make_caption_json(str(tmp_path / "data"), n=4)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        "task: stage1\nmodel:\n  preset: tiny-stage1\n"
        f"data:\n  kind: captions\n  path: {data}\n  images: {images}\n  num_workers: 0\n"
        f"train:\n  output_dir: {tmp_path / 'out'}\n  batch_size: 2\n  max_steps: 1\n"
    )
    for device, words in cases[:1] + cases[-1:]:
        code, _, err = cli(capsys, "train", str(cfg), f"train.device={device}")
        assert code == 2 and words in one_sentence(err)


# ------------------------------------------------------------------------------ item 14: file names


@pytest.mark.skipif(sys.platform != "linux", reason="names that are not UTF-8 are a Linux (POSIX) thing")
def test_file_name_that_is_not_utf8_is_kept_and_resumed(captioner, tmp_path, capsys):
    folder = tmp_path / "images"
    good = uh.make_images(folder, 2)
    raw = os.fsencode(folder) + b"/caf\xe9.png"  # Latin-1 e-acute: not valid UTF-8
    os.rename(os.fsencode(good[0]), raw)
    out = tmp_path / "captions.jsonl"
    argv = ["caption", "--model", captioner, str(folder), "--out", str(out), *FAST]
    assert cli(capsys, *argv)[0] == 0
    text = out.read_bytes().decode("utf-8")  # the results file stays valid UTF-8
    records = [json.loads(line) for line in text.splitlines()]
    assert sorted(os.fsencode(r["image"]) for r in records) == sorted([raw, os.fsencode(good[1])])
    assert all(r.get("caption") for r in records)
    code, _, err = cli(capsys, *argv)
    assert code == 0 and "0 captioned" in err and "2 already done" in err
    assert out.read_bytes().decode("utf-8") == text  # nothing new, nothing lost


# ------------------------------------------------------------------------------ items 18, 20: resume


def test_caption_retry_errors_overwrite_and_settings(captioner, tmp_path, capsys):
    folder = tmp_path / "images"
    uh.make_images(folder, 2)
    late = folder / "late.png"
    late.write_bytes(b"not yet an image")
    out = tmp_path / "captions.jsonl"
    base = ["caption", "--model", captioner, str(folder)]
    argv = [*base, "--out", str(out), *FAST]

    assert cli(capsys, *argv)[0] == 1  # some inputs failed
    assert "error" in {r["image"]: r for r in read_results(out)}[str(late)]
    uh.make_images(tmp_path / "fixed", 1, seed=4)[0].rename(late)  # the file is repaired
    code, _, err = cli(capsys, *argv)
    assert code == 1 and "--retry-errors" in err  # errors still count as done
    before = read_results(out)
    assert cli(capsys, *argv, "--retry-errors")[0] == 0
    after = read_results(out)
    assert sorted(r["image"] for r in after) == sorted(r["image"] for r in before)  # once each
    assert {r["image"]: r for r in after}[str(late)].get("caption")
    assert [r for r in after if r["image"] != str(late)] == [r for r in before if r["image"] != str(late)]

    kept = out.read_bytes()
    for other in (["--num-beams", "2"], ["--prompt", "a photo of"]):
        code, _, err = cli(capsys, *argv, *other)
        assert code == 2 and "other generation settings" in one_sentence(err)
        assert out.read_bytes() == kept
    beams = ["--num-beams", "2", "--max-new-tokens", "6"]
    assert cli(capsys, *argv, *beams, "--overwrite")[0] == 0
    fresh = tmp_path / "fresh.jsonl"
    assert cli(capsys, *base, "--out", str(fresh), *FAST, *beams)[0] == 0
    assert sorted(map(json.dumps, read_results(out))) == sorted(map(json.dumps, read_results(fresh)))


# ------------------------------------------------------------------------------ item 17: search


def test_search_ranks_by_the_score_eval_uses(retriever, tmp_path):
    paths = uh.make_images(tmp_path / "images", 8)
    query = "a dog"
    pipe = blip2.load(retriever)
    # the oracle: evaluation's re-ranking (ITM positive logit + ITC cosine) of this one query
    sims = pipe.similarity(paths, [query]).T  # (1, N)
    emb = pipe.model.encode_image(pipe.pixels(paths))
    ids, mask = pipe._text([query] * len(paths))
    with torch.no_grad():
        logits = pipe.model.itm_logits(ids, mask, image_embeds=emb).float()
    scores = rerank_rows(sims, lambda _, c: logits[c, 1], [0], k=len(paths))[0]
    expected = scores.argsort(descending=True).tolist()
    by_itm_alone = logits.softmax(-1)[:, 1].argsort(descending=True).tolist()
    assert expected[0] != by_itm_alone[0]  # a case where ITM alone ranks differently

    argv = ["search", "--model", retriever, query, str(tmp_path / "images"), "--json"]
    result = blip2_run(*argv, "--rerank", str(len(paths)), "--top-k", str(len(paths)))
    assert result.returncode == 0, result.stderr[-3000:]
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    got = [paths.index(Path(h["image"])) for h in hits]
    assert got[:3] == expected[:3]
    for h, i in zip(hits, got, strict=True):
        assert h["score"] == pytest.approx(float(scores[i]), abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # the library's search agrees
    assert [h.index for h in pipe.search(paths, query, top_k=3, rerank=len(paths))] == expected[:3]


# ------------------------------------------------------------------------------ item 21: small ones


def test_small_usage_errors_are_one_sentence(captioner, retriever, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "images"
    image = uh.make_images(images, 2)[0]
    (images / "broken.png").write_bytes(b"nope")  # embedding the folder would report it
    cases: list[tuple[list[str], str]] = [
        (["search", "--model", retriever, "a dog", str(images), "--top-k", "0"], "--top-k must be 1 or more"),
        (["search", "--model", retriever, "  ", str(images)], "the query is empty"),
    ]
    demo_file = tmp_path / "report.txt"
    demo_file.write_text("keep")
    cases.append((["demo", "--quick", "--out", str(demo_file)], f"--out {demo_file} is a file"))
    cases.append((["serve", "--model", captioner, "--port", "70000"], "--port must be between 1 and 65535"))
    lavis_file = tmp_path / "mine.pth"
    torch.save({"model": {"temp": torch.ones(())}}, lavis_file)
    cases.append((["caption", "--model", str(lavis_file), str(image)], "--preset"))
    (tmp_path / "runs").mkdir()
    cases.append((["caption", "--model", "runs/final", str(image)], "runs/final does not exist"))
    cases.append((["convert", captioner, captioner], "would overwrite the source"))
    data, _ = tu.make_caption_json(str(tmp_path / "data"), n=4)
    wrong = tmp_path / "data" / "wrong"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        "task: stage1\nmodel:\n  preset: tiny-stage1\n"
        f"data:\n  kind: captions\n  path: {data}\n  images: {wrong}\n  num_workers: 1\n"
        f"train:\n  output_dir: {tmp_path / 'out'}\n  batch_size: 2\n  max_steps: 1\n  device: cpu\n"
    )
    cases.append((["train", str(cfg)], f"{wrong} does not exist"))
    model_files = {p: p.read_bytes() for p in Path(captioner).iterdir() if p.is_file()}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases.append((["serve", "--model", captioner, "--port", str(port)], f"port {port}"))
        for argv, words in cases:
            code, _, err = cli(capsys, *argv)
            assert code == 2, (argv, err[-2000:])
            assert words in one_sentence(err), argv
    assert demo_file.read_text() == "keep"
    assert {p: p.read_bytes() for p in Path(captioner).iterdir() if p.is_file()} == model_files
    # an existing image folder without the images: the error names the file it looked for (the
    # samples are read by a loader worker, whose traceback must not leak into the sentence)
    wrong.mkdir()
    result = blip2_run("train", str(cfg))
    assert result.returncode == 2 and str(wrong / "im00") in one_sentence(result.stderr)


def test_a_hub_id_beside_a_folder_named_like_its_owner_still_reaches_the_hub(captioner, tmp_path):
    """`acme/captioner` (as `Salesforce/blip2-opt-2.7b`) run from a folder that holds an `acme/` folder:
    still the hub id (served here offline from a hub cache holding the tiny captioner under that id; a
    Salesforce id would bring that model's conventions); `runs/final` beside `runs/`, in no cache, is a
    missing path; `./acme/captioner` is a path, never a hub id."""
    hf = tmp_path / "hf"
    repo, commit = hf / "hub" / "models--acme--captioner", "0123456789" * 4
    shutil.copytree(captioner, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    work = tmp_path / "work"
    (work / "acme").mkdir(parents=True)
    (work / "runs").mkdir()
    image = str(uh.make_images(work / "images", 1)[0])
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf)}
    run = blip2_run("caption", "--model", "acme/captioner", image, cwd=work, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip(), run.stderr[-3000:]
    run = blip2_run("caption", "--model", "runs/final", image, cwd=work, env=env)
    assert run.returncode == 2 and one_sentence(run.stderr) == (
        "error: runs/final does not exist (runs/ holds no final), nor is it in the local Hugging Face cache "
        "(offline mode is on): check the path, or download the model once while online"
    )
    run = blip2_run("caption", "--model", "./acme/captioner", image, cwd=work, env=env)
    assert run.returncode == 2 and one_sentence(run.stderr) == (
        "error: ./acme/captioner does not exist: pass an existing folder or checkpoint file, or a hub id"
    )


# ------------------------------------------------------------------------------ item 19: configs


@pytest.mark.slow
def test_every_shipped_config_runs_offline_or_says_what_it_needs(tmp_path):
    """Each configs/*.yaml, one step, offline with an empty hub cache, from a folder holding only the
    tiny shards: it trains, or it exits 2 with one sentence, quickly."""
    tu.make_shards(str(tmp_path / "data" / "tiny"), shards=4, per_shard=4)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 8
    # tiny-stage1 first: tiny-stage2 starts from its final model
    configs.sort(key=lambda p: p.stem != "tiny-stage1")
    outcome = {}
    for cfg in configs:
        start = time.monotonic()
        result = blip2_run("train", str(cfg), "train.max_steps=1", cwd=tmp_path, env=env, timeout=180)
        seconds = time.monotonic() - start
        assert result.returncode in (0, 2), (cfg.name, result.stderr[-3000:])
        if result.returncode == 2:
            outcome[cfg.stem] = one_sentence(result.stderr)
        else:
            assert "trained 1 steps" in result.stdout, cfg.name
            outcome[cfg.stem] = "ran"
        assert seconds < 90, (cfg.name, seconds)
    assert outcome["tiny-stage1"] == "ran"
    assert "model.llm_tokenizer" in outcome["tiny-stage2"]
    assert "bert-base-uncased" in outcome["stage1-vit-g"]
    # with the tokenizer it asks for, the tiny stage-2 recipe trains offline
    tok = tu.make_llm_tokenizer(str(tmp_path / "tok"))
    result = blip2_run(
        "train", str(ROOT / "configs" / "tiny-stage2.yaml"), "train.max_steps=1", f"model.llm_tokenizer={tok}",
        cwd=tmp_path, env=env, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
