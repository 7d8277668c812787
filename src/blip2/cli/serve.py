"""`blip2 serve --model M [--model M2] [--index INDEX] [--host H] [--port P] [--api-key KEY]`: the HTTP
API, its OpenAI-compatible `/v1/chat/completions` and the web page.

Give a stage-2 checkpoint for caption and ask (and `/v1/chat/completions`, under the name given to
`--model`), a stage-1 one for match and search, or one of each. `--index` adds `GET /search` over an
index (`blip2 index build`), with the retriever it was built with: the `--model` given, or else the
model the index records. Binds to 127.0.0.1 unless told otherwise; another address needs `--api-key`
(or `BLIP2_API_KEY`), or `--insecure` to serve it to anyone who reaches it. Each request is logged in
one line on stderr. See `blip2.serve.app` for the endpoints.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from typing import Any

from blip2.cli import options
from blip2.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        help="hub id or path of a checkpoint; repeat to serve a captioner and a retriever together",
    )
    parser.add_argument(
        "--index", help="an index (`blip2 index build`) to search with GET /search (default model: its own)"
    )
    options.add_device_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--api-key",
        default=None,
        help="a bearer token every request but the page must send (default: $BLIP2_API_KEY; none)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve an address other than loopback without --api-key (anyone who reaches it may use it)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (default 20 MB)")
    options.add_max_pixels(parser)
    parser.add_argument(
        "--max-request-pixels",
        type=int,
        default=100_000_000,
        help="most pixels of all the images of one request together (default 100 million: about 300 MB)",
    )
    parser.add_argument(
        "--max-server-pixels",
        type=int,
        default=400_000_000,
        help="most pixels decoded for all the requests in flight together; beyond it a request gets 503 "
        "(default 400 million: about 1.2 GB)",
    )
    parser.add_argument(
        "--max-text-chars",
        type=int,
        default=10_000,
        help="most characters of text in one request, e.g. a question and its history (default 10000)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds before a request gets 504 (default 60)"
    )
    parser.add_argument("--max-batch", type=int, default=8, help="most requests run together (default 8)")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="wait for more requests to batch (default 10 ms)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=256, help="requests allowed to wait; more get 503 (default 256)"
    )


def check_port(host: str, port: int) -> None:
    """Refuse, before any model loads, a port out of range or one another program listens on."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, not {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host} is not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(
                    f"port {port} on {host} is already in use: stop what listens there or give another --port"
                ) from None
            raise UserError(
                f"cannot listen on {host}:{port} ({e.strerror}): give another --host or --port"
            ) from None


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def access_log() -> None:
    """The access log (`blip2.serve.access`) on stderr, one line a request, with the time."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log = logging.getLogger("blip2.serve.access")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def load_models(args: argparse.Namespace) -> tuple[list[Any], Any]:
    """The pipelines of `--model`, and the index of `--index` (None without), with its retriever
    loaded from the model it records when `--model` gives none."""
    from blip2.pipelines import Retriever

    pipes = [
        options.load_pipeline(m, args.device, args.dtype, **options.load_options(args))
        for m in args.model or []
    ]
    if args.index is None:
        return pipes, None
    from blip2.index import Index

    index = Index.open(args.index)
    if not any(isinstance(p, Retriever) for p in pipes):
        recorded = index.store.meta["model"]
        try:
            pipes.append(
                options.load_pipeline(
                    recorded, args.device, args.dtype, method="search", **options.load_options(args)
                )
            )
        except UserError as e:
            raise UserError(
                f"{str(e).rstrip('.')} (the model {args.index} records): give it with --model"
            ) from None
    index.faiss_index()  # built now (when missing or stale), not on the first query
    return pipes, index


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UserError("the server needs its extras: pip install 'blip2[serve]'") from None
    from blip2.serve import ServerSettings, create_app

    if not args.model and args.index is None:
        raise UserError("give the model to serve (--model), an index to search (--index), or both")
    api_key = args.api_key or os.environ.get("BLIP2_API_KEY") or None
    if not api_key and not args.insecure and not is_loopback(args.host):
        raise UserError(
            f"--host {args.host} lets other machines in: give --api-key (or BLIP2_API_KEY), "
            "or --insecure to serve it without one"
        )
    check_port(args.host, args.port)

    pipes, index = load_models(args)
    settings = ServerSettings(
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        max_request_pixels=args.max_request_pixels,
        max_server_pixels=args.max_server_pixels,
        max_text_chars=args.max_text_chars,
        timeout_s=args.timeout,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
    )
    from blip2.pipelines import Captioner

    names = [m for m, p in zip(args.model or [], pipes, strict=False) if isinstance(p, Captioner)]
    name = names[0].rstrip("/") if names else None
    app = create_app(pipes, settings, index=index, model_name=name, api_key=api_key)
    methods = sorted({m for p in pipes for m in p.methods} & {"caption", "ask", "match", "search"})
    extra = f", {len(index)} indexed images" if index is not None else ""
    extra += f", /v1/chat/completions as {name!r}" if name else ""
    extra += ", API key required" if api_key else ""
    print(
        f"serving {', '.join(methods)}{extra} on http://{args.host}:{args.port}/ (API docs at /docs)",
        file=sys.stderr,
    )
    access_log()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=5)
    return 0
