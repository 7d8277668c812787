"""The frozen-feature cache (`blip2 cache-features`, see `blip2.cli.cache_features`): run the frozen
image encoder once over a dataset and store its outputs.

The image encoder dominates the cost of stage 1 (a ViT-g forward per image per epoch); its weights never
change, so its outputs can be computed once. The features are the tower's outputs *before* `ln_vision`
(which trains), in the tower's precision by default, written as memory-mappable `.npy` parts (layout:
`blip2.data.features`). Training with `data.features=<folder>` reads them instead of images. Images go
through the eval transform (resize, no crop or flip): cached features mean no augmentation.

Each image is encoded once even when it has several captions (features are indexed by the digest of
the image's bytes, see `blip2.data.features`). Under torchrun each rank encodes its share of the images
(annotation data) or of the shards (webdataset: local files, URLs or `pipe:` commands, each read once
front to back) and writes its own parts; nothing needs merging. `meta.json` records a fingerprint of
the tower's weights, which training checks.

The output folder: `manifest.json` lists every file the command wrote. A rerun into the same folder
removes exactly those (and, after an interrupted run, the part and temporary files it was writing) and
nothing else; a folder that holds any other file (a dataset's own `part-00000.tar`, say) is refused
with one sentence, untouched.
"""

from __future__ import annotations

import json
import os
import re

MANIFEST = "manifest.json"
WRITER = "blip2 cache-features"
OWN_NAMES = r"(part-r\d{3}-\d{5}\.(npy|json)|meta\.json|manifest\.json)(\.tmp)?"


def _work(cfg, rank: int, world_size: int) -> list:
    """This rank's share of the data: annotation records (one per image path), or shards."""
    from blip2.data.shards import expand_braces
    from blip2.train.data import section_records

    d = cfg.data
    if d.kind == "webdataset":
        return expand_braces(d.path)[rank::world_size]
    seen, out = set(), []
    for rec in section_records(d)[0]:
        if rec.key not in seen:
            seen.add(rec.key)
            out.append(rec)
    return out[rank::world_size]


def _collate(items):
    return items


