"""Small JPEGs of an index's images for `GET /thumbnail/{n}` (see `blip2.serve.index_routes`): only images the
index holds, by their position in it (never a path from the request), decoded within the pixel limit
and kept in a small cache."""

import io
import tarfile
import threading
from collections import OrderedDict

from blip2.errors import UserError
from blip2.processing import to_rgb
from blip2.serve.limits import PixelBudget

SIDE = 256  # a thumbnail's longest side, in pixels
CACHED = 512  # thumbnails kept (about 10 KB each)


class Unreadable(UserError):
    """An indexed image that cannot be read any more (moved, deleted, damaged): 404."""


class ServerBusy(Exception):
    """The server's pixel budget cannot hold the image now: 503."""


def make_thumbnail(path: str, member: str | None, max_pixels: int, budget: PixelBudget) -> bytes:
    """The JPEG thumbnail of the image at `path` (or `member` of the shard at `path`), at most `SIDE`
    pixels a side; its pixels are taken from the server's `budget` while it is decoded (`ServerBusy`
    when they do not fit).

    Raises:
        Unreadable: the image cannot be read, or has more than `max_pixels` pixels.
    """
    from PIL import Image, ImageOps

    name = path if member is None else f"{path}#{member}"
    try:
        if member is None:
            src: str | io.BytesIO = path
        else:
            with tarfile.open(path) as tar:
                info = tar.getmember(member)
                f = tar.extractfile(info)
                if f is None or info.size > 64 * 2**20:
                    raise Unreadable(f"{name} is not a readable image file in its shard")
                src = io.BytesIO(f.read())
        with Image.open(src) as image:
            w, h = image.size
            if w * h > max_pixels:
                raise Unreadable(f"{name} has {w}x{h} pixels, more than the limit of {max_pixels}")
            if not budget.take(w * h):
                raise ServerBusy("the server is decoding as many images as it can hold")
            try:
                image.draft("RGB", (SIDE, SIDE))  # JPEG: decoded at a fraction of its size
                small = to_rgb(ImageOps.exif_transpose(image) or image)
                small.thumbnail((SIDE, SIDE))
            finally:
                budget.give(w * h)
        out = io.BytesIO()
        small.save(out, format="JPEG", quality=85)
        return out.getvalue()
    except (OSError, tarfile.TarError, KeyError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise Unreadable(f"{name} can no longer be read") from None


class ThumbnailCache:
    """The last `CACHED` thumbnails, by index position (thread-safe)."""

    def __init__(self, size: int = CACHED):
        self.size, self._items = size, OrderedDict[int, bytes]()
        self._lock = threading.Lock()

    def get(self, n: int) -> bytes | None:
        with self._lock:
            data = self._items.get(n)
            if data is not None:
                self._items.move_to_end(n)
            return data

    def put(self, n: int, data: bytes) -> None:
        with self._lock:
            self._items[n] = data
            while len(self._items) > self.size:
                self._items.popitem(last=False)
