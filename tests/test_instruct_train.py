"""Instruction tuning (task: instruct): from a BLIP-2 stage-2 model, on a mixture of captions, VQA and
one's own instructions; the loss falls, a stop resumes bit-exactly, the result loads as InstructBLIP."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from train_utils import image_bytes, make_caption_json, make_llm_tokenizer

import blip2
from blip2.errors import UserError
from blip2.models import LanguageBridge, RetrievalModel
from blip2.pipelines import pipeline_for
from blip2.processing import ImageProcessor
from blip2.tokenizers import llm_tokenizer, qformer_tokenizer
from blip2.train import checkpoint
from blip2.train.config import load_config
from blip2.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny stage-1 and stage-2 model saved as folders, an LLM tokenizer, and three datasets."""
    root = tmp_path_factory.mktemp("instruct")
    torch.manual_seed(0)
    tok = make_llm_tokenizer(str(root / "tok"))
    stage1 = RetrievalModel(blip2.preset("tiny-stage1"))
    processor = ImageProcessor(stage1.config.vision.image_size)
    pipeline_for(stage1, processor, qformer_tokenizer()).save_pretrained(root / "stage1")
    stage2 = LanguageBridge(blip2.preset("tiny-opt"))
    pipeline_for(stage2, processor, llm_tokenizer(tok)).save_pretrained(root / "stage2")
    captions, images = make_caption_json(str(root / "data"), n=12)
    items = json.load(open(captions))
    vqa = [
        {"image": it["image"], "question": "what is it?", "answer": it["caption"].split()[0]} for it in items
    ]
    own = [
        {"image": it["image"], "instruction": "Name the last word.", "answer": it["caption"].split()[-1]}
        for it in items[:6]
    ]
    for name, data in (("vqa.json", vqa), ("own.json", own)):
        with open(root / "data" / name, "w") as f:
            json.dump(data, f)
    return root, tok, captions, images


def _config(world, out: str, *extra: str):
    root, tok, captions, images = world
    sources = [
        {"kind": "captions", "path": captions, "images": images},
        {"kind": "vqa", "path": str(root / "data" / "vqa.json"), "images": images},
        {"kind": "instructions", "path": str(root / "data" / "own.json"), "images": images},
    ]
    cfg = {
        "task": "instruct",
        "model": {
            "init_from": str(root / "stage2"),
            "qformer_text_from": str(root / "stage1"),
            "llm_tokenizer": tok,
        },
        "data": {"kind": "mixture", "sources": sources, "num_workers": 0, "augment": False},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {
            "output_dir": str(root / out),
            "batch_size": 6,
            "max_steps": 6,
            "precision": "float32",
            "log_every": 1,
            "save_every": 0,
            "device": "cpu",
        },
    }
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(str(path), list(extra))


def _losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [m["loss"] for m in map(json.loads, f) if "loss" in m]


def test_instruction_tuning_learns_and_saves_an_instructblip_model(world):
    root = world[0]
    # one dataset of one batch (6 examples): every step sees the same examples, so the loss must fall
    own = [{"kind": "instructions", "path": str(root / "data" / "own.json"), "images": world[3]}]
    result = train(_config(world, "learn", "train.max_steps=10", f"data.sources={json.dumps(own)}"))
    losses = _losses(root / "learn")
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses
    tuned = blip2.load(result.final_dir)
    assert tuned.config.kind == "instruct"
    start = blip2.load(str(root / "stage2")).model
    # the image tower and the LLM stayed frozen; the Q-Former, ln_vision and the projection moved
    same = {
        k: torch.equal(v, start.state_dict()[k])
        for k, v in tuned.model.state_dict().items()
        if k in start.state_dict()
    }
    assert all(v for k, v in same.items() if k.startswith(("visual.tower.", "llm.")))
    assert not same["language_projection.weight"] and not same["query_tokens"]
    # the text side came from the stage-1 model, and learned
    s1 = blip2.load(str(root / "stage1")).model.qformer.embeddings.word.weight
    moved = (tuned.model.qformer.embeddings.word.weight - s1).abs()
    assert 0 < moved.max() < 0.1
    with open(root / "x.jpg", "wb") as f:
        f.write(image_bytes(3))
    answer = tuned.ask(str(root / "x.jpg"), "what is it?", max_new_tokens=4)
    assert isinstance(answer, str)


