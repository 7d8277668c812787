"""Tiny BLIP-2 checkpoints on disk for the usage tests (API, command line, server), built offline.

A captioner (`Blip2ForConditionalGeneration` with a tiny OPT) and a retriever
(`Blip2ForImageTextRetrieval`), every weight random (see `tiny_hf`), saved as transformers saves them
and loaded back through `blip2.load`, the path real checkpoints take. The captioner's tokenizer names
every id of its 99-token vocabulary (`w0`, `w1`, ...), so whatever the random model generates decodes
to visible words, and different images give different captions.
"""

from __future__ import annotations

from pathlib import Path

import tiny_hf
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import Blip2Processor, BlipImageProcessorPil, PreTrainedTokenizerFast

VOCAB = 99
CAPTIONER_SEED = 5


def full_word_tokenizer() -> PreTrainedTokenizerFast:
    """An OPT-like WordLevel tokenizer (`</s>` first) whose words fill ids up to `VOCAB - 2`."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for w in tiny_hf.WORDS:
        vocab[w] = len(vocab)
    while len(vocab) < VOCAB - 1:  # the last id is left for the processor's <image> token
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_captioner(path: Path, seed: int = CAPTIONER_SEED, text: object | None = None) -> Path:
    """A tiny random OPT captioner (16 px images, 8 queries) saved in transformers' layout; `text`: another
    decoder-only LM config (e.g. fewer positions) with the same vocabulary and special ids."""
    model, processor = tiny_hf.generation_model("opt", "a", seed=seed, text=text)
    size = tiny_hf.SHAPES["a"]["image"]
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=full_word_tokenizer(),
        num_query_tokens=tiny_hf.SHAPES["a"]["queries"],
    )
    model.config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_index < VOCAB
    return tiny_hf.save_generation(model, processor, path)


def save_retriever(path: Path, seed: int = 7) -> Path:
    """A tiny random stage-1 retriever (ITC + ITM) saved in transformers' layout."""
    model, tok = tiny_hf.retrieval_model("a", seed=seed)
    return tiny_hf.save_retrieval(model, tok, path)


def make_images(folder: Path, n: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    """`n` small random RGB PNGs of different sizes; returns their paths, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        h, w = 12 + (5 * i) % 17, 10 + (3 * i) % 23
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        p = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return sorted(paths)


def unusual_images(folder: Path) -> list[Path]:
    """Valid but unusual images that must be captioned, not rejected: CMYK, RGBA, palette, 16-bit,
    grayscale, EXIF-rotated, 1 x 1, and extreme aspect ratios."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)

    def rgb(h: int, w: int) -> Image.Image:
        return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())

    out = {
        "cmyk.jpg": rgb(20, 24).convert("CMYK"),
        "rgba.png": rgb(18, 18).convert("RGBA"),
        "palette.png": rgb(16, 20).convert("P"),
        "gray.png": rgb(16, 16).convert("L"),
        "one_pixel.png": rgb(1, 1),
        "wide.png": rgb(2, 400),
        "tall.png": rgb(300, 1),
    }
    sixteen = Image.fromarray(
        (torch.rand(14, 15, generator=g) * 65535).to(torch.int32).numpy().astype("uint16")
    )
    out["sixteen_bit.png"] = sixteen
    paths = []
    for name, im in out.items():
        paths.append(folder / name)
        im.save(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    rgb(10, 30).save(folder / "exif_rotated.jpg", exif=exif)
    paths.append(folder / "exif_rotated.jpg")
    return sorted(paths)


def bad_files(folder: Path) -> dict[Path, str]:
    """Files that are not usable images, each with a word its error line must contain."""
    import struct
    import zlib

    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "_whole.png"
    make_images(folder, 1, seed=9, prefix="_tmp")[0].rename(good)
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("this is not a picture")
    (folder / "empty.png").write_bytes(b"")

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # a PNG header that claims 30000 x 30000 pixels (a decompression bomb); the data is tiny
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )
    (folder / "bomb.png").write_bytes(bomb)
    return {
        folder / "truncated.png": "truncated",
        folder / "text.jpg": "not an image",
        folder / "empty.png": "not an image",
        folder / "bomb.png": "too large",
    }
