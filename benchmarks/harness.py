"""The benchmark's harness: model sizes, the interleaved clock, and our model beside transformers' on the
same weights (`bench.py` runs the rows)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.interop import hf as hf_map
from blip2.interop.keymap import convert, unique_state_dict
from blip2.models import LanguageBridge, RetrievalModel, language
from blip2.presets import TINY_LLMS, preset

# ------------------------------------------------------------------------------------------ sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Batch sizes and model shapes of one mode."""

    stage1: Blip2Config
    stage2: Blip2Config
    caption_batch: int = 32
    beam_batch: int = 8
    stage2_batch: int = 32
    stage1_batch: int = 200
    qformer_batch: int = 128
    itm_images: int = 16
    itm_texts: int = 16  # candidate texts re-ranked per image
    text_len: int = 32
    new_tokens: int = 30
    t5: Blip2Config | None = None  # the `t5` row: a bridge with an encoder-decoder LLM
    t5_batch: int = 32
    dataset_batch: int = 256  # the `caption256` row: captioning a dataset
    e2e_images: int = 2048  # the `e2e` row: `blip2 caption` on this many JPEGs
    e2e_batch: int = 256
    e2e_size: tuple[int, int] = (640, 480)


def gpu_sizes() -> Sizes:
    """The paper's sizes: ViT-g (1408 x 39, 224 px), Q-Former 768 x 12, OPT-2.7b."""
    return Sizes(
        stage1=preset("blip2-stage1-vit-g"), stage2=preset("blip2-opt-2.7b"), t5=preset("blip2-flan-t5-xl")
    )


def with_tower_dtype(sizes: Sizes, dtype: str) -> Sizes:
    """The frozen image tower and LLM in `dtype` (the Q-Former's weights stay fp32)."""

    def cast(c: Blip2Config) -> Blip2Config:
        llm = dataclasses.replace(c.llm, dtype=dtype) if c.llm is not None else None
        return dataclasses.replace(c, vision=dataclasses.replace(c.vision, dtype=dtype), llm=llm)

    t5 = cast(sizes.t5) if sizes.t5 is not None else None
    return dataclasses.replace(sizes, stage1=cast(sizes.stage1), stage2=cast(sizes.stage2), t5=t5)


def cpu_sizes(quick: bool) -> Sizes:
    """Small shapes with the real structure (32 queries, cross-attention every 2nd layer, OPT vocab)."""
    vision = VisionConfig(
        hf_config={
            "model_type": "blip_2_vision_model",
            "hidden_size": 192,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 112,
            "patch_size": 14,
            "initializer_range": 0.02,
        },
        image_size=112,
    )
    qformer = QFormerConfig(
        hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, max_position_embeddings=64
    )
    llm = dict(TINY_LLMS["opt"])
    llm.update(
        hidden_size=256,
        word_embed_proj_dim=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        ffn_dim=1024,
        vocab_size=8192,  # a small vocabulary: the LM head of OPT's 50k would dominate a small model
        max_position_embeddings=256,
        eos_token_id=8000,
    )
    s1 = Blip2Config(vision=vision, qformer=qformer, embed_dim=128, name="cpu-stage1")
    s2 = Blip2Config(
        vision=vision,
        qformer=dataclasses.replace(qformer, text=False, itg_head=False),
        llm=LLMConfig(hf_config=llm, image_token_id=8100),
        name="cpu-opt",
    )
    t5 = dict(TINY_LLMS["t5"])  # the tests' tiny T5 (gated GELU, untied head, FlanT5's ids), larger
    t5.update(
        d_model=256, d_kv=64, d_ff=640, num_layers=4, num_decoder_layers=4, num_heads=4, vocab_size=8192
    )
    s2_t5 = dataclasses.replace(s2, llm=LLMConfig(hf_config=t5, image_token_id=8100), name="cpu-t5")
    n = 1 if quick else 2
    return Sizes(
        stage1=s1,
        stage2=s2,
        caption_batch=16,
        beam_batch=4,
        stage2_batch=8 * n,
        stage1_batch=16 * n,
        qformer_batch=16 * n,
        itm_images=4,
        itm_texts=8,
        text_len=16,
        new_tokens=30,
        t5=s2_t5,
        t5_batch=8,
        dataset_batch=32,
        e2e_images=64,
        e2e_batch=32,
        e2e_size=(320, 240),
    )


# ------------------------------------------------------------------------------------------ timing


