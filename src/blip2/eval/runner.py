"""Benchmark runs: captioning, VQA and retrieval, in one process or sharded under torchrun.

Captioning and VQA: every rank generates for its shard (every `world`-th sample) and appends each
batch to `predictions.part-<rank>.jsonl` in the output folder as soon as it is done; a rerun skips the
samples already in any part file (resumable; the world size may change between runs). Rank 0 then
merges the parts in dataset order into `predictions.json` (the official results layout) and writes
`metrics.json`. Retrieval: every rank encodes all images and texts (as the original code), re-ranks
its shard of query rows with ITM, and rank 0 gathers the ranks and top-10 lists.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from blip2.data.jsonl import Parts, hashable, write_atomic
from blip2.distributed import DistInfo, barrier
from blip2.errors import InputFailed, UserError
from blip2.eval import metrics
from blip2.eval.datasets import CaptionSample, RetrievalSet, VqaSample
from blip2.eval.settings import caption_settings, vqa_settings
from blip2.processing import clean_caption, clean_question, load_image

RETRIEVAL_K = 128  # ITC candidates re-ranked by ITM per query (the paper's k)
RETRIEVAL_MAX_TXT_LEN = 35  # the original retrieval evaluation's text length

S = TypeVar("S", CaptionSample, VqaSample)


# ------------------------------------------------------------------------------------------ files


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def prediction_parts(out: Path) -> Parts:
    """The per-rank prediction files in the output folder: `predictions.part-000.jsonl`, ..."""
    return Parts(str(out / "predictions.part-"), width=3, suffix=".jsonl")


def _prepare_out(out: Path, run: dict[str, Any], overwrite: bool, info: DistInfo) -> None:
    """Create the output folder; refuse to resume predictions made with other settings."""
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        run_file = out / "run.json"
        if overwrite:
            prediction_parts(out).remove()
        elif run_file.is_file() and json.loads(run_file.read_text()) != run:
            raise UserError(
                f"{out} holds predictions of a different run (model, data or settings differ from "
                f"{run_file}); pass --overwrite or choose another --out"
            )
        _write_json(run_file, run)
    barrier()


def read_parts(out: Path) -> dict[Hashable, str]:
    """Predictions already made: id -> text, from every part file (a torn last line is skipped)."""
    return {hashable(row["id"]): row["text"] for row in prediction_parts(out).records(key="id")}


def _batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _load_image(path: str) -> Any:
    """The decoded image; one that cannot be read stops the run with `InputFailed` (exit status 1), a
    missing one with a `UserError` (exit status 2: `--images` or the annotation file is wrong)."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist: check --images and the annotation file")
    try:
        return load_image(path)
    except UserError as e:
        raise InputFailed(f"cannot evaluate: {e} (replace or remove that image and rerun)") from None


def _load_images(paths: list[str]) -> list[Any]:
    return [_load_image(p) for p in paths]


def _images(paths: Sequence[str], batch_size: int, workers: int) -> Iterator[list[Any]]:
    """Decoded images in batches; decoding runs in `workers` background processes when > 0."""
    if workers <= 0:
        for batch in _batches(paths, batch_size):
            yield _load_images(batch)
        return
    loader = torch.utils.data.DataLoader(
        list(paths), batch_size=batch_size, num_workers=workers, collate_fn=_load_images
    )
    yield from loader


# ------------------------------------------------------------------------------ caption and VQA


