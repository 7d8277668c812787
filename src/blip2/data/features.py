"""Reading the frozen-feature cache (written by `blip2 cache-features`, see `blip2.train.feature_cache`).

Layout of a cache folder:

* `meta.json`: `{"format": "blip2-features/1", "vision": <VisionConfig>, "tower_sha256": <hex>,
  "tokens": N, "width": D, "dtype": "float16"}` (`tower_sha256`: `tower_fingerprint` of the weights);
* `part-rRRR-IIIII.npy`: `(n, N, D)` arrays of frozen image-encoder outputs *before* `ln_vision`, one
  row per image, in NumPy's `.npy` format (memory-mapped when read);
* `part-rRRR-IIIII.json`: the image keys of that part's rows, in order (written after its `.npy`, so a
  part without its key list is an unfinished write and is ignored).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np
import torch
from torch import nn

from blip2.errors import UserError

FORMAT = "blip2-features/1"
SAMPLES_PER_TENSOR = 4096


def tower_fingerprint(tower: nn.Module) -> str:
    """sha256 of a frozen tower's weights: every tensor's name, shape and dtype, and its values (all of a
    small tensor, an evenly strided sample of `SAMPLES_PER_TENSOR` of a large one; other weights differ
    everywhere, so a sample shows it). A few MB hashed even for ViT-g."""
    h = hashlib.sha256()
    for name, t in sorted(tower.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(sample.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureStore:
    """Image key -> cached features `(N, D)`; the arrays are opened memory-mapped, lazily, per process
    (so a store can be sent to DataLoader workers)."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{path} is not a feature cache (no meta.json); run `blip2 cache-features` first")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{path} holds features of an unknown format {self.meta.get('format')!r}")
        self.path = path
        self.index: dict[str, tuple[str, int]] = {}
        for keys_file in sorted(glob.glob(os.path.join(path, "part-*.json"))):
            npy = keys_file[: -len(".json")] + ".npy"
            with open(keys_file) as f:
                keys = json.load(f)
            for row, key in enumerate(keys):
                self.index[key] = (npy, row)
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}}

    def get(self, key: str) -> torch.Tensor:
        """The cached features of one image, `(N, D)`; raises KeyError for an image not in the cache."""
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
