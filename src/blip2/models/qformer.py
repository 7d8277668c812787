"""The Querying Transformer (Q-Former).

A BERT-style (post-LayerNorm) transformer over the sequence `[queries; text]`:

* learnable queries (given by the caller) get a LayerNorm but no position embedding; text gets
  word + position embeddings (no token-type embedding);
* one self-attention per layer, shared by queries and text; who sees whom is set by the mask:
  unimodal (ITC: two separate passes), multimodal causal (ITG: queries see queries, text sees all
  queries and earlier text) or bidirectional (ITM: everything sees everything);
* in every `cross_attention_freq`-th layer the query positions (only they) cross-attend to the image;
* queries and text have separate feed-forward blocks.

Keys/values of each layer's self-attention can be returned (`use_cache`) and fed back (`past_kv`), so
the ITG pass and text generation reuse the query pass instead of recomputing it. The image side of
every cross-attention can be projected once (`image_kv`) and shared by several passes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from blip2.config import QFormerConfig
from blip2.models import onednn

KV = tuple[Tensor, Tensor]  # (B, heads, N, head_dim) each
MASK_MODES = ("bidirectional", "causal", "unimodal")


@dataclass
class QFormerOutput:
    hidden: Tensor  # (B, Q + L, D): queries first, then text
    past_kv: list[KV] | None = None  # per layer, self-attention keys/values of this pass (and the past)


class Attention(nn.Module):
    """Multi-head attention with BERT's post-LN residual: `LN(x + dropout(out(attn(x, kv))))`."""

    def __init__(self, dim: int, heads: int, kv_dim: int, dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = attn_dropout

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, N, d)

    def project_kv(self, source: Tensor) -> KV:
        return self._split(self.key(source)), self._split(self.value(source))

    def forward(self, x: Tensor, kv: KV, mask: Tensor | None = None) -> Tensor:
        q = self._split(self.query(x))
        k, v = kv
        if k.shape[0] != q.shape[0]:  # one image's keys/values shared by several rows
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        drop = self.attn_dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        ctx = ctx.transpose(1, 2).flatten(2)  # (B, N, D)
        return self.norm(x + self.dropout(self.out(ctx)))