def _generate_sharded(
    samples: Sequence[S],
    texts_for: Callable[[list[S], list[Any]], list[str]],
    out: Path,
    info: DistInfo,
    batch_size: int,
    workers: int,
    log: Callable[[str], None],
) -> dict[Hashable, str] | None:
    """Generate for this rank's shard of the samples not yet predicted; rank 0 returns all predictions."""
    done = read_parts(out)
    todo = [s for n, s in enumerate(samples) if n % info.world_size == info.rank and s.id not in done]
    log(f"{len(done)} predictions found, {len(todo)} to make on rank {info.rank}")
    start, made = time.time(), 0
    part = prediction_parts(out).writer(info.rank, key="id")  # a line torn by an interruption is cut
    try:
        batches = _batches(todo, batch_size)
        for batch, images in zip(batches, _images([s.image for s in todo], batch_size, workers), strict=True):
            for s, text in zip(batch, texts_for(batch, images), strict=True):
                part.write({"id": s.id, "text": text})
            part.flush()
            made += len(batch)
            log(f"rank {info.rank}: {made}/{len(todo)} ({made / max(time.time() - start, 1e-9):.1f}/s)")
    finally:
        part.close()
    barrier()
    if not info.is_main:
        return None
    done = read_parts(out)
    missing = [s.id for s in samples if s.id not in done]
    if missing:
        raise UserError(f"{len(missing)} samples have no prediction (first: {missing[0]!r}); rerun to resume")
    return {s.id: done[s.id] for s in samples}


def evaluate_captions(
    pipe: Any,
    samples: Sequence[CaptionSample],
    out: str | os.PathLike[str],
    *,
    settings: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    batch_size: int = 16,
    workers: int = 0,
    overwrite: bool = False,
    java: bool | None = None,
    spice: bool | None = None,
    info: DistInfo | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Caption every image, write `predictions.json` (`[{"image_id", "caption"}]`) and `metrics.json`.

    Args:
        pipe: a `blip2.Captioner`.
        samples: the benchmark (`datasets.caption_samples`).
        out: output folder (also holds the resumable part files).
        settings: generation settings over the model kind's zero-shot ones (`eval.settings`: `prompt`
            and transformers `generate` options).
        run: what identifies the run besides the settings (model, data); a resumed run must match.
        batch_size: images per generation batch (per rank).
        workers: image-decoding processes.
        overwrite: discard earlier predictions in `out`.
        java, spice: see `metrics.caption_metrics`.
        info: this process's rank and world (default: one process).

    Returns:
        The metrics record on rank 0 (overall, and per NoCaps domain when the set has domains), else
        None.
    """
    info = info or DistInfo()
    out = Path(out)
    opts = {**caption_settings(pipe.config.kind), **(settings or {})}
    if opts.get("min_new_tokens") and opts.get("max_new_tokens"):  # a lowered maximum wins
        opts["min_new_tokens"] = min(opts["min_new_tokens"], opts["max_new_tokens"])
    _prepare_out(out, {**(run or {}), "task": "caption", "settings": opts}, overwrite, info)
    prompt = opts.pop("prompt")

    def captions(batch: list[CaptionSample], images: list[Any]) -> list[str]:
        return pipe.generate(images, [prompt] * len(batch), **opts)

    preds = _generate_sharded(samples, captions, out, info, batch_size, workers, log)
    if preds is None:
        return None
    _write_json(
        out / "predictions.json",
        [{"image_id": s.id, "image": s.image, "caption": preds[s.id]} for s in samples],
    )
    scores, notes = score_captions(preds, samples, java=java, spice=spice)
    record = {
        "task": "caption",
        **(run or {}),
        "images": len(samples),
        "settings": {"prompt": prompt, **opts},
    }
    record |= {"metrics": scores, "notes": notes}
    _write_json(out / "metrics.json", record)
    return record


def score_captions(
    preds: dict[Hashable, str],
    samples: Sequence[CaptionSample],
    *,
    java: bool | None = None,
    spice: bool | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Score captions against the samples' references: overall (`"all"`) and per NoCaps domain.

    Args:
        preds: image id -> caption, for every sample.
        samples: the benchmark (`datasets.caption_samples`).
        java, spice: see `metrics.caption_metrics`.

    Returns:
        (scores, notes): the metrics by domain, and notes on how they were computed.
    """
    refs = {s.id: s.references for s in samples}
    scores: dict[str, Any] = {"all": metrics.caption_metrics(preds, refs, java=java, spice=spice)}
    for domain in sorted({s.domain for s in samples if s.domain}):
        ids = [s.id for s in samples if s.domain == domain]
        scores[domain] = metrics.caption_metrics({i: preds[i] for i in ids}, refs, java=java, spice=spice)
    notes = []
    java_used = metrics.java_available() if java is None else java
    if not java_used:
        notes.append("Java-free scoring: simple tokenization, no METEOR/SPICE; not comparable to the paper")
    elif "SPICE" not in scores["all"]:
        notes.append(metrics.spice_status() or "SPICE not requested")
    return scores, notes


