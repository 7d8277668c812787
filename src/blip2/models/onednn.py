"""Linear layers' matrix products through oneDNN on CPU (float32).

PyTorch computes a float32 `F.linear` on CPU with MKL's GEMM. On some CPUs oneDNN's float32 kernels
(the ones inductor uses for prepacked weights) are much faster: on an AMD EPYC (Zen 5) with AVX-512,
MKL ran the products of the benchmark's small models at about 100 GFLOP/s on one thread and oneDNN at
about 230. `linears()` is a context in which every float32 CPU `F.linear` (the `nn.Linear` layers of
our Q-Former and of the transformers towers and LMs alike, and `torch.addmm` with a bias as GPT-2's
`Conv1D` layers call it) runs through oneDNN, forward and backward:
the same products in float32, rounded in another order (differences of float32 rounding, ~1e-6
relative).

It leaves alone what it does not cover: other devices and dtypes, autocast, products of fewer than
`MIN_ROWS` rows, and training with gradient checkpointing (`with_linears`). Its backward is first-order
only (no double backward, no forward-mode AD). Code compiled within the context (`torch.compile` traces the context's hook) gets
the oneDNN product where no gradient is asked for (the compiled decode steps of
`blip2.generation.Decoding`), PyTorch's elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

# `BLIP2_ONEDNN=0` in the environment keeps every product on PyTorch's default (MKL), e.g. on a CPU where
# MKL is the faster of the two
AVAILABLE = (
    os.environ.get("BLIP2_ONEDNN", "1") != "0"
    and bool(torch.backends.mkldnn.is_available())
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


# fewer rows than this: MKL's products are as fast or faster (one row: about twice as fast)
MIN_ROWS = 8


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`x @ weight.T + bias` for 2-D `x` `(M, K)` and `weight` `(N, K)` (strided views are fine)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    """`F.linear` with oneDNN products forward and backward."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _mm(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, _ = inputs  # kept only where a gradient needs it (a frozen weight's input is not)
        ctx.save_for_backward(
            x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None
        )
        ctx.x_shape = x.shape

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm(g, weight.t(), None).view(ctx.x_shape)  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            grad_w = _mm(g.t(), x.reshape(-1, x.shape[-1]).t(), None)  # (N, M) @ (M, K)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def _eligible(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and x.dim() >= 1
        and weight.shape[1] == x.shape[-1]  # else F.linear's own error (or its broadcasting)
        and weight.device == x.device
        and (
            bias is None
            or (
                bias.dtype == torch.float32
                and bias.dim() == 1
                and bias.shape[0] == weight.shape[0]
                and bias.device == x.device
            )
        )
        and x.layout == torch.strided
        and weight.layout == torch.strided
        and not torch.is_autocast_enabled("cpu")
        and x.numel() >= MIN_ROWS * x.shape[-1] > 0
    )


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(input, weight, bias)`, through oneDNN where it applies (float32 on CPU, no autocast, at
    least `MIN_ROWS` rows)."""
    if not AVAILABLE or not _eligible(input, weight, bias):
        return F.linear(input, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias)
    )
    if not needs_grad:  # the op itself (no autograd node; traceable)
        return _Linear.forward(input, weight, bias)
    if torch.compiler.is_compiling():
        return F.linear(input, weight, bias)
    return _Linear.apply(input, weight, bias)


def addmm(bias: Tensor, x: Tensor, weight_t: Tensor) -> Tensor:
    """`torch.addmm(bias, x, weight_t)` (`bias + x @ weight_t`, as GPT-2's `Conv1D` computes its layers)
    as `linear(x, weight_t.t(), bias)` where that applies (a 1-D bias of the output's size)."""
    if bias.dim() == 1 and x.dim() == 2 and weight_t.dim() == 2 and bias.shape[0] == weight_t.shape[1]:
        return linear(x, weight_t.t(), bias)
    return torch.addmm(bias, x, weight_t)


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(*args, **kwargs)
        if func is torch.addmm and len(args) == 3 and not kwargs:  # beta, alpha or out=: PyTorch's own
            return addmm(*args)
        return func(*args, **kwargs)


_active = threading.local()


@contextlib.contextmanager
def linears(device: torch.device | str | None = None) -> Iterator[None]:
    """Within: every float32 CPU `F.linear` through oneDNN (`linear`). A no-op for another `device`
    (no Python hook on each operation there), where oneDNN is not available, and when already on."""
    off = device is not None and torch.device(device).type != "cpu"
    if off or not AVAILABLE or getattr(_active, "on", False):
        yield
        return
    _active.on = True
    try:
        with _Mode():
            yield
    finally:
        _active.on = False


T = TypeVar("T", bound=Callable[..., Any])


def _checkpointing(module: torch.nn.Module) -> bool:
    """Whether gradient checkpointing is on anywhere in `module` (ours and transformers' both set a
    `gradient_checkpointing` attribute to True)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


def with_linears(method: T) -> T:
    """Decorator of a module's method: it runs within `linears()` when the module's first parameter is
    on the CPU. Not while training with gradient checkpointing: the recomputation in backward runs
    outside the context, and checkpointing requires it to save what the forward saved."""

    @functools.wraps(method)
    def run(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        param = next(self.parameters(), None)
        if param is None or (self.training and _checkpointing(self)):
            return method(self, *args, **kwargs)
        with linears(param.device):
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]
