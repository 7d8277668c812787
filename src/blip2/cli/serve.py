"""`blip2 serve --model M [--model M2] [--host H] [--port P]`: the HTTP API and web page.

Give a stage-2 checkpoint for caption and ask (and the web page), a stage-1 one for match and search,
or one of each. Binds to 127.0.0.1 unless told otherwise; see `blip2.serve.app` for the endpoints.
"""

from __future__ import annotations

import argparse
import sys

from blip2.cli import options
from blip2.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="hub id or path of a checkpoint; repeat to serve a captioner and a retriever together",
    )
    options.add_device_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
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


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UserError("the server needs its extras: pip install 'blip2[serve]'") from None
    from blip2.serve import ServerSettings, create_app

    check_port(args.host, args.port)

    pipes = [
        options.load_pipeline(m, args.device, args.dtype, **options.load_options(args)) for m in args.model
    ]
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
    app = create_app(pipes, settings)
    methods = sorted({m for p in pipes for m in p.methods} & {"caption", "ask", "match", "search"})
    print(
        f"serving {', '.join(methods)} on http://{args.host}:{args.port}/ (API docs at /docs)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=5)
    return 0
