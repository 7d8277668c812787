"""Training faults injected through the real entry points: the CLI, torchrun, `train(cfg)`.

Bad config numbers, ranks that skip different samples, buffers of a trainable tower across a resume,
stage 1 with no possible ITM negative, SIGTERM/SIGINT in the middle of `blip2 train`.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from train_utils import blip2_cli

from blip2.errors import UserError
from blip2.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY1 = os.path.join(ROOT, "configs", "tiny-stage1.yaml")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _one_sentence_error(p) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


# ------------------------------------------------------------------------------- item 9: config numbers


def test_a_fractional_step_count_is_refused_on_the_command_line_and_in_yaml(tmp_path):
    out = tmp_path / "run"
    p = blip2_cli(["train", TINY1, "train.max_steps=8.5", f"train.output_dir={out}"])
    assert "train.max_steps must be a whole number, not 8.5" in _one_sentence_error(p)
    assert not out.exists()  # refused before anything ran

    job = tmp_path / "job.yaml"
    job.write_text(
        "task: stage1\nmodel: {preset: tiny-stage1}\ndata: {path: x.tar}\n"
        f"train: {{max_steps: 8.5, output_dir: {out}}}\n"
    )
    p = blip2_cli(["train", str(job)])
    assert "train.max_steps must be a whole number, not 8.5" in _one_sentence_error(p)
    p = blip2_cli(["train", str(job), "train.max_steps=8", "optim.betas=[0.9, 1.5]"])
    assert "optim.betas must both lie in [0, 1)" in _one_sentence_error(p)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.log_every=0", "train.log_every must be at least 1, not 0"),
        ("train.batch_size=2.5", "train.batch_size must be a whole number, not 2.5"),
        ("train.max_steps=-3", "train.max_steps must be at least 0, not -3"),
        ("train.save_every=often", "train.save_every must be a number, not 'often'"),
        ("train.grad_accum=true", "train.grad_accum must be a number, not True"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be at least 1, not 0"),
        ("train.save_final=3", "train.save_final must be true or false, not 3"),
        ("optim.lr=0", "optim.lr must be greater than 0, not 0.0"),
        ("optim.lr=.nan", "optim.lr must be a finite number"),
        ("optim.warmup_steps=1.5", "optim.warmup_steps must be a whole number, not 1.5"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be at least 0, not -0.1"),
        ("optim.betas=[0.9]", "optim.betas must be a pair of numbers"),
        ("data.num_workers=-1", "data.num_workers must be at least 0, not -1"),
        ("data.path=[a, b]", "data.path must be a text"),
    ],
)
def test_config_numbers_out_of_range_get_one_sentence(override, message):
    with pytest.raises(UserError) as e:
        load_config(TINY1, [override])
    assert message in str(e.value)


def test_numbers_written_the_yaml_way_are_accepted():
    cfg = load_config(TINY1, ["train.max_steps=1e3", "optim.lr=3e-4", "train.save_every=8.0", "data.path=2024"])
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == 3e-4 and cfg.train.save_every == 8 and cfg.data.path == "2024"
