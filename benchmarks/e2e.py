"""The `e2e` row of `bench.py`: the real `blip2 caption` command on a folder of JPEGs, against the same
model's calls on pixels already decoded.

The bench's random model is saved with `save_pretrained` (with a word tokenizer that names every id of
its vocabulary), `N` JPEGs are written, and the command runs in a fresh process with `--batch-size` and
`--workers` decoding workers, greedy search for the bench's number of tokens. Its rate is the one it
prints (model loading excluded, its first batch's warm-up included). The model-only rate is the
command's per-batch call (`Captioner.generate_from_pixels`: prompts, the model, the text) on the first
batch's pixels, decoded by the command's own loader, timed in this process with the model that was
saved, set as the command loads it (no Q-Former autocast); its captions must be the command's for
those images (which also checks that the saved folder loads as the same model).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness import Clock, interleaved
from PIL import Image
from torch import nn

DISTINCT_JPEGS = 64  # the folder repeats this many different images (decoding costs the same)


def word_tokenizer(model: nn.Module) -> Any:
    """An OPT-like tokenizer (`</s>` first) whose words `w<id>` name every id of the model's LM, with
    the model's EOS id for "\\n" (OPT's caption end) and its `<image>` id."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    cfg = model.llm.config
    special = {"<s>": 0, "<pad>": cfg.pad_token_id, "</s>": cfg.bos_token_id, "<unk>": 3}
    special.update({"\n": model.eos_token_id, "<image>": model.config.llm.image_token_id})
    taken = set(special.values())
    if len(taken) != len(special):
        raise ValueError(f"the tokenizer's special ids collide: {special}")
    vocab = {f"w{i}": i for i in range(cfg.vocab_size) if i not in taken}
    vocab.update(special)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", special["</s>"])]
    )
    tok.add_tokens([AddedToken("\n", normalized=False)])  # matched before the whitespace split
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def write_jpegs(folder: Path, n: int, size: tuple[int, int]) -> None:
    """`n` JPEGs of `size` (width, height), smooth random images, `DISTINCT_JPEGS` of them repeated."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w, h = size
    distinct = []
    for i in range(min(n, DISTINCT_JPEGS)):
        coarse = rng.integers(0, 255, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(path, quality=90)
        distinct.append(path.read_bytes())
    for i in range(len(distinct), n):
        (folder / f"{i:05d}.jpg").write_bytes(distinct[i % len(distinct)])


def model_only_side(
    args: argparse.Namespace, clock: Clock, pipe: Any, folder: Path, batch: int, opts: dict[str, Any]
) -> tuple[list[str], list[str], dict[str, Any]]:
    """The command's per-batch call on its loader's first batch of `folder`: that batch's keys and
    captions, and the timing."""
    from blip2.data.inputs import expand_inputs, loader

    prompts = [pipe.config.llm.prompt] * batch
    items = expand_inputs([str(folder)])[:batch]
    first = next(iter(loader(items, pipe.image_processor, batch, 0)))
    keys = [k for k, _, _ in first]
    pixels = torch.stack([px for _, px, _ in first])

    def call() -> list[str]:
        return pipe.generate_from_pixels(pixels, prompts[: len(keys)], **opts)

    reference = call()
    return keys, reference, interleaved(clock, {"ours": call}, args.repeats)


def run_e2e(
    args: argparse.Namespace,
    clock: Clock,
    ours: nn.Module,
    batch: int,
    images: int,
    workers: int,
    size: tuple[int, int],
) -> dict[str, Any]:
    import blip2
    from blip2.pipelines import Captioner
    from blip2.processing import ImageProcessor

    n = args.new_tokens
    opts = {"num_beams": 1, "max_new_tokens": n, "min_new_tokens": n}
    device = clock.device
    with tempfile.TemporaryDirectory(prefix="blip2-bench-e2e-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        pipe = Captioner(ours, ImageProcessor(size=ours.config.vision.image_size), word_tokenizer(ours))
        pipe.save_pretrained(root / "model")
        # both sides decode in `fast` mode: the command's rate counts its first batches, and a compiled
        # step's one-time compilation there would swamp a run of a few batches
        pipe.decoding.mode = "fast"
        write_jpegs(root / "images", images, size)
        prep_s = time.perf_counter() - t
        # the model as the command loads it: no autocast (the Q-Former computes in its fp32 weights)
        autocast, ours.autocast_dtype = ours.autocast_dtype, None
        try:
            keys, reference, res = model_only_side(args, clock, pipe, root / "images", batch, opts)
        finally:
            ours.autocast_dtype = autocast
        mode, dtype = pipe.decoding.mode, next(ours.llm.parameters()).dtype
        del pipe  # its decoding caches

        out = root / "captions.jsonl"
        cmd = [sys.executable, "-m", "blip2.cli", "caption", "--model", str(root / "model")]
        cmd += [str(root / "images"), "--out", str(out), "--device", str(device), "--no-progress"]
        cmd += ["--batch-size", str(batch), "--workers", str(workers)]
        cmd += ["--num-beams", "1", "--max-new-tokens", str(n), "--min-new-tokens", str(n)]
        cmd += ["--decode-mode", mode]
        if device.type == "cpu":
            cmd += ["--threads", str(torch.get_num_threads())]
        src = str(Path(blip2.__file__).resolve().parents[1])  # this checkout's package, no install step
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        wall = time.perf_counter() - t
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 0:
            raise RuntimeError(f"blip2 caption exited with {proc.returncode}: {' | '.join(lines[-5:])}")
        rates = [re.search(r"(\d+) images in ([\d.]+) s \(([\d.]+) images/s", line) for line in lines]
        found = next((m for m in reversed(rates) if m is not None), None)
        if found is None:
            raise RuntimeError(f"blip2 caption printed no rate: {' | '.join(lines[-5:])}")
        done, rate = int(found.group(1)), float(found.group(3))  # its rate has more digits than its seconds
        captions = {r["image"]: r.get("caption") for r in map(json.loads, out.read_text().splitlines())}
    if done != images or len(captions) != images:
        raise RuntimeError(f"blip2 caption captioned {done} of {images} images ({len(captions)} lines)")
    same = sum(captions.get(k) == c for k, c in zip(keys, reference, strict=True)) / len(keys)
    if same < 1:
        raise RuntimeError(f"blip2 caption's captions differ from the in-process ones ({same:.0%} equal)")
    seconds = done / rate
    model_only = len(keys) / res["ours"]["median_s"]
    w, h = size
    return {
        "row": f"blip2 caption end to end ({images} JPEGs {w}x{h}, {workers} workers)",
        "batch": batch,
        "unit": "images/s",
        "ours": {"median_s": seconds, "times_s": [seconds], "peak_gib": None, "throughput": rate},
        "model_only": {**res["ours"], "throughput": model_only},
        "ratio_to_model_only": rate / model_only,
        "command_wall_s": wall,
        "prepare_s": prep_s,
        "decode_mode": mode,
        "llm_dtype": str(dtype).removeprefix("torch."),
        "command": " ".join(["blip2", *cmd[3:]]).replace(tmp, "TMP"),
        "repeats": args.repeats,
        "agreement": (
            f"{same:.0%} of batch 1's captions ({len(set(reference))} distinct) = in-process; "
            f"{rate / model_only:.0%} of model-only "
            f"{model_only:.1f}/s"
        ),
    }
