"""`blip2 demo --llm FAMILY`: the demo's stage-1 Q-Former bridged to a second family of LLM.

A phase after the demo (it reads a finished demo folder and keeps the demo's 10 minutes as they are),
MiniGPT-4's path in the demo's world: a trained Q-Former reused for a new LLM.

1. a small LM of the family (Llama or Qwen2, `pretrain.lm_config`: as big as the demo's GPT-2) is
   pre-trained as the demo's GPT-2 was: the world's own word-level tokenizer (the demo's `lm/`, so the
   same vocabulary and the same `<s>` before every text), the same documents (the demo's seed and
   budget), steps, batch and learning rate, on text alone; then frozen: `lm_<family>/`, with the
   world's tokenizer saved beside it;
2. stage 2 alone, from the demo's stage-1 model (`model_stage1/`): the demo's own stage-2 job
   (`work/stage2/train_config.json`: data, steps, optimizer, seed) with only the LLM changed. The
   Q-Former starts from stage 1 and keeps training, as in the demo; the projection to the LLM is new:
   `work/stage2_<family>/`, `model_<family>/`;
3. the demo's evaluation on its held-out images for both bridges (the demo's `model/` and the new one)
   and for both LMs alone from each image's true description (the ceiling of zero-shot VQA through
   them): `llm_<family>_report.json`, `llm_<family>_report.md`.

The report also says how far each bridge's Q-Former moved from the stage-1 one and from the untrained
Q-Former stage 1 began with (`work/init/`): stage 2 started from stage 1 when the first is the smaller.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from blip2.demo import pretrain as P
from blip2.demo import world as W
from blip2.demo.evaluate import HeldOut, chance_levels, evaluate_generation, vqa_scores
from blip2.demo.instruct import demo_examples
from blip2.demo.run import CAPTION_PROMPT, VQA_TEMPLATE, Budget, _bar, _losses, _progress, with_caption_prompt
from blip2.errors import UserError

FAMILIES = tuple(f for f in P.LM_FAMILIES if f != "gpt2")  # what `--llm` takes; GPT-2 is the demo's own
NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2"}
SCORES = (
    ("caption_cider", "caption CIDEr-D"),
    ("caption_attribute_accuracy", "caption attribute accuracy"),
    ("caption_exact", "captions with every attribute right"),
    ("vqa_accuracy", "zero-shot VQA (exact match)"),
    *((f"vqa_accuracy_{k}", f"- {k} questions") for k in W.QUESTIONS),
)


def run_llm(out: str, family: str, echo: Callable[[str], None] = print) -> dict:
    """Pre-train an LM of `family`, train stage 2 for it from the demo's stage-1 model, score both bridges.

    Args:
        out: a finished demo folder (with `report.json`); its budget and seed are this phase's.
        family: `llama` or `qwen2` (`FAMILIES`).

    Returns:
        The report (also written to `out/llm_<family>_report.json`).
    """
    import transformers

    from blip2.train.config import TrainConfig
    from blip2.train.loop import train

    if family not in FAMILIES:
        raise UserError(f"--llm {family!r} is not a family the demo trains: one of {', '.join(FAMILIES)}")
    with open(os.path.join(out, "report.json")) as f:
        demo = json.load(f)
    b, seed = Budget(**demo["budget"]), demo["seed"]
    work = os.path.join(out, "work")
    job = _demo_stage2_job(out)
    seconds: dict[str, float] = {}

    began = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "lm"))
    docs = P.lm_corpus(b.lm_docs, VQA_TEMPLATE, CAPTION_PROMPT, seed, p_caption=b.lm_p_caption)
    echo(
        f"== {NAMES[family]} LM on text alone: {len(docs)} documents of the world's grammar, "
        f"{b.lm_steps} steps x {b.lm_batch} at lr {b.lm_lr:g} (the demo's GPT-2: the same)"
    )
    with _bar(b.lm_steps, f"{family} (text only)") as bar:
        lm = P.pretrain_lm(
            tok,
            docs,
            os.path.join(out, f"lm_{family}"),
            b.lm_steps,
            b.lm_batch,
            b.lm_lr,
            seed=seed,
            progress=_progress(bar),
            config=P.lm_config(family, tok),
        )
    seconds["pretrain_lm"] = time.perf_counter() - began

    began = time.perf_counter()
    stage1 = os.path.join(out, "model_stage1")
    run_dir = os.path.join(work, f"stage2_{family}")
    job["model"] = {"init_from": stage1, "llm": lm.path}  # its tokenizer: the world's, saved beside it
    job["train"]["output_dir"] = run_dir
    echo(
        f"== stage 2 for the {NAMES[family]} LM from the demo's stage-1 model: {job['train']['max_steps']} steps"
    )
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun starts again (metrics.jsonl appends)
    result = train(TrainConfig.from_dict(job))
    final = with_caption_prompt(result.final_dir)
    model_dir = os.path.join(out, f"model_{family}")
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(final, model_dir)
    seconds["stage2"] = time.perf_counter() - began

    began = time.perf_counter()
    echo("== evaluate both bridges on the demo's held-out images")
    bridges = {"gpt2": os.path.join(out, "model"), family: model_dir}
    lms = {"gpt2": os.path.join(out, "lm"), family: lm.path}
    scores = _scores(out, b, seed, bridges, lms, tok)
    seconds["evaluate"] = time.perf_counter() - began

    init = os.path.join(work, "init")
    report = {
        "family": family,
        "seed": seed,
        "quick": demo["quick"],
        "budget": {k: getattr(b, k) for k in ("lm_docs", "lm_steps", "lm_batch", "lm_lr", "stage2_steps")},
        "stage2_job": job,
        "models": bridges,
        "lms": {
            name: {
                "path": path,
                "model_type": _model_type(path),
                "parameters": _parameters(path),
                "final_loss": _tail_mean([v for _, v in curve]),
            }
            for name, path, curve in (
                ("gpt2", lms["gpt2"], demo["losses"]["language_model"]["loss"]),
                (family, lms[family], list(enumerate(lm.losses))),
            )
        },
        "qformer_change": {
            name: {"from_stage1": _distance(path, stage1), "from_random_init": _distance(path, init)}
            for name, path in bridges.items()
        },
        **scores,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "demo_seconds": {"pretrain_lm": demo["seconds"]["pretrain_lm"], "stage2": demo["seconds"]["stage2"]},
        "losses": {"language_model": list(enumerate(lm.losses)), "stage2": _losses(run_dir)},
    }
    with open(os.path.join(out, f"llm_{family}_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(out, f"llm_{family}_report.md"), "w") as f:
        f.write(text)
    echo(text)
    return report


def _demo_stage2_job(out: str) -> dict:
    """The demo's stage-2 training job as saved (`work/stage2/train_config.json`), its paths moved to
    where the demo folder is now."""
    path = os.path.join(out, "work", "stage2", "train_config.json")
    if not os.path.isfile(path):
        raise UserError(f"{out} has no {path}: run `blip2 demo --out {out}` first")
    with open(path) as f:
        job = json.load(f)
    then = os.path.dirname(os.path.dirname(job["train"]["output_dir"]))  # it was <then>/work/stage2
    for section in (job["data"], job["eval_data"]):
        for key in ("path", "images", "features"):
            if section.get(key, "").startswith(then + os.sep):
                section[key] = out + section[key][len(then) :]
    return job


def _scores(out: str, b: Budget, seed: int, bridges: dict[str, str], lms: dict[str, str], tok: Any) -> dict:
    """The demo's held-out scores of each bridge and of each LM alone from the true description."""
    import transformers

    from blip2.pipelines import load

    data_dir = os.path.join(out, "work", "data")
    _, test = demo_examples(data_dir, b, seed)
    held = HeldOut.load(data_dir, test)
    images, scenes, refs, vqa, unseen = held.images, held.scenes, held.refs, held.vqa, held.unseen_questions
    scores: dict[str, Any] = {"bridges": {}, "lm_from_true_description": {}}
    for name, folder in bridges.items():
        pipe = load(folder)
        pipe.model.eval()
        metrics, _, answers = evaluate_generation(pipe, images, scenes, refs, vqa, b.num_beams)
        metrics["vqa_accuracy_heldout_scenes"] = vqa_scores(
            [answers[j] for j in unseen], [vqa[j] for j in unseen]
        )["vqa_accuracy"]
        scores["bridges"][name] = metrics
    for name, folder in lms.items():
        lm = transformers.AutoModelForCausalLM.from_pretrained(folder)
        firsts = [P.description(scenes[q["index"]]) for q in vqa]
        prompts = [W.vqa_text(VQA_TEMPLATE, q["question"]) for q in vqa]
        scores["lm_from_true_description"][name] = vqa_scores(
            P.lm_answers(lm, tok, firsts, prompts, b.num_beams), vqa
        )
    scores["chance"] = chance_levels([e.captions[0] for e in test], scenes, refs, vqa, seed)
    scores["data"] = {"test_images": len(test), "test_questions": len(vqa), "of_heldout_scenes": len(unseen)}
    return scores


