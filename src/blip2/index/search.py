"""`Index`: text-to-image search over an index folder, as `Retriever.search` ranks a list of images.

```python
index = blip2.index.Index.open("photos.index")
index.search(retriever, "a dog on a beach", top_k=10)  # [SearchHit(index=i, itc, itm, score)]: index.paths[i]
index.itc(retriever.embed_texts(["a dog"]), top_k=10)  # (positions, cosines) by ITC alone, no model needed
```

Ranking, in three steps: FAISS gives `candidates` images for the text embedding (by their pooled vector,
or by all their query vectors: the index's `strategy`); those are scored exactly, the max over the
image's Q query embeddings (`losses.max_over_queries`, the model's ITC cosine); the best `rerank` of them
are re-scored with ITM from their pixels, read again from disk, and ordered by `losses.rerank_score`, the
score retrieval evaluation ranks by. With `candidates` at least the size of the index every image is
scored exactly, and the ranking is that of `blip2 search` over the same images.

The FAISS index is derived data, kept in step with the log: images added since it was saved are added
to it, removed (or replaced) ones removed by id (`remove_ids`); it is built from scratch only when missing
or unreadable, when `--faiss` names another type, or, for the automatic type, once the index holds 4
times (or a quarter of) the images it was built on (`REBUILD_FACTOR`): an inverted file stays trained on
its first sample, and its lists are sized for that count. `blip2 index rebuild` rebuilds it at will
(`index info` advises it when an index of a fixed type has grown that far). Its ids are stable: an
image's `seg << 32 | row` (times Q, plus the query, under `queries`). Up to `FLAT_LIMIT` vectors it is
exact (`Flat`); above, an inverted file over an HNSW coarse quantizer with 8-bit scalar codes
(`IVF<lists>_HNSW32,SQ8`, `NPROBE` lists searched, the quantizer exploring `2 * NPROBE` centres), which
only proposes: the exact re-score decides. `benchmarks/index_bench.py` measured these defaults against
one pooled vector per image (see the README's "Image index" section). Where FAISS sees a GPU
(`faiss.get_num_gpus()`, a faiss-gpu build), the index is searched there when it can be copied there
(flat and plain IVF indexes; not an HNSW quantizer), else on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from blip2.data.features import same_weights, tower_fingerprint, weights_sample
from blip2.data.jsonl import write_atomic
from blip2.errors import UserError
from blip2.index.store import Entry, Store, writing
from blip2.losses import max_over_queries

if TYPE_CHECKING:
    from blip2.pipelines.retriever import Retriever, SearchHit

CANDIDATES = 100  # images scored exactly per query (FAISS's best)
FLAT_LIMIT = 1 << 18  # vectors up to which FAISS searches exhaustively
NPROBE = 32  # inverted lists an IVF index searches
TRAIN_PER_LIST = 64  # training vectors per inverted list (k-means of the coarse quantizer)
TRAIN_ITERATIONS = 10
ADD_CHUNK = 8192  # images added to FAISS at a time
CHUNK = 4096  # images scored at a time by an exhaustive search
REBUILD_FACTOR = 4  # an automatic FAISS index is rebuilt at this many times (or 1/this) its images


class UnreadImageWarning(UserWarning):
    """An image `Index.search` could not read again for ITM (it is ranked by ITC alone)."""


def fingerprint(retriever: Retriever) -> str:
    """The weights' fingerprint an index records (`tower_fingerprint` of the whole stage-1 model, which
    depends on the dtype it was loaded in)."""
    cached = getattr(retriever, "_index_fingerprint", None)
    if cached is None:
        cached = tower_fingerprint(retriever.model)
        retriever._index_fingerprint = cached  # type: ignore[attr-defined]
    return cached


def weights(retriever: Retriever) -> tuple[str, np.ndarray]:
    """The `weights_sample` of the stage-1 model: the same weights in any dtype compare equal."""
    cached = getattr(retriever, "_index_weights", None)
    if cached is None:
        cached = weights_sample(retriever.model)
        retriever._index_weights = cached  # type: ignore[attr-defined]
    return cached


def model_dtype(retriever: Retriever) -> str:
    """The dtype(s) of the model's floating-point weights, e.g. "bfloat16" or "float16+float32"."""
    dtypes = {
        str(p.dtype).removeprefix("torch.") for p in retriever.model.parameters() if p.is_floating_point()
    }
    return "+".join(sorted(dtypes))


