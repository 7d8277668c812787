"""CUDA graphs for inference calls whose cost is mostly the host launching kernels.

At batch 1, the frozen ViT-g, the Q-Former and the projection launch about a thousand small kernels;
on an H100 the host needs longer to launch them than the GPU to run them. A CUDA graph records the
kernels once and replays them with a single launch. `GraphCache` does that for a function of one tensor:
one graph per input shape and dtype, captured on first use (after two warm-up calls on a side stream),
replayed after copying the input into the graph's own buffer.

A graph reads the weights where they were when it was captured. Weights changed in place (an optimizer
step) are seen; weights replaced (`load_state_dict(assign=True)`, `.to(...)`) change the key, so a new
graph is captured. A capture that fails (an operation that cannot be recorded) is remembered and the
plain call is used from then on for that key: same results, only slower. Calls under the caller's own
`torch.autocast`, or with autograd on, always run plainly (autocast's cached weight casts would outlive
the graph's view of them). One caller at a time: replays share the graph's input and output buffers.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class GraphCache:
    """Calls `fn(x)` replayed from CUDA graphs, one per input shape/dtype, weight layout and `extra` key
    (inference only: with autograd or autocast on, or off CUDA, `fn` simply runs).

    Args:
        max_graphs: graphs kept (each holds its own memory pool); the least recently used goes first.
    """

    def __init__(self, max_graphs: int = 4):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Any, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = OrderedDict()
        self.failed: set = set()  # keys whose capture failed: run plainly

    def __call__(
        self, fn: Callable[[Tensor], Tensor], x: Tensor, tensors: Iterable[Tensor], extra: tuple = ()
    ) -> Tensor:
        """`fn(x)`. `fn`: one CUDA tensor in, one out, no host synchronisation inside; `tensors`: what
        it reads besides `x` (weights, buffers), whose addresses are part of the key; `extra`: anything
        else that changes what `fn` computes."""
        if x.device.type != "cuda" or torch.is_grad_enabled() or torch.is_autocast_enabled("cuda"):
            return fn(x)
        key = (tuple(x.shape), x.dtype, x.device, extra, *(t.data_ptr() for t in tensors))
        if key in self.failed:
            return fn(x)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(fn, x)
            if entry is None:
                self.failed.add(key)
                return fn(x)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()  # the graph's buffer is overwritten by the next replay

    @staticmethod
    def _capture(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple | None:
        with torch.cuda.device(x.device):
            current = torch.cuda.current_stream()
            static_in = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            try:
                with torch.cuda.stream(side):  # warm-up: library handles, workspaces, lazy initialisation
                    for _ in range(2):
                        fn(static_in)
                current.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = fn(static_in)
            except torch.OutOfMemoryError:
                torch.cuda.set_stream(current)
                raise
            except Exception as e:  # e.g. an operation that waits for the host: not recordable
                torch.cuda.set_stream(current)  # a failed capture can leave its stream current
                torch.cuda.synchronize()
                warnings.warn(
                    f"running without a CUDA graph: capturing it failed ({type(e).__name__}: {e})",
                    stacklevel=3,
                )
                return None
        return graph, static_in, static_out
