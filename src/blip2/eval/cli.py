"""`blip2 eval caption|vqa|retrieval`: the paper's benchmarks from their published annotation files.

```
blip2 eval caption   --model M --dataset coco_karpathy_test.json --images coco/ --out runs/coco-caption
blip2 eval vqa       --model M --dataset v2_OpenEnded_mscoco_val2014_questions.json \\
                     --answers v2_mscoco_val2014_annotations.json --images coco/val2014 --out runs/vqav2
blip2 eval retrieval --model M --dataset flickr30k_test.json --images flickr30k/ --out runs/flickr
torchrun --nproc_per_node=8 -m blip2.cli eval caption ...   # sharded, then one merged result
```
Each writes `predictions.json` and `metrics.json` into `--out`; see docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _common(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--model", required=True, help="hub id, model folder or LAVIS checkpoint file")
    p.add_argument("--dataset", required=True, help=what)
    p.add_argument("--images", default="", help="folder the annotation's image paths are relative to")
    p.add_argument("--out", required=True, help="output folder (predictions.json, metrics.json)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch and rank (default 16)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (default 2)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", help="float16 / bfloat16 / float32 for the frozen image encoder and LLM")
    p.add_argument("--preset", help="the preset of a LAVIS checkpoint file (`blip2 presets`)")
    p.add_argument("--llm", help="LLM folder or hub id for a LAVIS stage-2 checkpoint")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id when the model has none beside it")


def _generation(p: argparse.ArgumentParser, prompt_help: str) -> None:
    p.add_argument("--prompt", help=prompt_help)
    p.add_argument("--num-beams", type=int, help="beam width (default 5)")
    p.add_argument("--max-new-tokens", type=int, help="most generated tokens")
    p.add_argument("--min-new-tokens", type=int, help="fewest generated tokens")
    p.add_argument("--length-penalty", type=float, help="beam-search length penalty")
    p.add_argument("--repetition-penalty", type=float, help="repetition penalty (default 1.0)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --out")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="task", required=True)
    c = sub.add_parser(
        "caption", help="COCO Karpathy test, NoCaps val, Flickr30K: BLEU, METEOR, ROUGE-L, CIDEr"
    )
    _common(
        c,
        "caption annotations: coco_karpathy_test.json, dataset_coco.json, captions_val2014.json, nocaps_val",
    )
    c.add_argument("--layout", default="auto", help="karpathy-flat, karpathy or coco (default: detected)")
    c.add_argument("--split", default="test", help="Karpathy split of dataset_*.json (default test)")
    _generation(c, 'text the caption continues (default "a photo of")')
    c.add_argument("--no-java", action="store_true", help="Java-free scoring (BLEU, ROUGE-L, CIDEr-D only)")
    c.add_argument("--spice", action="store_true", help="require SPICE (default: computed when installed)")

    v = sub.add_parser("vqa", help="VQAv2, OK-VQA (official accuracy), GQA test-dev (exact match)")
    _common(v, "questions: VQAv2/OK-VQA questions file, GQA testdev_balanced_questions.json, or a list")
    v.add_argument("--answers", help="VQAv2/OK-VQA annotations file (omit for test-dev: predictions only)")
    v.add_argument(
        "--image-pattern",
        help="image file from {image_id} and {data_subtype} (default COCO_{data_subtype}_{image_id:012d}.jpg; "
        "GQA {image_id}.jpg)",
    )
    _generation(v, "question template with {} (default: the model's, e.g. 'Question: {} Short answer:')")

    r = sub.add_parser("retrieval", help="COCO 5k / Flickr30K 1k test: TR/IR R@1/5/10, ITC top-k + ITM")
    _common(r, "retrieval test annotations: coco_karpathy_test.json, flickr30k_test.json, dataset_*.json")
    r.add_argument("--layout", default="auto", help="karpathy-flat, karpathy or coco (default: detected)")
    r.add_argument("--split", default="test", help="Karpathy split of dataset_*.json (default test)")
    r.add_argument(
        "--k", type=int, default=128, help="ITC candidates re-ranked by ITM (default 128; 0: ITC only)"
    )
    r.add_argument("--itm-batch-size", type=int, default=256, help="image-text pairs per ITM forward")
    r.add_argument("--max-txt-len", type=int, default=35, help="text tokens (default 35)")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "prompt",
        "num_beams",
        "max_new_tokens",
        "min_new_tokens",
        "length_penalty",
        "repetition_penalty",
    )
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def run(args: argparse.Namespace) -> int:
    import blip2
    from blip2.errors import UserError
    from blip2.eval import datasets, runner
    from blip2.train.distributed import setup, teardown

    info = setup(args.device)
    try:
        pipe = blip2.load(
            args.model,
            device=info.device,
            dtype=args.dtype,
            preset=args.preset,
            llm=args.llm,
            tokenizer=args.tokenizer,
        )
        need = blip2.Retriever if args.task == "retrieval" else blip2.Captioner
        if not isinstance(pipe, need):
            kind = "a stage-1 (retrieval)" if need is blip2.Retriever else "a stage-2 (captioning / VQA)"
            raise UserError(
                f"`blip2 eval {args.task}` needs {kind} model; {args.model} is stage {pipe.config.stage}"
            )
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
                settings=_settings(args),
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
                settings=_settings(args),
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
