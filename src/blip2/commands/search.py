"""`blip2 search --model M QUERY INPUTS...`: rank images (a folder, globs, shards, lists) for a text.

Every image is embedded once (ITC, batched, decoded by loader workers); the best `--rerank` by ITC are
re-scored with ITM and put first. Prints `rank  itm  itc  image` lines (`--json`: JSON lines).
Images that cannot be read are reported on stderr and left out.
"""

from __future__ import annotations

import argparse
import json
import sys

from blip2.commands import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("query", help="the text to search for")
    parser.add_argument("inputs", nargs="+", help="image files, folders, globs, .tar shards, .txt path lists")
    parser.add_argument("--top-k", type=int, default=10, help="results to print (default 10)")
    parser.add_argument("--rerank", type=int, default=32, help="ITC candidates re-ranked by ITM (default 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--workers", type=int, default=0, help="processes decoding images (default 0)")
    parser.add_argument("--json", action="store_true", help="JSON lines: {rank, image, itm, itc}")


def run(args: argparse.Namespace) -> int:
    import torch

    from blip2 import batch
    from blip2.errors import UserError

    common.show_notices()
    items = batch.expand_inputs(args.inputs)
    if not items:
        raise UserError("the inputs hold no images (folders and globs count .jpg, .png, ... files only)")
    pipe = common.load_pipeline(args.model, args.device, args.dtype, task="search")
    keys: list[str] = []
    feats: list[torch.Tensor] = []
    for chunk in batch.loader(items, pipe.image_processor, args.batch_size, args.workers, args.max_pixels):
        good = [(k, px) for k, px, _ in chunk if px is not None]
        for _, _, err in chunk:
            if err is not None:
                print(f"skipped: {err}", file=sys.stderr)
        if good:
            keys += [k for k, _ in good]
            feats.append(pipe.embed_pixels(torch.stack([px for _, px in good])))
    if not keys:
        raise UserError("none of the images could be read")
    by_itc = pipe.search(torch.cat(feats), args.query, top_k=len(keys), rerank=0)
    candidates = by_itc[: max(0, args.rerank)]
    by_key = {it.key: it for it in items}
    dataset = batch.ImageItems(
        [by_key[keys[h.index]] for h in candidates], pipe.image_processor, args.max_pixels
    )
    itm: dict[int, float] = {}
    if candidates:
        pixels = torch.stack([dataset[i][1] for i in range(len(candidates))])
        probs = pipe.match_pixels(pixels, [args.query] * len(candidates)).tolist()
        itm = {h.index: p for h, p in zip(candidates, probs, strict=True)}
    ranked = sorted(candidates, key=lambda h: -itm[h.index]) + by_itc[len(candidates) :]
    for rank, hit in enumerate(ranked[: args.top_k], 1):
        p = itm.get(hit.index)
        if args.json:
            rec = {"rank": rank, "image": keys[hit.index], "itm": p, "itc": round(hit.itc, 6)}
            print(json.dumps(rec, ensure_ascii=False))
        else:
            print(f"{rank:3d}  {'  -   ' if p is None else f'{p:.4f}'}  {hit.itc:+.4f}  {keys[hit.index]}")
    return 0
