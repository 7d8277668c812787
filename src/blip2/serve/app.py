"""The HTTP API: FastAPI endpoints over one or more loaded pipelines, with server-side batching.

Endpoints (OpenAPI schema at `/openapi.json`, interactive docs at `/docs`):

```
GET  /            the web page: upload an image, get a caption, ask questions
GET  /health      {"status": "ok", "tasks": [...], "requests": n, "batches": m, "pixels_in_flight": p}
POST /caption     image (file), prompt?, generation options -> {"caption": str}
POST /ask         image, question, history? (JSON [[q, a], ...]) -> {"answer": str}
POST /match       image, text (one or more) -> {"itm": [...], "itc": [...]}
POST /search      images (several files), query, top_k? -> {"results": [{index, filename, itc, itm}]}
```

Batching: requests go to one `Batcher` thread that owns the models. It takes the first waiting job,
waits up to `batch_wait_ms` for more jobs of the same kind (and the same generation options), and runs
them as one batch: concurrent users share a forward pass, and each gets exactly the answer a lone
request would (each request is checked on its own first, so one bad request fails alone). Limits: request bodies over `max_upload_mb` are refused with 413 (counted as they
arrive when there is no Content-Length), images over `max_pixels` with 400, the images of one
request over `max_request_pixels` together with 400 (read from the image headers, before anything is
decoded), a request finding `max_server_pixels` already decoded or decoding for the requests in
flight with 503 (before decoding; its pixels count until it is answered), more than `max_items` images or texts in one request, more than `max_history_turns` turns
and more than `max_text_chars` characters of text with 400, a request finding `max_queue` requests
already waiting with 503, and requests that take longer than `timeout_s` (decoding their images
included) with 504 (their job is cancelled: it never runs). User errors are one sentence in
`{"detail": ...}`, never a traceback.

The event loop only receives and answers: images are decoded in a small thread pool, and /ask's
conversation is tokenized in the batcher thread, so a large image or a long conversation never holds
up `/health` or the other requests.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime,
# and their types are imported inside `create_app`
import asyncio
import io
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any

from blip2.errors import UserError
from blip2.processing import DEFAULT_MAX_PIXELS, load_image

logger = logging.getLogger("blip2.serve")


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
            `rerank` of /search.
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
    max_request_pixels: int = 100_000_000
    max_server_pixels: int = 400_000_000
    max_text_chars: int = 10_000
    decode_threads: int = 4


@dataclass
class Job:
    """One unit of work: `group` jobs may run together; `payload` is the job's own input. A job
    cancelled (`Batcher.cancel`) before its turn is skipped."""

    group: tuple[Any, ...]
    payload: Any
    done: Callable[[Any, BaseException | None], None]
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    started: bool = False


class QueueFull(Exception):
    """`Batcher.submit` when `max_queue` jobs are already waiting."""


class Batcher:
    """A thread that runs jobs in batches. `run_group(group, payloads) -> results` does the work.

    Jobs of the same `group` waiting together (up to `max_batch`, collected for up to `wait_s` after
    the first) run in one call; results go back through each job's `done` callback. Each job is
    first checked on its own by `prepare(group, payload) -> payload` (when given, in this thread): a
    job it refuses gets that error alone, and the others run. A batch failing with a `UserError` (the
    fault of one request, not of the server) runs again one job at a time, so that each job gets its
    own answer or its own error; a batch failing otherwise fails each of its jobs with the error. At
    most `max_queue` jobs wait (0: no limit); cancelled jobs do not count and are skipped.
    """

    def __init__(
        self,
        run_group: Callable[[tuple[Any, ...], list[Any]], list[Any]],
        max_batch: int,
        wait_s: float,
        max_queue: int = 0,
        prepare: Callable[[tuple[Any, ...], Any], Any] | None = None,
    ):
        self.run_group = run_group
        self.prepare = prepare
        self.max_batch = max(1, max_batch)
        self.wait_s = wait_s
        self.max_queue = max_queue
        self.waiting = 0  # jobs submitted, neither started nor cancelled
        self._lock = threading.Lock()
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.requests = 0
        self.batches = 0
        self.largest_batch = 0
        self._held: list[Job] = []  # taken from the queue but of another group
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="blip2-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; `QueueFull` when `max_queue` jobs are already waiting."""
        with self._lock:
            if self.max_queue and self.waiting >= self.max_queue:
                raise QueueFull(f"{self.waiting} requests are waiting")
            self.waiting += 1
        self.queue.put(job)

    def cancel(self, job: Job) -> None:
        """Skip `job` if it has not started (e.g. its request timed out); its `done` is never called."""
        with self._lock:
            if not job.started and not job.cancelled:
                job.cancelled = True
                self.waiting -= 1

    def close(self) -> None:
        """Stop after the jobs already taken (None in the queue is the stop sign)."""
        self._closing = True
        self.queue.put(None)
        self._thread.join(timeout=5)

    def _next(self, timeout: float | None) -> Job | None:
        if self._held:
            return self._held.pop(0)
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            if first.cancelled:
                continue
            jobs, others = [first], []
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0 and not self._held and self.queue.empty():
                    break
                nxt = self._next(max(left, 0.0) if not self._held else None)
                if nxt is None:
                    if self._closing:  # that None was the stop sign: keep it for the outer loop
                        self.queue.put(None)
                        break
                    if left <= 0:
                        break
                    continue
                if not nxt.cancelled:
                    (jobs if nxt.group == first.group else others).append(nxt)
            self._held = others + self._held
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        with self._lock:  # jobs cancelled while waiting are dropped; the rest can no longer be
            jobs = [j for j in jobs if not j.cancelled]
            for j in jobs:
                j.started = True
            self.waiting -= len(jobs)
        self.requests += len(jobs)
        ready = []
        for j in jobs:  # each job checked on its own: a bad request must not fail the others
            try:
                j.payload = j.payload if self.prepare is None else self.prepare(j.group, j.payload)
            except Exception as e:
                j.done(None, e)
                continue
            ready.append(j)
        if not ready:
            return
        try:
            self._batch(ready)
        except UserError:  # one job's fault: each job alone gets its own answer or its own error
            for j in ready:
                try:
                    self._batch([j])
                except BaseException as e:
                    j.done(None, e)
        except BaseException as e:  # each waiting request gets the error
            for j in ready:
                j.done(None, e)

    def _batch(self, jobs: list[Job]) -> None:
        """Run `jobs` as one batch and answer each; raises what the batch raised (nobody answered)."""
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        results = self.run_group(jobs[0].group, [j.payload for j in jobs])
        for j, r in zip(jobs, results, strict=True):
            j.done(r, None)


