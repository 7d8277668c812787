"""Benchmark metrics, computed the way the paper's evaluation computes them.

- `vqa_accuracy` / `vqa_scores`: VQA accuracy (VQAv2, OK-VQA) as LAVIS's version of the official
  script computes it: normalized prediction, then the mean over the ten leave-one-out subsets of the
  human answers of min(1, matches / 3); questions with fewer than ten human answers use the
  fallbacks of `vqa_rule` (`vqa_rules` counts which rule scored how many questions).
- `gqa_accuracy`: exact match of the normalized prediction with GQA's short answer (as LAVIS).
- `caption_metrics`: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when its models are installed)
  through pycocoevalcap with its Java PTB tokenizer; or, with `java=False`, BLEU, ROUGE-L and CIDEr-D
  from pycocoevalcap's pure-Python scorers on simply tokenized text.
- `retrieval_recall`: text and image retrieval R@1/5/10 from score matrices.
- `itm_rerank`: ITC top-k candidates re-scored by ITM (score = ITM positive logit + ITC cosine).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from blip2.errors import UserError
from blip2.eval.vqa_normalize import normalize_answer, normalize_punctuation
from blip2.losses import rerank_score

__all__ = [
    "caption_metrics",
    "gqa_accuracy",
    "itm_rerank",
    "java_available",
    "normalize_answer",
    "query_ranks",
    "recall_from_ranks",
    "rerank_rows",
    "retrieval_recall",
    "simple_tokenize",
    "spice_status",
    "vqa_accuracy",
    "vqa_rule",
    "vqa_rules",
    "vqa_scores",
]

# ------------------------------------------------------------------------------------------- VQA


VQA_OFFICIAL = "leave-one-out"  # ten or more answers: the official accuracy
VQA_CONSENSUS = "min(1, matches/3)"  # three to nine answers: no leave-one-out
VQA_EXACT = "exact match"  # one or two answers


def vqa_rule(num_answers: int) -> str:
    """The rule `vqa_accuracy` scores a question with, by its number of human answers.

    The official accuracy averages min(1, matches / 3) over the leave-one-out subsets of ten human
    answers; with fewer answers that undercounts (with one answer, a correct prediction scores 0), so:

    - ten or more answers: `VQA_OFFICIAL`, the official leave-one-out accuracy;
    - three to nine: `VQA_CONSENSUS`, min(1, matches / 3) over all the answers (no leave-one-out);
    - one or two: `VQA_EXACT`, 1 if the prediction equals one of the answers, else 0.

    In both fallbacks the answers get the prediction's full normalization (`normalize_answer`).
    """
    if num_answers < 1:
        raise ValueError("a VQA question needs at least one human answer")
    if num_answers >= 10:
        return VQA_OFFICIAL
    return VQA_CONSENSUS if num_answers >= 3 else VQA_EXACT


def vqa_rules(answers: Iterable[Sequence[str]]) -> dict[str, int]:
    """How many of these questions (their human answers) each `vqa_rule` scores."""
    counts: dict[str, int] = {}
    for ans in answers:
        rule = vqa_rule(len(ans))
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (ten for VQAv2/OK-VQA), as LAVIS.

    We follow LAVIS's version of the official script (`lavis/common/vqa_tools/vqa_eval.py`), the code
    that produced the BLIP-2 paper's numbers, so that our scores are comparable with them:

    - the prediction always loses newlines/tabs and outer spaces and is fully normalized
      (`normalize_punctuation`, then `normalize_words`: digits, articles, contractions);
    - the human answers are used as given, except that when they disagree (more than one distinct
      string) each gets `normalize_punctuation` only (not the digit/article step);
    - for each human answer left out in turn, the prediction scores
      min(1, (number of the remaining answers equal to it) / 3); the scores are averaged.

    The official GT-Vision-Lab script (`vqaEval.py`) differs: it normalizes the prediction (and the
    answers, fully) only when the human answers disagree, so there "Yes" or "two" against ten "yes"
    or "2" scores 0; under LAVIS's rules they score 1.

    With fewer than ten human answers the leave-one-out mean undercounts (one answer: always 0), so
    those questions are scored by the fallbacks of `vqa_rule`.

    Returns:
        Accuracy in [0, 1].
    """
    rule = vqa_rule(len(answers))
    pred = normalize_answer(prediction)
    if rule != VQA_OFFICIAL:
        matches = sum(1 for a in answers if normalize_answer(a) == pred)
        return min(1.0, matches / 3.0) if rule == VQA_CONSENSUS else float(matches > 0)
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [normalize_punctuation(a) for a in gts]
    total = 0.0
    for left_out in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != left_out and a == pred)
        total += min(1.0, matches / 3.0)
    return total / len(gts)