def test_instruction_tuning_resumes_bit_exactly(world):
    root = world[0]
    train(_config(world, "full", "train.save_final=false"))
    cfg = _config(world, "split", "train.save_final=false")
    assert train(cfg, stop_after=3).steps == 3
    assert train(cfg, resume="auto").steps == 6
    a = checkpoint.load(checkpoint.find(str(root / "full")))[0]
    b = checkpoint.load(checkpoint.find(str(root / "split")))[0]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _losses(root / "full") == _losses(root / "split")


def test_instruction_tuning_refuses_what_it_cannot_start_from(world):
    root = world[0]
    with pytest.raises(UserError, match="stage-1 one: train stage 2 first"):
        train(_config(world, "bad1", f"model.init_from={root / 'stage1'}"))
    with pytest.raises(UserError, match="has no Q-Former text side"):
        train(_config(world, "bad2", f"model.qformer_text_from={root / 'stage2'}"))
    other = root / "stage1_wide"
    wide = RetrievalModel(blip2.preset("tiny-stage1", qformer={"hidden_size": 48, "num_heads": 4}))
    pipeline_for(wide, ImageProcessor(wide.config.vision.image_size), qformer_tokenizer()).save_pretrained(
        other
    )
    with pytest.raises(UserError, match="Q-Former is not the size of"):
        train(_config(world, "bad4", f"model.qformer_text_from={other}"))
    with pytest.raises(UserError, match="sources\\[0\\].kind must be one of"):
        train(_config(world, "bad3", "data.sources=[{kind: webdataset, path: x}]"))


@pytest.mark.slow
def test_instruction_tuning_on_two_ranks_resumes_on_one(world):
    """A mixture's cursor means the same examples on any world size: 3 steps on 2 ranks x 3 rows, then
    3 more on 1 rank x 6 rows, end where 6 steps on 1 rank x 6 rows end (the samplers' order is
    checked in tests/test_instruct_data.py; the weights differ by dropout draws and per-rank loss
    means, so they are not compared)."""
    from train_utils import blip2_cli, torchrun

    root = world[0]
    one = _config(world, "ranks1", "train.save_final=false")
    path = root / "ranks2.yaml"
    cfg = yaml.safe_load((root / "ranks1.yaml").read_text())
    cfg["train"]["output_dir"] = str(root / "ranks2")
    path.write_text(yaml.safe_dump(cfg))
    train(one)
    two = ["-m", "blip2.cli", "train", str(path), "train.save_final=false"]
    p = torchrun([*two, "train.batch_size=3", "--stop-after", "3"], nproc=2, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    state = checkpoint.load(checkpoint.find(str(root / "ranks2")))[1]
    assert (state["step"], state["world_size"]) == (3, 2)
    p = blip2_cli(["train", str(path), "train.save_final=false", "--resume", "auto"], timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    a = checkpoint.load(checkpoint.find(str(root / "ranks1")))[1]
    b = checkpoint.load(checkpoint.find(str(root / "ranks2")))[1]
    assert a["step"] == b["step"] == 6 and b["world_size"] == 1
    assert a["positions"][0]["sample"] == b["positions"][0]["sample"] == [1, 6]  # 30 examples, 6 a step
    losses = _losses(root / "ranks2")
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)


def test_each_bridge_type_takes_only_its_own_kind(world, tmp_path):
    from blip2.models import InstructBridge

    with pytest.raises(
        ValueError, match="LanguageBridge cannot build a 'instruct' model: use InstructBridge"
    ):
        LanguageBridge(blip2.preset("tiny-instruct-opt"))
    with pytest.raises(
        ValueError, match="InstructBridge cannot build a 'generation' model: use LanguageBridge"
    ):
        InstructBridge(blip2.preset("tiny-opt"))
    # BLIP-2's stage-2 objective refuses an InstructBLIP model, new or saved
    tok = world[1]
    cfg = {
        "task": "stage2",
        "model": {"preset": "tiny-instruct-opt", "llm_tokenizer": tok},
        "data": {"kind": "captions", "path": world[2], "images": world[3], "num_workers": 0},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "device": "cpu"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="is an InstructBLIP model: use task: instruct"):
        train(load_config(str(tmp_path / "cfg.yaml")))