def _prepare(out: str) -> str | None:
    """Make `out` ready for a new cache: remove what an earlier `cache-features` wrote there (the files
    its manifest lists, and for an unfinished run the files it was writing) and start a new manifest.
    Returns why not (one sentence) when the folder holds anything else; then nothing is touched."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file; give a folder for the feature cache"
    os.makedirs(out, exist_ok=True)
    present = set(os.listdir(out))
    ours = _owned(out) if MANIFEST in present else set()
    foreign = sorted(present if ours is None else present - ours - {MANIFEST})
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        return (
            f"{out} holds files that `blip2 cache-features` did not write ({shown}); write the cache to "
            "an empty or new folder (it never deletes what it did not write)"
        )
    for name in sorted(present & ours):
        os.remove(os.path.join(out, name))
    _write_manifest(out, [], complete=False)
    return None


def _owned(out: str) -> set[str] | None:
    """The files a manifest in `out` says an earlier run wrote (None: the manifest is not ours)."""
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("written_by") != WRITER:
        return None
    owned = set(m.get("files", []))
    if not m.get("complete"):  # an unfinished run: also the parts and temporary files it was writing
        owned |= {n for n in os.listdir(out) if re.fullmatch(OWN_NAMES, n)}
    return owned


def _write_manifest(out: str, files: list[str], complete: bool) -> None:
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"written_by": WRITER, "complete": complete, "files": sorted(files)}, f, indent=1)
    os.replace(tmp, os.path.join(out, MANIFEST))


def cache_features(
    cfg, out: str, batch_size: int = 64, part_size: int = 4096, dtype: str = "tower", num_workers: int = 2
) -> dict[str, int]:
    """Encode every image of `cfg.data` with the model's frozen tower into `out` (see module doc).

    Returns `{"images": written, "skipped": unusable}` (summed over ranks).
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from blip2 import distributed as D
    from blip2 import tasks
    from blip2.data.features import FORMAT, EncodedImages, tower_fingerprint
    from blip2.data.shards import worker_init
    from blip2.errors import UserError
    from blip2.models.encoders import torch_dtype
    from blip2.processing import ImageProcessor

    info = D.setup(cfg.train.device)
    try:
        refusal = None
        if info.is_main:
            try:
                refusal = _prepare(out)
            except OSError as e:  # said on every rank below, never a rank left waiting
                refusal = f"cannot write the feature cache to {out} ({e.strerror or e}): check --out"
        refusal = D.broadcast_object(refusal)
        if refusal:
            raise UserError(refusal)
        torch.manual_seed(cfg.train.seed)
        model = tasks.get(cfg.task).build_model(cfg)
        encoder = model.visual.to(info.device).eval()
        v = model.config.vision
        processor = ImageProcessor(v.image_size, v.image_mean, v.image_std)
        work = _work(cfg, info.rank, info.world_size)
        loader = DataLoader(
            EncodedImages(work, processor),
            batch_size=batch_size,
            num_workers=min(num_workers, len(work)),
            collate_fn=_collate,
            worker_init_fn=worker_init,
        )
        written = part = 0
        keys: list[str] = []
        chunks: list[np.ndarray] = []
        parts: list[str] = []
        seen: set[str] = set()
        unusable: set[str] = set()

        def flush() -> None:
            nonlocal part, keys, chunks
            if not keys:
                return
            name = f"part-r{info.rank:03d}-{part:05d}"
            path = os.path.join(out, name)
            arr = np.concatenate(chunks)
            with open(path + ".npy.tmp", "wb") as f:
                np.save(f, arr)
            os.replace(path + ".npy.tmp", path + ".npy")
            with open(path + ".json.tmp", "w") as f:
                json.dump(keys, f)
            os.replace(path + ".json.tmp", path + ".json")
            parts.append(name)
            part, keys, chunks = part + 1, [], []

        shape = None
        for batch in loader:
            good = [(k, x) for k, x in batch if x is not None and k not in seen]
            unusable.update(k for k, x in batch if x is None)
            if not good:
                continue
            seen.update(k for k, _ in good)
            feats = encoder.features(torch.stack([x for _, x in good]).to(info.device))  # (b, N, D)
            feats = feats if dtype == "tower" else feats.to(torch_dtype(dtype))
            if feats.dtype == torch.bfloat16:  # NumPy has no bfloat16
                feats = feats.float()
            arr = feats.cpu().numpy()
            shape = shape or (int(arr.shape[1]), int(arr.shape[2]), str(arr.dtype))
            chunks.append(arr)
            keys.extend(k for k, _ in good)
            written += len(good)
            if len(keys) >= part_size:
                flush()
        flush()
        mine = {"parts": parts, "unusable": sorted(unusable), "shape": shape, "written": written}
        everyone = D.all_gather_object(mine)
        written = sum(r["written"] for r in everyone)
        skipped = len(set().union(*(r["unusable"] for r in everyone)))
        if info.is_main:
            all_parts = [p for r in everyone for p in r["parts"]]
            tokens, width, kind = next((r["shape"] for r in everyone if r["shape"]), (0, 0, ""))
            meta = {
                "format": FORMAT,
                "vision": json.loads(json.dumps(model.config.to_dict()["vision"])),
                "tower_sha256": tower_fingerprint(encoder.tower),
                "tokens": tokens,
                "width": width,
                "dtype": kind,
                "images": written,
                "skipped": skipped,
                "parts": all_parts,
                "unusable": sorted(set().union(*(r["unusable"] for r in everyone))),
            }
            with open(os.path.join(out, "meta.json.tmp"), "w") as f:
                json.dump(meta, f, indent=2)
            os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))
            files = [p + ext for p in all_parts for ext in (".npy", ".json")] + ["meta.json"]
            _write_manifest(out, files, complete=True)
        D.barrier()
        return {"images": written, "skipped": skipped}
    finally:
        D.teardown()