def vqa_scores(
    predictions: Mapping[Hashable, str],
    answers: Mapping[Hashable, Sequence[str]],
    answer_types: Mapping[Hashable, str] | None = None,
) -> dict[str, float]:
    """Official VQA accuracy over a question set, in percent (rounded to two decimals as reported).

    Args:
        predictions: question id -> predicted answer; every id must have human answers.
        answers: question id -> the human answers.
        answer_types: question id -> "yes/no", "number" or "other", for the per-type breakdown.

    Returns:
        `{"accuracy": ..., "yes/no": ..., "number": ..., "other": ...}` (types present only), and
        `"questions"`, the number scored.
    """
    missing = [q for q in predictions if q not in answers]
    if missing:
        raise UserError(f"{len(missing)} predictions have no annotation (first: question {missing[0]!r})")
    accs = {q: vqa_accuracy(p, answers[q]) for q, p in predictions.items()}
    out = {"accuracy": _pct(accs.values()), "questions": float(len(accs))}
    if answer_types:
        for kind in sorted({answer_types[q] for q in accs if q in answer_types}):
            out[kind] = _pct(a for q, a in accs.items() if answer_types.get(q) == kind)
    return out


def gqa_accuracy(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, str]) -> dict[str, float]:
    """GQA accuracy in percent: the normalized prediction (`normalize_answer`) must equal the short
    answer exactly (LAVIS normalizes the prediction only; GQA's answers are already lowercase words)."""
    missing = [q for q in predictions if q not in answers]
    if missing:
        raise UserError(f"{len(missing)} predictions have no annotation (first: question {missing[0]!r})")
    hits = [float(normalize_answer(p) == answers[q]) for q, p in predictions.items()]
    return {"accuracy": _pct(hits), "questions": float(len(hits))}


def _pct(values: Iterable[float]) -> float:
    vals = list(values)
    return round(100.0 * sum(vals) / len(vals), 2) if vals else 0.0


# ------------------------------------------------------------------------------------- captioning

# tokens the PTB tokenizer wrapper of pycocoevalcap removes after tokenizing
_PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_SIMPLE_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def simple_tokenize(text: str) -> str:
    """A Java-free stand-in for pycocoevalcap's PTB tokenization: lowercase, words (with an inner
    apostrophe kept) and single symbols as tokens, the punctuation the PTB wrapper drops removed,
    joined with spaces."""
    tokens = _SIMPLE_TOKEN.findall(text.lower())
    return " ".join(t for t in tokens if t not in _PTB_PUNCTUATION and t not in "()[]{}")


def java_available() -> bool:
    """Whether a `java` executable is on PATH (pycocoevalcap's PTB tokenizer, METEOR and SPICE)."""
    return shutil.which("java") is not None


