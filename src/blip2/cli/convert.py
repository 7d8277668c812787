"""`blip2 convert`: a LAVIS checkpoint (or any loadable model) into our folder.

    blip2 convert blip2_pretrained_opt2.7b.pth out/ --vision-weights eva_vit_g.pth --llm facebook/opt-2.7b
    blip2 convert my_qformer.pth --config my_config.json --out out/   # sizes of no preset

A LAVIS file whose sizes match no preset converts with `--config`, a `Blip2Config` JSON file
(`blip2 presets NAME > cfg.json` gives one to edit); without image-encoder weights in the file, the
tower comes from `--vision-weights` (LAVIS's tower file, or a transformers folder of it).

The folder loads with `blip2.load(out)` and, where transformers has the class, with
`Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval.from_pretrained(out)`; the command says
which (a model with another image encoder than EVA ViT-g is our layout only).
"""

from __future__ import annotations

import argparse
import os

from blip2.cli import options
from blip2.config import DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="LAVIS .pth file, transformers folder, our folder or hub id")
    p.add_argument("output", nargs="?", help="folder to write (or --out)")
    p.add_argument("--out", help="folder to write")
    p.add_argument("--dtype", choices=DTYPES, help="precision of the frozen towers")
    loading = options.add_loading_arguments(p)
    loading.add_argument("--config", help="Blip2Config JSON file of a LAVIS file whose sizes match no preset")


def _same(output: str, source: str) -> bool:
    return os.path.realpath(output) == os.path.realpath(source)


def run(args: argparse.Namespace) -> int:
    from blip2.errors import UserError
    from blip2.interop.saving import layout
    from blip2.pipelines import load

    if (args.output is None) == (args.out is None):
        raise UserError("give the folder to write once: as the second argument or as --out")
    args.output = args.output or args.out
    if os.path.exists(args.source) and _same(args.output, args.source):
        raise UserError(
            f"the output {args.output} would overwrite the source {args.source}: give another output folder"
        )
    if os.path.isfile(args.output):
        raise UserError(f"the output {args.output} is a file: give a folder to write the model into")

    pipe = load(args.source, config=args.config, dtype=args.dtype, **options.load_options(args))
    pipe.save_pretrained(args.output)
    print(
        f"wrote {args.output} ({pipe.config.name or 'blip2'}, {pipe.config.kind} model; {layout(pipe.config)})"
    )
    return 0
