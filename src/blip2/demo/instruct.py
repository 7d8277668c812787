"""`blip2 demo --instruct`: instruction tuning (InstructBLIP) in the demo's world, against the fair baseline.

A phase after the demo (it reads a finished demo folder and keeps the demo's 10 minutes as they are):

1. data: the world's questions about the training images (`world.sample_examples` drew two per image
   when the demo rendered them; replayed here from the demo's seed and checked against its files),
   written as a VQA list beside the demo's caption list, and both again in the `instructions` layout;
2. two models from the demo's stage-2 model, the same number of steps on the same mixture (captions and
   questions, sampled by the square root of their sizes), the same learning rate, seed and data order:
   (a) BLIP-2 continued: task `stage2`, captions after the caption prompt, questions in the LLM's VQA
   template; (b) InstructBLIP: task `instruct`, its Q-Former's text side from the demo's stage-1 model,
   the very same LLM texts given as instructions, so the Q-Former reads them too;
3. zero-shot VQA on the held-out test images (the demo's own scoring, per question kind, and on the
   test images of scenes no training image shows) for the start model, (a) and (b):
   `instruct_report.json`, `instruct_report.md`.

Why these instructions: the frozen LLM is a tiny GPT-2 that only ever read the world's grammar in two
forms, `Caption: ...` and `Question: ... Answer: ...`. The library's instruction templates
(`blip2.data.instructions`) are English it has no words for (they would reach it as `<unk>`), so both
models get the LLM's own two prompts, word for word. The one difference between (a) and (b) is then the
one InstructBLIP makes: the Q-Former reads the instruction. Task `stage2` (not `vqa`) for (a): with a
decoder-only LLM the two are one loss, and `stage2` says "the stage-2 objective, continued".

The Q-Former reads the instruction with the demo's Q-Former tokenizer, whose vocabulary is the captions'
words (`run.run_demo` builds it): the colour and shape a question names reach it, the question's other
words (`what`, `colour`, `where`, `?`) reach it as `[UNK]`; the LLM reads every word. (A vocabulary with
the questions' words too changes the demo's own random start: the quick demo's held-out retrieval fell
below its test's bar with it, so the demo keeps its own.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blip2.demo import world as W
from blip2.demo.evaluate import HeldOut, evaluate_generation, vqa_scores
from blip2.demo.run import CAPTION_PROMPT, VQA_TEMPLATE, Budget, _losses, train_config
from blip2.errors import UserError

MODELS = ("start", "blip2_continued", "instruction_tuned")
LABELS = {
    "start": "stage-2 model (start)",
    "blip2_continued": "BLIP-2 stage 2, continued",
    "instruction_tuned": "InstructBLIP, instruction-tuned",
}


@dataclass(frozen=True)
class InstructBudget:
    """The phase's training budget, the same for both models.

    Attributes:
        steps: optimizer steps of each model.
        batch_size: examples per step.
        lr: peak learning rate (linear warm-up, cosine to a tenth).
        warmup_steps: warm-up length.
    """

    steps: int = 100
    batch_size: int = 128
    lr: float = 1e-3  # the demo's stage-2 settings (`run.Budget`), a third of its steps
    warmup_steps: int = 10

    @classmethod
    def quick(cls) -> InstructBudget:
        return cls(steps=8, batch_size=32, warmup_steps=2)


def demo_examples(data_dir: str, demo_budget: Budget, seed: int) -> tuple[list[W.Example], list[W.Example]]:
    """The demo's training and test examples, their questions included, drawn again as
    `world.write_dataset` drew them (the same generator, before any image was rendered), and checked
    against the demo's own caption lists."""
    world = W.World()
    rng = random.Random(seed)
    train = W.sample_examples(world, demo_budget.n_train, "train", rng, world.train_scenes, 2)
    n_heldout = round(demo_budget.n_test * 0.4)
    test = W.sample_examples(world, demo_budget.n_test - n_heldout, "test", rng, world.train_scenes, 2)
    test += W.sample_examples(world, n_heldout, "test", rng, world.heldout_scenes, 2)
    for i, ex in enumerate(test):
        ex.key = f"test/{i:06d}"
    for name, examples in (("train.json", train), ("test.json", test)):
        with open(os.path.join(data_dir, name)) as f:
            saved = [(e["image"], e["caption"]) for e in json.load(f)]
        if saved != [(e.key + ".png", e.captions) for e in examples]:
            raise UserError(
                f"{data_dir}/{name} is not the data of this demo's seed and budget: run `blip2 demo` "
                "again into a new --out folder"
            )
    return train, test


