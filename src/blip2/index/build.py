"""Filling an index: images embedded in batches (`Retriever.embed_pixels`, decoded by loader workers),
each process writing its own segment, resumable after a kill at any point.

```python
add_images(retriever, expand_inputs(["photos/"]), "photos.index", create=True)  # build, or resume one
add_images(retriever, expand_inputs(["new/"]), "photos.index", replace=True)    # add; re-added replaces
```

One process changes an index at a time: rank 0 holds the folder's lock (`blip2.index.store.writing`)
from before it reads the index until the last batch is merged, and a second writer is refused.

Under `torchrun` every rank embeds every world_size-th image still missing into its segment, then rank 0
merges the segment logs and adds the new vectors to the FAISS index. A run killed at any point leaves whole batches
only; the next run merges them and embeds the rest.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Container, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blip2.data.inputs import Item, loader
from blip2.distributed import DistInfo, barrier, broadcast_object
from blip2.errors import UserError
from blip2.index.search import Index, check_factory, fingerprint, model_dtype, weights
from blip2.index.store import SegmentWriter, Store, writing
from blip2.pipelines.retriever import Retriever
from blip2.processing import DEFAULT_MAX_PIXELS


def absolute(items: Sequence[Item]) -> list[Item]:
    """The items under the keys an index stores: absolute paths with links resolved (`os.path.realpath`,
    no other change: any bytes a name holds stay), `shard.tar#member` with the shard's so resolved; the
    same file named twice (`./a.png`, `/photos/a.png`, from another folder) is one item."""
    out: dict[str, Item] = {}
    for it in items:
        path = os.path.realpath(it.path)
        key = path if it.member is None else f"{path}#{it.member}"
        out.setdefault(key, Item(key, path, it.member))
    return list(out.values())


def stored_key(path: str, keys: Container[str]) -> str:
    """The key under which `keys` (an index's) holds the image named `path`: itself, or the absolute path
    the index stores (a shard member's `shard.tar#member` resolved by its shard)."""
    if path in keys:
        return path
    shard, _, member = path.rpartition("#")
    if member and os.path.isfile(shard):
        return f"{os.path.realpath(shard)}#{member}"
    return os.path.realpath(path)


def remove_images(path: str | os.PathLike[str], paths: Sequence[str]) -> int:
    """Remove images (named as given to `add_images`, or as the index lists them) from the index at `path`
    and from its FAISS index; returns how many it held."""
    store = Store.open(path)
    with writing(path):
        live = store.entries()
        gone = store.remove([stored_key(p, live) for p in paths])
        Index(store).faiss_index()
    return gone


def rebuild(path: str | os.PathLike[str], faiss: str | None = None) -> Index:
    """Build the FAISS index of the index at `path` anew (retrained), as the `faiss` type (an
    `index_factory` string, or "auto") when given, which the index then records."""
    store = Store.open(path)
    with writing(path):
        if faiss is not None:
            check_factory(faiss, store.meta["dim"])
            store.meta["faiss"] = faiss
        index = Index(store)
        index.faiss_index(rebuild=True)
        store.save_meta()  # once the new type could be built
    return index


@dataclass
class BuildStats:
    """What one `add_images` call did (`added` and `failed` count this rank's share)."""

    added: int = 0
    skipped: int = 0  # in the index already (a resumed build)
    failed: int = 0  # could not be read (reported on stderr, not stored)
    seconds: float = 0.0
    images: int = 0  # in the index at the end (rank 0)


def _prepare(
    retriever: Retriever, path: Path, create: bool, model: str, settings: dict[str, Any], lock: ExitStack
) -> int:
    """Rank 0: open (or create) the index and take its lock (held by `lock`), check the model (and, for a
    build, the settings), merge what a killed run left; returns the first segment number of this run."""
    fresh = create and not Store.is_index(path)
    if fresh:
        size = retriever.image_processor.size
        feats = retriever.embed_pixels(torch.zeros(1, 3, size, size))  # (1, Q, E)
        check_factory(settings["faiss"], feats.shape[2])  # before anything is written
        if not Store.is_new(path):
            raise UserError(f"{path} exists and is not a blip2 image index: give --out a new folder")
        path.mkdir(parents=True, exist_ok=True)
    else:
        Store.open(path)  # not an index: refused before anything is written there
    lock.enter_context(writing(path))
    if not fresh or Store.is_index(path):  # (another build may have made it meanwhile)
        store = Store.open(path)
        Index(store).check_model(retriever)
        if create:
            _check_settings(store, settings)
    else:
        store = Store.create(
            path,
            model=model,
            fingerprint=fingerprint(retriever),
            queries=feats.shape[1],
            dim=feats.shape[2],
            weights=weights(retriever),
            model_dtype=model_dtype(retriever),
            **settings,
        )
    store.merge_segments()
    return store.next_segment()


def _check_settings(store: Store, settings: dict[str, Any]) -> None:
    """Refuse a build into an existing index with other settings than it was made with."""
    meta = store.meta
    kept = {"precision": meta["dtype"], "strategy": meta["strategy"], "faiss": meta.get("faiss", "auto")}
    given = {"precision": settings["dtype"], "strategy": settings["strategy"], "faiss": settings["faiss"]}
    if given != kept:
        was = " ".join(f"--{k} {v}" for k, v in kept.items())
        raise UserError(
            f"{store.path} was built with {was}: give those to resume it (`blip2 index rebuild "
            f"{store.path} --faiss TYPE` changes the FAISS type), or give --out a new folder"
        )


def add_images(
    retriever: Retriever,
    items: Sequence[Item],
    path: str | os.PathLike[str],
    *,
    create: bool = False,
    replace: bool = False,
    model: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
    max_pixels: int | None = None,
    info: DistInfo | None = None,
    dtype: str = "float16",
    strategy: str = "queries",
    faiss: str = "auto",
    flat_limit: int | None = None,
) -> BuildStats:
    """Embed `items` into the index at `path`.

    Args:
        retriever: the stage-1 model (an existing index refuses another one).
        items: from `blip2.data.inputs.expand_inputs`; stored under their absolute paths (`absolute`).
        create: make the index when `path` is not one yet (`path` must then be new or an empty folder);
            without, `path` must be an index.
        replace: embed again the items the index holds (re-adding a path replaces it); without, they
            are skipped (a killed build resumes).
        model: the model's name recorded in a new index (default the checkpoint's name).
        batch_size: images per model call.
        workers: processes decoding images while the model runs.
        max_pixels: larger images are refused (decompression bombs; default the library's).
        info: this process's place under torchrun (default one process).
        dtype, strategy, faiss, flat_limit: a new index's settings (`Store.create`).
    """
    info = info or DistInfo()
    path = Path(path)
    items = absolute(items)
    start = time.perf_counter()
    with ExitStack() as lock:  # rank 0: the index's lock, held to the end
        refusal, base = None, 0
        if info.is_main:
            try:
                name = model or retriever.config.name or "a blip2 model"
                settings = {"dtype": dtype, "strategy": strategy, "faiss": faiss, "flat_limit": flat_limit}
                base = _prepare(retriever, path, create, name, settings, lock)
            except UserError as e:
                refusal = str(e)
            except OSError as e:
                refusal = f"cannot write the index {path} ({e.strerror or e}): check the path"
        refusal, base = broadcast_object((refusal, base))  # every rank stops with rank 0's sentence
        if refusal:
            raise UserError(refusal)
        store = Store.open(path)
        done = store.entries()
        pending = list(items) if replace else [it for it in items if it.key not in done]
        stats = BuildStats(skipped=len(items) - len(pending))
        mine = pending[info.rank :: info.world_size]
        writer = SegmentWriter(store, base + info.rank)
        try:
            images = loader(
                mine, retriever.image_processor, batch_size, workers, max_pixels or DEFAULT_MAX_PIXELS
            )
            members = {it.key: it.member for it in mine}
            for batch in images:
                good = [(k, px) for k, px, err in batch if px is not None]
                for _, _, err in batch:
                    if err is not None:
                        print(f"skipped: {err}", file=sys.stderr)
                        stats.failed += 1
                if good:
                    feats = retriever.embed_pixels(torch.stack([px for _, px in good]))  # (n, Q, E)
                    writer.append([k for k, _ in good], [members[k] for k, _ in good], feats)
                    stats.added += len(good)
        finally:
            writer.close()
        barrier()
        if info.is_main:
            store.merge_segments()
            index = Index(store)
            index.faiss_index()  # built now, not at the first search
            stats.images = len(index)
        stats.seconds = time.perf_counter() - start
        return stats
