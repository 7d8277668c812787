"""`blip2 demo`: train a small BLIP-2 from nothing on CPU and show it captions, answers and retrieves.

No download, no GPU: the demo renders its own world of simple shapes, pre-trains a small image encoder
on images alone and a small GPT-2 on text alone, freezes both, runs stage 1 and stage 2 with the
training engine, and scores the model on held-out images (see `blip2.demo.run`).

Examples:
    blip2 demo                    # the full demo (under 10 minutes on 2 CPU cores)
    blip2 demo --quick --out /tmp/demo
    blip2 demo --instruct         # then instruction tuning vs. stage 2 continued (`blip2.demo.instruct`)
    blip2 demo --llm llama        # then a Llama LM, bridged by stage 2 alone from stage 1 (`blip2.demo.llm`)
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for the report, figure and models")
    p.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes), used by the tests")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the weights and the data order")
    p.add_argument(
        "--instruct",
        action="store_true",
        help="an extra phase on the demo in --out (run first when it has no report.json): instruction "
        "tuning (InstructBLIP) against BLIP-2 stage 2 continued, the same steps, zero-shot VQA of both",
    )
    p.add_argument(
        "--llm",
        choices=("llama", "qwen2"),
        help="an extra phase on the demo in --out (run first when it has no report.json): a small LM of this "
        "family pre-trained on the world's text as the demo's GPT-2 was, stage 2 alone for it from the "
        "demo's stage-1 model, held-out captions and VQA of both bridges",
    )


def run(args: argparse.Namespace) -> int:
    import os

    from blip2.errors import UserError

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file: give a folder for the demo's report and models")
    from blip2.demo.run import run_demo

    out = os.path.abspath(args.out)
    phases = args.instruct or args.llm
    if not (phases and os.path.isfile(os.path.join(out, "report.json"))):
        report = run_demo(args.out, quick=args.quick, seed=args.seed)
        print(f"report: {out}/report.md, {out}/report.json, figure: {out}/figure.png")
        print(f"models: {out}/model (stage 2: caption, ask), {out}/model_stage1 (stage 1: match, similarity)")
        print(
            f"try:    python -c \"import blip2; m = blip2.load('{out}/model'); "
            f"print(m.caption('{out}/work/data/test/000000.png'))\""
        )
        print(f"total:  {report['seconds']['total']:.0f} s")
    if args.instruct:
        _instruct(out, args.quick)
    if args.llm:
        _llm(out, args.llm)
    return 0


def _instruct(out: str, quick: bool) -> None:
    from blip2.demo.instruct import MODELS, run_instruct

    report = run_instruct(out, quick=quick)
    print(f"report: {out}/instruct_report.md, {out}/instruct_report.json")
    for name in MODELS:
        scores = report["scores"][name]["vqa"]
        print(f"zero-shot VQA, {name}: {scores['vqa_accuracy']:.3f}")


def _llm(out: str, family: str) -> None:
    from blip2.demo.llm import NAMES, run_llm

    report = run_llm(out, family)
    print(
        f"report: {out}/llm_{family}_report.md, {out}/llm_{family}_report.json; model: {out}/model_{family}"
    )
    for name, scores in report["bridges"].items():
        print(
            f"{NAMES[name]} bridge: caption attribute accuracy {scores['caption_attribute_accuracy']:.3f}, "
            f"zero-shot VQA {scores['vqa_accuracy']:.3f}"
        )
