"""The HTTP API: FastAPI endpoints over a loaded `Captioner`, `Retriever` or both, with server-side batching.

Endpoints (OpenAPI schema at `/openapi.json`, interactive docs at `/docs`):

```
GET  /            the web page: caption and ask about an image, match it with texts, search
GET  /health      {"status": "ok", "methods": [...], "index": n | null, "requests": n, "batches": m, ...}
POST /caption     image (file), prompt?, generation options -> {"caption": str}
POST /ask         image, question, history? (JSON [[q, a], ...]) -> {"answer": str}
POST /match       image, text (one or more) -> {"itm": [...], "itc": [...]}
POST /search      images (several files), query, top_k? -> {"results": [{index, filename, itc, itm}]}
GET  /search      ?q=&top_k=&rerank= over the server's index (`--index`) ->
                  {"results": [{rank, path, itc, itm, score, thumbnail}]}, as `Index.search` ranks
GET  /thumbnail/n a JPEG of the index's image at position n (at most 256 pixels a side)
POST /v1/chat/completions   OpenAI's chat completions (`blip2.serve.chat`), streaming too
GET  /v1/models             the model `/v1/chat/completions` serves
```

With an API key (`create_app(api_key=...)`, `blip2 serve --api-key`) every request but `GET /` (the page,
which asks for the key) needs `Authorization: Bearer <key>` (401 otherwise). Each request is logged in
one line on the `blip2.serve.access` logger (`blip2.serve.access.AccessLog`). Errors are `{"detail": sentence}`,
and OpenAI's `{"error": {"message": ...}}` under `/v1/`.

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
included) with 504 (their job is cancelled: it never runs). User errors are one sentence, never a
traceback. `/v1/chat/completions` goes through the same limits: its JSON body counts as an upload, its
image as an uploaded image, its messages as a conversation (`max_history_turns`, `max_text_chars`).

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
from types import SimpleNamespace
from typing import Annotated, Any

from blip2.errors import UserError
from blip2.processing import load_image
from blip2.serve.batching import Batcher, Job, QueueFull
from blip2.serve.limits import BodyLimit, Hold, PixelBudget, ServerSettings, header_size, invalid_field

logger = logging.getLogger("blip2.serve")


class Models:
    """The loaded models and what each serves (the `methods` of its kind: `Captioner` or `Retriever`),
    and the index searched by `GET /search`; runs a batch of one group (in the batcher's thread)."""

    def __init__(self, pipelines: Sequence[Any], index: Any = None):
        self.by_method: dict[str, Any] = {}
        for pipe in pipelines:
            for method in pipe.methods:
                self.by_method.setdefault(method, pipe)
        self.index = index
        self.index_retriever: Any = None
        if index is not None:
            from blip2.pipelines import Retriever

            retrievers = [p for p in pipelines if isinstance(p, Retriever)]
            if not retrievers:
                raise UserError("searching an index needs the retrieval model it was built with")
            index.check_model(retrievers[0])
            self.index_retriever = retrievers[0]

    def pipe(self, method: str) -> Any:
        if method not in self.by_method:
            from blip2.pipelines import Captioner, Retriever

            use = (Captioner if method in Captioner.methods else Retriever).checkpoint_kind
            raise UserError(f"{method} needs {use}: start the server with --model pointing at one")
        return self.by_method[method]

    def prepare(self, group: tuple[Any, ...], payload: Any) -> Any:
        """Check one job on its own before it is batched (a `UserError` fails it alone): a generation
        must fit the LLM's positions after its own prompt; /ask's conversation becomes its prompt here
        (fitted to the pipeline's `max_txt_len` tokens: the tokenizer is this thread's), and so does a
        chat completion's (its question, or the checkpoint's caption prompt when it has none)."""
        method, options = group[0], dict(group[1])
        if method == "caption":
            self.pipe(method).check_generation_length([payload[1]], options)
        elif method in ("ask", "chat", "stream"):
            pipe = self.pipe("ask")
            image, question, turns, *rest = payload
            if question is None:
                prompt = pipe.config.llm.prompt
            else:
                prompt = pipe.conversation_prompt(question, turns)
            pipe.check_generation_length([prompt], options)
            return image, prompt, *rest
        return payload

    def run_group(self, group: tuple[Any, ...], payloads: list[Any]) -> list[Any]:
        method, options = group[0], dict(group[1])
        if method == "index":
            return [self.index.search(self.index_retriever, **p) for p in payloads]
        pipe = self.pipe(method if method not in ("chat", "stream") else "ask")
        if method == "caption":
            return pipe.generate([p[0] for p in payloads], [p[1] for p in payloads], **options)
        if method == "ask":  # (image, prompt): `prepare` made the conversation a prompt
            return pipe.generate([p[0] for p in payloads], [p[1] for p in payloads], **options)
        if method == "chat":  # (image, prompt, stop strings)
            texts = pipe.generate([p[0] for p in payloads], [p[1] for p in payloads], **options)
            return [
                self._finished(pipe, p[1], t, p[2], options) for p, t in zip(payloads, texts, strict=True)
            ]
        if method == "stream":  # (image, prompt, stop strings, emit): never batched
            return [self._stream(pipe, *p, options) for p in payloads]
        if method == "match":
            itm, itc = pipe.pair_scores([p[0] for p in payloads], [p[1] for p in payloads])
            return list(zip(itm.tolist(), itc.tolist(), strict=True))
        if method == "search":
            return [pipe.search(images, query, top_k=k, rerank=r) for images, query, k, r in payloads]
        raise UserError(f"unknown method {method}")

    @staticmethod
    def _finished(
        pipe: Any, prompt: str, text: str, stops: list[str], options: dict[str, Any]
    ) -> dict[str, Any]:
        """A chat completion's text cut at its stop strings, why it ended and its token counts (the
        prompt's: the image's query tokens and the prompt's text tokens)."""
        from blip2.serve.chat import cut

        out, stopped = cut(text, stops)
        tok = pipe.llm_tokenizer
        made = len(tok(text, add_special_tokens=False)["input_ids"])
        prompt_tokens = pipe.config.qformer.num_query_tokens + len(tok(prompt)["input_ids"])
        completion_tokens = len(tok(out, add_special_tokens=False)["input_ids"])
        length = not stopped and made >= options.get("max_new_tokens", 0)
        return {
            "text": out,
            "finish_reason": "length" if length else "stop",
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }

    def _stream(
        self, pipe: Any, image: Any, prompt: str, stops: list[str], emit: Any, options: dict[str, Any]
    ) -> dict[str, Any]:
        """Stream one completion: each piece of text goes to `emit` as it is generated (cut at the stop
        strings, stripped at both ends, as `_finished` cuts the whole text)."""
        from blip2.serve.chat import StopCut

        cutter, pieces = StopCut(stops), []
        for piece in pipe.stream(image, prompt, **options):
            pieces.append(piece)
            out = cutter.feed(piece)
            if out:
                emit(out)
        out = cutter.finish()
        if out:
            emit(out)
        done = self._finished(pipe, prompt, "".join(pieces).strip(), stops, options)
        return {**done, "text": cutter.text}


def _page() -> str:
    return resources.files("blip2.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(
    pipelines: Sequence[Any],
    settings: ServerSettings | None = None,
    *,
    index: Any = None,
    model_name: str | None = None,
    api_key: str | None = None,
) -> Any:
    """The FastAPI application serving `pipelines` (a stage-2 one for caption/ask, a stage-1 one for
    match/search; either or both). Closing the app's lifespan stops its batcher thread.

    Args:
        index: a `blip2.index.Index` that `GET /search` searches, with the retriever among `pipelines`
            that it was built with (another is refused, `UserError`).
        model_name: the name `/v1/` gives the captioner and requests must use (default "blip2").
        api_key: the bearer token every request but `GET /` must send; None: no token.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response, StreamingResponse

    from blip2.pipelines.captioner import ASK_DEFAULTS, CAPTION_DEFAULTS, check_generation_options
    from blip2.serve import chat
    from blip2.serve.access import AccessLog, BearerAuth, error_body
    from blip2.serve.thumbnails import ServerBusy, ThumbnailCache, Unreadable, make_thumbnail

    settings = settings or ServerSettings()
    models = Models(pipelines, index)
    model_name = model_name or "blip2"
    thumbnails = ThumbnailCache()
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
    # the last added runs first: the log sees every answer, the key is checked before the body is read
    app.add_middleware(BodyLimit, max_bytes=max_bytes, limit_mb=settings.max_upload_mb)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    app.add_middleware(AccessLog)

    class HTTPProblem(Exception):
        def __init__(self, status: int, detail: str, code: str | None = None):
            self.status, self.detail, self.code = status, detail, code

    def problem(request: Request, status: int, message: str, code: str | None = None) -> Response:
        """An error answer in the shape of the route's API (OpenAI's under /v1/)."""
        body = error_body(request.url.path, status, message, code)
        return Response(body, status_code=status, media_type="application/json")

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem) -> Response:
        return problem(request, exc.status, exc.detail, exc.code)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> Response:
        if isinstance(exc, chat.ModelNotFound):
            return problem(request, 404, str(exc), "model_not_found")
        if isinstance(exc, Unreadable):
            return problem(request, 404, str(exc))
        return problem(request, 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return problem(request, 400, invalid_field(exc.errors()))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error in %s", request.url.path)
        return problem(request, 500, f"internal error ({type(exc).__name__}); see the server log")

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
        return await decode_files([await read_upload(u) for u in uploads], deadline, hold)

    async def decode_files(files: list[tuple[str, bytes]], deadline: float, hold: Hold) -> list[Any]:
        """Decode (name, bytes) images off the event loop, as `read_images`."""
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
        job = start(group, payload)
        try:
            return await asyncio.wait_for(job.result, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise too_slow() from None
        finally:
            batcher.cancel(job.job)  # timed out or the client went away: never run it (no-op once started)

    def start(group: tuple[Any, ...], payload: Any, on_done: Any = None) -> Any:
        """Queue a job; its result (or error) comes back as a future of this event loop. `on_done()`
        is called in the batcher's thread once it has run (never when it is cancelled before)."""
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
            batcher.submit(job)
        except QueueFull as e:
            raise HTTPProblem(503, f"the server is busy ({e}); try again in a moment") from None
        return SimpleNamespace(job=job, result=future)

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
        """Liveness and what the server does (`model`: the name `/v1/` serves, `index`: the images `GET
        /search` searches); `requests` / `batches` count the work batched so far, `pixels_in_flight` the
        decoded pixels the requests in flight hold (`max_server_pixels`)."""
        return {
            "status": "ok",
            "methods": sorted(models.by_method),
            "model": model_name if "ask" in models.by_method else None,
            "index": None if index is None else len(index),
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

    @app.get("/search")
    async def search_index(
        q: Annotated[str, Query(description="the text to search for")] = "",
        top_k: Annotated[int, Query()] = 10,
        rerank: Annotated[int, Query(description="the best by ITC re-ranked by ITM")] = 32,
    ) -> Response:
        """Rank the images of the server's index (`--index`) for a text, as `Index.search` (and
        `blip2 search --index`) ranks them; each hit names its thumbnail (`/thumbnail/{n}`)."""
        deadline = time.monotonic() + settings.timeout_s
        if index is None:
            raise HTTPProblem(
                400, "this server has no index: start it with --index, or POST the images to /search"
            )
        if not q.strip():
            raise HTTPProblem(400, "the query is empty: type some words")
        text_at_most("the query", [q], "shorten it")
        if not 1 <= top_k <= settings.max_items or not 0 <= rerank <= settings.max_items:
            raise HTTPProblem(
                400,
                f"top_k must be between 1 and {settings.max_items} and rerank between 0 and {settings.max_items}",
            )
        query = {"query": q, "top_k": top_k, "rerank": rerank, "max_pixels": settings.max_pixels}
        hits = await submit(("index", (), object()), query, deadline)  # never batched
        results = [
            {
                "rank": rank,
                "index": h.index,
                "path": index.paths[h.index],
                "score": h.score,
                "itm": h.itm,
                "itc": h.itc,
                "thumbnail": f"/thumbnail/{h.index}",
            }
            for rank, h in enumerate(hits, 1)
        ]
        # paths are kept exactly: names that are not UTF-8 travel as JSON \udcxx escapes
        return Response(json.dumps({"query": q, "results": results}), media_type="application/json")

    @app.get("/thumbnail/{n}", response_class=Response)
    async def thumbnail(n: int) -> Response:
        """A JPEG, at most 256 pixels a side, of the index's image at position `n` (a search hit's
        `index`); only the index's images are ever read."""
        deadline = time.monotonic() + settings.timeout_s
        if index is None or not 0 <= n < len(index):
            raise HTTPProblem(404, f"the index has no image {n}")
        data = thumbnails.get(n)
        if data is None:
            path, member = index.source(n)
            work = asyncio.get_running_loop().run_in_executor(
                decoder, make_thumbnail, path, member, settings.max_pixels, budget
            )
            try:
                data = await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise too_slow() from None
            except ServerBusy as e:
                raise HTTPProblem(503, f"{e}; try again in a moment") from None
            thumbnails.put(n, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The model `/v1/chat/completions` serves (OpenAI's list of models)."""
        served = [model_name] if "ask" in models.by_method else []
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "blip2"} for m in served],
        }

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_name or "ask" not in models.by_method:
            raise HTTPProblem(404, f"the model {name!r} does not exist here", "model_not_found")
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "blip2"}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        """OpenAI's chat completions over the captioner: one image (a base64 data URL), the conversation
        as `Captioner.chat` reads it; `stream: true` answers with server-sent events."""
        deadline = time.monotonic() + settings.timeout_s
        models.pipe("ask")
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise HTTPProblem(400, "the request body is not JSON") from None
        req = chat.parse_request(body, model_name)
        at_most("the number of earlier turns", len(req.history), settings.max_history_turns)
        text_at_most("the text of the messages", req.texts(), "send a shorter conversation")
        if req.question is None:
            defaults = dict(CAPTION_DEFAULTS)
        else:
            is_t5 = models.pipe("ask").model.is_encoder_decoder
            defaults = {**ASK_DEFAULTS, "length_penalty": -1.0 if is_t5 else 0.0}
        given = {**req.sampling, "max_new_tokens": req.max_tokens}
        if req.stream:  # as `Captioner.stream`: the defaults' lengths, one beam
            most = 10 if req.question is not None else 30
            defaults = {"max_new_tokens": most, "min_new_tokens": 1}
            given["num_beams"] = 1
        group = options(defaults, given)
        payload = (req.question, req.history, req.stop)
        files = [("the image", req.image)]
        if not req.stream:
            async with decoded_files(files, deadline) as [pil]:
                done = await submit(("chat", group), (pil, *payload), deadline)
            return chat.completion(
                model_name,
                done["text"],
                done["finish_reason"],
                done["prompt_tokens"],
                done["completion_tokens"],
            )
        return await stream_completion(group, payload, files, deadline, req.include_usage)

    @asynccontextmanager
    async def decoded_files(files: list[tuple[str, bytes]], deadline: float):  # noqa: ANN202
        """`decoded` for images already read (name, bytes)."""
        hold = Hold(budget)
        try:
            yield await decode_files(files, deadline, hold)
        finally:
            hold.end()

    async def stream_completion(
        group: tuple[Any, ...],
        payload: tuple[Any, ...],
        files: list[tuple[str, bytes]],
        deadline: float,
        usage: bool,
    ) -> StreamingResponse:
        """A chat completion as server-sent events. The image is decoded, the job queued and its first
        piece of text awaited before the answer starts, so that what fails before generation (a bad
        image, a prompt too long, a full queue, the timeout) gets its status; then each piece is a
        `chat.completion.chunk` as the batcher thread generates it, the last one saying why it ended
        (an error after the start is an `{"error": ...}` event), then `data: [DONE]`."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        hold = Hold(budget)
        released = threading.Lock()

        def release() -> None:  # once: when the job has run, or when it is cancelled before it runs
            if released.acquire(blocking=False):
                hold.end()

        def emit(piece: str) -> None:  # in the batcher's thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        try:
            [pil] = await decode_files(files, deadline, hold)
            job = start(("stream", group, object()), (pil, *payload, emit), on_done=release)  # never batched
        except BaseException:
            release()
            raise
        result = asyncio.ensure_future(job.result)
        getter = asyncio.ensure_future(pieces.get())

        async def wait() -> bool:
            """Until a piece or the result comes (False: the request's time is over)."""
            left = max(0.0, deadline - time.monotonic())
            finished, _ = await asyncio.wait(
                {getter, result}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            return bool(finished)

        def stop() -> None:
            getter.cancel()
            batcher.cancel(job.job)
            if job.job.cancelled:  # it never ran: its `on_done` never comes
                release()

        try:
            if not await wait():
                raise too_slow()
            if not getter.done() and result.exception() is not None:
                raise result.exception()  # type: ignore[misc]
        except BaseException:
            stop()
            raise
        chat_id = chat.new_id()

        def event(data: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(data)}\n\n".encode()

        def text(piece: str) -> bytes:
            return event(chat.chunk(chat_id, model_name, {"content": piece}))

        async def events() -> Any:
            nonlocal getter
            try:
                yield event(chat.chunk(chat_id, model_name, {"role": "assistant", "content": ""}))
                while True:
                    if getter.done():
                        yield text(getter.result())
                        getter = asyncio.ensure_future(pieces.get())
                    elif result.done():
                        getter.cancel()
                        while not pieces.empty():  # emitted before the result was set
                            yield text(pieces.get_nowait())
                        error = result.exception()
                        if error is not None:
                            failed = isinstance(error, UserError)
                            message = str(error) if failed else f"internal error ({type(error).__name__})"
                            yield event(chat.error(message, 400 if failed else 500))
                            break
                        done = result.result()
                        yield event(chat.chunk(chat_id, model_name, {}, done["finish_reason"]))
                        if usage:
                            counts = chat.usage(done["prompt_tokens"], done["completion_tokens"])
                            yield event(chat.chunk(chat_id, model_name, None, usage=counts))
                        break
                    elif not await wait():
                        yield event(chat.error(too_slow().detail, 504, "timeout"))
                        break
                yield b"data: [DONE]\n\n"
            finally:
                stop()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return app
