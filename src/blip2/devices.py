"""Devices a user names (`--device`, `train.device`, `blip2.load(device=...)`), checked up front so a
wrong one is one sentence (`UserError`) instead of a traceback from deep inside torch."""

from __future__ import annotations

from typing import Any

from blip2.errors import UserError

KNOWN = "cpu, cuda, cuda:N or mps"


def check_device(device: Any) -> Any:
    """`device` as a `torch.device` if this machine has it.

    Raises:
        UserError: a name torch does not know (`tpu`), or a device this build or machine lacks (`cuda`
            on a CPU-only build or without a visible GPU, `cuda:3` with two GPUs, `mps` off Apple).
    """
    import torch

    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip())
        except (RuntimeError, ValueError):
            raise UserError(f"unknown device {device!r}: use {KNOWN}") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise UserError(
                f"device {device!r} needs CUDA, but this PyTorch build has no CUDA support: use cpu, "
                "or install a CUDA build of PyTorch"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device {device!r} needs a CUDA GPU, but none is visible here: use cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(
                f"device {device!r} does not exist: this machine has {count} CUDA GPU(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device {device!r} (Apple GPU) is not available here: use cpu")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise UserError(f"device {device!r} is not available here: use {KNOWN}")
    return dev