def spice_status() -> str | None:
    """None when SPICE can run; otherwise one sentence saying why not and what to do.

    SPICE needs Java and the Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use;
    we never download: install them with `python -m pycocoevalcap.spice.get_stanford_models` (from a
    machine with network access) to get SPICE.
    """
    if not java_available():
        return "SPICE not computed: Java is not installed"
    try:
        import pycocoevalcap.spice as spice_pkg
    except ImportError:
        return "SPICE not computed: pycocoevalcap is not installed (pip install 'blip2[eval]')"
    jar = Path(spice_pkg.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar"
    if not jar.is_file():
        return (
            "SPICE not computed: its Stanford CoreNLP models are not installed "
            f"({jar} is missing; run `python -m pycocoevalcap.spice.get_stanford_models` once with network)"
        )
    return None


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    java: bool | None = None,
    spice: bool | None = None,
) -> dict[str, float]:
    """Corpus captioning metrics, as fractions (pycocoevalcap's scale: CIDEr 1.46 = "146.0").

    Args:
        predictions: image id -> generated caption (the ids scored).
        references: image id -> reference captions (COCO: five, NoCaps: ten).
        java: True: pycocoevalcap's PTB tokenizer and METEOR (as COCOEvalCap; needs Java); False: the
            pure-Python path (`simple_tokenize`, then BLEU, ROUGE-L and CIDEr-D; no METEOR/SPICE);
            None (default): True when Java is installed.
        spice: also SPICE (slow; needs Java and its Stanford models, see `spice_status`); None
            (default): only when available. True when it is not raises `UserError`.

    Returns:
        `Bleu_1`..`Bleu_4`, `ROUGE_L`, `CIDEr`, plus `METEOR` (and `SPICE`) on the Java path.
    """
    _require_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise UserError(f"{len(missing)} captions have no references (first: image {missing[0]!r})")
    if not ids:
        raise UserError("no captions to score")
    java = java_available() if java is None else java
    if java and not java_available():
        raise UserError("METEOR and the PTB tokenizer need Java: install a JRE (or pass java=False)")
    if spice and spice_status() is not None:
        raise UserError(spice_status() or "")
    use_spice = java and (spice_status() is None if spice is None else spice)

    keys = {i: str(n) for n, i in enumerate(ids)}  # pycocoevalcap wants sortable, uniform keys
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({keys[i]: [{"caption": c} for c in references[i]] for i in ids})
        res = tok.tokenize({keys[i]: [{"caption": predictions[i]}] for i in ids})
    else:
        gts = {keys[i]: [simple_tokenize(c) for c in references[i]] for i in ids}
        res = {keys[i]: [simple_tokenize(predictions[i])] for i in ids}

    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        out["METEOR"] = float(Meteor().compute_score(gts, res)[0])  # its Java process ends with it
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if use_spice:
        from pycocoevalcap.spice.spice import Spice

        with contextlib.redirect_stdout(io.StringIO()):
            out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return out


def _require_pycocoevalcap() -> None:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as e:
        raise UserError("captioning metrics need pycocoevalcap: pip install 'blip2[eval]'") from e


# -------------------------------------------------------------------------------------- retrieval


