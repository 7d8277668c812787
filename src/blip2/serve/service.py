"""What every route of the server shares (see `blip2.serve.app`): the `Service` that holds the models'
batcher, the image-decoding pool and the pixel budget, and the steps a request goes through on its
way to the batcher: its limits checked, its images read and decoded within them, its job queued and
awaited within the request's time.

A route gets the service with `ServiceDep` (a FastAPI dependency on the app's `state.service`) and
refuses a request by raising `HTTPProblem(status, sentence)`, or `UserError` for a 400.
"""

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, UploadFile

from blip2.errors import UserError
from blip2.pipelines.captioner import ASK_DEFAULTS, check_generation_options
from blip2.processing import load_image
from blip2.serve.batching import Batcher, Job, QueueFull
from blip2.serve.limits import Hold, PixelBudget, ServerSettings, header_size
from blip2.serve.runner import Models
from blip2.serve.thumbnails import ThumbnailCache


class HTTPProblem(Exception):
    """A request refused with `status` and one sentence (`code`: OpenAI's error code under /v1/)."""

    def __init__(self, status: int, detail: str, code: str | None = None):
        self.status, self.detail, self.code = status, detail, code


@dataclass
class Queued:
    """A job in the batcher's queue and the future of its result (on the request's event loop)."""

    job: Job
    result: asyncio.Future


