"""The query encoder both BLIP-2 kinds share: frozen image tower -> `ln_vision` -> Q-Former queries.

Li et al. (2023), section 3.1. A fixed set of learned queries `(1, Q, D)` cross-attends to the
image embeddings (after `ln_vision`) and comes out as the query outputs `(B, Q, D)`: the bottleneck that stage
1's heads (`blip2.models.retrieval`) and stage 2's language bridge (`blip2.models.bridge`) read.

The kinds inherit from `QueryEncoder` (the parts are attributes of the model itself, not a submodule),
so the state_dict keys are `visual.*`, `qformer.*` and `query_tokens` in both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from blip2.config import Blip2Config
from blip2.models import onednn
from blip2.models.encoders import ImageEncoder
from blip2.models.qformer import QFormer, autocast


class QueryEncoder(nn.Module):
    """Frozen image encoder (tower + `ln_vision`) -> Q-Former -> query outputs.

    Args:
        config: the model's config (its `vision` and `qformer` sections are used here).
        vision_tower: a transformers vision model to use instead of random weights, or a whole
            `ImageEncoder` (tower + `ln_vision`), used as is.

    Attributes:
        autocast_dtype: compute dtype of the Q-Former side under `torch.autocast` (e.g.
            `torch.bfloat16`: bf16 matmuls and attention over fp32 master weights); None (default)
            computes in the weights' dtype. The frozen image tower is never autocast.
    """

    def __init__(self, config: Blip2Config, vision_tower: nn.Module | ImageEncoder | None = None):
        super().__init__()
        q = config.qformer
        if isinstance(vision_tower, ImageEncoder):
            self.visual = vision_tower
        else:
            self.visual = ImageEncoder(config.vision, vision_tower)
        self.qformer = QFormer(q)
        self.query_tokens = nn.Parameter(torch.randn(1, q.num_query_tokens, q.hidden_size) * 0.02)
        self.config = config
        self.autocast_dtype: torch.dtype | None = None

    @onednn.with_linears
    def encode_image(
        self, pixel_values: Tensor | None = None, image_features: Tensor | None = None
    ) -> Tensor:
        """Image embeddings `(B, N, Dv)` after `ln_vision`.

        Args:
            pixel_values: `(B, 3, H, W)` images, run through the frozen tower, or
            image_features: `(B, N, Dv)` frozen tower outputs (before `ln_vision`), e.g. from a
                feature cache; they win when both are given.
        """
        if image_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or cached image_features")
            image_features = self.visual.features(pixel_values)
        return self.visual.normalize(image_features)

    def queries(self, batch: int) -> Tensor:
        """The learned queries repeated over a batch, `(B, Q, D)`."""
        return self.query_tokens.expand(batch, -1, -1)

    def autocast(self):
        """The Q-Former side's precision context (`autocast_dtype`; a no-op for None)."""
        return autocast(self.query_tokens.device, self.autocast_dtype)

    @onednn.with_linears
    def query_output(
        self, pixel_values: Tensor | None = None, image_features: Tensor | None = None
    ) -> Tensor:
        """Q-Former query outputs `(B, Q, D)` (the query-only pass; inputs as in `encode_image`).

        The frozen tower runs in its own precision; the Q-Former in its weights' precision, or under
        autocast to `autocast_dtype`.
        """
        image_embeds = self.encode_image(pixel_values, image_features)  # (B, N, Dv), no autocast
        with self.autocast():
            return self.qformer(queries=self.queries(image_embeds.shape[0]), image_embeds=image_embeds).hidden
