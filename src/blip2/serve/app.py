"""The HTTP API: FastAPI endpoints over a loaded `Captioner`, `Retriever` or both, with server-side batching.

Endpoints (OpenAPI schema at `/openapi.json`, interactive docs at `/docs`):

```
GET  /            the web page: upload an image, get a caption, ask questions
GET  /health      {"status": "ok", "methods": [...], "requests": n, "batches": m, "pixels_in_flight": p}
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
import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Annotated, Any

from blip2.errors import UserError
from blip2.processing import load_image
from blip2.serve.batching import Batcher, Job, QueueFull
from blip2.serve.limits import BodyLimit, Hold, PixelBudget, ServerSettings, header_size, invalid_field

logger = logging.getLogger("blip2.serve")


class Models:
    """The loaded models and what each serves (the `methods` of its kind: `Captioner` or `Retriever`);
    runs a batch of one group."""

    def __init__(self, pipelines: Sequence[Any]):
        self.by_method: dict[str, Any] = {}
        for pipe in pipelines:
            for method in pipe.methods:
                self.by_method.setdefault(method, pipe)

    def pipe(self, method: str) -> Any:
        if method not in self.by_method:
            from blip2.pipelines import Captioner, Retriever

            use = (Captioner if method in Captioner.methods else Retriever).checkpoint_kind
            raise UserError(f"{method} needs {use}: start the server with --model pointing at one")
        return self.by_method[method]

    def prepare(self, group: tuple[Any, ...], payload: Any) -> Any:
        """Check one job on its own before it is batched (a `UserError` fails it alone): a generation
        must fit the LLM's positions after its own prompt; /ask's conversation becomes its prompt here
        (fitted to the pipeline's `max_txt_len` tokens: the tokenizer is this thread's)."""
        method, options = group[0], dict(group[1])
        if method == "caption":
            self.pipe(method).check_generation_length([payload[1]], options)
        elif method == "ask":
            image, question, turns = payload
            prompt = self.pipe(method).conversation_prompt(question, turns)
            self.pipe(method).check_generation_length([prompt], options)
            return image, prompt
        return payload

    def run_group(self, group: tuple[Any, ...], payloads: list[Any]) -> list[Any]:
        method, options = group[0], dict(group[1])
        pipe = self.pipe(method)
        if method == "caption":
            return pipe.generate([p[0] for p in payloads], [p[1] for p in payloads], **options)
        if method == "ask":  # (image, prompt): `prepare` made the conversation a prompt
            return pipe.generate([p[0] for p in payloads], [p[1] for p in payloads], **options)
        if method == "match":
            itm, itc = pipe.pair_scores([p[0] for p in payloads], [p[1] for p in payloads])
            return list(zip(itm.tolist(), itc.tolist(), strict=True))
        if method == "search":
            return [pipe.search(images, query, top_k=k, rerank=r) for images, query, k, r in payloads]
        raise UserError(f"unknown method {method}")


def _page() -> str:
    return resources.files("blip2.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(pipelines: Sequence[Any], settings: ServerSettings | None = None) -> Any:
    """The FastAPI application serving `pipelines` (a stage-2 one for caption/ask, a stage-1 one for
    match/search; either or both). Closing the app's lifespan stops its batcher thread."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse

    from blip2.pipelines.captioner import ASK_DEFAULTS, CAPTION_DEFAULTS, check_generation_options

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
        return JSONResponse({"detail": invalid_field(exc.errors())}, status_code=400)

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

    def decode(files: list[tuple[str, bytes]], stop: threading.Event, hold: Hold) -> list[Any]:
        """The images of one request, within the pixel limits: the sizes come from the headers first,
        so that images over a limit are refused before any memory is spent on them, and the pixels are
        taken from the server's budget (into `hold`) before decoding. Runs in the decode pool; stops
        between images once `stop` is set (the request has timed out)."""
        try:
            return decode_within(files, stop, hold)
        finally:
            hold.end()

    def decode_within(files: list[tuple[str, bytes]], stop: threading.Event, hold: Hold) -> list[Any]:
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

    async def read_images(uploads: list[UploadFile], deadline: float, hold: Hold) -> list[Any]:
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
        hold = Hold(budget)
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
            "methods": sorted(models.by_method),
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
