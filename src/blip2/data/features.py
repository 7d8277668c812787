"""Reading the frozen-feature cache (written by `blip2 cache-features`, see `blip2.train.feature_cache`).

Features are indexed by the image's content: `image_digest` of its encoded bytes (a 128-bit BLAKE2b).
So two shard folders that both hold `00000.tar` with keys `000000000...` never share an entry, the same
image under two paths shares one (its features are the same), and training checks that the image it
reads is the one that was encoded.

Layout of a cache folder:

* `meta.json`: `{"format": "blip2-features/2", "vision": <VisionConfig>, "tower_sha256": <hex>,
  "tokens": N, "width": D, "dtype": "float16", "parts": [part names], "unusable": [digests]}`
  (`tower_sha256`: `tower_fingerprint` of the weights; `unusable`: images that did not decode, which
  training skips as it would skip them when decoding);
* `part-rRRR-IIIII.npy`: `(n, N, D)` arrays of frozen image-encoder outputs *before* `ln_vision`, one
  row per image, in NumPy's `.npy` format (memory-mapped when read);
* `part-rRRR-IIIII.json`: the image digests of that part's rows, in order;
* `manifest.json`: every file the command wrote (see `blip2.train.feature_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset, get_worker_info

from blip2.errors import UserError

FORMAT = "blip2-features/2"
SAMPLES_PER_TENSOR = 4096


def image_digest(image: str | bytes) -> str:
    """The cache key of an encoded image (bytes, or a file path whose bytes are read; raises OSError)."""
    if isinstance(image, str):
        with open(image, "rb") as f:
            image = f.read()
    return hashlib.blake2b(bytes(image), digest_size=16).hexdigest()


def _samples(tower: nn.Module, per_tensor: int) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Each weight's name, the tensor, and an evenly strided sample of about `per_tensor` of its values."""
    for name, t in sorted(tower.state_dict().items()):
        flat = t.detach().reshape(-1)
        yield name, t, flat[:: max(1, flat.numel() // per_tensor)]


def tower_fingerprint(tower: nn.Module) -> str:
    """sha256 of a frozen tower's weights: every tensor's name, shape and dtype, and its values (all of a
    small tensor, an evenly strided sample of `SAMPLES_PER_TENSOR` of a large one; other weights differ
    everywhere, so a sample shows it). A few MB hashed even for ViT-g. The dtype counts: features cached
    from a tower in another precision differ at that precision (`blip2.index` compares weights across
    dtypes with `weights_sample` instead)."""
    h = hashlib.sha256()
    for name, t, sample in _samples(tower, SAMPLES_PER_TENSOR):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(sample.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_sample(model: nn.Module, per_tensor: int = 16) -> tuple[str, np.ndarray]:
    """What identifies a model's weights whatever dtype it was loaded in: sha256 of every tensor's name and
    shape (not its dtype), and an evenly strided sample of about `per_tensor` values of each, as float32.
    Compare two samples with `same_weights`."""
    h, values = hashlib.sha256(), []
    for name, t, sample in _samples(model, per_tensor):
        h.update(f"{name}:{tuple(t.shape)};".encode())
        values.append(sample.to("cpu", torch.float32).numpy())
    return h.hexdigest(), np.concatenate(values) if values else np.zeros(0, np.float32)


def same_weights(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two `weights_sample` values are one model's weights, loaded in the same or another dtype:
    equal within 2^-7 of their size (bfloat16 rounds to 2^-8, float16 to 2^-11; float16 flushes values
    below 6e-8 to 0). Other weights (another checkpoint, a fine-tune) differ far more."""
    if a.shape != b.shape:
        return False
    tolerance = 2.0**-7 * np.maximum(np.abs(a), np.abs(b)) + 1e-7
    return bool(np.all(np.abs(a - b) <= tolerance))


class FeatureStore:
    """Image digest -> cached features `(N, D)`; the arrays are opened memory-mapped, lazily, per process
    (so a store can be sent to DataLoader workers). `unusable` holds the digests of images that did not
    decode when the cache was made."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{path} is not a feature cache (no meta.json); run `blip2 cache-features` first")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT:
            raise UserError(
                f"{path} holds features of another format ({self.meta.get('format')!r}, this version reads "
                f"{FORMAT!r}); re-run `blip2 cache-features` into a new folder"
            )
        self.path = path
        self.index: dict[str, tuple[str, int]] = {}
        for part in self.meta.get("parts", []):
            npy = os.path.join(path, part + ".npy")
            with open(os.path.join(path, part + ".json")) as f:
                keys = json.load(f)
            for row, key in enumerate(keys):
                self.index[key] = (npy, row)
        self.unusable = frozenset(self.meta.get("unusable", []))
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}

    def get(self, key: str) -> torch.Tensor:
        """The cached features of one image (by `image_digest`), `(N, D)`; KeyError when not cached."""
        npy, row = self.index[key]
        arr = self._arrays.get(npy)
        if arr is None:
            arr = self._arrays[npy] = np.load(npy, mmap_mode="r")
        return torch.from_numpy(np.array(arr[row]))

    def check_vision(self, vision: dict, tower: nn.Module | None = None) -> None:
        """Refuse a cache made with another image encoder: architecture, resolution or (given `tower`,
        and recorded by the cache) weights."""
        cached = self.meta.get("vision", {})
        vision = json.loads(json.dumps(vision))
        differs = [k for k in ("hf_config", "image_size") if cached.get(k) != vision.get(k)]
        recorded = self.meta.get("tower_sha256")
        if not differs and tower is not None and recorded and recorded != tower_fingerprint(tower):
            differs = ["its weights"]
        if differs:
            raise UserError(
                f"the feature cache at {self.path} was made with another image encoder ({differs[0]} "
                "differs); re-run `blip2 cache-features` with this model"
            )


class EncodedImages(IterableDataset):
    """`(digest, pixel_values | None)` of every image of this rank's records or shards (split over
    DataLoader workers); None for an image that does not decode. Images without bytes (a missing file,
    a shard sample without an image member) are left out: training skips them without the cache."""

    def __init__(self, items: list, processor):
        self.items, self.processor = items, processor

    def _encoded(self, items: list) -> Iterator[bytes]:
        from blip2.data.shards import IMAGE_EXTS, ShardReader

        for item in items:
            if isinstance(item, str):  # a shard
                for _, members in ShardReader(item):
                    ext = next((e for e in IMAGE_EXTS if e in members), None)
                    if ext is not None:
                        yield members[ext]
            else:
                try:
                    with open(item.image, "rb") as f:
                        yield f.read()
                except OSError:
                    continue

    def __iter__(self):
        from blip2.processing import ImageError

        info = get_worker_info()
        items = self.items[info.id :: info.num_workers] if info else self.items
        seen: set[str] = set()
        for data in self._encoded(items):
            digest = image_digest(data)
            if digest in seen:
                continue
            seen.add(digest)
            try:
                yield digest, self.processor.preprocess(data)
            except ImageError:
                yield digest, None
