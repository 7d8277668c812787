"""The images a usage command is given: files, folders, globs, webdataset shards and path lists, and a
loader that decodes them in worker processes while the model runs.

```
expand_inputs(["photos/", "*.jpg", "list.txt", "shard-000.tar"])  -> [Item(key, path, member), ...]
loader(items, processor, batch_size=8, workers=2)                   -> batches of (key, pixels, error)
```

File names that are not valid UTF-8 (any bytes are legal in a Linux name) are kept losslessly: a key
is the name as `os.fsdecode` gives it, where each undecodable byte 0xXY becomes the lone surrogate
U+DCXY (`blip2.data.jsonl.json_line` writes it with JSON's `\\uXXXX` escapes).
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blip2.errors import UserError
from blip2.processing import DEFAULT_MAX_PIXELS, ImageError, ImageProcessor, load_image

IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .bmp .tif .tiff .webp .ppm .pgm .pbm .pnm .ico .tga .dib".split()
)
LIST_SUFFIXES = frozenset({".txt", ".lst"})
SHARD_SUFFIXES = (".tar",)


@dataclass(frozen=True)
class Item:
    """One input image.

    Attributes:
        key: what the results file calls it: the path, or `shard.tar#member` for a shard member.
        path: the file to read (the image, or the shard).
        member: the member of a webdataset shard holding the image, else None.
    """

    key: str
    path: str
    member: str | None = None


# ------------------------------------------------------------------------------------------- inputs


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _shard_items(path: str) -> list[Item]:
    try:
        with tarfile.open(path) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile() and _is_image_name(m.name)]
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{path} is not a readable tar shard ({e})") from None
    return [Item(f"{path}#{n}", path, n) for n in names]


def _list_items(path: str) -> list[Item]:
    base = Path(path).parent
    items = []
    for line in Path(path).read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = line if os.path.isabs(line) or os.path.exists(line) else str(base / line)
        items.extend(_expand_one(p, explicit=True, from_list=True))
    return items


def _expand_one(spec: str, explicit: bool, from_list: bool = False) -> list[Item]:
    if os.path.isdir(spec):
        found = []
        for root, dirs, files in os.walk(spec):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files) if _is_image_name(f)]
        return [Item(f, f) for f in found]
    if os.path.isfile(spec):
        low = spec.lower()
        if low.endswith(SHARD_SUFFIXES):
            return _shard_items(spec)
        if Path(low).suffix in LIST_SUFFIXES and not from_list:
            return _list_items(spec)
        return [Item(spec, spec)] if explicit or _is_image_name(spec) else []
    if glob.has_magic(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            raise UserError(f"no file matches {spec}")
        return [it for m in matches for it in _expand_one(m, explicit=False)]
    if from_list:  # a missing file named in a list gets its own error line
        return [Item(spec, spec)]
    raise UserError(f"{spec} does not exist: give image files, folders, globs, .tar shards or a .txt list")


def expand_inputs(specs: Sequence[str]) -> list[Item]:
    """Image items from files, folders (recursive, image suffixes only), globs, webdataset `.tar`
    shards (their image members) and text files listing paths (one a line; `#` comments).

    Each image appears once, in the order given. A file named explicitly is captioned whatever its
    suffix (an unreadable one gets an error line); inside folders and globs only image suffixes count.

    Raises:
        UserError: a path that does not exist, a glob that matches nothing, an unreadable shard.
    """
    seen: set[str] = set()
    items = []
    for spec in specs:
        for it in _expand_one(os.fspath(spec), explicit=True):
            if it.key not in seen:
                seen.add(it.key)
                items.append(it)
    return items


# ------------------------------------------------------------------------------------------- loading


class ImageItems(torch.utils.data.Dataset):
    """Decodes and transforms items in the loader's workers; a bad image becomes an error, not a crash.

    Each element is `(key, pixels (3, S, S) or None, error sentence or None)`.
    """

    def __init__(
        self, items: Sequence[Item], processor: ImageProcessor, max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        self.items = list(items)
        self.processor = processor
        self.max_pixels = max_pixels
        self._tars: dict[str, tarfile.TarFile] = {}  # one open shard per worker process

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, item: Item) -> Any:
        if item.member is None:
            return item.path
        tar = self._tars.get(item.path)
        if tar is None:
            tar = self._tars[item.path] = tarfile.open(item.path)
        f = tar.extractfile(item.member)
        if f is None:
            raise ImageError(f"{item.key} is not a file in its shard")
        return f.read()

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None]:
        item = self.items[i]
        try:
            image = load_image(self._read(item), self.max_pixels)
            return item.key, self.processor.preprocess(image), None
        except ImageError as e:
            message = str(e).replace("image ", f"{item.key} ", 1) if item.member else str(e)
            return item.key, None, message
        except (OSError, tarfile.TarError) as e:
            return item.key, None, f"{item.key} could not be read ({e})"


def _collate(batch: list[Any]) -> list[Any]:
    return batch


def loader(
    items: Sequence[Item],
    processor: ImageProcessor,
    batch_size: int,
    workers: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prefetch: int = 4,
) -> torch.utils.data.DataLoader:
    """Batches of `(key, pixels | None, error | None)`; with `workers > 0` images are decoded in that
    many processes, `prefetch` batches ahead of the model."""
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {"prefetch_factor": prefetch, "persistent_workers": False}
    return torch.utils.data.DataLoader(
        ImageItems(items, processor, max_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        **kwargs,
    )