def retrieval_recall(
    scores_i2t: Tensor | np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    scores_t2i: Tensor | np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Text retrieval (image -> its captions) and image retrieval (caption -> its image) recall.

    The rank of a query is the number of wrong candidates scoring at least as high as its best correct
    one (ties count against the model), so R@k = percentage of queries with rank < k. For text
    retrieval an image is right when any of its captions is retrieved (as the paper's protocol).

    Args:
        scores_i2t: `(N_images, N_texts)` scores for text retrieval.
        img2txt: for each image, the indices of its captions.
        txt2img: for each caption, the index of its image.
        scores_t2i: `(N_texts, N_images)` scores for image retrieval (default: `scores_i2t.T`; ITM
            re-ranking gives each direction its own matrix).
        ks: the recall cut-offs.

    Returns:
        `txt_r{k}`, `txt_r_mean`, `img_r{k}`, `img_r_mean`, `r_mean` and `agg_metrics` (the mean of the
        text-retrieval recalls, LAVIS's model-selection number), all in percent.
    """
    i2t = torch.as_tensor(np.asarray(scores_i2t), dtype=torch.float64)
    t2i = i2t.T if scores_t2i is None else torch.as_tensor(np.asarray(scores_t2i), dtype=torch.float64)
    n_img, n_txt = i2t.shape
    if len(img2txt) != n_img or len(txt2img) != n_txt or tuple(t2i.shape) != (n_txt, n_img):
        raise ValueError(
            f"score matrices {tuple(i2t.shape)}/{tuple(t2i.shape)} do not fit "
            f"{len(img2txt)} images and {len(txt2img)} texts"
        )
    return recall_from_ranks(
        query_ranks(i2t, [list(t) for t in img2txt]), query_ranks(t2i, [[i] for i in txt2img]), ks
    )


def recall_from_ranks(
    txt_ranks: Tensor, img_ranks: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """`retrieval_recall` from the ranks of the right answers (`query_ranks`), in percent."""
    out: dict[str, float] = {}
    for name, ranks in (("txt", torch.as_tensor(txt_ranks)), ("img", torch.as_tensor(img_ranks))):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * float((ranks < k).double().mean())
        out[f"{name}_r_mean"] = sum(out[f"{name}_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["agg_metrics"] = out["txt_r_mean"]
    return out


def query_ranks(scores: Tensor, correct: Sequence[Sequence[int]]) -> Tensor:
    """Per query row of `scores`: how many wrong candidates score at least as high as its best right
    one (`correct[row]`); 0 means a right answer is retrieved first."""
    ranks = torch.empty(scores.shape[0], dtype=torch.long)
    for row, good in enumerate(correct):
        if not good:
            raise ValueError(f"query {row} has no correct candidate")
        s = scores[row]
        best = s[list(good)].max()
        wrong = torch.ones_like(s, dtype=torch.bool)
        wrong[list(good)] = False
        ranks[row] = int(((s >= best) & wrong).sum())
    return ranks


# ------------------------------------------------------------------------------ ITM re-ranking

ItmScorer = Callable[[Tensor, Tensor], Tensor]
"""(image indices (P,), text indices (P,)) -> ITM positive logits (P,) for those pairs."""


@torch.no_grad()
def rerank_rows(
    sims: Tensor,
    itm_scores: Callable[[Tensor, Tensor], Tensor],
    rows: Sequence[int] | Tensor,
    *,
    k: int = 128,
    batch_size: int = 256,
) -> Tensor:
    """Re-score the ITC top-k candidates of some query rows with ITM.

    For each row r the k candidates c with the highest `sims[r, c]` get `rerank_score`: `itm(r, c) +
    sims[r, c]` (the ITM positive logit plus the ITC cosine, as LAVIS's `compute_sim_matrix`); the others keep
    their ITC order below all of them (shifted down), so the ranking changes only inside the top k.

    Args:
        sims: `(R_total, C)` ITC cosine similarities (rows are queries).
        itm_scores: `(row indices (P,), candidate indices (P,)) -> (P,)` positive ITM logits; it is
            called with at most `batch_size` pairs at a time, pairs of one row consecutive.
        rows: which rows to re-rank (a shard of them under distributed evaluation).
        k: candidates re-scored per row (the paper: 128).
        batch_size: pairs per `itm_scores` call.

    Returns:
        `(len(rows), C)` float32 scores on `sims`' device.
    """
    rows = torch.as_tensor(
        list(rows) if isinstance(rows, range) else rows, dtype=torch.long, device=sims.device
    )
    sub = sims[rows].float()  # (R, C)
    n_rows, n_cand = sub.shape
    k = min(k, n_cand)
    top_sim, top_idx = sub.topk(k, dim=1)  # (R, k)
    row_idx = rows[:, None].expand(n_rows, k).reshape(-1)
    cand_idx = top_idx.reshape(-1)
    itm = torch.empty(row_idx.numel(), dtype=torch.float32, device=sims.device)
    for start in range(0, row_idx.numel(), batch_size):
        stop = start + batch_size
        itm[start:stop] = itm_scores(row_idx[start:stop], cand_idx[start:stop]).float().to(sims.device)
    top_score = rerank_score(itm.view(n_rows, k), top_sim)  # (R, k)
    out = sub.clone()
    if k < n_cand:  # push the rest below the re-ranked top k, keeping their ITC order
        inside = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, top_idx, True)
        rest_max = sub.masked_fill(inside, float("-inf")).amax(dim=1, keepdim=True)
        shift = top_score.amin(dim=1, keepdim=True) - rest_max - 1.0
        out = out + shift
    return out.scatter_(1, top_idx, top_score)


def itm_rerank(
    sims: Tensor,
    itm_scores: Callable[[Tensor, Tensor], Tensor],
    *,
    k: int = 128,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Both retrieval directions re-ranked by ITM (`rerank_rows` on all rows).

    Args:
        sims: `(N_images, N_texts)` ITC cosines (no temperature).
        itm_scores: `(image indices (P,), text indices (P,)) -> (P,)` positive ITM logits.

    Returns:
        `(scores_i2t (N_images, N_texts), scores_t2i (N_texts, N_images))` for `retrieval_recall`.
    """
    i2t = rerank_rows(sims, itm_scores, range(sims.shape[0]), k=k, batch_size=batch_size)
    t2i = rerank_rows(sims.T, lambda t, i: itm_scores(i, t), range(sims.shape[1]), k=k, batch_size=batch_size)
    return i2t, t2i
