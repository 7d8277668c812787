"""A stage-1 checkpoint as users call it: `Retriever` matches, scores, embeds and searches.

```python
retriever = blip2.load("Salesforce/blip2-itm-vit-g")
retriever.match(["dog.jpg", "cat.jpg"], ["a dog", "a dog"])       # tensor([0.97, 0.02]): one per pair
retriever.similarity(["dog.jpg", "cat.jpg"], ["a dog", "a cat"])  # (2, 2) cosine matrix
retriever.embed_images(["dog.jpg"]), retriever.embed_texts(["a dog"])  # (1, Q, E), (1, E)
retriever.search(["dog.jpg", "cat.jpg"], "a dog", top_k=1)       # [SearchHit(index=0, ...)]
retriever.index(["photos/"], "photos.index").search(retriever, "a dog")  # a persistent index
```
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from blip2.errors import UserError
from blip2.losses import rerank_score
from blip2.pipelines.base import Pipeline, TruncationWarning, broadcast
from blip2.processing import ImageLike, ImageProcessor

if TYPE_CHECKING:
    from blip2.index import Index


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One ranked image of `Retriever.search`."""

    index: int  # position in the images searched
    itc: float  # ITC cosine similarity with the query
    itm: float | None  # ITM match probability (None when not re-ranked)
    score: float | None = None  # what re-ranked hits are ordered by: `losses.rerank_score`


