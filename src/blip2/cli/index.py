"""`blip2 index build|add|info|remove`: a persistent image index that `blip2 search --index` searches.

```
blip2 index build IMAGES... --model M --out photos.index   # embed once; rerun to resume after a kill
blip2 index add photos.index IMAGES...                     # grow it (a path added again is replaced)
blip2 index remove photos.index PATHS...                   # forget images
blip2 index info photos.index                              # model, size, settings
blip2 index rebuild photos.index [--faiss TYPE]            # the FAISS index built anew (retrained)
```

One command changes an index at a time: a second `build`, `add`, `remove` or `rebuild` while one runs is
refused (searches go on, over what was last merged).

IMAGES are image files, folders, globs, webdataset `.tar` shards and `.txt` path lists (as for
`blip2 caption`). Under `torchrun --nproc-per-node N -m blip2.cli index build ...` each process embeds
its share into its own segment and rank 0 merges them. Images that cannot be read are reported on
stderr and left out (exit status 1; a rerun tries them again).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from blip2.cli import options
from blip2.errors import EXIT_OK, EXIT_SOME_FAILED, UserError


def _optional_model(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The model options, with `--model` optional (an existing index names its own)."""
    options.add_model_arguments(parser, model_help=help_text, llm=False)


def _embedding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--workers", type=int, default=0, help="processes decoding images (default 0)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="embed images into a new index (or resume one)")
    build.add_argument("inputs", nargs="+", help="image files, folders, globs, .tar shards, .txt path lists")
    build.add_argument("--out", required=True, help="the index folder")
    options.add_model_arguments(build, llm=False)  # a retrieval model: no LLM
    _embedding_arguments(build)
    build.add_argument(
        "--precision", choices=("float16", "float32"), default="float16",
        help="how embeddings are stored (default float16: half the size, cosines within about 1e-3)",
    )  # fmt: skip
    build.add_argument(
        "--strategy", choices=("queries", "pooled"), default="queries",
        help="what FAISS indexes: all of an image's query vectors (default) or one pooled vector",
    )  # fmt: skip
    build.add_argument("--faiss", default="auto", help="FAISS index_factory string (default: by size)")
    add = sub.add_parser("add", help="add images to an index (a path added again is replaced)")
    add.add_argument("index", help="the index folder")
    add.add_argument("inputs", nargs="+", help="image files, folders, globs, .tar shards, .txt path lists")
    _optional_model(add, "hub id, model folder or LAVIS checkpoint file (default: the index's)")
    _embedding_arguments(add)
    info = sub.add_parser("info", help="what an index holds")
    info.add_argument("index", help="the index folder")
    info.add_argument("--json", action="store_true", help="one JSON object")
    remove = sub.add_parser("remove", help="remove images from an index")
    remove.add_argument("index", help="the index folder")
    remove.add_argument("paths", nargs="+", help="the images' paths (as added, or as the index lists them)")
    rebuild = sub.add_parser("rebuild", help="build an index's FAISS index anew (after it grew far)")
    rebuild.add_argument("index", help="the index folder")
    rebuild.add_argument("--faiss", help="a new FAISS index_factory string (or auto) for the index to record")


def load_model(args: argparse.Namespace, device: str | None, index: str | None = None) -> Any:
    """The `Retriever` of `--model`, or of the model the index records when `--model` is not given."""
    from blip2.index.store import Store

    model = args.model or Store.open(index).meta["model"]
    try:
        return options.load_pipeline(model, device, args.dtype, method="search", **options.load_options(args))
    except UserError as e:
        if args.model:
            raise
        raise UserError(f"{str(e).rstrip('.')} (the model {index} records): give --model") from None


def run(args: argparse.Namespace) -> int:
    if args.action == "info":
        return _info(args)
    if args.action == "remove":
        return _remove(args)
    if args.action == "rebuild":
        return _rebuild(args)
    return _embed(args)


def _embed(args: argparse.Namespace) -> int:
    import os

    from blip2.data.inputs import expand_inputs
    from blip2.distributed import setup, teardown
    from blip2.index.build import add_images

    options.show_notices()
    if args.batch_size < 1 or args.workers < 0:
        raise UserError("--batch-size must be at least 1 and --workers at least 0")
    build = args.action == "build"
    path = args.out if build else args.index
    items = expand_inputs(args.inputs)
    if not items:
        raise UserError("the inputs hold no images (folders and globs count .jpg, .png, ... files only)")
    info = setup(args.device)
    try:
        pipe = load_model(args, str(info.device), None if build else path)
        settings = {"dtype": args.precision, "strategy": args.strategy, "faiss": args.faiss} if build else {}
        model = args.model  # recorded by a new index (an existing one keeps its own)
        recorded = os.path.abspath(model) if model and os.path.exists(model) else model
        stats = add_images(
            pipe,
            items,
            path,
            create=build,
            replace=not build,
            model=recorded,
            batch_size=args.batch_size,
            workers=args.workers,
            max_pixels=args.max_pixels,
            info=info,
            **settings,
        )
    finally:
        teardown()
    if not info.is_main:
        return EXIT_OK
    rate = stats.added / stats.seconds if stats.seconds > 0 else 0.0
    where = f" on rank 0 of {info.world_size}" if info.distributed else ""
    print(
        f"{stats.added} images embedded in {stats.seconds:.1f} s ({rate:.1f} images/s{where}), "
        f"{stats.skipped} already there, {stats.failed} unreadable; {path} holds {stats.images} images",
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if stats.failed else EXIT_OK


def _info(args: argparse.Namespace) -> int:
    from blip2.index import Index

    facts = Index.open(args.index).info()
    if args.json:
        print(json.dumps(facts))
    else:
        for name, value in facts.items():
            print(f"{name:13s} {value}")
    return EXIT_OK


def _remove(args: argparse.Namespace) -> int:
    from blip2.index.build import remove_images

    gone = remove_images(args.index, args.paths)
    missing = len(set(args.paths)) - gone
    note = f" ({missing} of the paths given were not in it)" if missing else ""
    print(f"removed {gone} images from {args.index}{note}", file=sys.stderr)
    return EXIT_OK


def _rebuild(args: argparse.Namespace) -> int:
    from blip2.index.build import rebuild

    index = rebuild(args.index, args.faiss)
    print(
        f"rebuilt the FAISS index of {args.index} ({index.factory()}, {len(index)} images)", file=sys.stderr
    )
    return EXIT_OK