class Service:
    """The server's state and the steps its routes share.

    Args:
        pipelines: the loaded pipelines (`Models`).
        settings: the limits and batching.
        index: the index `GET /search` searches, or None.
        model_name: the name `/v1/` serves the captioner under.
    """

    def __init__(self, pipelines: Sequence[Any], settings: ServerSettings, index: Any, model_name: str):
        self.settings = settings
        self.models = Models(pipelines, index)
        self.index = index
        self.model_name = model_name
        self.thumbnails = ThumbnailCache()
        self.batcher = Batcher(
            self.models.run_group,
            settings.max_batch,
            settings.batch_wait_ms / 1000,
            settings.max_queue,
            self.models.prepare,
        )
        self.decoder = ThreadPoolExecutor(max(1, settings.decode_threads), thread_name_prefix="blip2-decode")
        self.budget = PixelBudget(settings.max_server_pixels)
        self.max_bytes = int(settings.max_upload_mb * 1024 * 1024)

    def close(self) -> None:
        """Stop the batcher thread and the decoding pool (the app's lifespan ends)."""
        self.batcher.close()
        self.decoder.shutdown(wait=False, cancel_futures=True)

    # -- limits ---------------------------------------------------------------------------------------

    def deadline(self) -> float:
        """When a request starting now times out (`time.monotonic()`)."""
        return time.monotonic() + self.settings.timeout_s

    def too_slow(self) -> HTTPProblem:
        return HTTPProblem(
            504, f"the request took longer than {self.settings.timeout_s:g} s; try again later"
        )

    @staticmethod
    def at_most(what: str, n: int, limit: int, fix: str = "send fewer") -> None:
        if n > limit:
            raise HTTPProblem(400, f"{what} is {n}, more than the limit of {limit}: {fix}")

    def text_at_most(self, what: str, texts: Sequence[str], fix: str) -> None:
        n, limit = sum(len(t) for t in texts), self.settings.max_text_chars
        if n > limit:
            raise HTTPProblem(400, f"{what} is {n} characters long, more than the limit of {limit}: {fix}")

    def check_ranks(self, top_k: int, rerank: int) -> None:
        """A search's `top_k` and `rerank` within `max_items`."""
        most = self.settings.max_items
        if not 1 <= top_k <= most or not 0 <= rerank <= most:
            raise HTTPProblem(400, f"top_k must be between 1 and {most} and rerank between 0 and {most}")

    def ask_defaults(self) -> dict[str, Any]:
        """The generation defaults of a question (`Captioner.chat`'s: a T5 prefers short answers)."""
        is_t5 = self.models.pipe("ask").model.is_encoder_decoder
        return {**ASK_DEFAULTS, "length_penalty": -1.0 if is_t5 else 0.0}

    def options(self, defaults: dict[str, Any], given: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        """The generation options of a job (`given`, None for a default), checked, as a group key. A
        default `max_new_tokens` above the server's `max_new_tokens` counts as it."""
        most = self.settings.max_new_tokens
        if "max_new_tokens" in defaults:
            defaults = {**defaults, "max_new_tokens": min(defaults["max_new_tokens"], most)}
        merged = {**defaults, **{k: v for k, v in given.items() if v is not None}}
        check_generation_options(merged)  # a UserError: 400
        for name, value in merged.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise HTTPProblem(400, f"{name} must be a finite number, not {value}")
        if not 1 <= merged.get("num_beams", 1) <= 10:
            raise HTTPProblem(400, "num_beams must be between 1 and 10")
        if not 1 <= merged.get("max_new_tokens", 1) <= most:
            raise HTTPProblem(400, f"max_new_tokens must be between 1 and {most}")
        return tuple(sorted(merged.items()))

    # -- images ---------------------------------------------------------------------------------------

    async def read_upload(self, upload: UploadFile) -> tuple[str, bytes]:
        """The name and bytes of one uploaded file (not decoded)."""
        data = await upload.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise HTTPProblem(
                413, f"{upload.filename} is larger than the limit of {self.settings.max_upload_mb:g} MB"
            )
        if not data:
            raise HTTPProblem(400, f"{upload.filename or 'the upload'} is empty: choose an image file")
        return upload.filename or "the image", data

    @asynccontextmanager
    async def decoded(self, uploads: list[UploadFile], deadline: float) -> AsyncIterator[list[Any]]:
        """The request's decoded images, their pixels held in the server's budget until the block ends
        (the request is answered, fails or times out)."""
        hold = Hold(self.budget)
        try:
            files = [await self.read_upload(u) for u in uploads]
            yield await self.decode_files(files, deadline, hold)
        finally:
            hold.end()

    @asynccontextmanager
    async def decoded_files(
        self, files: list[tuple[str, bytes]], deadline: float
    ) -> AsyncIterator[list[Any]]:
        """`decoded` for images already read (name, bytes)."""
        hold = Hold(self.budget)
        try:
            yield await self.decode_files(files, deadline, hold)
        finally:
            hold.end()

    async def decode_files(self, files: list[tuple[str, bytes]], deadline: float, hold: Hold) -> list[Any]:
        """Decode (name, bytes) images in the decoding pool, within the request's time; their pixels are
        held in the server's budget until `hold.end()` (the request's)."""
        stop = threading.Event()
        try:
            work = asyncio.get_running_loop().run_in_executor(self.decoder, self._decode, files, stop, hold)
        except RuntimeError:  # the pool is shut down: the server is stopping
            hold.end()
            raise
        try:
            return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise self.too_slow() from None
        finally:
            stop.set()  # timed out or the client went away: decode no further

    def _decode(self, files: list[tuple[str, bytes]], stop: threading.Event, hold: Hold) -> list[Any]:
        """The images of one request, within the pixel limits: the sizes come from the headers first,
        so that images over a limit are refused before any memory is spent on them, and the pixels are
        taken from the server's budget (into `hold`) before decoding. Runs in the decode pool; stops
        between images once `stop` is set (the request has timed out)."""
        try:
            return self._decode_within(files, stop, hold)
        finally:
            hold.end()

    def _decode_within(self, files: list[tuple[str, bytes]], stop: threading.Event, hold: Hold) -> list[Any]:
        settings = self.settings
        per_image = min(settings.max_pixels, settings.max_request_pixels)
        sizes = [header_size(data) for _, data in files]
        for (name, _), (w, h) in zip(files, sizes, strict=True):
            if w * h > per_image:
                raise HTTPProblem(
                    400, f"{name} has {w}x{h} pixels, more than the limit of {per_image}; resize it first"
                )
        total = sum(w * h for w, h in sizes)
        if total > settings.max_request_pixels:
            raise HTTPProblem(
                400,
                f"the {len(files)} images have {total} pixels together, more than the limit of "
                f"{settings.max_request_pixels} per request: send fewer or smaller images",
            )
        if total > settings.max_server_pixels:
            raise HTTPProblem(
                400,
                f"the {len(files)} image(s) have {total} pixels together, more than the server's limit of "
                f"{settings.max_server_pixels}: send fewer or smaller images",
            )
        if stop.is_set():
            raise self.too_slow()
        if not self.budget.take(total):
            raise HTTPProblem(
                503, "the server is decoding as many images as it can hold; try again in a moment"
            )
        hold.pixels = total
        images = []
        for name, data in files:
            if stop.is_set():
                raise self.too_slow()
            try:
                images.append(load_image(data, settings.max_pixels))
            except UserError as e:
                raise HTTPProblem(400, str(e).replace("image ", f"{name} ", 1)) from None
        return images

    # -- the batcher ----------------------------------------------------------------------------------

    async def submit(self, group: tuple[Any, ...], payload: Any, deadline: float) -> Any:
        """Queue a job and await its result, within the request's time (504 after)."""
        queued = self.start(group, payload)
        try:
            return await asyncio.wait_for(queued.result, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise self.too_slow() from None
        finally:
            self.batcher.cancel(
                queued.job
            )  # timed out or the client went away: never run it (no-op once started)

    def start(
        self, group: tuple[Any, ...], payload: Any, on_done: Callable[[], None] | None = None
    ) -> Queued:
        """Queue a job (503 when the queue is full); its result (or error) comes back as a future of
        this event loop. `on_done()` is called in the batcher's thread once it has run (never when it
        is cancelled before)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                if future.done():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

            if on_done is not None:
                on_done()
            loop.call_soon_threadsafe(settle)

        job = Job(group, payload, done)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise HTTPProblem(503, f"the server is busy ({e}); try again in a moment") from None
        return Queued(job, future)


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