class FeedForward(nn.Module):
    """BERT feed-forward with post-LN residual: `LN(x + dropout(fc2(gelu(fc1(x)))))`."""

    def __init__(self, dim: int, hidden: int, dropout: float, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.self_attn = Attention(d, cfg.num_heads, d, cfg.dropout, cfg.attention_dropout, eps)
        self.cross_attn = None
        if index % cfg.cross_attention_freq == 0:
            self.cross_attn = Attention(
                d, cfg.num_heads, cfg.encoder_width, cfg.dropout, cfg.attention_dropout, eps
            )
        self.query_ffn = FeedForward(d, cfg.intermediate_size, cfg.dropout, eps)
        self.text_ffn = FeedForward(d, cfg.intermediate_size, cfg.dropout, eps) if cfg.text else None

    def forward(
        self,
        h: Tensor,
        num_queries: int,
        mask: Tensor | None,
        image_kv: KV | None,
        past: KV | None,
    ) -> tuple[Tensor, KV]:
        k, v = self.self_attn.project_kv(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        h = self.self_attn(h, (k, v), mask)
        queries, text = h[:, :num_queries], h[:, num_queries:]
        if num_queries:
            if self.cross_attn is not None:
                queries = self.cross_attn(queries, image_kv)
            queries = self.query_ffn(queries)
        if text.shape[1]:
            if self.text_ffn is None:
                raise ValueError(
                    "this Q-Former has no text side (a stage-2 checkpoint): it takes queries only"
                )
            text = self.text_ffn(text)
        return torch.cat([queries, text], dim=1), (k, v)


class Embeddings(nn.Module):
    """`LN([queries; word + position])` then dropout. Queries get no position embedding."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word = (
            nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id) if cfg.text else None
        )
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.text else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, queries: Tensor | None, input_ids: Tensor | None, position_offset: int = 0) -> Tensor:
        parts = []
        if queries is not None:
            parts.append(queries.to(self.norm.weight.dtype))
        if input_ids is not None:
            if self.word is None:
                raise ValueError(
                    "this Q-Former has no text side (a stage-2 checkpoint): it takes queries only"
                )
            positions = torch.arange(input_ids.shape[1], device=input_ids.device) + position_offset
            parts.append(self.word(input_ids) + self.position(positions))
        return self.dropout(self.norm(torch.cat(parts, dim=1)))


class LMHead(nn.Module):
    """BERT's MLM head, used for ITG: dense -> GELU -> LN -> decoder tied to the word embeddings."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), word_embeddings, self.bias)


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """`torch.autocast` to `dtype` on `device`'s type (the Q-Former's mixed precision: fp32 master
    weights, `dtype` matmuls and attention); a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_mask(
    batch: int,
    num_past: int,
    num_queries: int,
    text_mask: Tensor | None,
    num_text: int,
    mode: str,
    device: torch.device,
    past_mask: Tensor | None = None,
) -> Tensor | None:
    """Boolean SDPA mask `(B, 1, Q + L, P + Q + L)`; True = may attend. None when nothing is masked.

    Keys are `[past; queries; text]`; padded text keys (and padded past keys) are hidden from every row.

    * "bidirectional" (ITM): every row sees every key.
    * "causal" (ITG, generation): query rows see only the past and the queries; text row i sees the
      past, all queries and text tokens 0..i.
    * "unimodal" (ITC in one pass): queries see only queries, text sees only text.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}: use one of {MASK_MODES}")
    if mode == "bidirectional" and text_mask is None and past_mask is None:
        return None
    n_keys = num_past + num_queries + num_text
    keys = torch.ones(batch, n_keys, dtype=torch.bool, device=device)
    if past_mask is not None:
        keys[:, :num_past] = past_mask.bool()
    if text_mask is not None:
        keys[:, num_past + num_queries :] = text_mask.bool()
    mask = keys[:, None, None, :].expand(batch, 1, num_queries + num_text, n_keys)
    rows = torch.arange(num_queries + num_text, device=device)[:, None]
    cols = torch.arange(n_keys, device=device)[None, :] - num_past  # key index within [queries; text]
    is_text_row, is_text_key = rows >= num_queries, cols >= num_queries
    if mode == "causal":
        mask = mask & (~is_text_key | (is_text_row & (cols <= rows)))  # text sees earlier text and itself
    elif mode == "unimodal":
        mask = mask & (is_text_row == is_text_key)
    return mask


class QFormer(nn.Module):
    """The Q-Former body: embeddings and layers (the ITG head is `lm_head`, present when configured)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_layers))
        self.lm_head = LMHead(cfg) if cfg.text and cfg.itg_head else None
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @onednn.with_linears
    def image_kv(self, image_embeds: Tensor) -> list[KV | None]:
        """Project image embeddings once into each cross-attention's keys/values (shareable by passes)."""
        image_embeds = image_embeds.to(self.embeddings.norm.weight.dtype)
        return [
            layer.cross_attn.project_kv(image_embeds) if layer.cross_attn is not None else None
            for layer in self.layers
        ]

    @onednn.with_linears
    def forward(
        self,
        queries: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        image_kv: list[KV | None] | None = None,
        mode: str = "bidirectional",
        past_kv: list[KV] | None = None,
        past_mask: Tensor | None = None,
        position_offset: int = 0,
        use_cache: bool = False,
    ) -> QFormerOutput:
        """Run the Q-Former over `[queries; text]`.

        Args:
            queries: query embeddings `(B, Q, D)` or None (text only).
            input_ids: text ids `(B, L)` or None (queries only).
            attention_mask: text padding mask `(B, L)` (1 = token), or None for no padding.
            image_embeds: image embeddings `(B, N, encoder_width)` (after `ln_vision`) for the
                cross-attention (queries only).
            image_kv: already projected image keys/values (`image_kv(image_embeds)`), instead of image_embeds.
            mode: "bidirectional" (ITM, default), "causal" (ITG, generation) or "unimodal" (see `build_mask`).
            past_kv: cached self-attention keys/values to prepend (e.g. the query pass, for ITG).
            past_mask: padding mask of the past keys `(B, P)`; default all visible.
            position_offset: position of the first text token (text tokens already in the past).
            use_cache: return this pass's (past-including) keys/values.
        """
        h = self.embeddings(queries, input_ids, position_offset)
        b = h.shape[0]
        num_q = queries.shape[1] if queries is not None else 0
        num_past = past_kv[0][0].shape[2] if past_kv is not None else 0
        if num_q and image_kv is None:
            if image_embeds is None:
                raise ValueError("queries need image embeddings: pass image_embeds or image_kv")
            image_kv = self.image_kv(image_embeds)
        mask = build_mask(b, num_past, num_q, attention_mask, h.shape[1] - num_q, mode, h.device, past_mask)
        new_kv = []
        for i, layer in enumerate(self.layers):
            args = (
                h,
                num_q,
                mask,
                image_kv[i] if image_kv is not None else None,
                past_kv[i] if past_kv else None,
            )
            if self.gradient_checkpointing and self.training:
                h, kv = checkpoint(layer, *args, use_reentrant=False)
            else:
                h, kv = layer(*args)
            new_kv.append(kv)
        return QFormerOutput(hidden=h, past_kv=new_kv if use_cache else None)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """ITG logits over the Q-Former vocabulary for text hidden states."""
        if self.lm_head is None:
            raise ValueError("this Q-Former has no ITG head")
        return self.lm_head(hidden, self.embeddings.word.weight)
