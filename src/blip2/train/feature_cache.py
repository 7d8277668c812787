"""`blip2 cache-features`: run the frozen image encoder once over a dataset and store its outputs.

The image encoder dominates the cost of stage 1 (a ViT-g forward per image per epoch); its weights never
change, so its outputs can be computed once. The features are the tower's outputs *before* `ln_vision`
(which trains), in the tower's precision by default, written as memory-mappable `.npy` parts (layout:
`blip2.data.features`). Training with `data.features=<folder>` reads them instead of images. Images go
through the eval transform (resize, no crop or flip): cached features mean no augmentation.

Each image is encoded once even when it has several captions. Under torchrun each rank encodes its
share of the images and writes its own parts; nothing needs merging. Parts of an earlier run in the
same folder are removed first; `meta.json` records a fingerprint of the tower's weights, which training
checks.
"""

from __future__ import annotations

import argparse
import glob
import json
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a training YAML: its model and data sections say what to encode")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config changes")
    p.add_argument("--out", required=True, help="folder to write the cache to (data.features of training)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder forward")
    p.add_argument("--part-size", type=int, default=4096, help="images per .npy part")
    p.add_argument(
        "--dtype",
        choices=("tower", "float16", "bfloat16", "float32"),
        default="tower",
        help="storage precision (default: the tower's; bfloat16 is stored as float32 by NumPy)",
    )
    p.add_argument("--num-workers", type=int, default=2, help="image-decoding workers")


def run(args: argparse.Namespace) -> int:
    from blip2.train.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    stats = cache_features(
        cfg,
        args.out,
        batch_size=args.batch_size,
        part_size=args.part_size,
        dtype=args.dtype,
        num_workers=args.num_workers,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"cached {stats['images']} images to {args.out} ({stats['skipped']} unusable skipped)")
    return 0


def _unique_images(cfg) -> list:
    """One record per image of the training data (annotation files or shards)."""
    from blip2.data.annotations import load_records
    from blip2.data.shards import expand_braces, index_shard, read_record

    d = cfg.data
    if d.kind != "webdataset":
        seen, out = set(), []
        for rec in load_records(d.kind, d.path, d.images, d.split, d.questions):
            if rec.key not in seen:
                seen.add(rec.key)
                out.append(rec)
        return out

    class Lazy:  # a shard sample, read when the worker decodes it
        def __init__(self, path, key, members):
            self.path, self.key_, self.members = path, key, members

        def read(self):
            with open(self.path, "rb") as f:
                return read_record(self.path, self.key_, self.members, f)

    out = []
    for path in expand_braces(d.path):
        samples, _ = index_shard(path)
        out.extend(Lazy(path, key, members) for key, members in samples)
    return out


class _Images:
    """Dataset of (key, pixel_values | None) for the encoder (bad images give None and are counted)."""

    def __init__(self, items: list, processor):
        self.items, self.processor = items, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from blip2.processing import ImageError

        item = self.items[i]
        try:
            rec = item.read() if hasattr(item, "read") else item
            if rec.image is None:
                return rec.key, None
            return rec.key, self.processor.preprocess(rec.image)
        except (ImageError, Exception) as e:  # noqa: B014 (any unreadable sample is skipped, never fatal)
            from blip2.data.batching import BadSample

            if isinstance(e, (ImageError, BadSample)):
                return getattr(item, "key", str(i)), None
            raise


def _collate(items):
    return items


def cache_features(
    cfg, out: str, batch_size: int = 64, part_size: int = 4096, dtype: str = "tower", num_workers: int = 2
) -> dict[str, int]:
    """Encode every image of `cfg.data` with the model's frozen tower into `out` (see module doc).

    Returns `{"images": written, "skipped": unusable}` (summed over ranks).
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from blip2.data.features import FORMAT, tower_fingerprint
    from blip2.data.shards import worker_init
    from blip2.models.encoders import torch_dtype
    from blip2.processing import ImageProcessor
    from blip2.train import distributed as D
    from blip2.train.loop import build_model

    info = D.setup(cfg.train.device)
    try:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        encoder = model.visual.to(info.device).eval()
        v = model.config.vision
        items = _unique_images(cfg)[info.rank :: info.world_size]
        processor = ImageProcessor(v.image_size, v.image_mean, v.image_std)
        loader = DataLoader(
            _Images(items, processor),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            worker_init_fn=worker_init,
        )
        if info.is_main:  # a fresh cache: no part or meta.json of an earlier run is indexed with it
            os.makedirs(out, exist_ok=True)
            for f in glob.glob(os.path.join(out, "part-*")) + glob.glob(os.path.join(out, "meta.json*")):
                os.remove(f)
        D.barrier()
        written = skipped = part = 0
        keys: list[str] = []
        chunks: list[np.ndarray] = []

        def flush() -> None:
            nonlocal part, keys, chunks
            if not keys:
                return
            name = os.path.join(out, f"part-r{info.rank:03d}-{part:05d}")
            arr = np.concatenate(chunks)
            with open(name + ".npy.tmp", "wb") as f:
                np.save(f, arr)
            os.replace(name + ".npy.tmp", name + ".npy")
            with open(name + ".json.tmp", "w") as f:
                json.dump(keys, f)
            os.replace(name + ".json.tmp", name + ".json")  # the key list marks the part complete
            part, keys, chunks = part + 1, [], []

        for batch in loader:
            good = [(k, x) for k, x in batch if x is not None]
            skipped += len(batch) - len(good)
            if not good:
                continue
            feats = encoder.features(torch.stack([x for _, x in good]).to(info.device))  # (b, N, D)
            feats = feats if dtype == "tower" else feats.to(torch_dtype(dtype))
            if feats.dtype == torch.bfloat16:  # NumPy has no bfloat16
                feats = feats.float()
            arr = feats.cpu().numpy()
            chunks.append(arr)
            keys.extend(k for k, _ in good)
            written += len(good)
            if len(keys) >= part_size:
                flush()
        flush()
        written, skipped = (int(x) for x in D.all_reduce_sum([written, skipped], info.device))
        D.barrier()  # every rank's parts are complete
        if info.is_main:
            parts = sorted(glob.glob(os.path.join(out, "part-*.npy")))  # rank 0 may have written none
            first = np.load(parts[0], mmap_mode="r") if parts else None
            meta = {
                "format": FORMAT,
                "vision": json.loads(json.dumps(model.config.to_dict()["vision"])),
                "tower_sha256": tower_fingerprint(encoder.tower),
                "tokens": int(first.shape[1]) if first is not None else 0,
                "width": int(first.shape[2]) if first is not None else 0,
                "dtype": str(first.dtype) if first is not None else "",
                "images": written,
                "skipped": skipped,
            }
            with open(os.path.join(out, "meta.json.tmp"), "w") as f:
                json.dump(meta, f, indent=2)
            os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))
        D.barrier()
        return {"images": written, "skipped": skipped}
    finally:
        D.teardown()