def lists(n: int) -> int:
    """Inverted lists for n vectors: the power of two at or below sqrt(n) (1024 for 100,000 images of 32
    query vectors, 4096 for a million); an HNSW graph over the lists' centres keeps assigning every
    vector to its list, the build's main cost, far below a scan of all the centres."""
    return 1 << max(0, int(math.log2(max(1.0, math.sqrt(n)))))


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise UserError("the image index needs FAISS: pip install 'blip2[index]' (faiss-cpu)") from None
    return faiss


def faiss_reason(e: Exception) -> str:
    """The part of a FAISS error a user can act on (without the C++ function, file and line)."""
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", " ".join(str(e).split()))
    return re.sub(r"^Error: '.*?' failed: ", "", text) or type(e).__name__


def check_factory(factory: str, dim: int) -> None:
    """Refuse (`UserError`) a FAISS type (`index_factory` string) that FAISS cannot make for `dim`-wide
    vectors; "auto" (chosen by size) is always fine."""
    if factory == "auto":
        return
    faiss = import_faiss()
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(
            f"--faiss {factory} is not a FAISS index type for {dim}-wide vectors ({faiss_reason(e)}): give a "
            "faiss.index_factory string such as Flat, HNSW32 or IVF1024,SQ8, or auto"
        ) from None


