"""`blip2 search --model M QUERY INPUTS...`: rank images (a folder, globs, shards, lists) for a text;
`blip2 search --index INDEX QUERY`: rank the images of an index (`blip2 index build`) instead.

Every image is embedded once (ITC, batched, decoded by loader workers); the best `--rerank` by ITC are
re-scored with ITM and put first, ordered by ITM positive logit + ITC cosine (`rerank_score`, the score
retrieval evaluation ranks by). Prints `rank  score  itm  itc  image` lines (`--json`: JSON lines).
Images that cannot be read are reported on stderr and left out (exit status 1; with `--index`, ranked
by ITC alone).

With `--index` nothing is embedded but the query: FAISS proposes `--candidates` images, they are scored
exactly (the max over their query embeddings) and the best `--rerank` are read again for ITM, ranked as
above (`blip2.index.Index.search`). `--model` defaults to the index's; another model is refused.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from blip2.cli import options
from blip2.errors import EXIT_OK, EXIT_SOME_FAILED, UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_arguments(  # a retrieval model: no LLM
        parser,
        model_help="hub id, model folder or LAVIS checkpoint file (with --index: the index's)",
        llm=False,
    )
    parser.add_argument("query", help="the text to search for")
    parser.add_argument("inputs", nargs="*", help="image files, folders, globs, .tar shards, .txt path lists")
    parser.add_argument("--index", help="search this index (`blip2 index build`) instead of INPUTS")
    parser.add_argument(
        "--candidates", type=int, default=None, help="with --index: images FAISS proposes (default 100)"
    )
    parser.add_argument("--top-k", type=int, default=10, help="results to print (default 10)")
    parser.add_argument("--rerank", type=int, default=32, help="ITC candidates re-ranked by ITM (default 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--workers", type=int, default=0, help="processes decoding images (default 0)")
    parser.add_argument("--json", action="store_true", help="JSON lines: {rank, image, score, itm, itc}")


def run(args: argparse.Namespace) -> int:
    import torch

    from blip2.data.inputs import ImageItems, expand_inputs, loader

    options.show_notices()
    if not args.query.strip():  # before the folder is embedded
        raise UserError("the query is empty: give the text to search for")
    if args.top_k < 1:
        raise UserError(f"--top-k must be 1 or more, not {args.top_k}")
    if args.rerank < 0 or args.batch_size < 1 or args.workers < 0:
        raise UserError("--rerank and --workers must be 0 or more and --batch-size 1 or more")
    if (args.index is None) == (not args.inputs):
        raise UserError("give either images to search (INPUTS) or an index (--index), not both or neither")
    if args.index is not None:
        return _search_index(args)
    if args.model is None:
        raise UserError("give the model to search with (--model)")
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
    _print(ranked, keys, args.json)
    return EXIT_SOME_FAILED if skipped else EXIT_OK


def _search_index(args: argparse.Namespace) -> int:
    from blip2.cli.index import load_model
    from blip2.index import Index
    from blip2.index.search import CANDIDATES, UnreadImageWarning

    candidates = CANDIDATES if args.candidates is None else args.candidates
    if candidates < 1:
        raise UserError(f"--candidates must be 1 or more, not {candidates}")
    index = Index.open(args.index)
    pipe = load_model(args, args.device, args.index)
    pipe.batch_size = args.batch_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnreadImageWarning)  # images that could not be read again for ITM
        ranked = index.search(
            pipe,
            args.query,
            top_k=args.top_k,
            rerank=args.rerank,
            candidates=candidates,
            max_pixels=args.max_pixels,
        )
    unread = [w for w in caught if issubclass(w.category, UnreadImageWarning)]
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)  # a notice: line each
    _print(ranked, index.paths, args.json)
    return EXIT_SOME_FAILED if unread else EXIT_OK


def _print(ranked: list[Any], keys: list[str], as_json: bool) -> None:
    """`rank  score  itm  itc  image` lines, or JSON lines."""
    from blip2.data.jsonl import json_line

    for rank, hit in enumerate(ranked, 1):
        if as_json:
            rec = {"rank": rank, "image": keys[hit.index], "score": hit.score, "itm": hit.itm}
            print(json_line({**rec, "itc": round(hit.itc, 6)}), end="")
        else:
            score, p = ("   -   ", "  -   ") if hit.itm is None else (f"{hit.score:+.4f}", f"{hit.itm:.4f}")
            name = keys[hit.index].encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            print(f"{rank:3d}  {score}  {p}  {hit.itc:+.4f}  {name}")  # --json keeps any name exactly