class Retriever(Pipeline):
    """A stage-1 (retrieval) model with its image processor and the Q-Former's tokenizer.

    Attributes:
        model: `RetrievalModel` (image encoder, Q-Former, ITC projections, ITM head).
        qformer_tokenizer: the Q-Former's BERT tokenizer.
    """

    methods: ClassVar[tuple[str, ...]] = ("match", "similarity", "search", "embed_images", "embed_texts")
    checkpoint_kind: ClassVar[str] = "a stage-1 (retrieval) checkpoint such as Salesforce/blip2-itm-vit-g"

    def __init__(self, model: nn.Module, image_processor: ImageProcessor, qformer_tokenizer: Any):
        super().__init__(model, image_processor)
        self.qformer_tokenizer = qformer_tokenizer

    def _tokenizers(self) -> tuple[Any, Any]:
        return self.qformer_tokenizer, None

    def _text(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        texts = self._check_texts(texts, "text")
        limit = self.config.max_txt_len
        for t in texts:
            n = len(self.qformer_tokenizer(t)["input_ids"])
            if n > limit:
                warnings.warn(
                    f"the text {t[:40]!r}... is {n} tokens long; it was cut to the model's {limit}",
                    TruncationWarning,
                    stacklevel=3,
                )
        enc = self.qformer_tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_txt_len,
            return_tensors="pt",
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def match(self, images: ImageLike | Sequence[ImageLike], texts: str | Sequence[str]) -> Tensor:
        """ITM probability that each (image, text) pair matches, `(N,)`; one image or text may be
        paired with all of the others."""
        batch, txt = self._images(images), [texts] if isinstance(texts, str) else list(texts)
        batch, txt = broadcast(batch, txt, "images", "texts")
        probs = []
        for s in self._chunks(len(batch)):
            probs.append(self.match_pixels(self.pixels(batch[s]), txt[s]))
        return torch.cat(probs)

    @torch.no_grad()
    def match_pixels(self, pixel_values: Tensor, texts: Sequence[str]) -> Tensor:
        """`match` on already processed `(N, 3, S, S)` pixels and N texts, one batch: `(N,)`."""
        image_embeds = self.model.encode_image(pixel_values.to(self.device))
        ids, mask = self._text(texts)
        logits = self.model.itm_logits(ids, mask, image_embeds=image_embeds)  # (N, 2)
        return logits.float().softmax(dim=-1)[:, 1].cpu()

    @torch.no_grad()
    def pair_scores(
        self, images: ImageLike | Sequence[ImageLike], texts: str | Sequence[str]
    ) -> tuple[Tensor, Tensor]:
        """`match` and the ITC cosine of each (image, text) pair (the pairs' entries of `similarity`),
        from one pass of the image encoder: `(N,)` ITM probabilities, `(N,)` cosines."""
        batch, txt = self._images(images), [texts] if isinstance(texts, str) else list(texts)
        batch, txt = broadcast(batch, txt, "images", "texts")
        itm, itc = [], []
        for s in self._chunks(len(batch)):
            emb = self.model.embed_image(self.pixels(batch[s]).to(self.device))
            ids, mask = self._text(txt[s])
            logits = self.model.itm_logits(ids, mask, image_embeds=emb.image_embeds)  # (n, 2)
            itm.append(logits.float().softmax(dim=-1)[:, 1].cpu())
            sims = self.model.itc_scores(emb.image_feats, self.model.embed_text(ids, mask))  # (n, n)
            itc.append(sims.diagonal().float().cpu())
        return torch.cat(itm), torch.cat(itc)

    @torch.no_grad()
    def similarity(self, images: ImageLike | Sequence[ImageLike], texts: str | Sequence[str]) -> Tensor:
        """ITC cosine similarity of every image with every text, `(N_images, N_texts)`: the best of the
        image's query embeddings for each text, without temperature (as transformers reports it)."""
        image_feats = self.embed_images(images)
        text_feats = self.embed_texts(texts)
        return self.model.itc_scores(image_feats.to(self.device), text_feats.to(self.device)).float().cpu()

    @torch.no_grad()
    def search(
        self,
        images: ImageLike | Sequence[ImageLike] | Tensor,
        query: str,
        top_k: int = 10,
        rerank: int = 32,
        pixels: Callable[[list[int]], Tensor] | None = None,
    ) -> list[SearchHit]:
        """Rank images for a text query: ITC similarity over all, then ITM on the best `rerank`, which
        are ordered by ITM positive logit + ITC cosine (`rerank_score`, as retrieval evaluation ranks).

        Args:
            images: images, or their `embed_images` output `(N, Q, E)` (an index built once; ranked
                by ITC alone, as ITM needs the images, unless `pixels` is given).
            query: the text.
            top_k: hits returned.
            rerank: candidates (the best by ITC) re-scored with ITM; 0 ranks by ITC alone.
            pixels: with an index for `images`, a function giving the processed `(n, 3, S, S)` pixels
                of the images at the indices given (`batch_size` at a time, e.g. read again from disk,
                as `blip2 search` does), so that the candidates are re-ranked by ITM too.

        Returns:
            `SearchHit`s, best first: ITM-reranked candidates, then the rest by ITC.
        """
        self._check_texts([query], "query")  # before any image is embedded
        if top_k < 1 or rerank < 0:
            raise UserError(f"top_k must be 1 or more and rerank 0 or more (got {top_k} and {rerank})")
        if isinstance(images, Tensor) and images.dim() == 3:
            feats, load = images, pixels
        else:
            batch = self._images(images)
            feats = self.embed_images(batch)

            def load(indices: list[int]) -> Tensor:
                return self.pixels([batch[i] for i in indices])

        itc = self.model.itc_scores(feats.to(self.device), self.embed_texts([query]).to(self.device))
        itc = itc[:, 0].float().cpu()  # (N,)
        order = itc.argsort(descending=True).tolist()
        n_re = min(rerank, len(order)) if load is not None else 0
        head = order[:n_re]
        hits = []
        for s in self._chunks(len(head)):
            idx = head[s]
            hits += self.rerank_pixels(load(idx), query, idx, itc[idx])
        hits.sort(key=lambda h: -(h.score or 0.0))
        hits += [SearchHit(i, float(itc[i]), None) for i in order[n_re:]]
        return hits[:top_k]

    @torch.no_grad()
    def rerank_pixels(
        self, pixel_values: Tensor, query: str, indices: Sequence[int], itc: Tensor | Sequence[float]
    ) -> list[SearchHit]:
        """Re-rank candidates of a search: ITM of each of the `(N, 3, S, S)` pixels with the query, and
        their `rerank_score` from the ITM positive logit and their ITC cosines `itc` (N,); one batch.

        Returns:
            N `SearchHit`s (`indices` as their index), in the order given.
        """
        image_embeds = self.model.encode_image(pixel_values.to(self.device))
        ids, mask = self._text([query] * len(indices))
        logits = self.model.itm_logits(ids, mask, image_embeds=image_embeds).float().cpu()  # (N, 2)
        itc = torch.as_tensor(itc, dtype=torch.float32)
        scores = rerank_score(logits[:, 1], itc).tolist()
        probs = logits.softmax(dim=-1)[:, 1].tolist()
        return [
            SearchHit(int(i), float(c), p, s)
            for i, c, p, s in zip(indices, itc.tolist(), probs, scores, strict=True)
        ]

    @torch.no_grad()
    def embed_images(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Normalized ITC embeddings of images, one per query: `(N, Q, E)` (CPU, float32).

        `similarity` is the best query's dot product with a text embedding (`embed_texts`).
        """
        batch = self._images(images)
        return torch.cat([self.embed_pixels(self.pixels(batch[s])) for s in self._chunks(len(batch))])

    @torch.no_grad()
    def embed_pixels(self, pixel_values: Tensor) -> Tensor:
        """`embed_images` on already processed `(N, 3, S, S)` pixels, one batch."""
        return self.model.embed_image(pixel_values.to(self.device)).image_feats.float().cpu()

    @torch.no_grad()
    def embed_texts(self, texts: str | Sequence[str]) -> Tensor:
        """Normalized ITC embeddings of texts (the [CLS] output), `(N, E)` (CPU, float32). Texts longer
        than the checkpoint's `max_txt_len` tokens are cut, with a `TruncationWarning`."""
        txt = [texts] if isinstance(texts, str) else list(texts)
        step = max(1, int(self.batch_size)) * 4
        feats = []
        for i in range(0, len(txt), step):
            ids, mask = self._text(txt[i : i + step])
            feats.append(self.model.embed_text(ids, mask).float().cpu())
        if not feats:
            raise UserError("no texts given")
        return torch.cat(feats)

    def index(self, images: str | Sequence[str], path: str | os.PathLike[str], **options: Any) -> Index:
        """Build an image index at `path` (or resume or grow the one there) and open it.

        Args:
            images: image files, folders, globs, webdataset `.tar` shards, `.txt` path lists; the index
                stores their paths, so they are read again to re-rank with ITM.
            options: `blip2.index.build.add_images` options (`replace`, `batch_size`, `workers`, ...).
        """
        from blip2.data.inputs import expand_inputs
        from blip2.index import Index
        from blip2.index.build import add_images

        items = expand_inputs([images] if isinstance(images, (str, os.PathLike)) else list(images))
        if not items:
            raise UserError("the inputs hold no images (folders and globs count .jpg, .png, ... files only)")
        add_images(self, items, path, create=True, **options)
        return Index.open(path)