class Index:
    """The live images of an index folder, their stored embeddings and the FAISS candidate index.

    Attributes:
        paths: the images' keys (absolute paths, or `shard.tar#member`), in index order: `SearchHit.index`
            is a position in this list.
    """

    def __init__(self, store: Store):
        self.store = store
        entries = store.entries()
        self.paths: list[str] = list(entries)
        self._entries: list[Entry] = list(entries.values())
        self._seg = np.array([e.seg for e in self._entries], dtype=np.int64)
        self._row = np.array([e.row for e in self._entries], dtype=np.int64)
        self._ids = (self._seg << 32) | self._row  # the images' FAISS ids (times Q plus the query: `queries`)
        self._by_id = np.argsort(self._ids)  # positions, in the order of their ids
        used: dict[int, int] = {}  # segment -> the rows the log uses
        for e in self._entries:
            used[e.seg] = max(used.get(e.seg, 0), e.row + 1)
        store.check_segments(used)
        self._faiss: Any = None  # searched: on a GPU where there is one
        self._cpu_faiss: Any = None  # kept up to date and saved

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Index:
        """The index at `path` (`UserError` when there is none)."""
        return cls(Store.open(path))

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"Index({self.store.path}: {len(self)} images, model {self.store.meta['model']})"

    def info(self) -> dict[str, Any]:
        """What `blip2 index info` prints: the model, sizes and settings."""
        meta = self.store.meta
        rows = sum(len(self.store.vectors(s, pooled=True)) for s in self.store.segments(".vec"))
        size = sum(p.stat().st_size for p in self.store.path.rglob("*") if p.is_file())
        state = self._saved_state()
        built_on = state.get("built_on")
        facts = {
            "path": str(self.store.path),
            "images": len(self),
            "unused_rows": rows - len(self),
            "model": meta["model"],
            "fingerprint": meta["fingerprint"],
            "queries": meta["queries"],
            "dim": meta["dim"],
            "dtype": meta["dtype"],
            "model_dtype": meta.get("model_dtype"),
            "strategy": meta["strategy"],
            "faiss": state.get("factory", self.factory()),
            "faiss_built_on": built_on,
            "bytes": size,
        }
        if built_on and meta.get("faiss", "auto") != "auto" and len(self) >= REBUILD_FACTOR * built_on:
            facts["advice"] = (
                f"the FAISS index was trained on {built_on} images: rebuild it for this size with "
                f"`blip2 index rebuild {self.store.path}`"
            )
        return facts

    # ------------------------------------------------------------------------------- vectors

    def vectors(self, positions: Sequence[int] | np.ndarray, pooled: bool = False) -> Tensor:
        """The stored embeddings of the images at `positions`: `(n, Q, E)` (or `(n, E)` pooled), float32."""
        positions = np.asarray(positions, dtype=np.int64)
        shape = (self.store.meta["dim"],) if pooled else (self.store.meta["queries"], self.store.meta["dim"])
        out = np.empty((len(positions), *shape), dtype=np.float32)
        segs = self._seg[positions]
        for seg in np.unique(segs):
            at = np.nonzero(segs == seg)[0]
            out[at] = self.store.vectors(int(seg), pooled)[self._row[positions[at]]]
        return torch.from_numpy(out)

    def _exact(self, text: Tensor) -> Tensor:
        """The ITC cosine of every image with each of the `(T, E)` texts: `(T, N)`."""
        scores = torch.empty(text.shape[0], len(self))
        for seg in np.unique(self._seg):
            at = np.nonzero(self._seg == seg)[0]
            mm = self.store.vectors(int(seg))
            for i in range(0, len(at), CHUNK):
                rows = self._row[at[i : i + CHUNK]]
                feats = torch.from_numpy(np.ascontiguousarray(mm[rows], dtype=np.float32))
                scores[:, torch.from_numpy(at[i : i + CHUNK])] = max_over_queries(feats, text).T
        return scores

    # --------------------------------------------------------------------------------- FAISS

    def factory(self) -> str:
        """The FAISS index type (`faiss.index_factory` string): the index's own, or chosen by size."""
        chosen = self.store.meta.get("faiss", "auto")
        if chosen != "auto":
            return chosen
        n = len(self) * self._per_image()
        return (
            "Flat" if n <= (self.store.meta.get("flat_limit") or FLAT_LIMIT) else f"IVF{lists(n)}_HNSW32,SQ8"
        )

    def _per_image(self) -> int:
        return self.store.meta["queries"] if self.store.meta["strategy"] == "queries" else 1

    def _saved_state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.store.path / "faiss.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def faiss_index(self, rebuild: bool = False) -> Any:
        """The FAISS index over the live images: loaded and brought up to date with the log (new images
        added, removed ones removed), or built and saved when missing, unusable or due (`rebuild`: now)."""
        if self._faiss is not None and not rebuild:
            return self._faiss
        faiss = import_faiss()
        index, have, state = (None, None, {}) if rebuild else self._load_faiss(faiss)
        changed = index is None
        if index is not None and not np.array_equal(have, self._ids):
            try:
                self._update_faiss(index, have)
                changed = True
            except RuntimeError:  # an index type that cannot remove ids: built again
                index = None
        if index is None:
            index, changed = self._build_faiss(faiss), True
            state = {"factory": self.factory(), "built_on": len(self)}
        if changed:
            self._save_faiss(faiss, index, {"factory": state["factory"], "built_on": state.get("built_on")})
        self._cpu_faiss = self._tune(faiss, index)
        self._faiss = self._on_gpu(faiss, self._cpu_faiss)
        return self._faiss

    def _load_faiss(self, faiss: Any) -> tuple[Any, np.ndarray | None, dict[str, Any]]:
        """The saved FAISS index, the image ids it holds and its faiss.json, or (None, None, {}) when it must
        be built (also when a writer saved another one while it was read: faiss.json changed meanwhile)."""
        state, path = self._saved_state(), self.store.path
        n = len(self)
        if self.store.meta.get("faiss", "auto") == "auto":  # kept until the size moves REBUILD_FACTOR times
            built_on = state.get("built_on")
            usable = isinstance(built_on, int) and (
                n == built_on or built_on / REBUILD_FACTOR < n < built_on * REBUILD_FACTOR
            )
        else:
            usable = state.get("factory") == self.factory()
        if not usable:
            return None, None, {}
        try:
            have = np.load(path / "faiss.ids.npy")
            index = faiss.read_index(str(path / "faiss.index"))
        except (OSError, ValueError, RuntimeError):
            return None, None, {}
        if (
            self._saved_state() != state  # saved anew (its `saved` token) while read
            or len(have) != state.get("ids")
            or index.ntotal != len(have) * self._per_image()
            or not self._takes_ids(faiss, index)
        ):
            return None, None, {}
        return index, have, state

    @staticmethod
    def _takes_ids(faiss: Any, index: Any) -> bool:
        """Whether `index` stores the ids it is given (an inverted file, or a map of ids)."""
        return faiss.try_extract_index_ivf(index) is not None or hasattr(index, "id_map")

    def _vector_ids(self, image_ids: np.ndarray) -> np.ndarray:
        """FAISS ids of these images' vectors: the image id, or under `queries` id * Q + query, `(n * Q,)`."""
        q = self._per_image()
        return (image_ids[:, None] * q + np.arange(q)).reshape(-1) if q > 1 else image_ids

    def _positions(self, image_ids: np.ndarray) -> np.ndarray:
        """The positions of the live images among these ids, in their order (others are left out)."""
        if not len(self._ids):
            return np.zeros(0, dtype=np.int64)
        found = np.searchsorted(self._ids, image_ids, sorter=self._by_id).clip(max=len(self._ids) - 1)
        at = self._by_id[found]
        return at[self._ids[at] == image_ids]

    def _add_faiss(self, index: Any, positions: np.ndarray) -> None:
        """Add the vectors of the images at `positions` to `index`, a chunk at a time."""
        dim, pooled = self.store.meta["dim"], self.store.meta["strategy"] == "pooled"
        for start in range(0, len(positions), ADD_CHUNK):
            at = positions[start : start + ADD_CHUNK]
            vectors = self.vectors(at, pooled).numpy().reshape(-1, dim)  # (n, E), or (n * Q, E)
            index.add_with_ids(np.ascontiguousarray(vectors), self._vector_ids(self._ids[at]))

    def _update_faiss(self, index: Any, have: np.ndarray) -> None:
        """Bring `index`, holding the images `have`, to the live images: remove the others' vectors by id,
        add the new ones'."""
        gone = np.setdiff1d(have, self._ids)
        if len(gone):
            index.remove_ids(self._vector_ids(gone))
        new = np.nonzero(~np.isin(self._ids, have))[0]
        self._add_faiss(index, new)

    def _save_faiss(self, faiss: Any, index: Any, state: dict[str, Any]) -> None:
        """Save the FAISS index and the ids of the images it holds; faiss.json, written last, says what they
        are: `state` (its type, the images it was built on), their count and a token new at every save (a
        reader that finds it changed after reading the files read them half saved). Saved under the folder's lock
        (a reader saves only when no writer holds it), each file written to a temporary name first."""
        path = self.store.path
        state = {**state, "images": len(self), "ids": len(self._ids), "saved": os.urandom(8).hex()}
        try:
            with writing(path):
                (path / "faiss.json").unlink(missing_ok=True)
                fd, tmp = tempfile.mkstemp(prefix="faiss.index.", suffix=".tmp", dir=path)
                os.close(fd)
                faiss.write_index(index, tmp)
                os.replace(tmp, path / "faiss.index")
                with tempfile.NamedTemporaryFile(
                    dir=path, prefix="faiss.ids.", suffix=".tmp", delete=False
                ) as f:
                    np.save(f, self._ids)
                os.replace(f.name, path / "faiss.ids.npy")
                write_atomic(path / "faiss.json", json.dumps(state) + "\n")
        except (OSError, RuntimeError, UserError):
            pass  # a read-only index, or another process writing it: searched with the index built in memory

    @staticmethod
    def _tune(faiss: Any, index: Any, nprobe: int = NPROBE) -> Any:
        """Set how much of an inverted file a search visits: `nprobe` lists, and an HNSW coarse quantizer's
        `efSearch` to `max(16, 2 * nprobe)` (FAISS's 16 is below 32 lists probed: it then misses lists)."""
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = nprobe
            quantizer = faiss.downcast_index(ivf.quantizer)
            if hasattr(quantizer, "hnsw"):
                quantizer.hnsw.efSearch = max(16, 2 * nprobe)
        return index

    @staticmethod
    def _on_gpu(faiss: Any, index: Any) -> Any:
        """`index` copied to the GPUs where FAISS has any (a faiss-gpu build), else itself; an index the GPU
        cannot hold (an HNSW quantizer) stays on the CPU."""
        if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
            return index
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError):
            return index

    def _build_faiss(self, faiss: Any) -> Any:
        """A new FAISS index of the live images' vectors, trained on a sample and filled a chunk at a time
        (never all the vectors in memory as float32)."""
        dim, pooled = self.store.meta["dim"], self.store.meta["strategy"] == "pooled"
        factory = self.factory()
        check_factory(factory, dim)  # index.json edited by hand
        try:
            index = self._tune(faiss, faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None:
                ivf.cp.niter = TRAIN_ITERATIONS
            else:
                index = faiss.IndexIDMap(index)  # ids given, not counted
            if not index.is_trained and len(self):
                wanted = TRAIN_PER_LIST * (ivf.nlist if ivf is not None else 256)
                sample = np.random.default_rng(0).permutation(len(self))[
                    : max(1, wanted // self._per_image())
                ]
                train = self.vectors(np.sort(sample), pooled).numpy().reshape(-1, dim)  # (n, E) or (n * Q, E)
                index.train(np.ascontiguousarray(train))
            self._add_faiss(index, np.arange(len(self)))
        except RuntimeError as e:  # e.g. fewer vectors than an inverted file's lists or a PQ's centroids
            raise UserError(
                f"FAISS cannot build the index type {factory} over the {len(self)} images of {self.store.path} "
                f"({faiss_reason(e)}): choose another type with `blip2 index rebuild {self.store.path} --faiss TYPE` "
                "(Flat is exact and needs no training)"
            ) from None
        return index

    def _candidates(self, text: Tensor, k: int) -> list[np.ndarray]:
        """FAISS's best `k` images for each of the `(T, E)` texts (positions, best first)."""
        index = self.faiss_index()
        q = self._per_image()
        text = np.ascontiguousarray(text.numpy(), dtype=np.float32)
        try:
            _, ids = index.search(text, k * q)
        except RuntimeError:  # on a GPU: more results than it returns at once (2048)
            if index is self._cpu_faiss:
                raise
            _, ids = self._cpu_faiss.search(text, k * q)
        out = []
        for row in ids:
            images = np.asarray(list(dict.fromkeys((row[row >= 0] // q).tolist())), dtype=np.int64)
            out.append(self._positions(images)[:k])
        return out

    # -------------------------------------------------------------------------------- search

    def itc(
        self, text_feats: Tensor, top_k: int = 10, candidates: int | None = CANDIDATES
    ) -> tuple[Tensor, Tensor]:
        """Rank by ITC alone (no model needed): for `(T, E)` normalized text embeddings (`embed_texts`),
        the positions `(T, k)` and cosines `(T, k)` of the best images, best first, `k = min(top_k, N)`
        (fewer when an approximate FAISS index proposes fewer images for some text).

        Args:
            candidates: images FAISS proposes and that are scored exactly; None (or at least the size of
                the index) scores every image exactly.
        """
        text = text_feats.float().reshape(-1, text_feats.shape[-1])
        k = min(top_k, len(self))
        if candidates is None or candidates >= len(self):
            scores = self._exact(text)
            best = scores.topk(k, dim=1)
            return best.indices, best.values
        positions, cosines = [], []
        for t, cand in zip(text, self._candidates(text, max(candidates, k)), strict=True):
            sims = max_over_queries(self.vectors(cand), t[None])[:, 0]  # (C,)
            order = sims.argsort(descending=True)[:k]
            positions.append(torch.from_numpy(cand)[order])
            cosines.append(sims[order])
        k = min(len(p) for p in positions)
        return torch.stack([p[:k] for p in positions]), torch.stack([c[:k] for c in cosines])

    def check_model(self, retriever: Retriever) -> None:
        """Refuse (`UserError`) a model other than the one the index was built with; the same weights
        loaded in another dtype are that model."""
        from blip2.pipelines.retriever import Retriever

        if not isinstance(retriever, Retriever):
            raise UserError(
                "searching an index needs a stage-1 (retrieval) model such as Salesforce/blip2-itm-vit-g"
            )
        meta = self.store.meta
        if fingerprint(retriever) == meta["fingerprint"]:
            return
        layout, values = weights(retriever)
        sample = self.store.path / "model.npy"
        if layout != meta.get("weights") or not sample.is_file() or not same_weights(np.load(sample), values):
            raise UserError(
                f"{self.store.path} was built with another model ({self.store.meta['model']}): search it with "
                "that model, or build a new index with this one"
            )

    def source(self, position: int) -> tuple[str, str | None]:
        """Where the image at `position` is read from: `(file, member)`, the member of a webdataset shard
        (None for a plain image file)."""
        member = self._entries[position].member
        path = self.paths[position]
        return (path, None) if member is None else (path[: -len(member) - 1], member)

    def search(
        self,
        retriever: Retriever,
        query: str,
        top_k: int = 10,
        rerank: int = 32,
        candidates: int | None = CANDIDATES,
        max_pixels: int | None = None,
    ) -> list[SearchHit]:
        """Rank the index's images for a text query: ITC candidates, then ITM re-ranking of the best `rerank`
        (as `Retriever.search`, and `blip2 search` over a folder, rank).

        Args:
            retriever: the model the index was built with (another is refused).
            query: the text.
            top_k: hits returned.
            rerank: the best by ITC re-scored with ITM (their images read again); 0 ranks by ITC alone.
            candidates: see `itc`.
            max_pixels: larger images are not re-ranked (decompression bombs; default the library's).

        Returns:
            `SearchHit`s, best first (`index` is a position in `paths`): the re-ranked ones by
            `rerank_score`, then the rest by ITC. An image that cannot be read again is ranked by ITC,
            with a warning.
        """
        from blip2.data.inputs import ImageItems, Item
        from blip2.pipelines.retriever import SearchHit
        from blip2.processing import DEFAULT_MAX_PIXELS

        if not isinstance(query, str) or not query.strip():
            raise UserError("the query is empty: give the text to search for")
        if top_k < 1 or rerank < 0:
            raise UserError(f"top_k must be 1 or more and rerank 0 or more (got {top_k} and {rerank})")
        self.check_model(retriever)
        if not len(self):
            return []
        positions, cosines = self.itc(retriever.embed_texts([query]), max(top_k, rerank), candidates)
        order, itc = positions[0].tolist(), cosines[0]
        items = []
        for p in order[:rerank]:
            items.append(Item(self.paths[p], *self.source(p)))
        images = ImageItems(items, retriever.image_processor, max_pixels or DEFAULT_MAX_PIXELS)
        hits, unread = [], []
        step = max(1, int(retriever.batch_size))
        for start in range(0, len(items), step):
            loaded = [(n, images[n]) for n in range(start, min(start + step, len(items)))]
            good = [(n, px) for n, (_, px, _) in loaded if px is not None]
            for n, (_, _, err) in loaded:
                if err is not None:
                    warnings.warn(f"{err}: ranked by ITC alone", UnreadImageWarning, stacklevel=2)
                    unread.append(n)
            if good:
                at = [n for n, _ in good]
                pixels = torch.stack([px for _, px in good])  # (n, 3, S, S)
                found = retriever.rerank_pixels(pixels, query, [order[n] for n in at], itc[at])
                hits += found
        hits.sort(key=lambda h: -(h.score or 0.0))
        rest = sorted([*unread, *range(len(items), len(order))])
        hits += [SearchHit(order[n], float(itc[n]), None) for n in rest]
        return hits[:top_k]
