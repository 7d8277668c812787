"""The training loop on tiny models, in this process (one rank, CPU): resume, bad samples, feature cache,
and the whole path through the real CLI."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from train_utils import blip2_cli, image_bytes, make_caption_json, make_llm_tokenizer, make_shards

from blip2.data.batching import Preprocessor, TextSpec
from blip2.data.shards import ShardStream, expand_braces
from blip2.processing import ImageProcessor
from blip2.tokenizers import qformer_tokenizer
from blip2.train import checkpoint
from blip2.train.config import load_config
from blip2.train.feature_cache import cache_features
from blip2.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY1 = os.path.join(ROOT, "configs", "tiny-stage1.yaml")
TINY2 = os.path.join(ROOT, "configs", "tiny-stage2.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _json_cfg(tmp_path, out: str, *extra: str):
    ann, root = make_caption_json(str(tmp_path / "data"), n=16)
    return load_config(
        TINY1,
        [
            "data.kind=captions",
            f"data.path={ann}",
            f"data.images={root}",
            f"train.output_dir={tmp_path / out}",
            "train.max_steps=6",
            "train.save_every=0",
            "train.save_final=false",
            "train.log_every=1",
            *extra,
        ],
    )


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.find(str(run_dir)))[0]


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_after_a_stop_is_bit_exact_on_json_data(tmp_path):
    full = train(_json_cfg(tmp_path, "full"))
    assert full.steps == 6
    cfg = _json_cfg(tmp_path, "split")
    first = train(cfg, stop_after=3)
    assert first.steps == 3 and first.final_dir is None
    second = train(cfg, resume="auto")
    assert second.steps == 6
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the weights did move (so equality is not trivially true)
    start = train(_json_cfg(tmp_path, "one", "train.max_steps=1"))
    assert start.steps == 1
    assert not torch.equal(_final_weights(tmp_path / "one")["query_tokens"], a["query_tokens"])


def test_webdataset_resume_continues_at_the_shard_position(tmp_path):
    pattern = make_shards(str(tmp_path / "shards"), shards=4, per_shard=8)
    pre = Preprocessor(TextSpec("qformer", qformer_tokenizer(), max_len=16), images=ImageProcessor(16))

    def stream(start=None):
        return iter(
            ShardStream(expand_braces(pattern), pre, batch_size=4, seed=1, shuffle_shards=2, start=start)
        )

    whole = stream()
    epoch = [next(whole) for _ in range(8)]  # 32 samples = one epoch
    keys = [k for b in epoch for k in b["keys"]]
    assert len(set(keys)) == 32  # every sample once per epoch
    assert keys != sorted(keys)  # and shuffled across shards

    head = stream()
    seen = [next(head) for _ in range(3)]
    s, *pos = seen[-1]["position"]
    rest = stream({s: tuple(pos)})
    resumed = seen + [next(rest) for _ in range(5)]
    resumed_keys = [k for b in resumed for k in b["keys"]]
    assert resumed_keys == keys  # no sample twice, none missed, same order
    torch.testing.assert_close(resumed[5]["pixel_values"], epoch[5]["pixel_values"])  # same augmentation


def test_webdataset_training_resumes_to_the_same_weights(tmp_path):
    pattern = make_shards(str(tmp_path / "shards"), shards=4, per_shard=8)

    def cfg(out):
        return load_config(
            TINY1,
            [f"data.path={pattern}", f"train.output_dir={tmp_path / out}", "train.max_steps=5"]
            + ["train.save_every=0", "train.save_final=false"],
        )

    train(cfg("full"))
    train(cfg("split"), stop_after=2)
    state = checkpoint.load(checkpoint.find(str(tmp_path / "split")))[1]
    assert state["step"] == 2 and state["positions"][0]["streams"]["0"][2] > 0
    train(cfg("split"), resume="auto")
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "split")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_corrupt_image_and_missing_caption_are_skipped_and_counted(tmp_path):
    pattern = make_shards(str(tmp_path / "shards"), shards=4, per_shard=8, corrupt={3}, no_caption={5})
    cfg = load_config(
        TINY1,
        [f"data.path={pattern}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=7"]
        + ["data.shuffle=false", "train.save_final=false", "train.log_every=1"],
    )
    result = train(cfg)
    assert result.steps == 7
    assert result.skipped == {"image": 1, "text": 1}
    lines = _metrics(tmp_path / "run")
    assert lines[-1]["event"] == "end" and lines[-1]["skipped"] == {"image": 1, "text": 1}
    assert lines[0]["skipped_image"] == 1 and lines[1]["skipped_text"] == 1  # batch 1 has #3, batch 2 #5
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines[:-1])


def test_training_from_cached_features_gives_the_loss_of_training_from_images(tmp_path):
    from_images = _json_cfg(tmp_path, "images", "data.augment=false", "train.max_steps=3")
    stats = cache_features(from_images, str(tmp_path / "cache"), batch_size=5, part_size=7, num_workers=0)
    assert stats == {"images": 16, "skipped": 0}
    parts = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".npy")]
    assert len(parts) == 2  # whole encoder batches per part: 10 + 6 rows
    train(from_images)
    cached = _json_cfg(tmp_path, "cached", f"data.features={tmp_path / 'cache'}", "train.max_steps=3")
    train(cached)
    la = [m["loss"] for m in _metrics(tmp_path / "images") if "loss" in m]
    lb = [m["loss"] for m in _metrics(tmp_path / "cached") if "loss" in m]
    assert len(la) == 3
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)


def test_a_feature_cache_is_bound_to_the_tower_weights(tmp_path):
    from blip2.errors import UserError

    cfg = _json_cfg(tmp_path, "images", "data.augment=false", "train.max_steps=1")
    out = tmp_path / "cache"
    cache_features(cfg, str(out), batch_size=8, num_workers=0)
    # the cache remembers the tower's weights: a tower with other weights (another seed) is refused
    other = _json_cfg(tmp_path, "other", f"data.features={out}", "train.max_steps=1", "train.seed=1")
    with pytest.raises(UserError, match="weights"):
        train(other)


def test_mixed_precision_autocasts_the_qformer_but_not_the_frozen_tower(tmp_path, monkeypatch):
    import blip2.train.loop as loop

    seen: dict[str, list] = {"tower": [], "qformer": []}
    build = loop.build_task

    def spy(cfg):
        task = build(cfg)
        for name in seen:
            module = task.model.visual.tower if name == "tower" else task.model.qformer
            module.register_forward_hook(
                lambda m, i, o, name=name: seen[name].append(torch.is_autocast_enabled("cpu"))
            )
        return task

    monkeypatch.setattr(loop, "build_task", spy)
    result = train(_json_cfg(tmp_path, "run", "train.precision=bf16", "train.max_steps=1"))
    assert result.steps == 1 and math.isfinite(result.last_loss)
    assert seen["tower"] and not any(seen["tower"])
    assert seen["qformer"] and all(seen["qformer"])


def test_end_to_end_cli_stage1_then_stage2_then_load_and_caption(tmp_path):
    import blip2.pipelines

    pattern = make_shards(str(tmp_path / "shards"), shards=2, per_shard=8)
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    p = blip2_cli(["train", TINY1, f"data.path={pattern}", "train.max_steps=3", f"train.output_dir={s1}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "trained 3 steps" in p.stdout
    tok = make_llm_tokenizer(str(tmp_path / "llm_tok"))
    p = blip2_cli(
        [
            "train",
            TINY2,
            f"data.path={pattern}",
            f"model.init_from={s1 / 'final'}",
            f"model.llm_tokenizer={tok}",
        ]
        + ["train.max_steps=3", f"train.output_dir={s2}"]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    pipe = blip2.pipelines.load(str(s2 / "final"))
    assert pipe.config.kind == "generation"
    with open(tmp_path / "x.jpg", "wb") as f:
        f.write(image_bytes(7))
    text = pipe.caption(str(tmp_path / "x.jpg"), max_new_tokens=5, num_beams=1)
    assert isinstance(text, str)
    # stage 2 started from the stage-1 queries: 3 AdamW steps of lr <= 1e-3 move each by < 3.1e-3
    # (a fresh init would be ~0.02 away)
    s1_queries = blip2.pipelines.load(str(s1 / "final")).model.query_tokens
    moved = (pipe.model.query_tokens - s1_queries).abs().max()
    assert 0 < moved < 3.1e-3


@pytest.mark.parametrize(
    "task,preset_name,kind", [("vqa", "tiny-opt", "vqa"), ("caption", "tiny-t5", "captions")]
)
def test_stage2_objectives_train(tmp_path, task, preset_name, kind):
    """VQA (question in the decoder-only prompt) and encoder-decoder captioning run and learn
    (one fixed batch of 8, so the loss must fall)."""
    ann, root = make_caption_json(str(tmp_path / "data"), n=8)
    if kind == "vqa":
        items = json.load(open(ann))
        for it in items:
            it["question"], it["answer"] = "what is it?", it.pop("caption").split(" ")[0]
        with open(ann, "w") as f:
            json.dump(items, f)
    tok = make_llm_tokenizer(str(tmp_path / "tok"))
    cfg = load_config(
        TINY2,
        [f"task={task}", "model.init_from=null", f"model.preset={preset_name}", "model.llm=null"]
        + [f"model.llm_tokenizer={tok}", f"data.kind={kind}", f"data.path={ann}", f"data.images={root}"]
        + [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=6", "train.log_every=1"]
        + ["train.save_final=false", "optim.lr=1e-3", "optim.warmup_steps=0", "train.batch_size=8"]
        + ["data.augment=false", "model.overrides.qformer.dropout=0.0"],
    )
    train(cfg)
    losses = [m["loss"] for m in _metrics(tmp_path / "run") if "loss" in m]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
