"""Who may call the server and what it answered: the bearer token (`--api-key`) and the access log, both
ASGI middleware around the app (see `blip2.serve.app`)."""

import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

access_logger = logging.getLogger("blip2.serve.access")

OPEN_PATHS = frozenset({"/"})  # the web page's HTML: it asks for the key and sends it itself


def error_body(path: str, status: int, message: str, code: str | None = None) -> bytes:
    """An error in the shape the route's clients read: OpenAI's under /v1/, `{"detail": ...}` elsewhere."""
    from blip2.serve.chat import error

    body = error(message, status, code) if path.startswith("/v1/") else {"detail": message}
    return json.dumps(body).encode()


class BearerAuth:
    """Every request but `GET /` needs `Authorization: Bearer <key>`; others get 401."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or (scope["path"] in OPEN_PATHS and scope["method"] in ("GET", "HEAD")):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        message = (
            "the API key is missing: send the header Authorization: Bearer <key>"
            if not given
            else "the API key is not valid"
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"www-authenticate", b'Bearer realm="blip2"'),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send(
            {"type": "http.response.body", "body": error_body(scope["path"], 401, message, "invalid_api_key")}
        )


class AccessLog:
    """One line per request on the `blip2.serve.access` logger (INFO), once its answer is sent:
    `client method path status latency`. The path is logged without its query string (a search's text
    stays out of the log); the latency runs to the last byte (a stream's end)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]  # what the client gets when the app fails before answering

        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            host, port = scope.get("client") or ("-", 0)
            ms = (time.perf_counter() - start) * 1000
            access_logger.info(
                "%s:%s %s %s %d %.1f ms", host, port, scope["method"], scope["path"], status[0], ms
            )
