"""Distributed training on CPU (gloo, 2 processes under torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from train_utils import failure, torchrun

SCRIPT = os.path.join(os.path.dirname(__file__), "dist_checks.py")


def _run_single(what: str, out: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(
        [sys.executable, SCRIPT, what, out], capture_output=True, text=True, timeout=120, env=env
    )
    assert p.returncode == 0, failure(p)


def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    """ITC/ITM negatives come from both ranks (all-gather with gradient, labels offset by rank); with
    DDP averaging, 2 x 4 rows give the losses and gradients of 1 x 8 rows."""
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _run_single("stage1", one)
    p = torchrun([SCRIPT, "stage1", two], nproc=2)
    assert p.returncode == 0, failure(p)
    a, b = torch.load(one), torch.load(two)
    torch.testing.assert_close(b["losses"], a["losses"], rtol=1e-5, atol=1e-6)
    assert a["grads"].keys() == b["grads"].keys()
    assert "qformer.layers.0.cross_attn.key.weight" in a["grads"] or len(a["grads"]) > 10
    for name in a["grads"]:
        torch.testing.assert_close(b["grads"][name], a["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    assert a["grads"]["temp"].abs() > 0  # ITC's temperature is trained through the gathered features


def test_fsdp2_sharded_frozen_llm_gives_the_same_stage2_loss(tmp_path):
    out = str(tmp_path / "fsdp.pt")
    p = torchrun([SCRIPT, "fsdp", out], nproc=2)
    assert p.returncode == 0, failure(p)
    r = torch.load(out)
    assert r["blocks"] == 2 and r["sharded_params"] >= 2 * 10  # both OPT blocks really are sharded
    torch.testing.assert_close(r["fsdp"][0], r["plain"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r["fsdp"][1], r["plain"][1], rtol=1e-5, atol=1e-7)