class Clock:
    """Wall-clock timing that waits for the GPU, and peak-memory bookkeeping (CUDA only).

    `cpu_time`: on CPU, time the calling thread's CPU seconds instead of the wall clock. With one torch
    thread every operator runs on the calling thread, so this is the call's own work, steady on a
    machine other jobs share (the wall clock there also counts the time the job waited for a core).
    """

    def __init__(self, device: torch.device, cpu_time: bool = False):
        self.device = device
        self.now = time.thread_time if cpu_time and device.type == "cpu" else time.perf_counter

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, fn: Callable[[], Any]) -> tuple[float, float | None]:
        """Seconds for one call, and the peak memory (GiB) above what was allocated before it."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        self.sync()
        t = self.now()
        fn()
        self.sync()
        dt = self.now() - t
        peak = None
        if self.device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        return dt, peak


def interleaved(
    clock: Clock, fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Run each function `warmup` times, then alternate them `repeats` times; median seconds each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, float | None] = dict.fromkeys(fns)
    for _ in range(repeats):
        for name, fn in fns.items():
            dt, peak = clock.run(fn)
            times[name].append(dt)
            if peak is not None:
                peaks[name] = max(peaks[name] or 0.0, peak)
    if PROFILE_FILE:
        profile(clock, fns["ours"])
    return {
        k: {"median_s": statistics.median(v), "times_s": v, "peak_gib": peaks[k]} for k, v in times.items()
    }


PROFILE_FILE: str | None = None  # --profile: one profiled call of ours per row, appended here
PROFILE_ROW = ""


def profile(clock: Clock, fn: Callable[[], Any]) -> None:
    """The operators of one call of `fn`, by device time (CUDA) or CPU time, to a text file."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
        clock.sync()
    key = "cuda_time_total" if clock.device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
    with open(PROFILE_FILE, "a") as f:
        f.write(f"\n# {PROFILE_ROW}\n{table}\n")


# ------------------------------------------------------------------------------------------ models


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unique_state_dict(model).values())


def build_ours(config: Blip2Config, device: torch.device, seed: int) -> nn.Module:
    """Our model with random weights (LayerNorms randomized too), frozen towers in their dtype."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = RetrievalModel(config) if config.kind == "retrieval" else LanguageBridge(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight") and "norm" in name.lower():
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model.eval()


def build_theirs(ours: nn.Module, device: torch.device) -> nn.Module:
    """transformers' BLIP-2 holding our weights (shared tensors; built on the meta device)."""
    config = ours.config
    hf_config = hf_map.config_to_transformers(config)
    hf_config.vision_config._attn_implementation = "sdpa"
    if config.llm is not None:  # the LM's config as ours reads it: transformers 5.x rewrites some of
        # T5's fields on the way in (its head tied to the token table, GELU made tanh-approximate)
        hf_config.text_config = language.transformers_config(config.llm)
    cls = (
        transformers.Blip2ForConditionalGeneration
        if config.kind == "generation"
        else transformers.Blip2ForImageTextRetrieval
    )
    extra = hf_map.extra_keys(config)
    state = {k: v for k, v in unique_state_dict(ours).items() if not extra.match(k)}
    theirs_state = convert(state, hf_map.rules(), to="theirs")
    # transformers keeps only the Q-Former and queries in fp32 (its fp16 load): its vision tower's last
    # LayerNorm (our fp32 `ln_vision`) and the projection are in the towers' dtype
    vision_dtype = next(ours.visual.tower.parameters()).dtype
    for key in ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"):
        theirs_state[key] = theirs_state[key].to(vision_dtype)
    if config.kind == "generation":
        dtype = ours.llm.get_input_embeddings().weight.dtype
        for key in ("language_projection.weight", "language_projection.bias"):
            theirs_state[key] = theirs_state[key].to(dtype)
    with torch.device("meta"):
        model = cls._from_config(hf_config, attn_implementation="sdpa")
    buffers = {n for n, _ in model.named_buffers()}
    # filled by tie_weights(): the LM's head when it ties it, T5's encoder and decoder token tables (its `shared`)
    tied = {f"language_model.{k}" for k in ("lm_head", "encoder.embed_tokens", "decoder.embed_tokens")}
    tied = {f"{k}.weight" for k in tied}
    missing = [k for k in model.state_dict() if k not in theirs_state and k not in buffers | tied]
    if missing:
        raise RuntimeError(f"weights transformers needs that ours do not give: {missing[:5]}")
    model.load_state_dict(theirs_state, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):  # non-persistent buffers: rebuild them off meta
        if buf.is_meta:
            owner, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            owner._buffers[attr] = _rebuild_buffer(attr, buf, device)
    if config.kind == "generation":
        model.language_model.tie_weights()
        language.tie_input_embeddings(model.language_model)  # T5: encoder and decoder read `shared`
        meta = [n for n, p in model.named_parameters() if p.is_meta]
        if meta:
            raise RuntimeError(f"weights transformers needs that ours do not give: {meta[:5]}")
        # the LM's generation config, as ours uses it
        model.generation_config.eos_token_id = ours.eos_token_id
        model.generation_config.pad_token_id = ours.pad_token_id
    model.requires_grad_(False)
    return model.eval()


def _rebuild_buffer(name: str, buf: Tensor, device: torch.device) -> Tensor:
    if name == "position_ids":
        return torch.arange(buf.shape[-1], device=device).expand(buf.shape)
    raise RuntimeError(f"cannot rebuild the non-persistent buffer {name!r}")


def trainable_like_training(model: nn.Module, theirs: bool) -> list[nn.Parameter]:
    """Stage 2: the Q-Former, queries and projection train; the towers stay frozen (both sides)."""
    model.requires_grad_(False)
    if theirs:
        parts = [model.qformer, model.language_projection]
        model.query_tokens.requires_grad_(True)
        params = [model.query_tokens]
    else:
        parts = [model.qformer, model.language_projection, model.visual.ln_vision]
        model.query_tokens.requires_grad_(True)
        params = [model.query_tokens]
    for part in parts:
        part.requires_grad_(True)
        params += list(part.parameters())
    return params
