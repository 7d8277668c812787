"""BLIP-2's retrieval model: the query encoder with stage 1's heads (Li et al., 2023, section 3.2).

Stage 1 uses one Q-Former in three ways that differ in their self-attention masks:

* ITC: the queries' embeddings (`image_feats`) against the text's [CLS] embedding (`text_feats`);
  similarity = max over queries; queries and text never see each other (two separate passes);
* ITM: `[queries; text]` fully bidirectional, a binary head (`itm_head`) on the query outputs;
* ITG: `[DEC]` replaces `[CLS]`; text is causal and sees every query through the cached keys/values of
  the query pass; queries never see text. The Q-Former's own LM head gives the logits.

This module exposes those pieces and no loss: the stage-1 objective (`blip2.tasks.stage1`) combines
them; retrieval (`blip2.pipelines`) ranks with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2 import losses
from blip2.config import Blip2Config
from blip2.models.encoders import ImageEncoder
from blip2.models.qformer import KV
from blip2.models.query_encoder import QueryEncoder


@dataclass
class ImageEmbedding:
    image_embeds: Tensor  # (B, N, Dv) image embeddings after ln_vision (what ITM re-reads)
    query_output: Tensor  # (B, Q, D) Q-Former query outputs
    image_feats: Tensor  # (B, Q, E) normalized vision_proj(query_output), for ITC


@dataclass
class ITGOutput:
    logits: Tensor  # (B, L, V) over the Q-Former vocabulary; token t predicts token t + 1
    hidden_states: Tensor  # (B, L, D) the text's last hidden states under the causal ITG mask


class RetrievalModel(QueryEncoder):
    """Frozen image encoder + Q-Former with the ITC projections, the ITM head and the ITG head."""

    def __init__(self, config: Blip2Config, vision_tower: nn.Module | ImageEncoder | None = None):
        if not config.qformer.text:
            raise ValueError("a stage-1 model needs a Q-Former with its text side (QFormerConfig.text=True)")
        super().__init__(config, vision_tower)
        q = config.qformer
        self.vision_proj = nn.Linear(q.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(q.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(q.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    # ---------------------------------------------------------------------------------- ITC

    def image_feats(self, query_output: Tensor) -> Tensor:
        """Normalized ITC embeddings `(B, Q, E)` of query outputs `(B, Q, D)`."""
        return F.normalize(self.vision_proj(query_output), dim=-1)

    def embed_image(
        self, pixel_values: Tensor | None = None, image_features: Tensor | None = None
    ) -> ImageEmbedding:
        """Query outputs and normalized ITC embeddings of images (inputs as in `encode_image`)."""
        image_embeds = self.encode_image(pixel_values, image_features)
        out = self.qformer(queries=self.queries(image_embeds.shape[0]), image_embeds=image_embeds)
        return ImageEmbedding(
            image_embeds=image_embeds, query_output=out.hidden, image_feats=self.image_feats(out.hidden)
        )

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Normalized ITC embeddings `(B, E)` of texts (the [CLS] output of a text-only pass)."""
        out = self.qformer(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_proj(out.hidden[:, 0]), dim=-1)

    def itc_scores(self, image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Cosine similarity matrix `(Ni, Nt)`, max over queries, without temperature (retrieval)."""
        return losses.max_over_queries(image_feats, text_feats)

    # ---------------------------------------------------------------------------------- ITM

    def itm_logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        image_kv: list[KV | None] | None = None,
    ) -> Tensor:
        """ITM logits `(B, 2)` per (image, text) pair; index 1 means "matched".

        `image_embeds` are `ln_vision` outputs (`encode_image`); or pass projected `image_kv`
        (`self.qformer.image_kv(image_embeds)`). Pair any images with any texts: row i is image i with
        text i (the stage-1 task's negatives, or a caller's own).
        """
        out = self.qformer(
            queries=self.queries(input_ids.shape[0]),
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_embeds=image_embeds,
            image_kv=image_kv,
        )
        query_output = out.hidden[:, : self.config.qformer.num_query_tokens]  # (B, Q, D)
        return self.itm_head(query_output).mean(dim=1)

    # ---------------------------------------------------------------------------------- ITG

    def itg_logits(self, input_ids: Tensor, attention_mask: Tensor | None, past_kv: list[KV]) -> ITGOutput:
        """ITG logits and hidden states of texts after a cached query pass.

        Args:
            input_ids: `(B, L)` ids starting with [DEC] (`config.qformer.dec_token_id`).
            attention_mask: `(B, L)` text padding mask.
            past_kv: the query pass's keys/values (`self.qformer(..., use_cache=True).past_kv`).
        """
        dec = self.qformer(input_ids=input_ids, attention_mask=attention_mask, past_kv=past_kv, mode="causal")
        return ITGOutput(logits=self.qformer.lm_logits(dec.hidden), hidden_states=dec.hidden)

    def itg(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_features: Tensor | None = None,
    ) -> ITGOutput:
        """ITG logits `(B, L, V)` and hidden states `(B, L, D)` of texts given their images.

        `input_ids` start with [CLS] or [DEC]: the first token is set to [DEC] here, as the ITG
        objective does. Images as in `encode_image`.
        """
        image_embeds = self.encode_image(pixel_values, image_features)
        past = self.qformer(
            queries=self.queries(image_embeds.shape[0]), image_embeds=image_embeds, use_cache=True
        )
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.config.qformer.dec_token_id
        return self.itg_logits(dec_ids, attention_mask, past.past_kv)
