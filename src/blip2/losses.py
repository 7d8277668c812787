"""The losses of BLIP-2, as pure functions.

Stage 1 (Li et al., 2023, section 3.2): image-text contrastive (ITC), image-text matching with hard
negatives (ITM) and image-grounded text generation (ITG). Stage 2: the LLM's language-modeling loss
(see `blip2.models.language`). Nothing here talks to torch.distributed: features from other ranks
come in through a `Gather` passed by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Gather:
    """How features from all ranks reach the loss: `gather(x)` concatenates `x` over ranks (dim 0).

    The default is one process (identity). Training supplies an autograd all-gather (gradients flow
    back to the rank that owns each feature) together with this rank's index and the world size.
    """

    rank: int = 0
    world_size: int = 1

    def __call__(self, x: Tensor) -> Tensor:
        return x


def max_over_queries(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """Image-text similarity: the best of the image's query embeddings for each text.

    Args:
        image_feats: `(Ni, Q, E)` normalized query embeddings.
        text_feats: `(Nt, E)` normalized text embeddings.

    Returns:
        `(Ni, Nt)` similarities.
    """
    return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)


def positives(
    batch: int,
    total: int,
    offset: int,
    image_ids: Tensor | None = None,
    image_ids_all: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """`(batch, total)` bool: which of the `total` gathered items are positives of each local item.

    Without image ids the positive of local item `b` is gathered item `offset + b` (`offset` = rank x
    batch). With image ids every item sharing the image id is a positive (the original code's retrieval
    fine-tuning; also right for datasets with several captions per image).
    """
    if image_ids is None:
        pos = torch.zeros(batch, total, dtype=torch.bool, device=device)
        rows = torch.arange(batch, device=device)
        pos[rows, rows + offset] = True
        return pos
    return image_ids.view(-1, 1) == image_ids_all.view(1, -1)


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, pos: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Image-text contrastive loss, both directions averaged.

    The target of each row is uniform over its positives, smoothed as cross-entropy with
    `label_smoothing` does (`(1 - eps) * target + eps / K`). With one positive per row this equals
    `F.cross_entropy(sim, labels, label_smoothing=eps)`.

    Args:
        sim_i2t: `(B, B_all)` image-to-text similarities / temperature.
        sim_t2i: `(B, B_all)` text-to-image similarities / temperature.
        pos: `(B, B_all)` positives (see `positives`).
    """
    target = pos.float() / pos.sum(dim=1, keepdim=True)
    target = (1 - label_smoothing) * target + label_smoothing / target.shape[1]
    loss_i2t = -(target * F.log_softmax(sim_i2t.float(), dim=1)).sum(dim=1).mean()
    loss_t2i = -(target * F.log_softmax(sim_t2i.float(), dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@torch.no_grad()
def sample_hard_negatives(
    sim: Tensor, pos: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw one hard negative text per image and one hard negative image per text.

    Each is sampled from the softmax of the similarities with the positives excluded (vectorized:
    one `torch.multinomial` per direction, no per-sample loop). A positive is never drawn: a row with
    no possible negative (every item shares its image, or the global batch holds one item) gets -1,
    and the ITM loss leaves that row out (see `itm_loss`).

    Args:
        sim: `(N, N)` image-to-text similarities / temperature over the global batch.
        pos: `(N, N)` positives over the global batch (items sharing an image).
        generator: makes the draw reproducible (seed it the same on every rank).

    Returns:
        `(neg_text_for_image, neg_image_for_text)`, each `(N,)` indices into the global batch, -1 where
        a row has no negative.
    """

    def draw(s: Tensor, p: Tensor) -> Tensor:
        empty = p.all(dim=1)
        w = torch.softmax(s.float().masked_fill(p, float("-inf")), dim=1)
        w = torch.nan_to_num(w, nan=0.0)
        w[empty] = 1.0  # a placeholder draw for rows without a negative (replaced by -1 below)
        return torch.multinomial(w, 1, generator=generator).squeeze(1).masked_fill(empty, -1)

    return draw(sim, pos), draw(sim.t(), pos.t())


def itm_loss(logits: Tensor, num_positive: int, keep: Tensor | None = None) -> Tensor:
    """Image-text matching: 2-way cross-entropy, the first `num_positive` rows matched, the rest not.

    `keep` (bool, one per row) averages over the kept rows only; with none kept the loss is 0 (still
    connected to the graph, so every rank's backward reaches the ITM head).
    """
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_positive] = 1
    if keep is None:
        return F.cross_entropy(logits.float(), labels)
    per_row = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_row * keep).sum() / keep.sum().clamp_min(1)


def itg_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Image-grounded text generation: next-token cross-entropy (labels shifted here, -100 ignored)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Causal LM loss: token t predicts label t + 1; -100 ignored; mean over counted tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def seq2seq_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Encoder-decoder LM loss: decoder token t predicts label t (its inputs are the labels shifted
    right); -100 ignored; mean over counted tokens."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def rerank_score(itm_logit: Tensor, itc: Tensor) -> Tensor:
    """The score ITM re-ranking orders candidates by: the ITM head's positive logit plus the ITC cosine
    (LAVIS's `compute_sim_matrix`). Retrieval evaluation and `Retriever.search` / `blip2 search` both
    rank by it."""
    return itm_logit.float() + itc.float()
