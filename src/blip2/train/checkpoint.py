"""Training checkpoints: written atomically, resumed exactly.

A checkpoint is a folder `output_dir/checkpoints/step-00001000/` with

* `trainable.pt`: the trainable parameters (Q-Former, queries, heads, projection, `ln_vision`, an
  unfrozen tower) and the persistent buffers of the modules that train (e.g. BatchNorm running
  statistics of an unfrozen tower); frozen towers are not saved (they come from the starting model);
* `state.pt`: optimizer, schedule, GradScaler, step, the data position of every rank, the RNG states of
  every rank, and the job config; tensors and plain values only, read with `weights_only=True` (a
  checkpoint from elsewhere cannot run code).

It is written into a temporary folder and renamed into place, then `checkpoints/latest` (a one-line
file naming it) is replaced atomically. A crash while saving leaves at most a stray `*.tmp*` folder and
`latest` still names the previous complete checkpoint (saving a step again sets the old folder aside
first, where `find` still sees it, and deletes it only after the new one is in place).
"""

from __future__ import annotations

import glob
import os
import pickle
import random
import shutil
import sys
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from blip2.errors import UserError

LATEST = "latest"


def _frozen_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Names (with a trailing dot) of the submodules whose parameters are all frozen (frozen towers, the
    LLM): their buffers never change in training (a frozen tower stays in eval mode)."""
    out = []
    for name, module in model.named_modules():
        params = list(module.parameters())
        if name and params and not any(p.requires_grad for p in params):
            out.append(name + ".")
    return tuple(out)


def trainable_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers outside frozen submodules (e.g. BatchNorm running statistics of an
    unfrozen image tower), by name."""
    frozen = _frozen_prefixes(model)
    out = {}
    for mname, module in model.named_modules():
        for bname, buf in module.named_buffers(recurse=False):
            name = f"{mname}.{bname}" if mname else bname
            if buf is None or bname in module._non_persistent_buffers_set or name.startswith(frozen):
                continue
            out[name] = buf
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters and the buffers of the trainable modules (`trainable_buffers`) by name
    (detached CPU copies)."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().cpu().clone() for n, b in trainable_buffers(model).items()})
    return state


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters and buffers into `model`; every one of them must be there, except
    buffers in a checkpoint written before buffers were saved (a warning: they keep their values)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = trainable_buffers(model)
    params.update(buffers)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing and not unexpected and set(missing) <= set(buffers):  # written before buffers were saved
        print(
            f"warning: this checkpoint predates saved buffers: {len(missing)} buffers of the trainable "
            f"modules (e.g. {missing[0]}) start from their initial values; to avoid that, restart the run "
            "or start it from a saved model with model.init_from",
            file=sys.stderr,
        )
        params = {n: p for n, p in params.items() if n in state}
        missing = []
    if missing or unexpected:
        raise UserError(
            f"the checkpoint does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "resume with the config the run started with"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain Python values (loadable with `weights_only`)."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    root: str, step: int, trainable: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2
) -> str:
    """Write checkpoint `step` under `root` (= `output_dir/checkpoints`) atomically; keep the `keep` newest.

    Returns the checkpoint folder.
    """
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:08d}"
    final = os.path.join(root, name)
    tmp = tempfile.mkdtemp(prefix=f"{name}.tmp", dir=root)
    torch.save(trainable, os.path.join(tmp, "trainable.pt"))
    torch.save(state, os.path.join(tmp, "state.pt"))
    for f in os.listdir(tmp):
        with open(os.path.join(tmp, f), "rb") as fh:
            os.fsync(fh.fileno())
    old = None
    if os.path.exists(final):  # the same step again: set the old one aside, never a gap under `latest`
        old = tempfile.mkdtemp(prefix=f"{name}.tmp-old", dir=root)
        os.replace(final, os.path.join(old, name))
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(os.path.join(old, name), final)
        raise
    pointer = os.path.join(root, LATEST)
    with open(pointer + ".tmp", "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer + ".tmp", pointer)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep, current=name)
    return final


def _prune(root: str, keep: int, current: str) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-") and ".tmp" not in d)
    for d in steps[: max(0, len(steps) - max(1, keep))]:
        if d != current:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    for d in os.listdir(root):
        if ".tmp" in d and os.path.isdir(os.path.join(root, d)):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def find(path: str) -> str | None:
    """Resolve `--resume PATH`: a checkpoint folder, a `checkpoints/` folder or a run's output folder
    (their latest complete checkpoint); None when a run folder has none yet."""
    if os.path.isfile(os.path.join(path, "state.pt")):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        pointer = os.path.join(root, LATEST)
        if os.path.isfile(pointer):
            with open(pointer) as f:
                name = f.read().strip()
            # the named folder, or its old copy set aside by a save of the same step that was cut off
            aside = sorted(glob.glob(os.path.join(root, f"{glob.escape(name)}.tmp-old*", name)))
            for ckpt in [os.path.join(root, name), *aside]:
                if os.path.isfile(os.path.join(ckpt, "state.pt")):
                    return ckpt
    return None


def load(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint folder: `(trainable, state)`."""
    try:
        trainable = torch.load(os.path.join(path, "trainable.pt"), map_location="cpu", weights_only=True)
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} is not a complete training checkpoint") from None
    except pickle.UnpicklingError:
        raise UserError(
            f"{path} holds Python objects besides tensors and plain values; it is not loaded, as "
            "unpickling could run code"
        ) from None
    return trainable, state
