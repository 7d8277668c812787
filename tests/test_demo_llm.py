"""`blip2 demo --llm FAMILY` end to end on a tiny demo: a second LM family pre-trained on the world's
text, stage 2 alone for it from the demo's stage-1 model, and both bridges scored side by side."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from blip2.demo.run import Budget

TINY = Budget(
    n_train=48,
    n_test=20,
    encoder_steps=2,
    encoder_batch=16,
    lm_docs=64,
    lm_steps=4,
    lm_batch=16,
    stage1_steps=12,  # at the full learning rate after the warm-up: the Q-Former moves from its init
    stage2_steps=2,  # early in the warm-up: the bridge's Q-Former stays next to where stage 2 started
    batch_size=16,
    warmup_steps=6,
    itm_k=2,
    num_beams=1,
    figure_samples=2,
)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> str:
    from blip2.demo.run import run_demo

    out = str(tmp_path_factory.mktemp("demo_llm"))
    run_demo(out, quick=True, seed=0, echo=lambda _: None, budget=TINY)
    return out


def _qformer(folder: str) -> dict:
    from safetensors.torch import load_file

    name = "blip2_model.safetensors"  # our layout: the demo's tower is not transformers' EVA
    weights = load_file(
        os.path.join(folder, name if os.path.isfile(os.path.join(folder, name)) else "model.safetensors")
    )
    return {k: v for k, v in weights.items() if k.startswith(("qformer.", "query_tokens"))}


def _distance(a: dict, b: dict) -> float:
    """L2 distance of the weights `a` shares with `b`, relative to `b`'s norm."""
    keys = list(a)
    return float(sum((a[k] - b[k]).pow(2).sum() for k in keys) / sum(b[k].pow(2).sum() for k in keys)) ** 0.5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_second_llm_family_is_bridged_from_the_stage1_qformer(tiny_demo, family):
    """The new LM is the other architecture, learned the demo's text with the demo's budget, its stage 2
    began at the demo's stage-1 Q-Former, and the report scores both bridges the same way."""
    from transformers import AutoTokenizer

    import blip2
    from blip2.cli import main

    out = tiny_demo
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--llm", family, "--out", out]) == 0
    with open(os.path.join(out, f"llm_{family}_report.json")) as f:
        report = json.load(f)

    with open(os.path.join(out, f"lm_{family}", "config.json")) as f:
        assert json.load(f)["model_type"] == family
    with open(os.path.join(out, f"model_{family}", "blip2_config.json")) as f:
        assert json.load(f)["llm"]["hf_config"]["model_type"] == family
    assert report["lms"]["gpt2"]["model_type"] == "gpt2"
    assert report["lms"][family]["model_type"] == family
    gpt2, other = report["lms"]["gpt2"]["parameters"], report["lms"][family]["parameters"]
    assert abs(other - gpt2) < 0.05 * gpt2  # comparable size
    assert len(report["losses"]["language_model"]) == TINY.lm_steps
    assert [s for s, _ in report["losses"]["stage2"]["loss"]] == list(range(1, TINY.stage2_steps + 1))

    # stage 2 began at the stage-1 Q-Former: after a few warm-up steps its weights are still next to
    # the stage-1 ones, far from the untrained Q-Former that stage 1 itself started from
    assert report["stage2_job"]["model"]["init_from"] == os.path.join(out, "model_stage1")
    bridge, stage1 = (
        _qformer(os.path.join(out, f"model_{family}")),
        _qformer(os.path.join(out, "model_stage1")),
    )
    init = _qformer(os.path.join(out, "work", "init"))
    assert set(bridge) <= set(stage1) and len(bridge) > 20
    moved, apart = _distance(bridge, stage1), _distance(init, stage1)
    assert 0 < moved < apart / 5, (moved, apart)
    change = report["qformer_change"][family]
    assert change["from_stage1"] == pytest.approx(moved, rel=1e-3)
    assert change["from_random_init"] > 5 * change["from_stage1"]

    # the bridge reads and writes text with the world's tokenizer, the one its LM learned with
    # (transformers would load a `qwen2` folder's tokenizer as Qwen2's own, which splits words apart)
    world = AutoTokenizer.from_pretrained(os.path.join(out, "lm"))
    text = "caption : there is a large red circle on the left"
    bridge_tok = blip2.load(os.path.join(out, f"model_{family}")).llm_tokenizer
    assert bridge_tok(text).input_ids == world(text).input_ids
    assert len(world(text).input_ids) == 1 + len(text.split())

    for name in ("gpt2", family):
        scores = report["bridges"][name]
        for key in (
            "caption_cider",
            "caption_attribute_accuracy",
            "vqa_accuracy",
            "vqa_accuracy_heldout_scenes",
        ):
            assert key in scores
        assert 0 <= report["lm_from_true_description"][name]["vqa_accuracy"] <= 1
    assert report["data"]["test_images"] == TINY.n_test
    with open(os.path.join(out, f"llm_{family}_report.md")) as f:
        md = f.read()
    label = {"llama": "Llama", "qwen2": "Qwen2"}[family]
    assert "| | GPT-2 bridge (the demo's) | " + label + " bridge | chance |" in md
    row = next(x for x in md.splitlines() if x.startswith("| zero-shot VQA (exact match) |"))
    cells = [float(c) for c in row.strip("|").split("|")[1:]]
    assert cells == pytest.approx(
        [
            report["bridges"]["gpt2"]["vqa_accuracy"],
            report["bridges"][family]["vqa_accuracy"],
            report["chance"]["vqa_accuracy"],
        ],
        abs=5e-4,
    )
    assert f"{label} bridge: caption attribute accuracy" in printed.getvalue()
