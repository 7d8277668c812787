"""Training building blocks: checkpoints, schedule, optimizer groups, config, annotation layouts, sampling."""

from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch
from torch import nn

from blip2.data.annotations import load_records
from blip2.data.json_dataset import GlobalBatchSampler
from blip2.data.shards import expand_braces
from blip2.errors import UserError
from blip2.train import checkpoint
from blip2.train.config import OptimSection, load_config
from blip2.train.optim import lr_at, param_groups


def test_a_crash_while_saving_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    root = str(tmp_path / "checkpoints")
    checkpoint.save(root, 1, {"w": torch.ones(2)}, {"step": 1})
    real_save = torch.save

    def crash(obj, path, *a, **k):
        if str(path).endswith("state.pt"):
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(root, 2, {"w": torch.zeros(2)}, {"step": 2})
    monkeypatch.undo()
    latest = checkpoint.find(root)
    assert latest.endswith("step-00000001")
    trainable, state = checkpoint.load(latest)
    assert state["step"] == 1 and torch.equal(trainable["w"], torch.ones(2))
    checkpoint.save(root, 3, {"w": torch.full((2,), 3.0)}, {"step": 3}, keep=1)  # cleans the stray folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000003"]


def test_warmup_then_cosine_per_step():
    cfg = OptimSection(lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10)
    assert lr_at(0, 110, cfg) == pytest.approx(1e-6)
    assert lr_at(5, 110, cfg) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr_at(10, 110, cfg) == pytest.approx(1e-4)
    assert lr_at(60, 110, cfg) == pytest.approx(1e-5 + (1e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(110, 110, cfg) == pytest.approx(1e-5)


def test_weight_decay_groups_skip_biases_and_norms_and_frozen_parameters():
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    m[2].requires_grad_(False)
    decay, no_decay = param_groups(m, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_config_overrides_and_clear_errors(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("task: stage1\nmodel: {preset: tiny-stage1}\ndata: {kind: captions, path: x.json}\n")
    cfg = load_config(
        str(path), ["train.batch_size=7", "optim.betas=[0.9, 0.999]", "model.overrides.embed_dim=8"]
    )
    assert cfg.train.batch_size == 7 and cfg.optim.betas == (0.9, 0.999)
    assert cfg.model.overrides == {"embed_dim": 8}
    with pytest.raises(UserError, match="unknown field"):
        load_config(str(path), ["train.batchsize=7"])
    with pytest.raises(UserError, match="max_steps"):
        load_config(str(path), ["data.kind=webdataset"])
    with pytest.raises(UserError, match="exactly one"):
        load_config(str(path), ["model.init_from=somewhere"])


@pytest.mark.parametrize(
    "given,read",
    [("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float32")]
    + [("bfloat16-master", "bfloat16-master")]
    + [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")],  # older configs' names
)
def test_train_precision_takes_the_dtype_names_and_reads_the_older_ones(tmp_path, given, read):
    path = tmp_path / "job.yaml"
    path.write_text(
        f"model: {{preset: tiny-stage1}}\ndata: {{kind: captions, path: x.json}}\ntrain: {{precision: {given}}}\n"
    )
    assert load_config(str(path)).train.precision == read
    assert load_config(str(path), [f"train.precision={given}"]).train.precision == read


def test_an_unknown_train_precision_is_one_sentence_naming_the_choices(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: {preset: tiny-stage1}\ndata: {kind: captions, path: x.json}\n")
    with pytest.raises(
        UserError,
        match="^train.precision must be one of float32, bfloat16, float16, bfloat16-master, not 'half'$",
    ):
        load_config(str(path), ["train.precision=half"])


def test_brace_expansion():
    assert expand_braces("d/{0000..0002}.tar") == ["d/0000.tar", "d/0001.tar", "d/0002.tar"]
    assert expand_braces("a/{x,y}.tar::b.tar") == ["a/x.tar", "a/y.tar", "b.tar"]


def test_annotation_layouts(tmp_path):
    def write(name, obj):
        p = tmp_path / name
        p.write_text(json.dumps(obj))
        return str(p)

    plain = write("own.json", [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": ["y", "z"]}])
    recs = load_records("captions", plain, images="/img")
    assert [(r.image, r.text, r.image_id) for r in recs] == [
        ("/img/a.jpg", "x", 0),
        ("/img/b.jpg", "y", 1),
        ("/img/b.jpg", "z", 1),
    ]
    karpathy = write(
        "dataset_coco.json",
        {
            "dataset": "coco",
            "images": [
                {
                    "filepath": "val2014",
                    "filename": "A.jpg",
                    "split": "restval",
                    "sentences": [{"raw": "r1"}],
                },
                {"filepath": "val2014", "filename": "B.jpg", "split": "test", "sentences": [{"raw": "t1"}]},
            ],
        },
    )
    assert [r.key for r in load_records("karpathy", karpathy)] == ["val2014/A.jpg"]
    assert [r.text for r in load_records("karpathy", karpathy, split="test")] == ["t1"]
    coco = write(
        "captions_val2014.json",
        {
            "images": [{"id": 9, "file_name": "C.jpg"}],
            "annotations": [{"image_id": 9, "id": 1, "caption": "c"}],
        },
    )
    assert [(r.key, r.text, r.image_id) for r in load_records("coco", coco)] == [("C.jpg", "c", 9)]
    questions = write("q.json", {"questions": [{"image_id": 5, "question": "what?", "question_id": 50}]})
    answers = write(
        "a.json",
        {
            "annotations": [
                {
                    "question_id": 50,
                    "image_id": 5,
                    "multiple_choice_answer": "dog",
                    "answers": [{"answer": "cat"}],
                }
            ]
        },
    )
    (vqa,) = load_records(
        "vqa", answers, questions=questions, image_pattern="COCO_val2014_{image_id:012d}.jpg"
    )
    assert vqa.question == "what?" and vqa.answers[0] == "dog" and vqa.key == "COCO_val2014_000000000005.jpg"
    with pytest.raises(UserError, match="lacks"):
        load_records("captions", write("bad.json", [{"img": "a.jpg"}]))


def test_two_ranks_split_each_global_batch_of_one_process():
    one = iter(GlobalBatchSampler(20, 8, seed=3))
    r0 = iter(GlobalBatchSampler(20, 4, rank=0, world_size=2, seed=3))
    r1 = iter(GlobalBatchSampler(20, 4, rank=1, world_size=2, seed=3))
    for _ in range(5):  # crosses epochs (2 global batches each)
        assert next(one) == next(r0) + next(r1)
    resumed = iter(GlobalBatchSampler(20, 8, seed=3, start=(1, 8)))  # step 3: epoch 1, sample 8
    fresh = iter(GlobalBatchSampler(20, 8, seed=3))
    batches = [next(fresh) for _ in range(4)]
    assert next(resumed) == batches[3]
    assert batches[0][0][0] == 0 and batches[2][0][0] == 1  # epoch numbers seed the augmentation


def test_prefix_lm_split_cuts_each_caption_in_its_first_half():
    from blip2.data.annotations import Record
    from blip2.data.batching import Preprocessor, TextSpec
    from blip2.processing import ImageProcessor

    pre = Preprocessor(TextSpec("seq2seq", tokenizer=None, prefix_split=True), images=ImageProcessor(8))
    rec = Record("k", None, text="one two three four five six seven eight")
    cuts = set()
    for seed in range(40):
        t = pre._texts(rec, torch.Generator().manual_seed(seed))
        head = t["prompt"].split(" ")
        assert 1 <= len(head) <= 4 and f"{t['prompt']} {t['target']}" == rec.text
        cuts.add(len(head))
    assert cuts == {1, 2, 3, 4}


def _saved_llm(folder, kind: str, **fields):
    from blip2.config import LLMConfig
    from blip2.models import language
    from blip2.presets import TINY_LLMS

    torch.manual_seed(0)
    llm = language.build_llm(LLMConfig(hf_config={**TINY_LLMS[kind], **fields}))
    if kind == "t5":  # the hub's FlanT5 config: gelu_new
        llm.config.dense_act_fn, llm.config.feed_forward_proj = "gelu_new", "gated-gelu"
    llm.save_pretrained(str(folder))
    return llm


def test_a_pretrained_stage2_llm_keeps_the_preset_conventions_and_its_real_architecture(tmp_path):
    import dataclasses

    import torch.nn.functional as F

    from blip2.models import LanguageBridge, RetrievalModel
    from blip2.presets import preset
    from blip2.tasks.stage2 import llm_for_stage2

    saved = _saved_llm(tmp_path / "opt", "opt", vocab_size=120)
    base = dataclasses.replace(
        preset("tiny-opt").llm, name=str(tmp_path / "opt"), dtype="bfloat16", eos_text="\n"
    )
    llm_config, llm = llm_for_stage2(None, base)
    assert llm.dtype == torch.bfloat16 and llm_config.eos_text == "\n" and llm_config.dtype == "bfloat16"
    assert llm_config.hf_config["vocab_size"] == 120
    assert torch.equal(llm.get_input_embeddings().weight, saved.get_input_embeddings().weight.bfloat16())
    model = LanguageBridge.from_stage1(RetrievalModel(preset("tiny-stage1")), llm, llm_config=llm_config)
    assert model.config.llm.eos_text == "\n" and model.config.llm.hf_config["vocab_size"] == 120

    saved = _saved_llm(tmp_path / "t5", "t5")
    llm_config, llm = llm_for_stage2(str(tmp_path / "t5"), None)
    x = torch.linspace(-3, 3, 13)
    assert torch.equal(llm.encoder.block[0].layer[1].DenseReluDense.act(x), F.gelu(x))  # exact, as LAVIS
    assert llm.lm_head.weight is not llm.shared.weight
    want = saved.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in llm.state_dict().items())
    assert llm_config.name == str(tmp_path / "t5")


def test_an_unavailable_stage2_llm_is_one_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from blip2.tasks.stage2 import llm_for_stage2

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        llm_for_stage2("nobody-here/no-such-llm", None)
    with pytest.raises(UserError, match="does not exist"):
        llm_for_stage2(str(tmp_path / "missing"), None)


def test_training_state_holds_only_tensors_and_plain_values(tmp_path):
    import pickle
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(4)
    np.random.normal()  # a cached Gaussian in NumPy's state
    torch.manual_seed(5)
    root = str(tmp_path / "checkpoints")
    path = checkpoint.save(root, 1, {"w": torch.ones(2)}, {"step": 1, "rng": [checkpoint.rng_state()]})
    want = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    _, state = checkpoint.load(path)  # weights_only=True
    checkpoint.set_rng_state(state["rng"][0])
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])

    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    with open(f"{path}/state.pt", "wb") as f:
        pickle.dump({"step": Evil()}, f, protocol=2)
    with pytest.raises(UserError, match="could run code"):
        checkpoint.load(path)


def test_a_crash_while_saving_the_same_step_again_keeps_a_checkpoint_to_resume(tmp_path, monkeypatch):
    import os

    root = str(tmp_path / "checkpoints")
    checkpoint.save(root, 1, {"w": torch.ones(2)}, {"step": 1})
    real_replace = os.replace
    dead = []

    def killed(src, dst):  # the process dies as the new folder is renamed into place: nothing after runs
        if dead or (os.path.basename(str(dst)) == "step-00000001" and ".tmp-old" not in str(src)):
            dead.append(dst)
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(root, 1, {"w": torch.zeros(2)}, {"step": 1})
    monkeypatch.undo()
    trainable, state = checkpoint.load(checkpoint.find(str(tmp_path)))
    assert state["step"] == 1 and torch.equal(trainable["w"], torch.ones(2))

    path = checkpoint.save(root, 1, {"w": torch.zeros(2)}, {"step": 1})  # a later save cleans up
    assert checkpoint.find(root) == path and torch.equal(checkpoint.load(path)[0]["w"], torch.zeros(2))
    assert sorted(os.listdir(root)) == ["latest", "step-00000001"]


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.mark.parametrize(
    "name",
    sorted(
        os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    ),
)
def test_every_shipped_config_parses(name):
    from blip2.train.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", name))
    assert cfg.task and cfg.train.output_dir
