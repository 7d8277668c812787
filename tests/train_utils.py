"""Helpers for the training tests: small real datasets on disk (tar shards, JSON + image files), a
small real LLM tokenizer, and running the CLI under torchrun."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image

WORDS = "a dog cat man woman red blue green on the grass street table runs sits with small big".split()


def caption(i: int, words: int = 5) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=words))


def image_bytes(i: int, size: int = 20, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(1000 + i)
    arr = rng.integers(0, 255, size=(size, size + 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(
    folder: str, shards: int = 4, per_shard: int = 8, corrupt: set[int] = (), no_caption: set[int] = ()
) -> str:
    """img2dataset-style shards `00000.tar ...`; returns the brace pattern. Sample numbers in
    `corrupt` get bytes that are not an image; those in `no_caption` have neither txt nor caption."""
    os.makedirs(folder, exist_ok=True)
    n = 0
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for _ in range(per_shard):
                key = f"{n:09d}"
                img = b"\xff\xd8\xff\xe0 this is not a jpeg" if n in corrupt else image_bytes(n)
                _add(tar, key + ".jpg", img)
                meta = {
                    "url": f"http://x/{n}.jpg",
                    "key": key,
                    "status": "success",
                    "width": 24,
                    "height": 20,
                }
                if n not in no_caption:
                    _add(tar, key + ".txt", caption(n).encode())
                    meta["caption"] = caption(n)
                _add(tar, key + ".json", json.dumps(meta).encode())
                n += 1
    return os.path.join(folder, "{00000.." + f"{shards - 1:05d}" + "}.tar")


def make_caption_json(folder: str, n: int = 16, words: int = 5) -> tuple[str, str]:
    """A plain `[{image, caption}]` file and its image folder; returns `(json_path, image_root)`."""
    root = os.path.join(folder, "images")
    os.makedirs(root, exist_ok=True)
    items = []
    for i in range(n):
        name = f"im{i:03d}.jpg"
        with open(os.path.join(root, name), "wb") as f:
            f.write(image_bytes(i))
        items.append({"image": name, "caption": caption(i, words)})
    path = os.path.join(folder, "captions.json")
    with open(path, "w") as f:
        json.dump(items, f)
    return path, root


def make_llm_tokenizer(folder: str, vocab_size: int = 99) -> str:
    """A character-level tokenizer that fits the tiny LLM presets (vocab 99): `<s>`=0, `<pad>`=1,
    `</s>`=2 (BOS and EOS, as OPT), `<unk>`=3, then characters. Saved with `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 .,?!'\n:-")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in chars:
        vocab[c] = len(vocab)
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 120, env: dict | None = None):
    """Run `python -m torch.distributed.run --nproc_per_node=N ARGS` and return the CompletedProcess."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def failure(p: subprocess.CompletedProcess) -> str:
    """A failed run's stderr for an assertion message: its start (where a rank's own error is) and its
    end (torchrun's summary), not the end alone."""
    err = p.stderr or ""
    return err if len(err) <= 6000 else f"{err[:3000]}\n[...]\n{err[-3000:]}"


def blip2_cli(args: list[str], timeout: int = 120):
    """Run `python -m blip2.cli ARGS` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "blip2.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
