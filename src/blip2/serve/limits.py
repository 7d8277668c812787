"""What a request may cost the server: its settings, the pixel budget of the images in flight, the
request-body limit, and the one sentence of a malformed form (see `blip2.serve.app`)."""

import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from blip2.processing import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ServerSettings:
    """Server limits and batching.

    Attributes:
        max_upload_mb: largest request body accepted (413 above).
        max_pixels: largest image accepted, in pixels (decompression bombs; 400 above).
        max_request_pixels: most pixels of all the images of one request together (400 above), so
            that the memory a request decodes into is bounded (about 3 bytes a pixel), whatever
            number of images it sends; checked from the image headers before decoding.
        max_server_pixels: most pixels decoded for all the requests in flight together (their images
            wait in the queue and in the batch): a request that would go beyond gets 503 before its
            images are decoded; its pixels count from then until it is answered (or times out).
        timeout_s: a request taking longer than this (decoding its images included) gets 504.
        max_batch: most jobs run together.
        batch_wait_ms: how long the batcher waits for more jobs after the first.
        max_queue: most jobs waiting for the batcher (503 above; 0: no limit).
        max_items: most images per /search and texts per /match; also the largest `top_k` and
            `rerank` of /search, and the most messages of a chat completion (and parts of one message).
        max_new_tokens: most new tokens a request generates: /caption's and /ask's `max_new_tokens`
            above it get 400; a chat completion's `max_tokens` above it counts as it (the answer ends
            there, with `finish_reason` "length").
        max_history_turns: most earlier turns in an /ask conversation.
        max_text_chars: most characters of text in one request: the question and its history
            together (/ask), the prompt (/caption), the query (/search), the texts (/match).
        decode_threads: threads that decode images off the event loop.
    """

    max_upload_mb: float = 20.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout_s: float = 60.0
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 256
    max_items: int = 64
    max_history_turns: int = 20
    max_new_tokens: int = 256
    max_request_pixels: int = 100_000_000
    max_server_pixels: int = 400_000_000
    max_text_chars: int = 10_000
    decode_threads: int = 4


class PixelBudget:
    """The pixels decoded for the requests in flight, at most `limit` together (thread-safe)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, pixels: int) -> bool:
        """Count `pixels` in; False (nothing taken) when that would go beyond the limit."""
        with self._lock:
            if self.used + pixels > self.limit:
                return False
            self.used += pixels
            return True

    def give(self, pixels: int) -> None:
        with self._lock:
            self.used -= pixels


class Hold:
    """The pixels one request took from the budget: given back once both its decoding (in the pool)
    and the request itself (answered, failed or timed out) are over."""

    def __init__(self, budget: PixelBudget):
        self.budget, self.pixels, self.owners = budget, 0, 2
        self._lock = threading.Lock()

    def end(self) -> None:
        with self._lock:
            self.owners -= 1
            last = self.owners == 0
        if last and self.pixels:
            self.budget.give(self.pixels)


class TooLarge(Exception):
    pass


def header_size(data: bytes) -> tuple[int, int]:
    """An image's (width, height) read from its header, without decoding it; (0, 0) when PIL cannot
    read it (`load_image` then says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (Image.DecompressionBombError, Image.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return 0, 0


def invalid_field(errors: Sequence[Any]) -> str:
    """One sentence for the first of FastAPI's validation errors (a missing or mistyped form field)."""
    error = errors[0] if errors else {}
    name = str((error.get("loc") or ["the request"])[-1])
    kind, given = str(error.get("type", "")), error.get("input")
    if kind == "missing":
        return f"{name} is missing: send it in the form"
    if kind.startswith("int"):
        return f"{name} must be a whole number, not {given!r}"
    if kind.startswith("float"):
        return f"{name} must be a number, not {given!r}"
    return f"{name} is not valid ({error.get('msg', 'unexpected value')}): see /docs"


class BodyLimit:
    """ASGI middleware: request bodies over `max_bytes` get 413, by their Content-Length or, without
    one (chunked uploads), by counting the bytes as they arrive."""

    def __init__(self, app: Any, max_bytes: int, limit_mb: float):
        self.app, self.max_bytes, self.limit_mb = app, max_bytes, limit_mb

    async def _refuse(self, send: Callable, path: str, size: str) -> None:
        from blip2.serve.access import error_body

        body = error_body(path, 413, f"the upload is {size}more than the limit of {self.limit_mb:g} MB")
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, scope["path"], f"{int(length) / 2**20:.1f} MB, ")
        state = {"received": 0, "over": False, "started": False}

        async def counted() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["over"] = True
                    raise TooLarge
            return message

        async def guarded(message: dict) -> None:
            if state["over"]:
                return  # whatever the app makes of the cut body, the answer is 413
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await self._refuse(send, scope["path"], "")
