"""`blip2 demo`: train a small BLIP-2 from nothing on CPU and show that it works on unseen images.

Phases (each timed, each with a progress bar):

1. data: render the world (`blip2.demo.world`) to PNG files, JSON lists and webdataset shards;
2. unimodal pre-training (`blip2.demo.pretrain`): a ResNet on images alone, a GPT-2 on text alone;
   both are then frozen;
3. a stage-1 model around the pre-trained ResNet with a new Q-Former, saved as the training engine's
   starting point (`model.init_from`), and the frozen features of every training image cached;
4. stage 1 (ITC + ITM + ITG) with the training engine (`blip2.train.loop.train`): captions from the
   JSON list, images that show the same scene share an id (ITC positives, never ITM negatives);
5. stage 2 (the frozen GPT-2's LM loss through the soft visual prompt) with the training engine, on
   the webdataset shards; and the paper's ablation, the same stage 2 from a Q-Former that had no
   stage 1;
6. evaluation on held-out images (`blip2.eval.metrics`): retrieval (ITC, ITC + ITM re-ranking),
   zero-shot captioning (CIDEr, attribute accuracy), zero-shot VQA, chance levels;
7. the report: `report.json`, `report.md`, `figure.png`, `model/` and `model_stage1/`.

Everything after the data goes through the library's own code: the models of `blip2.models`, the
training engine, `blip2.load` and the pipeline's `caption` / `ask` / `similarity` / `match`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from blip2.demo import pretrain as P
from blip2.demo import world as W
from blip2.demo.evaluate import (
    HeldOut,
    caption_scores,
    chance_levels,
    evaluate_generation,
    evaluate_retrieval,
    images_of,
    vqa_scores,
)

VQA_TEMPLATE = "Question: {} Answer:"
CAPTION_PROMPT = "Caption:"  # the stage-2 caption prompt; the LM saw it before paraphrases
NUM_QUERIES = 8  # the Q-Former's queries: as many as the LM's description has tokens


@dataclass(frozen=True)
class Budget:
    """How much of everything a run does (the full demo and `--quick`)."""

    n_train: int = 4000
    n_test: int = 240
    encoder_steps: int = 250
    encoder_batch: int = 64
    lm_docs: int = 20000
    lm_steps: int = 600
    lm_batch: int = 128
    lm_lr: float = 2e-3
    lm_p_caption: float = 0.25  # the rest of the LM's documents are questions
    # fewer steps fit the 8 minutes but cost VQA: LM 400, stage 1 450, stage 2 180 steps answered
    # 0.887 / 0.835 (seeds 0 / 1; position and yes/no questions fall), 2026-12-03
    stage1_steps: int = 600
    stage2_steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 50
    itm_k: int = 16
    num_beams: int = 3
    figure_samples: int = 8

    @classmethod
    def quick(cls) -> Budget:
        return cls(
            n_train=1500,
            n_test=200,
            encoder_steps=60,
            lm_docs=8000,
            lm_steps=150,
            stage1_steps=100,
            stage2_steps=60,
            warmup_steps=10,
            itm_k=8,
            num_beams=1,
        )


@dataclass
class Timer:
    """Wall and process-CPU seconds of each phase."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str, echo: Callable[[str], None] = print) -> Iterator[None]:
        echo(f"== {name}")
        w, c = time.perf_counter(), time.process_time()
        yield
        self.wall[name] = time.perf_counter() - w
        self.cpu[name] = time.process_time() - c
        echo(
            f"   {name}: {self.wall[name]:.1f} s wall, {self.cpu[name]:.1f} s CPU "
            f"({self.cpu[name] / max(self.wall[name], 1e-9):.1f} cores busy); "
            f"so far {sum(self.wall.values()):.0f} s wall, {sum(self.cpu.values()):.0f} s CPU"
        )


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)


def _progress(bar) -> Callable[[int, float], None]:
    def update(step: int, loss: float) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")

    return update


# ------------------------------------------------------------------------------------------- model configs