class Models:
    """The loaded pipelines and what each serves; runs a batch of one group."""

    def __init__(self, pipelines: Sequence[Any]):
        self.by_task: dict[str, Any] = {}
        for pipe in pipelines:
            for task in pipe.tasks:
                self.by_task.setdefault(task, pipe)

    def pipe(self, task: str) -> Any:
        if task not in self.by_task:
            from blip2.pipeline import STAGE1_USE, STAGE2_USE

            use = STAGE2_USE if task in ("caption", "ask") else STAGE1_USE
            raise UserError(f"{task} needs {use}: start the server with --model pointing at one")
        return self.by_task[task]

    def prepare(self, group: tuple[Any, ...], payload: Any) -> Any:
        """Check one job on its own before it is batched (a `UserError` fails it alone): a generation
        must fit the LLM's positions after its own prompt; /ask's conversation becomes its prompt here
        (fitted to the pipeline's `max_txt_len` tokens: the tokenizer is this thread's)."""
        task, options = group[0], dict(group[1])
        if task == "caption":
            self.pipe(task).check_generation_length([payload[1]], options)
        elif task == "ask":
            image, question, turns = payload
            prompt = self.pipe(task).conversation_prompt(question, turns)
            self.pipe(task).check_generation_length([prompt], options)
            return image, prompt
        return payload

    def run_group(self, group: tuple[Any, ...], payloads: list[Any]) -> list[Any]:
        task, options = group[0], dict(group[1])
        pipe = self.pipe(task)
        if task == "caption":
            return pipe.generate([p[0] for p in payloads], [p[1] for p in payloads], **options)
        if task == "ask":  # (image, prompt): `prepare` made the conversation a prompt
            return pipe.generate([p[0] for p in payloads], [p[1] for p in payloads], **options)
        if task == "match":
            itm, itc = pipe.pair_scores([p[0] for p in payloads], [p[1] for p in payloads])
            return list(zip(itm.tolist(), itc.tolist(), strict=True))
        if task == "search":
            return [pipe.search(images, query, top_k=k, rerank=r) for images, query, k, r in payloads]
        raise UserError(f"unknown task {task}")


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