def evaluate_vqa(
    pipe: Any,
    samples: Sequence[VqaSample],
    out: str | os.PathLike[str],
    *,
    metric: str = "vqa",
    settings: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    batch_size: int = 16,
    workers: int = 0,
    overwrite: bool = False,
    info: DistInfo | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Answer every question, write `predictions.json` and (when answers are known) `metrics.json`.

    Args:
        pipe: a `blip2.Captioner`.
        samples: the questions (`datasets.vqa_samples`).
        metric: "vqa" (official accuracy, per answer type) or "gqa" (exact match).
        settings: over the model kind's (`eval.settings`): `prompt` (a template with `{}` for the question; default the
            model's), `length_penalty` (default -1 for FlanT5, 0 for OPT) and other `generate` options.
        Others as `evaluate_captions`.

    Returns:
        The metrics record on rank 0, else None. Predictions use the official result layouts:
        VQAv2/OK-VQA `[{"question_id", "answer"}]`, GQA `[{"questionId", "prediction"}]`.
    """
    if metric not in ("vqa", "gqa"):
        raise ValueError(f"unknown VQA metric {metric!r}")
    info = info or DistInfo()
    out = Path(out)
    opts = {**vqa_settings(pipe.config.kind), **(settings or {})}
    if opts["prompt"] is None:
        opts["prompt"] = pipe.config.llm.vqa_template
    if opts["length_penalty"] is None:
        opts["length_penalty"] = -1.0 if pipe.model.is_encoder_decoder else 0.0
    if "{}" not in opts["prompt"]:
        raise UserError(f"the VQA prompt {opts['prompt']!r} needs a {{}} where the question goes")
    _prepare_out(out, {**(run or {}), "task": metric, "settings": opts}, overwrite, info)
    template = opts.pop("prompt")

    def answers(batch: list[VqaSample], images: list[Any]) -> list[str]:
        prompts = [template.format(clean_question(s.question)) for s in batch]
        return pipe.generate(images, prompts, **opts)

    preds = _generate_sharded(samples, answers, out, info, batch_size, workers, log)
    if preds is None:
        return None
    if metric == "gqa":
        rows = [{"questionId": s.id, "prediction": preds[s.id]} for s in samples]
    else:
        rows = [{"question_id": s.id, "answer": preds[s.id]} for s in samples]
    _write_json(out / "predictions.json", rows)
    scores, notes, rules = score_vqa(preds, samples, metric)
    record = {
        "task": metric,
        **(run or {}),
        "questions": len(samples),
        "settings": {"prompt": template, **opts},
    }
    record |= {"metrics": scores, "notes": notes}
    if rules:
        record["scoring"] = rules  # which VQA accuracy rule scored how many questions
    _write_json(out / "metrics.json", record)
    return record


def score_vqa(
    preds: dict[Hashable, str], samples: Sequence[VqaSample], metric: str = "vqa"
) -> tuple[dict[str, float], list[str], dict[str, int]]:
    """Score answers: "vqa" (official accuracy, per answer type) or "gqa" (exact match).

    Args:
        preds: question id -> answer, for every sample.
        samples: the questions with their answers (`datasets.vqa_samples`); those without answers
            (test-dev) are not scored.

    Returns:
        (scores, notes, rules): the metrics, notes on how they were computed, and which VQA accuracy
        rule scored how many questions (empty for GQA).
    """
    scored = [s for s in samples if s.answers]
    notes = []
    if len(scored) < len(samples):
        notes.append(f"{len(samples) - len(scored)} questions have no public answers: not scored")
    scores: dict[str, float] = {}
    rules: dict[str, int] = {}
    if scored and metric == "gqa":
        scores = metrics.gqa_accuracy(
            {s.id: preds[s.id] for s in scored}, {s.id: s.answers[0] for s in scored}
        )
    elif scored:
        types = {s.id: s.answer_type for s in scored if s.answer_type}
        rules = metrics.vqa_rules(s.answers for s in scored)
        fallback = {rule: n for rule, n in rules.items() if rule != metrics.VQA_OFFICIAL}
        if fallback:
            notes.append(
                "questions with fewer than ten human answers are scored without leave-one-out: "
                + ", ".join(f"{n} by {rule}" for rule, n in sorted(fallback.items()))
            )
        scores = metrics.vqa_scores(
            {s.id: preds[s.id] for s in scored}, {s.id: s.answers for s in scored}, types or None
        )
    return scores, notes, rules


# ------------------------------------------------------------------------------------ retrieval


@torch.no_grad()
def evaluate_retrieval(
    pipe: Any,
    data: RetrievalSet,
    out: str | os.PathLike[str],
    *,
    k: int = RETRIEVAL_K,
    run: dict[str, Any] | None = None,
    batch_size: int = 64,
    itm_batch_size: int = 256,
    max_txt_len: int = RETRIEVAL_MAX_TXT_LEN,
    workers: int = 0,
    info: DistInfo | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Image-text retrieval: ITC cosines, the top-k of every query re-ranked by ITM, R@1/5/10.

    Texts are cleaned as the original evaluation does (`clean_caption`) and cut at `max_txt_len`
    tokens. Writes `metrics.json` (re-ranked and ITC-only recalls) and `predictions.json` (the top
    ten of every image and every text, by index into the set's images and texts).

    Args:
        pipe: a `blip2.Retriever`.
        data: the test set (`datasets.retrieval_set`).
        k: ITC candidates re-ranked per query (0: ITC only).
        batch_size: images or texts per encoding batch.
        itm_batch_size: (image, text) pairs per ITM forward.
    """
    info = info or DistInfo()
    out = Path(out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    model, dev = pipe.model, pipe.device
    tok = pipe.qformer_tokenizer
    enc = tok(
        [clean_caption(t) for t in data.texts],
        padding="longest",
        truncation=True,
        max_length=max_txt_len,
        return_tensors="pt",
    )
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)  # (Nt, L)
    text_feats = torch.cat(
        [
            model.embed_text(ids[i : i + batch_size], mask[i : i + batch_size])
            for i in range(0, len(ids), batch_size)
        ]
    )  # (Nt, E)
    # ln_vision outputs are kept for ITM on the CPU in the tower's dtype (COCO 5k at 364 px: ~10 GB in
    # fp16), and only each ITM batch's images go to the device (as LAVIS's compute_sim_matrix)
    tower_dtype = next(model.visual.tower.parameters()).dtype
    image_feats, image_embeds = [], []
    for images in _images(data.images, batch_size, workers):
        emb = model.embed_image(pipe.pixels(images))
        image_feats.append(emb.image_feats)
        image_embeds.append(emb.image_embeds.to("cpu", tower_dtype))
    embeds = torch.cat(image_embeds)  # (Ni, N, Dv) on the CPU
    sims = model.itc_scores(torch.cat(image_feats), text_feats).float()  # (Ni, Nt)
    log(f"encoded {len(data.images)} images and {len(data.texts)} texts")

    def itm(image_idx: Tensor, text_idx: Tensor) -> Tensor:
        uniq, inv = image_idx.unique(return_inverse=True)
        kv = model.qformer.image_kv(embeds[uniq.cpu()].to(dev))  # projected once per distinct image
        kv = [None if x is None else (x[0][inv], x[1][inv]) for x in kv]
        return model.itm_logits(ids[text_idx], mask[text_idx], image_kv=kv)[:, 1]

    img_rows = list(range(info.rank, len(data.images), info.world_size))
    txt_rows = list(range(info.rank, len(data.texts), info.world_size))
    mine: dict[str, Any] = {"itc": _rank_rows(sims, img_rows, txt_rows, data)}
    if k > 0:
        start = time.time()
        i2t = metrics.rerank_rows(sims, itm, img_rows, k=k, batch_size=itm_batch_size)
        t2i = metrics.rerank_rows(sims.T, lambda t, i: itm(i, t), txt_rows, k=k, batch_size=itm_batch_size)
        mine["itm"] = _ranked(i2t, t2i, img_rows, txt_rows, data)
        log(f"rank {info.rank}: ITM re-ranking took {time.time() - start:.1f}s")
    parts = [mine]
    if dist.is_initialized() and info.world_size > 1:
        parts = [None] * info.world_size
        dist.all_gather_object(parts, mine)
    if not info.is_main:
        return None
    scores, top = {}, {}
    for name in mine:
        txt_ranks = torch.empty(len(data.images), dtype=torch.long)
        img_ranks = torch.empty(len(data.texts), dtype=torch.long)
        top_i2t: list[list[int]] = [[] for _ in data.images]
        top_t2i: list[list[int]] = [[] for _ in data.texts]
        for p in parts:
            r = p[name]
            txt_ranks[r["img_rows"]] = torch.tensor(r["txt_ranks"], dtype=torch.long)
            img_ranks[r["txt_rows"]] = torch.tensor(r["img_ranks"], dtype=torch.long)
            for row, t in zip(r["img_rows"], r["top_i2t"], strict=True):
                top_i2t[row] = t
            for row, t in zip(r["txt_rows"], r["top_t2i"], strict=True):
                top_t2i[row] = t
        scores[name] = metrics.recall_from_ranks(txt_ranks, img_ranks)
        top[name] = {"image_to_text": top_i2t, "text_to_image": top_t2i}
    final = "itm" if "itm" in scores else "itc"
    _write_json(out / "predictions.json", {"texts": data.texts, "images": data.images, **top[final]})
    record = {
        "task": "retrieval",
        **(run or {}),
        "images": len(data.images),
        "texts": len(data.texts),
        "settings": {"k": k, "max_txt_len": max_txt_len},
        "metrics": scores[final],
        "itc_only": scores["itc"],
        "notes": [] if k > 0 else ["ITC only (k=0): no ITM re-ranking"],
    }
    _write_json(out / "metrics.json", record)
    return record


def _rank_rows(sims: Tensor, img_rows: list[int], txt_rows: list[int], data: RetrievalSet) -> dict[str, Any]:
    rows_i = torch.as_tensor(img_rows, dtype=torch.long, device=sims.device)
    rows_t = torch.as_tensor(txt_rows, dtype=torch.long, device=sims.device)
    return _ranked(sims[rows_i], sims.T[rows_t], img_rows, txt_rows, data)


def _ranked(
    i2t: Tensor, t2i: Tensor, img_rows: list[int], txt_rows: list[int], data: RetrievalSet
) -> dict[str, Any]:
    """This rank's share: the rank of the right answer and the top ten of each of its query rows."""
    i2t, t2i = i2t.float().cpu(), t2i.float().cpu()
    return {
        "img_rows": img_rows,
        "txt_rows": txt_rows,
        "txt_ranks": metrics.query_ranks(i2t, [data.img2txt[r] for r in img_rows]).tolist(),
        "img_ranks": metrics.query_ranks(t2i, [[data.txt2img[r]] for r in txt_rows]).tolist(),
        "top_i2t": i2t.topk(min(10, i2t.shape[1]), dim=1).indices.tolist(),
        "top_t2i": t2i.topk(min(10, t2i.shape[1]), dim=1).indices.tolist(),
    }