def demo_config(qtok: Any, encoder_dir: str) -> Any:
    """The stage-1 `Blip2Config`: the pre-trained ResNet's grid, a 2-layer 128-wide Q-Former, 8 queries."""
    from blip2.config import Blip2Config, QFormerConfig, VisionConfig

    return Blip2Config(
        vision=VisionConfig(
            hf_config=P.resnet_config(), image_size=64, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
        ),
        qformer=QFormerConfig(
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            intermediate_size=256,
            cross_attention_freq=1,
            num_query_tokens=NUM_QUERIES,
            vocab_size=len(qtok),
            max_position_embeddings=32,
            dropout=0.0,
            attention_dropout=0.0,
            pad_token_id=qtok.pad_token_id,
            cls_token_id=qtok.cls_token_id,
            sep_token_id=qtok.sep_token_id,
            dec_token_id=qtok.bos_token_id,
        ),
        embed_dim=64,
        max_txt_len=16,
        tokenizer="",
        name="demo-stage1",
    )


def train_config(task: str, model: dict, data: dict, out: str, steps: int, b: Budget, seed: int, **eval_data):
    """A training-engine job (`blip2.train.config.TrainConfig`) for the demo's CPU budget."""
    from blip2.train.config import TrainConfig

    return TrainConfig.from_dict(
        {
            "task": task,
            "model": model,
            "data": {"num_workers": 0, "max_len": 16, **data},
            "eval_data": eval_data.get("eval_data"),
            "optim": {
                "lr": b.lr,
                "min_lr": b.lr / 10,
                "warmup_lr": b.lr / 100,
                "warmup_steps": b.warmup_steps,
                "weight_decay": 0.05,
                "betas": [0.9, 0.98],
            },
            "train": {
                "output_dir": out,
                "batch_size": b.batch_size,
                "max_steps": steps,
                "precision": "float32",
                "log_every": max(1, steps // 50),
                "save_every": 0,
                "keep_checkpoints": 1,
                "eval_every": max(1, steps // 5),
                "eval_batches": 1,
                "device": "cpu",
                "seed": seed,
            },
        }
    )


def _losses(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Loss curves from a training run's `metrics.jsonl`."""
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            for k, v in rec.items():
                if (k.startswith("loss") or k == "eval_loss") and isinstance(v, (int, float)):
                    curves.setdefault(k, []).append((int(rec["step"]), float(v)))
    return curves


def with_caption_prompt(folder: str) -> str:
    """Make `CAPTION_PROMPT` the default prompt of the stage-2 model in `folder` (the model captions
    with the prompt it was trained with); returns `folder`."""
    from blip2.pipelines import load

    pipe = load(folder)
    config = pipe.model.config
    pipe.model.config = dataclasses.replace(
        config, llm=dataclasses.replace(config.llm, prompt=CAPTION_PROMPT)
    )
    pipe.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------- the demo


def run_demo(
    out: str,
    quick: bool = False,
    seed: int = 0,
    echo: Callable[[str], None] = print,
    budget: Budget | None = None,
) -> dict:
    """Run every phase and write the report into `out`; returns the report.

    Args:
        quick: the small budget (`Budget.quick`) when `budget` is not given.
        budget: how much of everything the run does (default `Budget()`, the full demo).
    """
    import transformers

    from blip2.models import RetrievalModel
    from blip2.pipelines import Retriever, load
    from blip2.processing import ImageProcessor
    from blip2.train.feature_cache import cache_features
    from blip2.train.loop import train

    b = budget or (Budget.quick() if quick else Budget())
    timer = Timer()
    threads = {
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", ""),
    }
    echo(
        f"blip2 demo{' --quick' if quick else ''}, seed {seed}: {threads['torch_threads']} CPU threads, "
        f"OMP_WAIT_POLICY={threads['omp_wait_policy'] or 'unset'}, "
        f"GOMP_SPINCOUNT={threads['gomp_spincount'] or 'unset'}"
    )
    torch.manual_seed(seed)
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    world = W.World()
    curves: dict[str, dict[str, list]] = {}

    with timer.phase("data", echo):
        data_dir = os.path.join(work, "data")
        paths, train_ex, test_ex = W.write_dataset(data_dir, world, b.n_train, b.n_test, seed)
        echo(
            f"   {len(train_ex)} training images, {len(test_ex)} held-out test images; "
            f"{world.distinct_captions} distinct captions"
        )

    with timer.phase("pretrain_image_encoder", echo):
        processor = ImageProcessor(64, (0.5,) * 3, (0.5,) * 3)
        pixels = processor(images_of(data_dir, [e.key for e in train_ex]))
        labels = {k: torch.tensor([e.scene.labels()[k] for e in train_ex]) for k in W.LABEL_CLASSES}
        with _bar(b.encoder_steps, "image encoder (images only)") as bar:
            enc = P.pretrain_image_encoder(
                pixels,
                labels,
                os.path.join(out, "encoder"),
                b.encoder_steps,
                b.encoder_batch,
                seed=seed,
                progress=_progress(bar),
            )
        curves["image_encoder"] = {"loss": list(enumerate(enc.losses))}
        del pixels

    with timer.phase("pretrain_lm", echo):
        tok = P.lm_tokenizer(P.grammar_texts(VQA_TEMPLATE, CAPTION_PROMPT))
        lengths = {len(tok(P.description(s), add_special_tokens=False).input_ids) for s in world.scenes}
        assert lengths == {NUM_QUERIES}, f"descriptions of {lengths} tokens for {NUM_QUERIES} queries"
        docs = P.lm_corpus(b.lm_docs, VQA_TEMPLATE, CAPTION_PROMPT, seed, p_caption=b.lm_p_caption)
        with _bar(b.lm_steps, "language model (text only)") as bar:
            lm = P.pretrain_lm(
                tok,
                docs,
                os.path.join(out, "lm"),
                b.lm_steps,
                b.lm_batch,
                b.lm_lr,
                seed=seed,
                progress=_progress(bar),
            )
        curves["language_model"] = {"loss": list(enumerate(lm.losses))}

    with timer.phase("feature_cache", echo):
        qtok = P.qformer_tokenizer([c for s in world.scenes for c in W.captions(s)])
        config = demo_config(qtok, enc.path)
        tower = transformers.ResNetModel.from_pretrained(enc.path)
        init = RetrievalModel(config, vision_tower=tower)
        init_dir = os.path.join(work, "init")
        Retriever(init, ImageProcessor(64, (0.5,) * 3, (0.5,) * 3), qtok).save_pretrained(init_dir)
        # stage 1 pads every caption to `max_len` (equal shapes on every rank): the longest caption's
        # length, not more (a third of the Q-Former's tokens in a step would be padding at 16)
        caption_len = max(len(qtok(c).input_ids) for s in world.scenes for c in W.captions(s))
        stage1_data = {
            "kind": "retrieval",
            "path": paths.train_json,
            "images": data_dir,
            "max_len": caption_len,
        }
        shards = {
            "kind": "webdataset",
            "path": paths.train_shards,
            "shuffle_shards": 4,
            "prompt": CAPTION_PROMPT,
        }
        feats1, feats2 = os.path.join(work, "features_json"), os.path.join(work, "features_shards")
        model1 = {"init_from": init_dir, "tokenizer": init_dir}
        cache_features(
            train_config("retrieval", model1, stage1_data, work, 1, b, seed), feats1, 256, num_workers=0
        )
        model2 = {"init_from": init_dir, "llm": lm.path, "llm_tokenizer": lm.path}
        cache_features(train_config("stage2", model2, shards, work, 1, b, seed), feats2, 256, num_workers=0)

        feats_test = os.path.join(work, "features_test")
        test_eval = {
            "kind": "retrieval",
            "path": paths.test_json,
            "images": data_dir,
            "num_workers": 0,
            "max_len": 16,
            "shuffle": False,
        }
        cache_features(
            train_config("retrieval", model1, test_eval, work, 1, b, seed), feats_test, 256, num_workers=0
        )
        test_eval["features"] = feats_test
    with timer.phase("stage1", echo):
        run1 = os.path.join(work, "stage1")
        cfg1 = train_config(
            "retrieval",
            model1,
            {**stage1_data, "features": feats1},
            run1,
            b.stage1_steps,
            b,
            seed,
            eval_data=test_eval,
        )
        res1 = train(cfg1)
        curves["stage1"] = _losses(run1)

    def stage2(name: str, init_from: str) -> str:
        run = os.path.join(work, name)
        model = {"init_from": init_from, "llm": lm.path, "llm_tokenizer": lm.path}
        cfg = train_config(
            "stage2",
            model,
            {**shards, "features": feats2},
            run,
            b.stage2_steps,
            b,
            seed,
            eval_data={**test_eval, "kind": "captions", "prompt": CAPTION_PROMPT},
        )
        train(cfg)
        curves[name] = _losses(run)
        return with_caption_prompt(os.path.join(run, "final"))

    with timer.phase("stage2", echo):
        final2 = stage2("stage2", res1.final_dir)
    with timer.phase("stage2_without_stage1", echo):
        final_ablation = stage2("stage2_without_stage1", init_dir)

    with timer.phase("evaluate", echo):
        for src, dst in ((res1.final_dir, "model_stage1"), (final2, "model")):
            shutil.rmtree(os.path.join(out, dst), ignore_errors=True)
            shutil.copytree(src, os.path.join(out, dst))
        held = HeldOut.load(data_dir, test_ex)
        images, scenes, refs, vqa, canon = held.images, held.scenes, held.refs, held.vqa, held.canonical
        stage1 = load(os.path.join(out, "model_stage1"))
        stage1.model.eval()
        metrics = evaluate_retrieval(stage1, images, canon, b.itm_k)
        model = load(os.path.join(out, "model"))
        model.model.eval()
        gen, caps, answers = evaluate_generation(model, images, scenes, refs, vqa, b.num_beams)
        metrics.update(gen)
        ablation_model = load(final_ablation)
        ablation_model.model.eval()
        ablation, _, _ = evaluate_generation(ablation_model, images, scenes, refs, vqa, b.num_beams)
        chance = chance_levels(canon, scenes, refs, vqa, seed)
        unseen, qs_unseen = held.unseen, held.unseen_questions
        metrics_unseen = caption_scores(
            [caps[i] for i in unseen], [scenes[i] for i in unseen], [refs[i] for i in unseen]
        )
        metrics_unseen.update(vqa_scores([answers[j] for j in qs_unseen], [vqa[j] for j in qs_unseen]))
        # the language model alone, given each test image's true description where the soft prompt
        # goes: what the frozen LM can answer at best (the ceiling of zero-shot VQA)
        lm_model = transformers.GPT2LMHeadModel.from_pretrained(lm.path)
        lm_alone = vqa_scores(
            P.lm_answers(
                lm_model,
                tok,
                [P.description(scenes[q["index"]]) for q in vqa],
                [W.vqa_text(VQA_TEMPLATE, q["question"]) for q in vqa],
                b.num_beams,
            ),
            vqa,
        )

    report = {
        "metrics": metrics,
        "chance": chance,
        "ablation_no_stage1": ablation,
        "lm_from_true_description": lm_alone,
        "heldout_scenes_only": metrics_unseen,
        "seconds": {
            **{k: round(v, 2) for k, v in timer.wall.items()},
            "total": round(sum(timer.wall.values()), 2),
        },
        "threads": threads,
        "cpu_seconds": {
            **{k: round(v, 2) for k, v in timer.cpu.items()},
            "total": round(sum(timer.cpu.values()), 2),
        },
        "dataset": {
            **world.describe(),
            "train_images": len(train_ex),
            "test_images": len(test_ex),
            "test_images_of_heldout_scenes": len(unseen),
            "test_questions": len(vqa),
        },
        "pretraining": {"image_encoder": enc.extra},
        "budget": dataclasses.asdict(b),
        "quick": quick,
        "seed": seed,
        "versions": _versions(),
        "losses": curves,
        "samples": [
            {
                "image": test_ex[i].key,
                "caption": caps[i],
                "truth": canon[i],
                "qa": [
                    (vqa[j]["question"], answers[j], vqa[j]["answer"])
                    for j in range(len(vqa))
                    if vqa[j]["index"] == i
                ],
            }
            for i in _sample_indices(test_ex, b.figure_samples)
        ],
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    from blip2.demo.report import write_figure, write_markdown

    write_figure(report, data_dir, os.path.join(out, "figure.png"))
    text = write_markdown(report, os.path.join(out, "report.md"))
    echo(text)
    return report


def _sample_indices(test_ex: list[W.Example], n: int) -> list[int]:
    seen = [i for i, e in enumerate(test_ex) if not e.heldout][: n - n // 2]
    unseen = [i for i, e in enumerate(test_ex) if e.heldout][: n // 2]
    return seen + unseen


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import tokenizers
    import transformers

    try:
        blip2_version = version("blip2")
    except PackageNotFoundError:
        blip2_version = "unknown"
    return {
        "blip2": blip2_version,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),
    }
