"""Stage 1 (representation learning): ITC + ITM + ITG on a `RetrievalModel` (Li et al., 2023, 3.2).

The three objectives share one Q-Former and differ in their self-attention masks:

* ITC against the whole (gathered) batch: similarity = max over queries / temperature;
* ITM with hard negatives: one negative text per image and one negative image per text, drawn over
  the global batch from the ITC similarities (the same draw on every rank), or given by the caller;
* ITG: `[DEC]` first, causal text that sees the cached query keys/values.

Task types: `Stage1Task` (task name `stage1`, pre-training) and `RetrievalTask` (`retrieval`,
fine-tuning: captions of one image share an image id and are positives of each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from blip2 import losses
from blip2.config import Blip2Config
from blip2.errors import UserError
from blip2.losses import Gather
from blip2.models.retrieval import RetrievalModel
from blip2.tasks.base import Task

if TYPE_CHECKING:
    from blip2.data.batching import TextSpec
    from blip2.train.config import DataSection, TrainConfig


@dataclass
class Stage1Output:
    loss: Tensor
    loss_itc: Tensor
    loss_itm: Tensor
    loss_itg: Tensor


class Stage1Task(Task):
    """ITC + ITM + ITG on a retrieval model.

    Args:
        model: the `RetrievalModel` to train.
    """

    model: RetrievalModel

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        image_features: Tensor | None = None,
        image_ids: Tensor | None = None,
        gather: Gather | None = None,
        generator: torch.Generator | None = None,
        negatives: tuple[Tensor, Tensor] | None = None,
    ) -> Stage1Output:
        """The three stage-1 losses on a batch of (image, text) pairs.

        Args:
            input_ids: `(B, L)` BERT ids starting with [CLS] (ITG replaces it with [DEC]).
            attention_mask: `(B, L)` text padding mask.
            pixel_values: `(B, 3, H, W)` images, or
            image_features: `(B, N, Dv)` cached frozen features (before `ln_vision`).
            image_ids: `(B,)` integer ids; pairs sharing one are positives for ITC and never negatives.
            gather: concatenation over ranks (identity in one process, see `losses.Gather`).
            generator: the random source of the hard-negative draw.
            negatives: fixed ITM negatives instead of the hard-negative draw: `(neg_text, neg_image)`,
                each `(B,)` indices into the gathered batch (the negative text of each local image, the
                negative image of each local text); -1 leaves a pair out of the ITM loss.
        """
        model = self.model
        if pixel_values is not None and image_features is None:
            image_features = model.visual.features(pixel_values)  # the frozen tower, outside autocast
        with model.autocast():
            return self._losses(
                input_ids, attention_mask, image_features, image_ids, gather, generator, negatives
            )

    def _losses(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_features: Tensor | None,
        image_ids: Tensor | None,
        gather: Gather | None,
        generator: torch.Generator | None,
        negatives: tuple[Tensor, Tensor] | None,
    ) -> Stage1Output:
        model, gather = self.model, gather or Gather()
        image_embeds = model.encode_image(None, image_features)  # (B, N, Dv)
        b = image_embeds.shape[0]
        image_kv = model.qformer.image_kv(image_embeds)  # projected once, shared by ITC/ITG and ITM

        query = model.qformer(queries=model.queries(b), image_kv=image_kv, use_cache=True)
        image_feats = model.image_feats(query.hidden)  # (B, Q, E)
        text_feats = model.embed_text(input_ids, attention_mask)  # (B, E)

        # ITC against the whole (gathered) batch
        image_feats_all, text_feats_all = gather(image_feats), gather(text_feats)
        image_ids_all = gather(image_ids) if image_ids is not None else None
        offset = gather.rank * b
        sim_i2t = losses.max_over_queries(image_feats, text_feats_all) / model.temp  # (B, B_all)
        sim_t2i = losses.max_over_queries(image_feats_all, text_feats).t() / model.temp  # (B, B_all)
        pos = losses.positives(b, sim_i2t.shape[1], offset, image_ids, image_ids_all, input_ids.device)
        loss_itc = losses.itc_loss(sim_i2t, sim_t2i, pos)

        # ITM with hard negatives drawn over the global batch (the same draw on every rank)
        with torch.no_grad():
            if negatives is None:
                n_all = image_feats_all.shape[0]
                sim_all = losses.max_over_queries(image_feats_all, text_feats_all) / model.temp
                pos_all = losses.positives(n_all, n_all, 0, image_ids_all, image_ids_all, input_ids.device)
                neg_text, neg_image = losses.sample_hard_negatives(sim_all, pos_all, generator)
                neg_text, neg_image = neg_text[offset : offset + b], neg_image[offset : offset + b]
            else:
                neg_text, neg_image = (n.to(input_ids.device) for n in negatives)
            # a row with no negative (all of the global batch shares its image id, or the global batch
            # is one item) is left out of the ITM loss: its pairs are computed on the row's own index
            # (fixed shapes) and not counted
            has_text, has_image = neg_text >= 0, neg_image >= 0
            keep = None
            if not (has_text.all() and has_image.all()):
                own = torch.arange(offset, offset + b, device=neg_text.device)
                neg_text, neg_image = neg_text.where(has_text, own), neg_image.where(has_image, own)
                keep = torch.cat([has_text | has_image, has_image, has_text]).float()
        input_ids_all, mask_all = gather(input_ids), gather(attention_mask)
        if gather.world_size == 1:  # negatives are local: reuse the projected image keys/values
            neg_kv = [None if kv is None else (kv[0][neg_image], kv[1][neg_image]) for kv in image_kv]
        else:
            neg_kv = model.qformer.image_kv(gather(image_embeds)[neg_image])
        # rows: (image, its text), (negative image, text), (image, negative text)
        itm_kv = [
            None if kv is None else tuple(torch.cat([kv[j], nkv[j], kv[j]]) for j in range(2))
            for kv, nkv in zip(image_kv, neg_kv, strict=True)
        ]
        itm_ids = torch.cat([input_ids, input_ids, input_ids_all[neg_text]])  # (3B, L)
        itm_mask = torch.cat([attention_mask, attention_mask, mask_all[neg_text]])
        logits = model.itm_logits(itm_ids, itm_mask, image_kv=itm_kv)  # (3B, 2)
        loss_itm = losses.itm_loss(logits, num_positive=b, keep=keep)

        # ITG: [DEC] first, causal text that sees the cached query keys/values
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = model.config.qformer.dec_token_id
        labels = dec_ids.masked_fill(attention_mask == 0, -100)
        itg = model.itg_logits(dec_ids, attention_mask, query.past_kv)
        loss_itg = losses.itg_loss(itg.logits, labels)

        return Stage1Output(
            loss=loss_itc + loss_itm + loss_itg, loss_itc=loss_itc, loss_itm=loss_itm, loss_itg=loss_itg
        )

    # ---------------------------------------------------------------------------------- training loop

    def inputs(self, batch: dict[str, Tensor], gather: Gather, generator: torch.Generator) -> dict[str, Any]:
        return dict(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch.get("pixel_values"),
            image_features=batch.get("image_features"),
            image_ids=batch.get("image_ids"),
            gather=gather,
            generator=generator,
        )

    def parts(self, output: Stage1Output) -> dict[str, Tensor]:
        return {"loss_itc": output.loss_itc, "loss_itm": output.loss_itm, "loss_itg": output.loss_itg}

    @classmethod
    def new_model(cls, config: Blip2Config, cfg: TrainConfig) -> RetrievalModel:
        if config.llm is not None:
            raise UserError(
                f"task {cfg.task!r} trains stage 1; model {config.name or cfg.model.preset!r} is stage 2"
            )
        return RetrievalModel(config)

    @classmethod
    def from_saved(cls, model: Any, cfg: TrainConfig) -> RetrievalModel:
        if getattr(model.config, "llm", None) is not None:
            raise UserError(
                f"task {cfg.task!r} trains a stage-1 model but {cfg.model.init_from} is a stage-2 one"
            )
        return model

    @classmethod
    def text_spec(cls, cfg: TrainConfig, section: DataSection, config: Blip2Config) -> TextSpec:
        from blip2.data.batching import TextSpec
        from blip2.tokenizers import qformer_tokenizer

        tok = qformer_tokenizer(cfg.model.tokenizer or config.tokenizer)
        return TextSpec("qformer", tok, max_len=section.max_len)


class RetrievalTask(Stage1Task):
    """Stage 1 fine-tuned for retrieval: captions of one image share an image id and are positives of
    each other (for ITC, and never ITM negatives)."""

    uses_image_ids = True
