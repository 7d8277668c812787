"""The HTTP API: FastAPI endpoints over a loaded `Captioner`, `Retriever` or both, with server-side
batching. `create_app` builds the application: its shared state (`blip2.serve.service.Service`), the
middleware (body limit, API key, access log), the error answers and the routes, which live in

```
blip2.serve.routes          GET / (the web page), /health; POST /caption, /ask, /match, /search
blip2.serve.index_routes    GET /search over the server's index, /thumbnail/{n}
blip2.serve.openai_routes   POST /v1/chat/completions, GET /v1/models (OpenAI's API)
```

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

With an API key (`create_app(api_key=...)`, `blip2 serve --api-key`) every request but `GET /` (the
page, which asks for the key) needs `Authorization: Bearer <key>` (401 otherwise). Each request is
logged in one line on the `blip2.serve.access` logger (`blip2.serve.access.AccessLog`), refused ones and
streams included. Errors are `{"detail": sentence}`, and OpenAI's `{"error": {"message": ...}}` under
`/v1/`.

Batching: requests go to one `Batcher` thread that owns the models. It takes the first waiting job,
waits up to `batch_wait_ms` for more jobs of the same kind (and the same generation options), and runs
them as one batch: concurrent users share a forward pass, and each gets exactly the answer a lone
request would (each request is checked on its own first, so one bad request fails alone).

Limits (`ServerSettings`): request bodies over `max_upload_mb` are refused with 413 (counted as they
arrive when there is no Content-Length); images over `max_pixels` with 400, the images of one request
over `max_request_pixels` together with 400 (read from the image headers, before anything is decoded);
a request finding `max_server_pixels` already decoded or decoding for the requests in flight with 503
(before decoding; its pixels count until it is answered); more than `max_items` images or texts in one
request, more than `max_history_turns` turns and more than `max_text_chars` characters of text with
400; a request finding `max_queue` requests already waiting with 503; and requests that take longer
than `timeout_s` (decoding their images included) with 504 (their job is cancelled: it never runs).
Generation options are checked before anything is queued (`max_new_tokens` at most the server's,
numbers finite). User errors are one sentence, never a traceback. `/v1/chat/completions` goes through
the same limits: its JSON body counts as an upload, its image as an uploaded image, its messages as a
conversation (`max_history_turns`, `max_text_chars`, and at most `max_items` messages and parts of a
message); its `max_tokens` above the server's `max_new_tokens` counts as it.

The event loop only receives and answers: images are decoded in a small thread pool, and /ask's
conversation is tokenized in the batcher thread, so a large image or a long conversation never holds
up `/health` or the other requests.
"""

import logging
from collections.abc import Sequence
from typing import Any

from blip2.errors import UserError
from blip2.serve.limits import ServerSettings

logger = logging.getLogger("blip2.serve")


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
    # FastAPI is the `serve` extra: imported when an app is made, not with `blip2.serve`
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response

    from blip2.serve import index_routes, openai_routes, routes
    from blip2.serve.access import AccessLog, BearerAuth, error_body
    from blip2.serve.chat import ModelNotFound
    from blip2.serve.limits import BodyLimit, invalid_field
    from blip2.serve.service import HTTPProblem, Service
    from blip2.serve.thumbnails import Unreadable

    settings = settings or ServerSettings()
    service = Service(pipelines, settings, index, model_name or "blip2")

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        service.close()

    app = FastAPI(
        title="BLIP-2",
        description="Captions, answers, image-text matching and search with a BLIP-2 model.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.batcher = service.batcher
    app.state.pixel_budget = service.budget
    app.state.settings = settings
    # the last added runs first: the log sees every answer, the key is checked before the body is read
    app.add_middleware(BodyLimit, max_bytes=service.max_bytes, limit_mb=settings.max_upload_mb)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    app.add_middleware(AccessLog)

    def problem(request: Request, status: int, message: str, code: str | None = None) -> Response:
        """An error answer in the shape of the route's API (OpenAI's under /v1/)."""
        body = error_body(request.url.path, status, message, code)
        return Response(body, status_code=status, media_type="application/json")

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem) -> Response:
        return problem(request, exc.status, exc.detail, exc.code)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> Response:
        if isinstance(exc, ModelNotFound):
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

    app.include_router(routes.router)
    app.include_router(index_routes.router)
    app.include_router(openai_routes.router)
    return app
