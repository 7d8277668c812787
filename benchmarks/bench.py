"""blip2 vs transformers' BLIP-2 on the same weights, side by side in one process.

    PYTHONPATH=src python benchmarks/bench.py                       # CPU, small sizes, a few minutes
    PYTHONPATH=src python benchmarks/bench.py --device cuda --out gpu.json   # real sizes, one GPU

Our model is built with random weights; its state dict, renamed with `blip2.interop.hf`, is loaded into
transformers' `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval` (on CUDA the tensors are
shared, not copied). Outputs are compared before anything is timed. Every timed row runs ours and
theirs alternately, `--repeats` times, and reports medians and the ratio ours/theirs in throughput
(> 1: we are faster). See benchmarks/README.md for what each row does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import harness  # noqa: E402  (the folder of this script is on sys.path)
import torch
import transformers
from e2e import run_e2e  # noqa: E402  (the folder of this script is on sys.path)
from harness import (  # noqa: E402  (the folder of this script is on sys.path)
    Clock,
    build_ours,
    build_theirs,
    cpu_sizes,
    gpu_sizes,
    interleaved,
    trainable_like_training,
    with_tower_dtype,
)
from torch import Tensor, nn

from blip2.generation import Decoding
from blip2.models import LanguageBridge, RetrievalModel
from blip2.tasks.stage1 import Stage1Task
from blip2.tasks.stage2 import Stage2Task
from blip2.train.config import OptimSection
from blip2.train.optim import MasterWeights

transformers.logging.set_verbosity_error()

# the 237 GFLOP per sample of the issue: the stage-1 step (ITC + ITM + ITG, forward and backward) at the
# paper's size (Q-Former 768 x 12, 32 queries, 257 image tokens of width 1408, 32 text tokens)
STAGE1_FLOP_PER_SAMPLE = 237e9
H100_BF16_DENSE = 767e12  # the measured bf16 matmul peak of one H100 (the datasheet says 989e12)

# ------------------------------------------------------------------------------------------ rows


def caption_inputs(ours: LanguageBridge, batch: int, device: torch.device, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = ours.config.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g).to(device)
    q = ours.config.qformer.num_query_tokens
    bos = ours.llm.config.bos_token_id
    image = ours.config.llm.image_token_id
    ids = torch.tensor([[image] * q + [bos]] * batch, device=device)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_caption(
    args: argparse.Namespace,
    clock: Clock,
    ours: LanguageBridge,
    decoding: Decoding,
    theirs: nn.Module,
    batch: int,
    beams: int,
    name: str,
    ours_mode: str,
) -> dict[str, Any]:
    inputs = caption_inputs(ours, batch, clock.device, seed=batch)
    q = ours.config.qformer.num_query_tokens
    n = args.new_tokens
    opts: dict[str, Any] = {"max_new_tokens": n, "min_new_tokens": n, "num_beams": beams}
    cast = {"pixel_values": inputs["pixel_values"].to(next(theirs.vision_model.parameters()).dtype)}

    def mine() -> Tensor:
        return decoding.generate(
            ours, inputs["pixel_values"], inputs["input_ids"][:, q:], mode=ours_mode, **opts
        )

    # the new tokens: a decoder-only LM's output repeats its input, an encoder-decoder's starts with its
    # decoder start token
    start = 1 if theirs.config.text_config.is_encoder_decoder else inputs["input_ids"].shape[1]

    def hf() -> Tensor:
        return theirs.generate(**{**inputs, **cast}, **opts)[:, start:]

    with torch.no_grad():
        try:
            a = mine()
        except Exception as e:  # the compiled static-cache path is CUDA-only and version-sensitive
            if ours_mode == "fast":
                raise
            print(
                f"decode_mode={ours_mode!r} failed ({type(e).__name__}: {e}); using 'fast'", file=sys.stderr
            )
            ours_mode = "fast"
            a = mine()
        b = hf()
    agree = (a == b).all(dim=1).float().mean().item() if a.shape == b.shape else 0.0
    res = interleaved(clock, {"ours": mine, "theirs": hf}, args.repeats)
    out = row(name, batch, res, unit="captions/s", agreement=f"{agree:.0%} rows token-identical")
    out["decode_mode"] = ours_mode if beams == 1 else f"{ours_mode} (blip2.generation.beam)"
    out["repeats"] = args.repeats
    if batch == 1:
        out["latency_ms"] = {side: 1000 * res[side]["median_s"] for side in res}
        out["agreement"] += f"; {out['latency_ms']['ours']:.0f} vs {out['latency_ms']['theirs']:.0f} ms"
    return out


def few_repeats(args: argparse.Namespace, most: int = 3) -> argparse.Namespace:
    """`args` with at most `most` repeats (the rows added for the GPU script's time budget)."""
    return argparse.Namespace(**{**vars(args), "repeats": min(args.repeats, most)})


def run_caption_t5(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Greedy captions with an encoder-decoder LLM (FlanT5-XL's dimensions on CUDA, a small T5 on CPU),
    ours against transformers' on the same weights, as the OPT caption rows."""
    config, batch = args.sizes.t5, args.sizes.t5_batch
    ours = build_ours(config, device, seed=2)
    ours.autocast_dtype = args.autocast
    theirs = build_theirs(ours, device)
    few = few_repeats(args)
    name = f"caption greedy, T5 LLM ({config.name})"
    return run_caption(
        few, Clock(device, args.cpu_time), ours, Decoding(), theirs, batch, 1, name, args.decode
    )


def compare_e2e(rows: list[dict[str, Any]]) -> None:
    """The command's rate against the dataset caption row's at the same batch (our fastest decode mode),
    beside its ratio to the model-only calls in the command's own mode."""
    e2e = next((r for r in rows if r["row"].startswith("blip2 caption end to end")), None)
    dataset = next((r for r in rows if r["row"] == "caption greedy, dataset batch"), None)
    if e2e is None or dataset is None or dataset["batch"] != e2e["batch"]:
        return
    e2e["ratio_to_dataset_row"] = e2e["ours"]["throughput"] / dataset["ours"]["throughput"]
    e2e["agreement"] += f"; {e2e['ratio_to_dataset_row']:.0%} of the dataset row ({dataset['decode_mode']})"


def master_weights(model: nn.Module) -> MasterWeights:
    """`--precision master`: the model's trainable weights become bf16 over fp32 masters, as
    `train.precision: bfloat16-master` trains them (no autocast; AdamW on the masters, lr 1e-9)."""
    model.autocast_dtype = None
    return MasterWeights(model, OptimSection(lr=1e-9, warmup_steps=0), torch.bfloat16)


def master_step(opt: MasterWeights) -> None:
    opt.take_grads()
    opt.step()
    opt.zero_grad(set_to_none=True)


def drop_master_weights(model: nn.Module, opt: MasterWeights, autocast: torch.dtype | None) -> None:
    """The model as before `master_weights`: fp32 trainable weights (the masters), its autocast."""
    for p, m in zip(opt.params, opt.masters, strict=True):
        p.data = m
    model.autocast_dtype = autocast


def precision_tag(args: argparse.Namespace) -> str:
    return " [bf16 weights, fp32 masters]" if args.precision == "master" else ""


def row(name: str, batch: int, res: dict[str, dict[str, Any]], unit: str, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"row": name, "batch": batch, "unit": unit, **extra}
    for side, r in res.items():
        out[side] = {**r, "throughput": batch / r["median_s"]}
    if "theirs" in res:
        out["ratio"] = res["theirs"]["median_s"] / res["ours"]["median_s"]
    return out


def run_stage2_train(
    args: argparse.Namespace, clock: Clock, ours: LanguageBridge, theirs: nn.Module, batch: int
):
    device = clock.device
    g = torch.Generator().manual_seed(7)
    size = ours.config.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g).to(device)
    vocab = ours.llm.config.vocab_size
    bos, q = ours.llm.config.bos_token_id, ours.config.qformer.num_query_tokens
    text = torch.randint(4, min(vocab, 50000), (batch, args.text_len), generator=g).to(device)
    text[:, 0] = bos
    mask = torch.ones_like(text)
    image = ours.config.llm.image_token_id
    hf_ids = torch.cat([torch.full((batch, q), image, device=device), text], dim=1)
    hf_mask = torch.ones_like(hf_ids)
    hf_labels = hf_ids.masked_fill(hf_ids == image, -100)
    hf_labels[:, q] = -100  # BOS is prompt, as prompt_lengths=1 on our side
    hf_pixels = pixels.to(next(theirs.vision_model.parameters()).dtype)

    # outputs agree before any update
    with torch.no_grad():
        loss_ours = Stage2Task(ours)(pixels, text, mask, prompt_lengths=1).loss.float().item()
        loss_theirs = theirs(hf_pixels, hf_ids, hf_mask, labels=hf_labels).loss.float().item()

    p_ours = trainable_like_training(ours, theirs=False)
    p_theirs = trainable_like_training(theirs, theirs=True)
    fused = device.type == "cuda" or None  # the same optimizer both sides: fused AdamW on CUDA
    master = master_weights(ours) if args.precision == "master" else None
    opt_ours = master or torch.optim.AdamW(p_ours, lr=1e-9, fused=fused)
    opt_theirs = torch.optim.AdamW(p_theirs, lr=1e-9, fused=fused)
    ours.train()
    theirs.train()
    ours.visual.tower.eval()

    def mine() -> None:  # as our training loop calls it: the loss only (no logits over the queries)
        loss = Stage2Task(ours)(pixels, text, mask, prompt_lengths=1, return_logits=False).loss
        loss.backward()
        if master is not None:
            master_step(master)
            return
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def hf() -> None:
        loss = theirs(hf_pixels, hf_ids, hf_mask, labels=hf_labels).loss
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    try:
        res = interleaved(clock, {"ours": mine, "theirs": hf}, args.repeats)
    finally:
        if master is not None:
            drop_master_weights(ours, master, args.autocast)
        ours.eval().requires_grad_(False)
        theirs.eval().requires_grad_(False)
    return row(
        "stage-2 training step (fwd+bwd+AdamW)" + precision_tag(args),
        batch,
        res,
        unit="samples/s",
        agreement=f"loss {loss_ours:.5f} vs {loss_theirs:.5f}",
    )


def run_qformer(args: argparse.Namespace, clock: Clock, ours: LanguageBridge, theirs: nn.Module, batch: int):
    """The Q-Former query pass, forward and backward, on image features."""
    device = clock.device
    n = (ours.config.vision.image_size // ours.config.vision.hf_config.get("patch_size", 14)) ** 2 + 1
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(batch, n, ours.config.vision.width, generator=g).to(device)
    qf, proj = ours.qformer, ours.language_projection
    qf.requires_grad_(True)
    theirs.qformer.requires_grad_(True)
    dtype = args.autocast

    def mine() -> None:
        with autocast_ctx(device, dtype):
            queries = ours.query_tokens.expand(batch, -1, -1)
            out = proj(qf(queries=queries, image_embeds=feats).hidden)
        out.float().square().mean().backward()

    def hf() -> None:
        out = theirs.qformer(
            query_embeds=theirs.query_tokens.expand(batch, -1, -1), encoder_hidden_states=feats
        ).last_hidden_state
        theirs.language_projection(
            out.to(theirs.language_projection.weight.dtype)
        ).float().square().mean().backward()

    with torch.no_grad(), autocast_ctx(device, dtype):
        a = qf(queries=ours.query_tokens.expand(batch, -1, -1), image_embeds=feats).hidden.float()
    with torch.no_grad():
        b = theirs.qformer(
            query_embeds=theirs.query_tokens.expand(batch, -1, -1), encoder_hidden_states=feats
        ).last_hidden_state.float()
    diff = (a - b).abs().max().item()
    try:
        res = interleaved(clock, {"ours": mine, "theirs": hf}, args.repeats)
    finally:
        qf.requires_grad_(False)
        theirs.qformer.requires_grad_(False)
        for p in list(qf.parameters()) + list(theirs.qformer.parameters()):
            p.grad = None
    tag = f"ours {str(dtype).removeprefix('torch.')} autocast" if dtype else "both fp32"
    return row(
        f"Q-Former query pass fwd+bwd ({tag})", batch, res, "samples/s", agreement=f"max |diff| {diff:.2e}"
    )


def autocast_ctx(device: torch.device, dtype: torch.dtype | None) -> Any:
    from blip2.models.qformer import autocast

    return autocast(device, dtype)


def run_stage1(args: argparse.Namespace, clock: Clock, model: RetrievalModel, batch: int) -> dict[str, Any]:
    """The stage-1 step on cached features: ITC + ITM + ITG, backward, AdamW (ours only)."""
    device = clock.device
    g = torch.Generator().manual_seed(5)
    n = (model.config.vision.image_size // model.config.vision.hf_config.get("patch_size", 14)) ** 2 + 1
    tower_dtype = next(model.visual.tower.parameters()).dtype
    feats = torch.randn(batch, n, model.config.vision.width, generator=g).to(device, tower_dtype)
    ids = torch.randint(1000, 30000, (batch, args.text_len), generator=g).to(device)
    ids[:, 0] = model.config.qformer.cls_token_id
    mask = torch.ones_like(ids)
    mask[batch // 2 :, args.text_len // 2 :] = 0  # some padding
    model.train()
    model.autocast_dtype = args.autocast
    params = [p for p in model.parameters() if p.requires_grad]
    master = master_weights(model) if args.precision == "master" else None
    opt = master or torch.optim.AdamW(params, lr=1e-9, fused=device.type == "cuda" or None)  # as blip2.train

    task = Stage1Task(model)

    def step() -> None:
        out = task(ids, mask, image_features=feats)
        out.loss.backward()
        if master is not None:
            master_step(master)
            return
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        res = interleaved(clock, {"ours": step}, args.repeats)
    finally:
        if master is not None:
            drop_master_weights(model, master, args.autocast)
        model.eval()
    name = "stage-1 step, cached features (ITC+ITM+ITG, fwd+bwd+AdamW)" + precision_tag(args)
    out = row(name, batch, res, "samples/s")
    sps = out["ours"]["throughput"]
    if device.type == "cuda":
        out["fraction_of_peak"] = sps * STAGE1_FLOP_PER_SAMPLE / args.peak_flops
        out["vs_lavis_444"] = sps / 444.0
    return out


def run_itm(
    args: argparse.Namespace, clock: Clock, ours: RetrievalModel, theirs: nn.Module
) -> dict[str, Any]:
    """Re-ranking: every image against its k candidate texts (ITM head)."""
    device = clock.device
    n_img, k = args.sizes.itm_images, args.sizes.itm_texts
    g = torch.Generator().manual_seed(11)
    size = ours.config.vision.image_size
    pixels = torch.randn(n_img, 3, size, size, generator=g).to(device)
    ids = torch.randint(1000, 30000, (n_img * k, args.text_len), generator=g).to(device)
    ids[:, 0] = ours.config.qformer.cls_token_id
    mask = torch.ones_like(ids)
    hf_pixels = pixels.to(next(theirs.vision_model.parameters()).dtype).repeat_interleave(k, dim=0)

    @torch.no_grad()
    def mine() -> Tensor:
        # the ViT once per image; each image's cross-attention keys/values projected once for its k texts
        with autocast_ctx(device, args.autocast):
            image_kv = ours.qformer.image_kv(ours.encode_image(pixels))
            image_kv = [
                None if kv is None else tuple(t.repeat_interleave(k, 0) for t in kv) for kv in image_kv
            ]
            logits = ours.itm_logits(ids, mask, image_kv=image_kv)
        return logits.float().softmax(-1)[:, 1]

    @torch.no_grad()
    def hf() -> Tensor:
        out = theirs(
            pixel_values=hf_pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True
        )
        return out.logits_per_image.float().softmax(-1)[:, 1]

    diff = (mine() - hf()).abs().max().item()
    res = interleaved(clock, {"ours": mine, "theirs": hf}, args.repeats)
    return row(
        f"ITM re-ranking ({n_img} images x {k} texts)",
        n_img * k,
        res,
        "pairs/s",
        agreement=f"max |p diff| {diff:.2e}",
    )


# ------------------------------------------------------------------------------------------ main


def fmt_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'row':<58} {'batch':>5} {'ours':>11} {'theirs':>11} {'ratio':>6} {'peak GiB o/t':>13}  check"
    lines = [head, "-" * len(head)]
    for r in rows:
        theirs = r.get("theirs", {}).get("throughput")
        peak = "/".join(
            f"{r[s]['peak_gib']:.1f}" if r.get(s, {}).get("peak_gib") is not None else "-"
            for s in ("ours", "theirs")
        )
        theirs_s = "-" if theirs is None else f"{theirs:.2f}"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        check = r.get("agreement", "")
        if "fraction_of_peak" in r:
            check = f"{r['fraction_of_peak']:.0%} of peak, {r['vs_lavis_444']:.2f}x LAVIS"
        lines.append(
            f"{r['row']:<58} {r['batch']:>5} {r['ours']['throughput']:>11.2f} {theirs_s:>11} "
            f"{ratio:>6} {peak:>13}  {check}"
        )
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
    }
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        env["load_average"] = os.getloadavg()
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 5; quick 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="with --threads 1 on CPU: time each call's CPU seconds, not wall seconds (a shared machine)",
    )
    p.add_argument(
        "--decode",
        "--cpu-decode",
        default="compiled",
        choices=["fast", "compiled", "static", "transformers"],
        help="our decode mode, greedy and beams (compiled: a torch.compile'd static-cache step, CUDA graphs "
        "on CUDA; compile time excluded)",
    )
    p.add_argument("--out", default=None, help="write the rows and environment as JSON here")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE, help="for the fraction of peak")
    p.add_argument(
        "--tower-dtype", choices=("float32", "bfloat16"), default=None, help="frozen ViT and LLM (cuda: bf16)"
    )
    p.add_argument(
        "--autocast", choices=("none", "bfloat16"), default=None, help="our Q-Former compute (cuda: bf16)"
    )
    p.add_argument(
        "--precision",
        choices=("autocast", "master"),
        default="autocast",
        help="the training rows (stage1, stage2): our trainable weights fp32 with --autocast, or bf16 weights "
        "over fp32 master copies in AdamW (train.precision: bfloat16-master; --autocast then unused there)",
    )
    p.add_argument("--profile", default=None, help="append one profiled call of ours per row to this file")
    p.add_argument(
        "--rows",
        default="caption,beam,stage2,qformer,stage1,itm",
        help="comma-separated rows; also caption256 (dataset captioning batch), t5 (an encoder-decoder "
        "LLM) and e2e (the `blip2 caption` command on a folder of JPEGs), which gpu.sh runs",
    )
    p.add_argument("--e2e-images", type=int, default=None, help="JPEGs the e2e row captions")
    p.add_argument(
        "--e2e-workers",
        type=int,
        default=None,
        help="the e2e row's decoding workers (default: CPU cores - 1, at most 8)",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and torch.get_num_threads() != 1:
        p.error("--cpu-time counts the calling thread only: use it with --threads 1")
    args.repeats = args.repeats or (3 if args.quick else 5)
    sizes = gpu_sizes() if device.type == "cuda" else cpu_sizes(args.quick)
    # frozen towers in bf16 and bf16 Q-Former compute over fp32 weights on the GPU; fp32 on CPU
    tower_dtype = args.tower_dtype or ("bfloat16" if device.type == "cuda" else "float32")
    sizes = with_tower_dtype(sizes, tower_dtype)
    autocast = args.autocast or ("bfloat16" if device.type == "cuda" else "none")
    args.autocast = None if autocast == "none" else torch.bfloat16
    args.sizes, args.text_len, args.new_tokens = sizes, sizes.text_len, sizes.new_tokens
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    wanted = set(args.rows.split(","))
    known = {"caption", "caption256", "beam", "stage2", "qformer", "e2e", "t5", "stage1", "itm"}
    if wanted - known:
        p.error(
            f"--rows: unknown {', '.join(sorted(wanted - known))}; the rows are {', '.join(sorted(known))}"
        )
    harness.PROFILE_FILE = args.profile  # read by harness.profile
    env = {**environment(device), "clock": "thread CPU time" if args.cpu_time else "wall"}
    print(json.dumps(env), file=sys.stderr)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []

    def save() -> None:
        if args.out:  # after every row: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"environment": env, "rows": rows, "errors": errors}, f, indent=1)

    def report(r: dict[str, Any]) -> None:
        rows.append(r)
        print(fmt_table([r]).splitlines()[-1], file=sys.stderr, flush=True)
        save()

    def attempt(name: str, fn: Callable[..., dict[str, Any]], *fn_args: Any) -> None:
        """One row; a row that fails is recorded with its error and the others still run."""
        harness.PROFILE_ROW, t = name, time.perf_counter()
        try:
            r = fn(*fn_args)
        except Exception as e:  # a benchmark reports a broken row rather than losing the others
            import traceback

            traceback.print_exc()
            errors.append({"row": name, "error": f"{type(e).__name__}: {e}"})
            print(f"{name}: FAILED ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
            save()
            return
        r["wall_s"] = time.perf_counter() - t
        report(r)

    if wanted & {"caption", "caption256", "beam", "stage2", "qformer", "e2e"}:
        ours = build_ours(sizes.stage2, device, seed=0)
        ours.autocast_dtype = args.autocast
        theirs = build_theirs(ours, device)
        mode, decoding = args.decode, Decoding()  # the decode step compiled once for every row
        captions = [(1, 1, "caption greedy, batch 1"), (sizes.caption_batch, 1, "caption greedy")]
        captions = [c for c in captions if "caption" in wanted]
        if "caption256" in wanted:
            captions += [(sizes.dataset_batch, 1, "caption greedy, dataset batch")]
        captions += [(sizes.beam_batch, 5, "caption 5 beams")] if "beam" in wanted else []
        for batch, beams, name in captions:
            clock = Clock(device, args.cpu_time)
            row_args = few_repeats(args) if name == "caption greedy, dataset batch" else args
            attempt(name, run_caption, row_args, clock, ours, decoding, theirs, batch, beams, name, mode)
        if "stage2" in wanted:
            attempt(
                "stage-2",
                run_stage2_train,
                args,
                Clock(device, args.cpu_time),
                ours,
                theirs,
                sizes.stage2_batch,
            )
        if "qformer" in wanted:
            attempt(
                "qformer", run_qformer, args, Clock(device, args.cpu_time), ours, theirs, sizes.qformer_batch
            )
        if "e2e" in wanted:
            workers = args.e2e_workers
            workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if workers is None else workers
            images = args.e2e_images or sizes.e2e_images
            clock = Clock(device)  # the wall clock, as the command's own rate
            few = few_repeats(args)
            attempt("e2e", run_e2e, few, clock, ours, sizes.e2e_batch, images, workers, sizes.e2e_size)
            compare_e2e(rows)
            save()
        del ours, theirs, decoding
        if device.type == "cuda":
            torch._dynamo.reset()  # drop the compiled decode step and its CUDA-graph memory pool
            torch.cuda.empty_cache()
    if "t5" in wanted:
        attempt("t5", run_caption_t5, args, device)
        if device.type == "cuda":
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    if wanted & {"stage1", "itm"}:
        s1 = build_ours(sizes.stage1, device, seed=1)
        if "itm" in wanted:
            attempt("itm", lambda: run_itm(args, Clock(device, args.cpu_time), s1, build_theirs(s1, device)))
        if "stage1" in wanted:
            attempt("stage-1", run_stage1, args, Clock(device, args.cpu_time), s1, sizes.stage1_batch)

    print(fmt_table(rows))
    for e in errors:
        print(f"{e['row']}: FAILED ({e['error']})")
    print(json.dumps(env))
    save()
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
