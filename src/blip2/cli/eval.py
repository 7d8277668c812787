"""`blip2 eval caption|vqa|retrieval|score`: the paper's benchmarks from their published annotation files.

```
blip2 eval caption   --model M --dataset coco_karpathy_test.json --images coco/ --out runs/coco-caption
blip2 eval vqa       --model M --dataset v2_OpenEnded_mscoco_val2014_questions.json \\
                     --answers v2_mscoco_val2014_annotations.json --images coco/val2014 --out runs/vqav2
blip2 eval retrieval --model M --dataset flickr30k_test.json --images flickr30k/ --out runs/flickr
torchrun --nproc_per_node=8 -m blip2.cli eval caption ...   # sharded, then one merged result
blip2 eval score runs/coco-caption/predictions.json --dataset coco_karpathy_test.json   # no model
```
Each run writes `predictions.json` and `metrics.json` into `--out`; `score` rescores a predictions file
(ours or any in the official results layout) against the annotations; see docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

from blip2.cli import options

GENERATION_DEFAULTS = "the paper's evaluation settings, docs/evaluation.md"


def _common(p: argparse.ArgumentParser, what: str) -> None:
    options.add_model_arguments(p, image_limit=False)
    p.add_argument("--dataset", required=True, help=what)
    p.add_argument("--images", default="", help="folder the annotation's image paths are relative to")
    p.add_argument("--out", required=True, help="output folder (predictions.json, metrics.json)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch and rank (default 16)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (default 2)")


def _generation(p: argparse.ArgumentParser, prompt_help: str) -> None:
    p.add_argument("--prompt", help=prompt_help)
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --out")
    options.add_generation_arguments(p, sampling=False, defaults=GENERATION_DEFAULTS)
    options.add_decode_mode_argument(p)


def _annotations(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", default="auto", help="karpathy-flat, karpathy or coco (default: detected)")
    p.add_argument("--split", default="test", help="Karpathy split of dataset_*.json (default test)")


def _java(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-java", action="store_true", help="Java-free scoring (BLEU, ROUGE-L, CIDEr-D only)")
    p.add_argument("--spice", action="store_true", help="require SPICE (default: computed when installed)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="task", required=True)
    add = functools.partial(sub.add_parser, parents=[options.global_options(suppress=True)])
    c = add("caption", help="COCO Karpathy test, NoCaps val, Flickr30K: BLEU, METEOR, ROUGE-L, CIDEr")
    _common(
        c,
        "caption annotations: coco_karpathy_test.json, dataset_coco.json, captions_val2014.json, nocaps_val",
    )
    _annotations(c)
    _generation(c, 'text the caption continues (default "a photo of")')
    _java(c)

    v = add("vqa", help="VQAv2, OK-VQA (official accuracy), GQA test-dev (exact match)")
    _common(v, "questions: VQAv2/OK-VQA questions file, GQA testdev_balanced_questions.json, or a list")
    v.add_argument("--answers", help="VQAv2/OK-VQA annotations file (omit for test-dev: predictions only)")
    v.add_argument(
        "--image-pattern",
        help="image file from {image_id} and {data_subtype} (default COCO_{data_subtype}_{image_id:012d}.jpg; "
        "GQA {image_id}.jpg)",
    )
    _generation(v, "question template with {} (default: the model's, e.g. 'Question: {} Short answer:')")

    r = add("retrieval", help="COCO 5k / Flickr30K 1k test: TR/IR R@1/5/10, ITC top-k + ITM")
    _common(r, "retrieval test annotations: coco_karpathy_test.json, flickr30k_test.json, dataset_*.json")
    _annotations(r)
    r.add_argument(
        "--k", type=int, default=128, help="ITC candidates re-ranked by ITM (default 128; 0: ITC only)"
    )
    r.add_argument("--itm-batch-size", type=int, default=256, help="image-text pairs per ITM forward")
    r.add_argument("--max-txt-len", type=int, default=35, help="text tokens (default 35)")

    s = add(
        "score",
        help="rescore a predictions file against the annotations, without a model",
        description="Rescore a predictions file (captions, VQA or GQA answers, retrieval top tens) "
        "against the benchmark's annotations, without a model. The kind is read from the file's layout: "
        'captions [{"image_id", "caption"}], VQA [{"question_id", "answer"}], GQA '
        '[{"questionId", "prediction"}], or the retrieval predictions.json of `blip2 eval retrieval` '
        "(recalls from its top ten lists: exact unless scores tie).",
    )
    s.add_argument("predictions", help="predictions.json of `blip2 eval`, or one in the official layout")
    s.add_argument("--dataset", required=True, help="the annotation (or questions) file it was made on")
    s.add_argument("--answers", help="VQAv2/OK-VQA annotations file (with its questions file as --dataset)")
    _annotations(s)
    _java(s)
    s.add_argument("--out", help="also write the metrics record to this file (JSON)")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The prompt and generation options given (the original evaluation's settings fill the rest)."""
    settings = options.generation_options(args)
    return settings if args.prompt is None else {"prompt": args.prompt, **settings}


def run(args: argparse.Namespace) -> int:
    if args.task == "score":
        return _score(args)
    from blip2.distributed import setup, teardown
    from blip2.eval import datasets, runner

    settings = {} if args.task == "retrieval" else _settings(args)  # checked before a model loads
    info = setup(args.device)
    try:
        pipe = options.load_pipeline(
            args.model,
            str(info.device),
            args.dtype,
            method="search" if args.task == "retrieval" else "generate",
            what=f"`blip2 eval {args.task}`",
            **options.load_options(args),
        )
        options.set_decode_mode(pipe, args)
        run_id = {"model": str(args.model), "dataset": str(args.dataset)}

        def log(msg: str) -> None:
            if info.is_main:
                print(msg, flush=True)

        common = dict(run=run_id, batch_size=args.batch_size, workers=args.workers, info=info, log=log)
        if args.task == "caption":
            samples = datasets.caption_samples(args.dataset, args.images, args.layout, args.split)
            record = runner.evaluate_captions(
                pipe,
                samples,
                args.out,
                settings=settings,
                overwrite=args.overwrite,
                java=False if args.no_java else None,
                spice=True if args.spice else None,
                **common,
            )
        elif args.task == "vqa":
            samples, metric = datasets.vqa_samples(
                args.dataset, args.answers, args.images, args.image_pattern
            )
            run_id["answers"] = str(args.answers)
            record = runner.evaluate_vqa(
                pipe,
                samples,
                args.out,
                metric=metric,
                settings=settings,
                overwrite=args.overwrite,
                **common,
            )
        else:
            data = datasets.retrieval_set(args.dataset, args.images, args.layout, args.split)
            record = runner.evaluate_retrieval(
                pipe,
                data,
                args.out,
                k=args.k,
                itm_batch_size=args.itm_batch_size,
                max_txt_len=args.max_txt_len,
                **common,
            )
        if record is not None:
            print(json.dumps({"metrics": record["metrics"], "notes": record["notes"]}, indent=1))
    finally:
        teardown()
    return 0


# ------------------------------------------------------------------------------------------ score


def _score(args: argparse.Namespace) -> int:
    from blip2.data.jsonl import write_atomic
    from blip2.eval.score import score_predictions

    record = score_predictions(
        args.predictions,
        args.dataset,
        answers=args.answers,
        layout=args.layout,
        split=args.split,
        java=False if args.no_java else None,
        spice=True if args.spice else None,
    )
    if args.out:
        write_atomic(args.out, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({"metrics": record["metrics"], "notes": record["notes"]}, indent=1))
    return 0
