"""`blip2 search --model M QUERY INPUTS...`: rank images (a folder, globs, shards, lists) for a text.

Every image is embedded once (ITC, batched, decoded by loader workers); the best `--rerank` by ITC are
re-scored with ITM and put first, ordered by ITM positive logit + ITC cosine (`rerank_score`, the score
retrieval evaluation ranks by). Prints `rank  score  itm  itc  image` lines (`--json`: JSON lines).
Images that cannot be read are reported on stderr and left out (exit status 1).
"""

from __future__ import annotations

import argparse
import sys

from blip2.cli import options
from blip2.errors import EXIT_OK, EXIT_SOME_FAILED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_arguments(parser)
    parser.add_argument("query", help="the text to search for")
    parser.add_argument("inputs", nargs="+", help="image files, folders, globs, .tar shards, .txt path lists")
    parser.add_argument("--top-k", type=int, default=10, help="results to print (default 10)")
    parser.add_argument("--rerank", type=int, default=32, help="ITC candidates re-ranked by ITM (default 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--workers", type=int, default=0, help="processes decoding images (default 0)")
    parser.add_argument("--json", action="store_true", help="JSON lines: {rank, image, score, itm, itc}")


def run(args: argparse.Namespace) -> int:
    import torch

    from blip2.data.inputs import ImageItems, expand_inputs, loader
    from blip2.data.jsonl import json_line
    from blip2.errors import UserError

    options.show_notices()
    if not args.query.strip():  # before the folder is embedded
        raise UserError("the query is empty: give the text to search for")
    if args.top_k < 1:
        raise UserError(f"--top-k must be 1 or more, not {args.top_k}")
    if args.rerank < 0 or args.batch_size < 1 or args.workers < 0:
        raise UserError("--rerank and --workers must be 0 or more and --batch-size 1 or more")
    items = expand_inputs(args.inputs)
    if not items:
        raise UserError("the inputs hold no images (folders and globs count .jpg, .png, ... files only)")
    pipe = options.load_pipeline(
        args.model, args.device, args.dtype, method="search", **options.load_options(args)
    )
    keys: list[str] = []
    feats: list[torch.Tensor] = []
    skipped = 0
    for chunk in loader(items, pipe.image_processor, args.batch_size, args.workers, args.max_pixels):
        good = [(k, px) for k, px, _ in chunk if px is not None]
        for _, _, err in chunk:
            if err is not None:
                skipped += 1
                print(f"skipped: {err}", file=sys.stderr)
        if good:
            keys += [k for k, _ in good]
            feats.append(pipe.embed_pixels(torch.stack([px for _, px in good])))
    if not keys:
        raise UserError("none of the images could be read")
    by_key = {it.key: it for it in items}

    def pixels(indices: list[int]) -> torch.Tensor:  # the ITM candidates, read again
        dataset = ImageItems([by_key[keys[i]] for i in indices], pipe.image_processor, args.max_pixels)
        return torch.stack([dataset[n][1] for n in range(len(indices))])

    pipe.batch_size = args.batch_size
    ranked = pipe.search(torch.cat(feats), args.query, top_k=args.top_k, rerank=args.rerank, pixels=pixels)
    for rank, hit in enumerate(ranked, 1):
        if args.json:
            rec = {"rank": rank, "image": keys[hit.index], "score": hit.score, "itm": hit.itm}
            print(json_line({**rec, "itc": round(hit.itc, 6)}), end="")
        else:
            score, p = ("   -   ", "  -   ") if hit.itm is None else (f"{hit.score:+.4f}", f"{hit.itm:.4f}")
            name = keys[hit.index].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            print(f"{rank:3d}  {score}  {p}  {hit.itc:+.4f}  {name}")  # --json keeps any name exactly
    return EXIT_SOME_FAILED if skipped else EXIT_OK
