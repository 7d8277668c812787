"""BLIP-2 models: stage 1 (representation learning) here; stage 2 in `blip2.models.stage2`.

Stage 1 trains the Q-Former on top of a frozen image encoder with three objectives that share the
Q-Former and differ in their self-attention masks (Li et al., 2023, section 3.2):

* ITC: query embeddings vs. the text's [CLS] embedding; similarity = max over queries / temperature;
  queries and text never see each other (two separate passes);
* ITM: `[queries; text]` fully bidirectional, a binary head on the query outputs, one hard negative
  text per image and one hard negative image per text;
* ITG: `[DEC]` replaces `[CLS]`; text is causal and sees every query through the cached keys/values of
  the query pass; queries never see text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2 import losses
from blip2.config import Blip2Config
from blip2.losses import Gather
from blip2.models.encoders import ImageEncoder
from blip2.models.qformer import QFormer, autocast


@dataclass
class Stage1Output:
    loss: Tensor
    loss_itc: Tensor
    loss_itm: Tensor
    loss_itg: Tensor


@dataclass
class ImageEmbedding:
    image_embeds: Tensor  # (B, N, Dv) image features after ln_vision (what ITM re-reads)
    query_output: Tensor  # (B, Q, D) Q-Former query outputs
    image_feats: Tensor  # (B, Q, E) normalized vision_proj(query_output), for ITC


class Stage1Model(nn.Module):
    """Frozen image encoder + Q-Former with ITC, ITM and ITG heads.

    Attributes:
        autocast_dtype: compute dtype of the training step under `torch.autocast` (e.g.
            `torch.bfloat16`: bf16 matmuls and attention over fp32 master weights); None (default)
            computes in the weights' dtype. The frozen image tower is never autocast.
    """

    def __init__(self, config: Blip2Config, vision_tower: nn.Module | None = None):
        super().__init__()
        if not config.qformer.text:
            raise ValueError("a stage-1 model needs a Q-Former with its text side (QFormerConfig.text=True)")
        self.config = config
        q = config.qformer
        self.visual = ImageEncoder(config.vision, vision_tower)
        self.qformer = QFormer(q)
        self.query_tokens = nn.Parameter(torch.randn(1, q.num_query_tokens, q.hidden_size) * 0.02)
        self.vision_proj = nn.Linear(q.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(q.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(q.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.autocast_dtype: torch.dtype | None = None

    # ---------------------------------------------------------------------------------- encoding

    def encode_image(self, pixel_values: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Image features after `ln_vision`, from pixels or from cached frozen features."""
        if features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or cached image features")
            features = self.visual.features(pixel_values)
        return self.visual.normalize(features)

    def queries(self, batch: int) -> Tensor:
        return self.query_tokens.expand(batch, -1, -1)

    def embed_image(
        self, pixel_values: Tensor | None = None, features: Tensor | None = None
    ) -> ImageEmbedding:
        """Query outputs and normalized ITC embeddings of images."""
        image_embeds = self.encode_image(pixel_values, features)
        out = self.qformer(queries=self.queries(image_embeds.shape[0]), image_embeds=image_embeds)
        return ImageEmbedding(
            image_embeds=image_embeds,
            query_output=out.hidden,
            image_feats=F.normalize(self.vision_proj(out.hidden), dim=-1),
        )

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Normalized ITC embeddings `(B, E)` of texts (the [CLS] output of a text-only pass)."""
        out = self.qformer(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_proj(out.hidden[:, 0]), dim=-1)

    def itc_scores(self, image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Cosine similarity matrix `(Ni, Nt)`, max over queries, without temperature (retrieval)."""
        return losses.max_over_queries(image_feats, text_feats)

    def itm_logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        image_kv: list | None = None,
    ) -> Tensor:
        """ITM logits `(B, 2)` per (image, text) pair; index 1 means "matched".

        `image_embeds` are `ln_vision` outputs (`encode_image`); or pass projected `image_kv`.
        """
        b = input_ids.shape[0]
        out = self.qformer(
            queries=self.queries(b),
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_embeds=image_embeds,
            image_kv=image_kv,
        )
        return self.itm_head(out.hidden[:, : self.config.qformer.num_query_tokens]).mean(dim=1)

    # ---------------------------------------------------------------------------------- training

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        image_features: Tensor | None = None,
        image_ids: Tensor | None = None,
        gather: Gather | None = None,
        generator: torch.Generator | None = None,
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
        """
        if pixel_values is not None and image_features is None:
            image_features = self.visual.features(pixel_values)  # the frozen tower, outside autocast
        with autocast(self.query_tokens.device, self.autocast_dtype):
            return self._losses(input_ids, attention_mask, image_features, image_ids, gather, generator)

    def _losses(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_features: Tensor | None,
        image_ids: Tensor | None,
        gather: Gather | None,
        generator: torch.Generator | None,
    ) -> Stage1Output:
        gather = gather or Gather()
        cfg = self.config.qformer
        image_embeds = self.encode_image(None, image_features)  # (B, N, Dv)
        b = image_embeds.shape[0]
        image_kv = self.qformer.image_kv(image_embeds)  # projected once, shared by ITC/ITG and ITM

        query = self.qformer(queries=self.queries(b), image_kv=image_kv, use_cache=True)
        image_feats = F.normalize(self.vision_proj(query.hidden), dim=-1)  # (B, Q, E)
        text = self.qformer(input_ids=input_ids, attention_mask=attention_mask)
        text_feat = F.normalize(self.text_proj(text.hidden[:, 0]), dim=-1)  # (B, E)

        # ITC against the whole (gathered) batch
        image_feats_all, text_feat_all = gather(image_feats), gather(text_feat)
        image_ids_all = gather(image_ids) if image_ids is not None else None
        offset = gather.rank * b
        sim_i2t = losses.max_over_queries(image_feats, text_feat_all) / self.temp  # (B, B_all)
        sim_t2i = losses.max_over_queries(image_feats_all, text_feat).t() / self.temp  # (B, B_all)
        pos = losses.positives(b, sim_i2t.shape[1], offset, image_ids, image_ids_all, input_ids.device)
        loss_itc = losses.itc_loss(sim_i2t, sim_t2i, pos)

        # ITM with hard negatives drawn over the global batch (the same draw on every rank)
        with torch.no_grad():
            n_all = image_feats_all.shape[0]
            sim_all = losses.max_over_queries(image_feats_all, text_feat_all) / self.temp
            pos_all = losses.positives(n_all, n_all, 0, image_ids_all, image_ids_all, input_ids.device)
            neg_text, neg_image = losses.sample_hard_negatives(sim_all, pos_all, generator)
            neg_text, neg_image = neg_text[offset : offset + b], neg_image[offset : offset + b]
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
            neg_kv = self.qformer.image_kv(gather(image_embeds)[neg_image])
        itm_kv = [
            None if kv is None else tuple(torch.cat([kv[j], nkv[j], kv[j]]) for j in range(2))
            for kv, nkv in zip(image_kv, neg_kv, strict=True)
        ]
        itm_ids = torch.cat([input_ids, input_ids, input_ids_all[neg_text]])
        itm_mask = torch.cat([attention_mask, attention_mask, mask_all[neg_text]])
        logits = self.itm_logits(itm_ids, itm_mask, image_kv=itm_kv)  # (3B, 2)
        loss_itm = losses.itm_loss(logits, num_positive=b, keep=keep)

        # ITG: [DEC] first, causal text that sees the cached query keys/values
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = cfg.dec_token_id
        labels = dec_ids.masked_fill(attention_mask == 0, -100)
        dec = self.qformer(
            input_ids=dec_ids, attention_mask=attention_mask, past_kv=query.past_kv, mode="causal"
        )
        loss_itg = losses.itg_loss(self.qformer.lm_logits(dec.hidden), labels)

        return Stage1Output(
            loss=loss_itc + loss_itm + loss_itg, loss_itc=loss_itc, loss_itm=loss_itm, loss_itg=loss_itg
        )

    # ---------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_itg(
        self,
        pixel_values: Tensor | None = None,
        image_features: Tensor | None = None,
        max_new_tokens: int = 30,
    ) -> Tensor:
        """Greedy captioning with the Q-Former's own ITG head (stage 1); returns token ids after [DEC].

        The query pass runs once; each new token attends to its keys/values and to the cached keys/values
        of earlier tokens. Generation stops at [SEP].
        """
        cfg = self.config.qformer
        image_embeds = self.encode_image(pixel_values, image_features)
        b = image_embeds.shape[0]
        past = self.qformer(queries=self.queries(b), image_embeds=image_embeds, use_cache=True).past_kv
        token = torch.full((b, 1), cfg.dec_token_id, dtype=torch.long, device=image_embeds.device)
        done = torch.zeros(b, dtype=torch.bool, device=image_embeds.device)
        out = []
        for step in range(max_new_tokens):
            dec = self.qformer(
                input_ids=token, past_kv=past, mode="causal", position_offset=step, use_cache=True
            )
            past = dec.past_kv
            token = self.qformer.lm_logits(dec.hidden[:, -1:]).argmax(-1)
            token = token.masked_fill(done[:, None], cfg.pad_token_id)
            out.append(token)
            done |= token[:, 0] == cfg.sep_token_id
            if done.all():
                break
        return torch.cat(out, dim=1)