def _model_type(folder: str) -> str:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)["model_type"]


def _parameters(folder: str) -> int:
    """Parameters of a saved LM (tied embeddings once)."""
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(os.path.join(folder, "model.safetensors")).values())


def _weights(folder: str) -> str:
    """The weights file of a saved model: our layout's (`blip2_model.safetensors`, any non-EVA tower) or
    transformers'."""
    ours = os.path.join(folder, "blip2_model.safetensors")
    return ours if os.path.isfile(ours) else os.path.join(folder, "model.safetensors")


def _tail_mean(values: list[float]) -> float:
    """The mean of the last tenth of a loss curve."""
    tail = values[-max(1, len(values) // 10) :]
    return sum(tail) / len(tail)


def _distance(folder: str, reference: str) -> float:
    """How far the Q-Former (with its queries) in `folder` is from the one in `reference`: the L2 norm
    of the difference over the norm of the reference's, over the weights both models have."""
    from safetensors.torch import load_file

    a = load_file(_weights(folder))
    r = load_file(_weights(reference))
    keys = [k for k in a if k in r and k.startswith(("qformer.", "query_tokens"))]
    diff = sum(float((a[k].double() - r[k].double()).pow(2).sum()) for k in keys)
    norm = sum(float(r[k].double().pow(2).sum()) for k in keys)
    return (diff / norm) ** 0.5


def markdown(report: dict) -> str:
    """The phase's section for a report: both bridges' held-out scores side by side."""
    family = report["family"]
    names = ("gpt2", family)
    b, d = report["budget"], report["data"]
    bridges, alone, chance = report["bridges"], report["lm_from_true_description"], report["chance"]
    header = [f"{NAMES[n]} bridge" + (" (the demo's)" if n == "gpt2" else "") for n in names]
    lines = [
        f"## A second LLM family: {NAMES[family]}, from the demo's stage-1 Q-Former",
        "",
        f"Both LMs learned the world's text alone ({b['lm_docs']} documents, {b['lm_steps']} steps of "
        f"{b['lm_batch']} at lr {b['lm_lr']:g}, seed {report['seed']}), then froze; each bridge is stage 2 "
        f"({b['stage2_steps']} steps) from the same stage-1 model. {d['test_images']} held-out test images, "
        f"{d['test_questions']} questions ({d['of_heldout_scenes']} about scenes no training image shows):",
        "",
        f"| | {' | '.join(header)} | chance |",
        "|---|---|---|---|",
        "| LM: model_type, parameters | "
        + " | ".join(f"{report['lms'][n]['model_type']}, {report['lms'][n]['parameters']:,}" for n in names)
        + " | |",
        "| LM pre-training loss (last tenth of the steps) | "
        + " | ".join(f"{report['lms'][n]['final_loss']:.3f}" for n in names)
        + " | |",
    ]
    for key, label in SCORES:
        cells = [f"{bridges[n].get(key, float('nan')):.3f}" for n in names]
        lines.append(f"| {label} | {' | '.join(cells)} | {chance.get(key, float('nan')):.3f} |")
    lines += [
        "| zero-shot VQA, held-out scenes only | "
        + " | ".join(f"{bridges[n]['vqa_accuracy_heldout_scenes']:.3f}" for n in names)
        + " | |",
        "| VQA of the LM alone from the true description | "
        + " | ".join(f"{alone[n]['vqa_accuracy']:.3f}" for n in names)
        + f" | {chance['vqa_accuracy']:.3f} |",
        "| Q-Former's change from stage 1 / from its random init (relative L2) | "
        + " | ".join(
            f"{report['qformer_change'][n]['from_stage1']:.3f} / {report['qformer_change'][n]['from_random_init']:.3f}"
            for n in names
        )
        + " | |",
        "| wall s: LM pre-training, stage 2 | "
        + f"{report['demo_seconds']['pretrain_lm']:.0f}, {report['demo_seconds']['stage2']:.0f} (in the demo) | "
        + f"{report['seconds']['pretrain_lm']:.0f}, {report['seconds']['stage2']:.0f} | |",
    ]
    if report.get("quick"):
        lines += [
            "",
            "A --quick demo trains too little to caption or answer: only the full demo's numbers mean anything.",
        ]
    return "\n".join(lines) + "\n"