def write_training_data(data_dir: str, train: list[W.Example]) -> dict[str, str]:
    """The training images' questions as a VQA list (`train_vqa.json`), and captions and questions in
    the `instructions` layout, each instruction the LLM's own prompt (`instruct_*.json`); one record per
    caption and per question, in the same order as the `captions` and `vqa` layouts read them."""
    caption_records = [
        {"image": e.key + ".png", "instruction": CAPTION_PROMPT, "answer": c}
        for e in train
        for c in e.captions
    ]
    questions = [
        {"image": e.key + ".png", "question": q, "answer": a, "kind": kind}
        for e in train
        for kind, q, a in e.questions
    ]
    question_records = [
        {"image": q["image"], "instruction": W.vqa_text(VQA_TEMPLATE, q["question"]), "answer": q["answer"]}
        for q in questions
    ]
    paths = {
        "vqa": os.path.join(data_dir, "train_vqa.json"),
        "instruct_captions": os.path.join(data_dir, "instruct_captions.json"),
        "instruct_questions": os.path.join(data_dir, "instruct_questions.json"),
    }
    for key, records in zip(paths, (questions, caption_records, question_records), strict=True):
        with open(paths[key], "w") as f:
            json.dump(records, f)
    return paths


def run_instruct(
    out: str, quick: bool = False, budget: InstructBudget | None = None, echo: Callable[[str], None] = print
) -> dict:
    """Train both models from the demo in `out`, score them and the start model, write the report.

    Args:
        out: a finished demo folder (with `report.json`).
        quick: the small budget (`InstructBudget.quick`) when `budget` is not given.
        budget: the training budget of both models.

    Returns:
        The report (also written to `out/instruct_report.json`).
    """
    from blip2.pipelines import load
    from blip2.train.loop import train

    with open(os.path.join(out, "report.json")) as f:
        demo = json.load(f)
    b = budget or (InstructBudget.quick() if quick else InstructBudget())
    seed = demo["seed"]
    demo_budget = Budget(**demo["budget"])
    engine_budget = dataclasses.replace(
        demo_budget, lr=b.lr, warmup_steps=b.warmup_steps, batch_size=b.batch_size
    )
    work = os.path.join(out, "work")
    data_dir = os.path.join(work, "data")
    features = os.path.join(work, "features_json")  # the demo's cache: every training image
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    train_ex, test_ex = demo_examples(data_dir, demo_budget, seed)
    paths = write_training_data(data_dir, train_ex)
    echo(
        f"== instruction tuning: {sum(len(e.captions) for e in train_ex)} captions and "
        f"{sum(len(e.questions) for e in train_ex)} questions of {len(train_ex)} training images; "
        f"{b.steps} steps x {b.batch_size} for each model"
    )
    seconds["data"] = time.perf_counter() - start

    lm = os.path.join(out, "lm")
    start_model = os.path.join(out, "model")
    runs = {
        "blip2_continued": (
            "stage2",
            {"init_from": start_model, "llm_tokenizer": lm},
            [
                {"kind": "captions", "path": os.path.join(data_dir, "train.json"), "images": data_dir},
                {"kind": "vqa", "path": paths["vqa"], "images": data_dir},
            ],
        ),
        "instruction_tuned": (
            "instruct",
            {
                "init_from": start_model,
                "qformer_text_from": os.path.join(out, "model_stage1"),
                "tokenizer": os.path.join(out, "model_stage1"),
                "llm_tokenizer": lm,
            },
            [
                {"kind": "instructions", "path": paths["instruct_captions"], "images": data_dir},
                {"kind": "instructions", "path": paths["instruct_questions"], "images": data_dir},
            ],
        ),
    }
    finals, steps, curves = {"start": start_model}, {}, {}
    for name, (task, model, sources) in runs.items():
        began = time.perf_counter()
        echo(f"== {name} (task {task})")
        run_dir = os.path.join(work, name)
        shutil.rmtree(run_dir, ignore_errors=True)  # a rerun starts again (metrics.jsonl appends)
        data = {"kind": "mixture", "sources": sources, "prompt": CAPTION_PROMPT, "features": features}
        result = train(train_config(task, model, data, run_dir, b.steps, engine_budget, seed))
        finals[name], steps[name], curves[name] = result.final_dir, result.steps, _losses(run_dir)
        seconds[name] = time.perf_counter() - began

    began = time.perf_counter()
    held = HeldOut.load(data_dir, test_ex)
    images, scenes, refs, vqa, unseen = held.images, held.scenes, held.refs, held.vqa, held.unseen_questions
    scores: dict[str, dict[str, Any]] = {}
    for name, folder in finals.items():
        pipe = load(folder)
        pipe.model.eval()
        metrics, _, answers = evaluate_generation(pipe, images, scenes, refs, vqa, demo_budget.num_beams)
        scores[name] = {
            "kind": pipe.config.kind,
            "vqa": {k: v for k, v in metrics.items() if k.startswith("vqa")},
            "vqa_heldout_scenes": vqa_scores([answers[j] for j in unseen], [vqa[j] for j in unseen]),
            "captions": {k: v for k, v in metrics.items() if k.startswith("caption")},
        }
    seconds["evaluate"] = time.perf_counter() - began

    report = {
        "budget": dataclasses.asdict(b),
        "steps": steps,
        "tasks": {name: task for name, (task, _, _) in runs.items()},
        "models": finals,
        "scores": scores,
        "data": {
            "train_images": len(train_ex),
            "captions": sum(len(e.captions) for e in train_ex),
            "questions": sum(len(e.questions) for e in train_ex),
            "test_questions": len(vqa),
            "test_questions_of_heldout_scenes": len(unseen),
        },
        "seed": seed,
        "quick": demo["quick"],
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "losses": curves,
    }
    with open(os.path.join(out, "instruct_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(out, "instruct_report.md"), "w") as f:
        f.write(text)
    echo(text)
    return report


def markdown(report: dict) -> str:
    """The phase's section for a report: VQA accuracy per question kind of the three models."""
    kinds = ["vqa_accuracy", *(f"vqa_accuracy_{k}" for k in W.QUESTIONS)]
    b = report["budget"]
    lines = [
        "## Instruction tuning (InstructBLIP) vs. BLIP-2 stage 2, continued",
        "",
        f"Both from the demo's stage-2 model, {b['steps']} steps of {b['batch_size']} at lr {b['lr']:g} on the "
        f"same mixture ({report['data']['captions']} captions, {report['data']['questions']} questions of "
        f"{report['data']['train_images']} training images). Zero-shot VQA accuracy (exact match) on "
        f"{report['data']['test_questions']} questions about held-out test images:",
        "",
        "| model | "
        + " | ".join(k.removeprefix("vqa_accuracy_") if k != kinds[0] else "all" for k in kinds)
        + " | all, held-out scenes | caption CIDEr |",
        "|---" * (len(kinds) + 3) + "|",
    ]
    for name in MODELS:
        s = report["scores"][name]
        cells = [f"{s['vqa'].get(k, float('nan')):.3f}" for k in kinds]
        cells += [f"{s['vqa_heldout_scenes']['vqa_accuracy']:.3f}", f"{s['captions']['caption_cider']:.2f}"]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