class _Hold:
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


class _TooLarge(Exception):
    pass


def _header_size(data: bytes) -> tuple[int, int]:
    """An image's (width, height) read from its header, without decoding it; (0, 0) when PIL cannot
    read it (`load_image` then says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (Image.DecompressionBombError, Image.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return 0, 0


def _invalid_field(errors: Sequence[Any]) -> str:
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

    async def _refuse(self, send: Callable, size: str) -> None:
        body = json.dumps({"detail": f"the upload is {size}more than the limit of {self.limit_mb:g} MB"})
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, f"{int(length) / 2**20:.1f} MB, ")
        state = {"received": 0, "over": False, "started": False}

        async def counted() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["over"] = True
                    raise _TooLarge
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
            await self._refuse(send, "")


def _page() -> str:
    return resources.files("blip2.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(pipelines: Sequence[Any], settings: ServerSettings | None = None) -> Any:
    """The FastAPI application serving `pipelines` (a stage-2 one for caption/ask, a stage-1 one for
    match/search; either or both). Closing the app's lifespan stops its batcher thread."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse

    from blip2.pipeline import ASK_DEFAULTS, CAPTION_DEFAULTS, check_generation_options

    settings = settings or ServerSettings()
    models = Models(pipelines)
    batcher = Batcher(
        models.run_group,
        settings.max_batch,
        settings.batch_wait_ms / 1000,
        settings.max_queue,
        models.prepare,
    )
    decoder = ThreadPoolExecutor(max(1, settings.decode_threads), thread_name_prefix="blip2-decode")
    budget = PixelBudget(settings.max_server_pixels)
    max_bytes = int(settings.max_upload_mb * 1024 * 1024)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        batcher.close()
        decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="BLIP-2",
        description="Captions, answers, image-text matching and search with a BLIP-2 model.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.pixel_budget = budget
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=max_bytes, limit_mb=settings.max_upload_mb)

    class HTTPProblem(Exception):
        def __init__(self, status: int, detail: str):
            self.status, self.detail = status, detail

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _invalid_field(exc.errors())}, status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error in %s", request.url.path)
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500
        )

    def too_slow() -> HTTPProblem:
        return HTTPProblem(504, f"the request took longer than {settings.timeout_s:g} s; try again later")

    async def read_upload(upload: UploadFile) -> tuple[str, bytes]:
        """The name and bytes of one uploaded file (not decoded)."""
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPProblem(
                413, f"{upload.filename} is larger than the limit of {settings.max_upload_mb:g} MB"
            )
        if not data:
            raise HTTPProblem(400, f"{upload.filename or 'the upload'} is empty: choose an image file")
        return upload.filename or "the image", data

    def decode(files: list[tuple[str, bytes]], stop: threading.Event, hold: _Hold) -> list[Any]:
        """The images of one request, within the pixel limits: the sizes come from the headers first,
        so that images over a limit are refused before any memory is spent on them, and the pixels are
        taken from the server's budget (into `hold`) before decoding. Runs in the decode pool; stops
        between images once `stop` is set (the request has timed out)."""
        try:
            return decode_within(files, stop, hold)
        finally:
            hold.end()

    def decode_within(files: list[tuple[str, bytes]], stop: threading.Event, hold: _Hold) -> list[Any]:
        per_image = min(settings.max_pixels, settings.max_request_pixels)
        sizes = [_header_size(data) for _, data in files]
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
            raise too_slow()
        if not budget.take(total):
            raise HTTPProblem(
                503, "the server is decoding as many images as it can hold; try again in a moment"
            )
        hold.pixels = total
        images = []
        for name, data in files:
            if stop.is_set():
                raise too_slow()
            try:
                images.append(load_image(data, settings.max_pixels))
            except UserError as e:
                raise HTTPProblem(400, str(e).replace("image ", f"{name} ", 1)) from None
        return images

    async def read_images(uploads: list[UploadFile], deadline: float, hold: _Hold) -> list[Any]:
        """Read and decode the uploaded images off the event loop, within the request's time; their
        pixels are held in the server's budget until `hold.end()` (the request's)."""
        files = [await read_upload(u) for u in uploads]
        stop = threading.Event()
        try:
            work = asyncio.get_running_loop().run_in_executor(decoder, decode, files, stop, hold)
        except RuntimeError:  # the pool is shut down: the server is stopping
            hold.end()
            raise
        try:
            return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise too_slow() from None
        finally:
            stop.set()  # timed out or the client went away: decode no further

    @asynccontextmanager
    async def decoded(uploads: list[UploadFile], deadline: float):  # noqa: ANN202
        """The request's decoded images, their pixels held in the server's budget until the block ends
        (the request is answered, fails or times out)."""
        hold = _Hold(budget)
        try:
            yield await read_images(uploads, deadline, hold)
        finally:
            hold.end()

    async def submit(group: tuple[Any, ...], payload: Any, deadline: float) -> Any:
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

            loop.call_soon_threadsafe(settle)

        job = Job(group, payload, done)
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise HTTPProblem(503, f"the server is busy ({e}); try again in a moment") from None
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise too_slow() from None
        finally:
            batcher.cancel(job)  # timed out or the client went away: never run it (no-op once started)

    def at_most(what: str, n: int, limit: int, fix: str = "send fewer") -> None:
        if n > limit:
            raise HTTPProblem(400, f"{what} is {n}, more than the limit of {limit}: {fix}")

    def text_at_most(what: str, texts: Sequence[str], fix: str) -> None:
        n, limit = sum(len(t) for t in texts), settings.max_text_chars
        if n > limit:
            raise HTTPProblem(400, f"{what} is {n} characters long, more than the limit of {limit}: {fix}")

    def options(defaults: dict[str, Any], given: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        merged = {**defaults, **{k: v for k, v in given.items() if v is not None}}
        check_generation_options(merged)  # a UserError: 400
        if not 1 <= merged.get("num_beams", 1) <= 10:
            raise HTTPProblem(400, "num_beams must be between 1 and 10")
        if not 1 <= merged.get("max_new_tokens", 1) <= 256:
            raise HTTPProblem(400, "max_new_tokens must be between 1 and 256")
        return tuple(sorted(merged.items()))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return _page()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and what the server does; `requests` / `batches` count the work batched so far,
        `pixels_in_flight` the decoded pixels the requests in flight hold (`max_server_pixels`)."""
        return {
            "status": "ok",
            "tasks": sorted(models.by_task),
            "requests": batcher.requests,
            "batches": batcher.batches,
            "largest_batch": batcher.largest_batch,
            "pixels_in_flight": budget.used,
        }

    @app.post("/caption")
    async def caption(
        image: Annotated[UploadFile, File(description="the image")],
        prompt: Annotated[str | None, Form(description="text the caption continues")] = None,
        num_beams: Annotated[int | None, Form()] = None,
        max_new_tokens: Annotated[int | None, Form()] = None,
        min_new_tokens: Annotated[int | None, Form()] = None,
        repetition_penalty: Annotated[float | None, Form()] = None,
        length_penalty: Annotated[float | None, Form()] = None,
    ) -> dict[str, str]:
        """Caption an image."""
        deadline = time.monotonic() + settings.timeout_s
        pipe = models.pipe("caption")
        text = pipe.config.llm.prompt if prompt is None else prompt
        text_at_most("the prompt", [text], "shorten it")
        given = dict(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
        )
        group = ("caption", options(CAPTION_DEFAULTS, given))
        async with decoded([image], deadline) as [pil]:
            return {"caption": await submit(group, (pil, text), deadline)}

    @app.post("/ask")
    async def ask(
        image: Annotated[UploadFile, File(description="the image")],
        question: Annotated[str | None, Form(description="the question")] = None,
        history: Annotated[
            str | None, Form(description='earlier turns as JSON: [["question", "answer"], ...]')
        ] = None,
        num_beams: Annotated[int | None, Form()] = None,
        max_new_tokens: Annotated[int | None, Form()] = None,
    ) -> dict[str, str]:
        """Answer a question about an image, given the earlier turns of the conversation."""
        deadline = time.monotonic() + settings.timeout_s
        pipe = models.pipe("ask")
        if not question or not question.strip():
            raise HTTPProblem(400, "the question is empty: type one")
        turns: list[tuple[str, str]] = []
        if history:
            text_at_most("the history", [history], "leave out earlier turns")  # before parsing it
            try:
                turns = [(str(q), str(a)) for q, a in json.loads(history)]
            except (ValueError, TypeError):
                raise HTTPProblem(400, 'history must be JSON like [["question", "answer"], ...]') from None
        at_most("the number of history turns", len(turns), settings.max_history_turns)
        texts = [question, *(t for turn in turns for t in turn)]
        text_at_most("the question with its history", texts, "leave out earlier turns")
        is_t5 = pipe.model.is_encoder_decoder
        defaults = {**ASK_DEFAULTS, "length_penalty": -1.0 if is_t5 else 0.0}
        group = ("ask", options(defaults, dict(num_beams=num_beams, max_new_tokens=max_new_tokens)))
        async with decoded([image], deadline) as [pil]:
            return {"answer": await submit(group, (pil, question, turns), deadline)}

    @app.post("/match")
    async def match(
        image: Annotated[UploadFile, File(description="the image")],
        text: Annotated[list[str], Form(description="one or more texts")],
    ) -> dict[str, list[float]]:
        """ITM match probability and ITC similarity of the image with each text."""
        deadline = time.monotonic() + settings.timeout_s
        models.pipe("match")
        at_most("the number of texts", len(text), settings.max_items)
        if not text or any(not t.strip() for t in text):
            raise HTTPProblem(400, "a text is empty: give some words")
        text_at_most("the texts together", text, "send fewer or shorter texts")
        async with decoded([image], deadline) as [pil]:
            pairs = await asyncio.gather(*(submit(("match", ()), (pil, t), deadline) for t in text))
        return {"itm": [p[0] for p in pairs], "itc": [p[1] for p in pairs]}

    @app.post("/search")
    async def search(
        images: Annotated[list[UploadFile], File(description="the images to rank")],
        query: Annotated[str | None, Form(description="the text to search for")] = None,
        top_k: Annotated[int, Form()] = 10,
        rerank: Annotated[int, Form()] = 16,
    ) -> dict[str, Any]:
        """Rank the uploaded images for a text query (ITC, then ITM re-ranking of the best)."""
        deadline = time.monotonic() + settings.timeout_s
        models.pipe("search")
        if not query or not query.strip():
            raise HTTPProblem(400, "the query is empty: type some words")
        text_at_most("the query", [query], "shorten it")
        at_most("the number of images", len(images), settings.max_items)
        if not 1 <= top_k <= settings.max_items or not 0 <= rerank <= settings.max_items:
            raise HTTPProblem(
                400,
                f"top_k must be between 1 and {settings.max_items} and rerank between 0 and {settings.max_items}",
            )
        async with decoded(images, deadline) as pils:
            hits = await submit(
                ("search", (("request", id(pils)),)), (pils, query, top_k, rerank), deadline
            )  # never batched
        return {
            "results": [
                {"index": h.index, "filename": images[h.index].filename, "itc": h.itc, "itm": h.itm}
                for h in hits
            ]
        }

    return app
