"""Tasks: a new kind of model or objective is a task type registered under a name; the training loop
trains it unchanged (`blip2.train.loop.train`), and the config knows its name only once registered."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from train_utils import make_caption_json, make_llm_tokenizer

from blip2 import losses, tasks
from blip2.data.batching import TextSpec
from blip2.errors import UserError
from blip2.models import RetrievalModel
from blip2.tasks.base import Task
from blip2.tokenizers import qformer_tokenizer
from blip2.train import checkpoint
from blip2.train.config import load_config
from blip2.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY1 = os.path.join(ROOT, "configs", "tiny-stage1.yaml")


@dataclass
class ToyOutput:
    loss: Tensor
    loss_toy: Tensor


class ToyTask(Task):
    """Image-text contrast alone (no ITM, no ITG) on the retrieval model."""

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None
    ) -> ToyOutput:
        image_feats = self.model.embed_image(pixel_values).image_feats  # (B, Q, E)
        text_feats = self.model.embed_text(input_ids, attention_mask)  # (B, E)
        sim = losses.max_over_queries(image_feats, text_feats) / self.model.temp  # (B, B)
        pos = losses.positives(sim.shape[0], sim.shape[1], 0, device=sim.device)
        loss = losses.itc_loss(sim, sim.t(), pos)
        return ToyOutput(loss=loss, loss_toy=loss.detach())

    def inputs(self, batch, gather, generator):
        return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    def parts(self, output: ToyOutput) -> dict[str, Tensor]:
        return {"loss_toy": output.loss_toy}

    @classmethod
    def new_model(cls, config, cfg):
        return RetrievalModel(config)

    @classmethod
    def text_spec(cls, cfg, section, config):
        return TextSpec(
            "qformer", qformer_tokenizer(cfg.model.tokenizer or config.tokenizer), max_len=section.max_len
        )


class MeanPoolModel(nn.Module):
    """Not built on a `QueryEncoder`: mean-pooled pixels and token embeddings in one space."""

    def __init__(self, config, vocab_size: int):
        super().__init__()
        self.config = config  # the loop reads the image processor's settings from it
        self.image = nn.Linear(3, 16)
        self.text = nn.Embedding(vocab_size, 16)


class MeanPoolTask(ToyTask):
    """Image-text contrast on a model of another kind: it overrides the set-up and saving hooks that
    the base `Task` writes for the Q-Former models."""

    calls: list = []

    def forward(self, input_ids, attention_mask, pixel_values=None) -> ToyOutput:
        image = F.normalize(self.model.image(pixel_values.mean((2, 3))), dim=-1)  # (B, 16)
        mask = attention_mask.unsqueeze(-1).float()  # (B, L, 1)
        text = F.normalize((self.model.text(input_ids) * mask).sum(1) / mask.sum(1), dim=-1)  # (B, 16)
        sim = image @ text.t() / 0.1  # (B, B)
        loss = losses.itc_loss(
            sim, sim.t(), losses.positives(sim.shape[0], sim.shape[1], 0, device=sim.device)
        )
        return ToyOutput(loss=loss, loss_toy=loss.detach())

    @classmethod
    def new_model(cls, config, cfg):
        return MeanPoolModel(config, config.qformer.vocab_size)

    def set_gradient_checkpointing(self, enabled):
        self.calls.append(("grad_checkpointing", enabled))

    def set_autocast(self, dtype):
        self.calls.append(("autocast", dtype))

    def image_tower(self):
        return None

    def save(self, path, text):
        os.makedirs(path)
        torch.save(self.model.state_dict(), os.path.join(path, "model.pt"))


@pytest.fixture
def scratch_registry(monkeypatch):
    """Tasks registered in the test are forgotten after it (the library has no way to unregister)."""
    from blip2.tasks import registry

    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))


@pytest.fixture
def toy(scratch_registry):
    tasks.register("toy-itc", ToyTask)
    return "toy-itc"


def _cfg(tmp_path, task: str, *extra: str):
    ann, root = make_caption_json(str(tmp_path / "data"), n=16)
    return load_config(
        TINY1,
        [
            f"task={task}",
            "data.kind=captions",
            f"data.path={ann}",
            f"data.images={root}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=3",
            "train.save_every=0",
            "train.save_final=false",
            "train.log_every=1",
            *extra,
        ],
    )


def test_a_new_task_trains_through_the_unchanged_training_loop(tmp_path, toy):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, toy)
    result = train(cfg)
    assert result.steps == 3 and math.isfinite(result.last_loss)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        steps = [m for m in map(json.loads, f) if "step" in m and "loss" in m and "event" not in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:  # the toy objective is the whole loss, and no stage-1 part is logged
        assert m["loss_toy"] == pytest.approx(m["loss"]) and "loss_itm" not in m
    # what trained is what the toy objective reaches: the ITC projections, never the ITM head
    torch.manual_seed(cfg.train.seed)
    start = ToyTask.build_model(cfg).state_dict()
    trained = checkpoint.load(checkpoint.find(str(tmp_path / "run")))[0]
    assert not torch.equal(trained["vision_proj.weight"], start["vision_proj.weight"])
    assert torch.equal(trained["itm_head.weight"], start["itm_head.weight"])


def test_a_task_of_another_model_kind_overrides_the_set_up_and_saving_hooks(tmp_path, scratch_registry):
    torch.set_num_threads(1)
    tasks.register("toy-meanpool", MeanPoolTask)
    cfg = _cfg(tmp_path, "toy-meanpool", "train.save_final=true", "train.grad_checkpointing=true")
    torch.manual_seed(cfg.train.seed)
    start = MeanPoolTask.build_model(cfg).state_dict()
    result = train(cfg)
    assert result.steps == 3 and math.isfinite(result.last_loss)
    assert MeanPoolTask.calls == [("grad_checkpointing", True), ("autocast", None)]
    saved = torch.load(os.path.join(result.final_dir, "model.pt"))
    assert saved.keys() == start.keys() and not torch.equal(saved["image.weight"], start["image.weight"])


def test_a_task_name_is_known_only_once_registered(tmp_path, scratch_registry):
    with pytest.raises(UserError, match="unknown task 'toy-itc'"):
        _cfg(tmp_path, "toy-itc")
    tasks.register("toy-itc", ToyTask)
    assert _cfg(tmp_path, "toy-itc").task == "toy-itc" and "toy-itc" in tasks.names()
    with pytest.raises(ValueError, match="built-in"):
        tasks.register("stage1", ToyTask)


def test_task_names_are_known_without_importing_torch():
    """The config checks task names through the registry, which imports no task (nor torch) until
    one is asked for: `blip2 train --help` and config errors stay fast."""
    code = (
        "import sys\n"
        "from blip2 import tasks\n"
        "from blip2.train.config import TrainConfig\n"
        "assert 'stage1' in tasks.names() and 'caption' in tasks.names()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize(
    "name,prompt,prefix_split",
    [("stage2", "", True), ("caption", "a photo of", False), ("vqa", "", False)],
)
def test_each_stage2_task_name_is_a_type_with_its_text_format(tmp_path, name, prompt, prefix_split):
    """Pre-training splits encoder-decoder captions at a random word and has no prompt; captioning
    starts with the model's caption prompt; VQA's prompt is its question."""
    from blip2.tasks.base import model_config
    from blip2.tasks.stage2 import Stage2Task

    tok = make_llm_tokenizer(str(tmp_path / "tok"))
    cfg = load_config(
        os.path.join(ROOT, "configs", "tiny-stage2.yaml"),
        [f"task={name}", "model.init_from=null", "model.preset=tiny-t5", "model.llm=null"]
        + [f"model.llm_tokenizer={tok}", "model.overrides.llm.prompt=a photo of"],
    )
    task_type = tasks.get(name)
    assert issubclass(task_type, Stage2Task) and not task_type.uses_image_ids
    spec = task_type.text_spec(cfg, cfg.data, model_config(cfg))
    assert (spec.mode, spec.prompt, spec.prefix_split) == ("seq2seq", prompt, prefix_split)


def test_retrieval_is_stage1_with_image_ids():
    from blip2.tasks.stage1 import Stage1Task

    assert tasks.get("retrieval").uses_image_ids and not tasks.get("stage1").uses_image_ids
    assert issubclass(tasks.get("retrieval"), Stage1Task)
