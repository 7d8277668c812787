"""`blip2 match --model M IMAGE TEXT...`: how well each text matches the image.

Prints one line per text: the ITM match probability, the ITC cosine similarity and the text
(`--json`: one JSON object a line).
"""

from __future__ import annotations

import argparse
import json

from blip2.cli import options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_arguments(parser, llm=False)  # a retrieval model: no LLM
    parser.add_argument("image", help="the image file")
    parser.add_argument("texts", nargs="+", help="one or more texts")
    parser.add_argument("--json", action="store_true", help="JSON lines: {text, itm, itc}")


def run(args: argparse.Namespace) -> int:
    from blip2.processing import load_image

    options.show_notices()
    pipe = options.load_pipeline(
        args.model, args.device, args.dtype, method="match", **options.load_options(args)
    )
    image = load_image(args.image, args.max_pixels)
    itm = pipe.match(image, args.texts).tolist()
    itc = pipe.similarity(image, args.texts)[0].tolist()
    if not args.json:
        print("itm     itc     text")
    for text, p, s in zip(args.texts, itm, itc, strict=True):
        if args.json:
            print(json.dumps({"text": text, "itm": round(p, 6), "itc": round(s, 6)}, ensure_ascii=False))
        else:
            print(f"{p:.4f}  {s:+.4f} {text}")
    return 0
