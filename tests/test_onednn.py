"""The oneDNN path of linear layers (`blip2.models.onednn`) equals PyTorch's `F.linear`, forward and
backward, and a model run through it equals the plain path."""

import os

import pytest
import torch
import torch.nn.functional as F
from test_stage2 import _prompts, images, make, pad

from blip2.config import Blip2Config
from blip2.generation import Decoding
from blip2.models import LanguageBridge, onednn
from blip2.presets import preset
from blip2.tasks.stage2 import Stage2Task

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="PyTorch built without oneDNN")


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("shape", [(16, 24), (3, 11, 24), (2, 3, 5, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_equals_f_linear(shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(40, 24, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if with_bias else None
    leaves = [x, w] + ([b] if with_bias else [])
    out, grads = _grads(lambda: onednn.linear(x, w, b), *leaves)
    assert onednn.linear(x, w, b).grad_fn.name() == "_LinearBackward"  # the oneDNN path ran
    ref, ref_grads = _grads(lambda: F.linear(x, w, b), *leaves)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # no autograd node: the oneDNN op itself
        torch.testing.assert_close(onednn.linear(x, w, b), ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)


def test_addmm_as_gpt2_calls_it_equals_torch_addmm(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 24, generator=g, requires_grad=True)
    w = torch.randn(24, 40, generator=g, requires_grad=True)  # Conv1D's (in, out) weight
    b = torch.randn(40, generator=g, requires_grad=True)
    calls = _count_products(monkeypatch)
    with onednn.linears():
        out, grads = _grads(lambda: torch.addmm(b, x, w), x, w, b)
        with pytest.raises(RuntimeError):  # shapes that do not fit: torch.addmm's own error
            torch.addmm(b, x, w.t())
    assert calls[0] == 3  # forward, and the input's and the weight's gradients
    ref, ref_grads = _grads(lambda: torch.addmm(b, x, w), x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)


def test_linear_strided_input_and_frozen_weight():
    x = torch.randn(24, 12, requires_grad=True)
    w = torch.randn(16, 24)  # frozen: only the input's gradient
    out, (gx,) = _grads(lambda: onednn.linear(x.t(), w), x)
    ref, (rx,) = _grads(lambda: F.linear(x.t(), w), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)


def test_linear_leaves_other_cases_to_pytorch():
    w = torch.randn(8, 6)
    few = torch.randn(onednn.MIN_ROWS - 1, 6, requires_grad=True)
    assert onednn.linear(few, w).grad_fn.name() != "_LinearBackward"
    x = torch.randn(16, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert onednn.linear(x, w).dtype == torch.bfloat16  # autocast keeps its say
    assert onednn.linear(x.double(), w.double()).dtype == torch.float64


def test_linears_context_routes_nn_linear_and_nests():
    layer = torch.nn.Linear(6, 4)
    x = torch.randn(16, 6, requires_grad=True)
    with onednn.linears():
        with onednn.linears():  # nested: one hook
            inner = layer(x)
        outer = layer(x)
    assert inner.grad_fn.name() == outer.grad_fn.name() == "_LinearBackward"
    assert layer(x).grad_fn.name() != "_LinearBackward"  # off again after the context
    with onednn.linears("meta"):  # another device: no hook
        assert layer(x).grad_fn.name() != "_LinearBackward"


def _count_products(monkeypatch) -> list[int]:
    """A counter of the oneDNN products run (the real op, counted)."""
    calls = [0]
    real = onednn._mm

    def counted(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(onednn, "_mm", counted)
    return calls


def test_linear_keeps_only_what_a_gradient_needs():
    x = torch.randn(16, 6, requires_grad=True)
    frozen = torch.randn(4, 6)  # a frozen weight: its input is not kept for backward
    out = onednn.linear(x, frozen)
    saved_x, saved_w = out.grad_fn.saved_tensors
    assert saved_x is None and saved_w is not None
    x.data.add_(1.0)  # an in-place change of the input after the product is then no error (as F.linear)
    out.sum().backward()
    torch.testing.assert_close(x.grad, frozen.sum(0).expand(16, 6))


def test_mismatched_devices_or_bias_go_to_f_linear():
    x, w = torch.randn(16, 6), torch.randn(4, 6)
    with pytest.raises(RuntimeError):  # F.linear's own error for a bias of the wrong size
        onednn.linear(x, w, torch.randn(3))
    torch.testing.assert_close(onednn.linear(x, w, torch.ones(1)), F.linear(x, w, torch.ones(1)))


def _bridge(name: str = "tiny-opt") -> LanguageBridge:
    torch.manual_seed(0)
    config: Blip2Config = preset(name)
    return LanguageBridge(config).eval()


def _stage2_step(model: LanguageBridge, padded: bool):
    """A function running one stage-2 training step of `model` (Q-Former trainable) on a fixed batch:
    its loss and the gradients it left (the same dropout masks on every call)."""
    model.train()
    model.qformer.requires_grad_(True)
    size = model.config.vision.image_size
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(8, 3, size, size, generator=g)
    ids = torch.randint(4, 90, (8, 7), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[:3, -2:] = 0

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout masks
        loss = Stage2Task(model)(pixels, ids, mask, prompt_lengths=1, return_logits=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    return run


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gpt2"])  # nn.Linear layers; GPT-2's Conv1D (addmm)
def test_bridge_loss_and_gradients_equal_the_plain_path(monkeypatch, name):
    model = _bridge(name)
    run = _stage2_step(model, padded=True)

    calls = _count_products(monkeypatch)
    fast_loss, fast = run()
    assert calls[0] > 0  # the route ran (forward and backward products)
    monkeypatch.setattr(onednn, "AVAILABLE", False)
    calls[0] = 0
    plain_loss, plain = run()
    assert calls[0] == 0
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fast.keys() == plain.keys() and fast
    for name in fast:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bridge_prefix_and_greedy_tokens_equal_the_plain_path(monkeypatch):
    model = _bridge()
    size = model.config.vision.image_size
    pixels = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(2))
    calls = _count_products(monkeypatch)
    prefix = model.prefix(pixels)
    tokens = Decoding().generate(model, pixels, max_new_tokens=6, mode="fast")
    assert calls[0] > 0  # the image side and the prefill went through oneDNN
    monkeypatch.setattr(onednn, "AVAILABLE", False)
    torch.testing.assert_close(prefix, model.prefix(pixels), rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, model.generate(pixels, max_new_tokens=6))


def test_compiled_decode_step_through_onednn_gives_the_plain_tokens(monkeypatch):
    """decode_mode="compiled" at a batch of `MIN_ROWS` or more traces the step's products as oneDNN ops
    (a compilation: some 20 s on 2 cores with a cold inductor cache)."""
    model = make("tiny-opt", lively=True).eval()
    prompts = (_prompts(model) * onednn.MIN_ROWS)[: onednn.MIN_ROWS]
    ids, mask = pad(prompts, "left", model.pad_token_id)
    pixels = images(onednn.MIN_ROWS)
    monkeypatch.setattr(onednn, "AVAILABLE", False)  # the plain path: PyTorch's products throughout
    plain = model.generate(pixels, ids, mask, max_new_tokens=6)
    monkeypatch.setattr(onednn, "AVAILABLE", True)
    assert len({tuple(row) for row in plain.tolist()}) > 1  # a model whose tokens depend on the input
    decoding = Decoding()
    for _ in range(2):  # the second call reuses the compiled step
        got = decoding.generate(model, pixels, ids, mask, max_new_tokens=6, mode="compiled")
        assert got.tolist() == plain.tolist()


def test_blip2_onednn_0_in_the_environment_turns_the_route_off():
    import subprocess
    import sys

    code = "from blip2.models import onednn; print(onednn.AVAILABLE)"
    for value, expected in (("0", "False"), ("1", str(onednn.AVAILABLE))):
        env = {**os.environ, "BLIP2_ONEDNN": value}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected


@pytest.mark.parametrize("where", ["qformer", "llm"])
def test_gradient_checkpointing_trains_with_the_plain_gradients(monkeypatch, where):
    """Training with gradient checkpointing keeps PyTorch's products (the recomputation in backward must
    save what the forward saved): the step runs and its gradients equal the step without it."""
    model = _bridge()
    run = _stage2_step(model, padded=False)

    monkeypatch.setattr(onednn, "AVAILABLE", False)
    plain_loss, plain = run()
    monkeypatch.setattr(onednn, "AVAILABLE", True)
    if where == "qformer":
        model.qformer.gradient_checkpointing = True
    else:
        model.llm.gradient_checkpointing_enable()
    loss, grads = run()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == plain.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
