"""OpenAI's API over the captioner: `POST /v1/chat/completions`, answered whole or streamed as
server-sent events, and `GET /v1/models`. `blip2.serve.chat` reads a request into what `Captioner.chat`
runs and writes the answers in OpenAI's shapes; these routes put the request through the server's
limits (its JSON body counts as an upload, its image as an uploaded image, its messages as a
conversation) and the batcher, as the other routes do.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime

import asyncio
import json
import threading
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from blip2.errors import UserError
from blip2.pipelines.captioner import CAPTION_DEFAULTS
from blip2.serve import chat
from blip2.serve.limits import Hold
from blip2.serve.service import HTTPProblem, Service, ServiceDep

router = APIRouter()


def _model(service: Service) -> dict[str, Any]:
    return {"id": service.model_name, "object": "model", "created": 0, "owned_by": "blip2"}


@router.get("/v1/models")
async def list_models(service: ServiceDep) -> dict[str, Any]:
    """The model `/v1/chat/completions` serves (OpenAI's list of models)."""
    served = [_model(service)] if "ask" in service.models.by_method else []
    return {"object": "list", "data": served}


@router.get("/v1/models/{name:path}")
async def get_model(service: ServiceDep, name: str) -> dict[str, Any]:
    if name != service.model_name or "ask" not in service.models.by_method:
        raise HTTPProblem(404, f"the model {name!r} does not exist here", "model_not_found")
    return _model(service)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(service: ServiceDep, request: Request) -> Any:
    """OpenAI's chat completions over the captioner: one image (a base64 data URL), the conversation
    as `Captioner.chat` reads it; `stream: true` answers with server-sent events."""
    deadline = service.deadline()
    settings = service.settings
    service.models.pipe("ask")
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):
        raise HTTPProblem(400, "the request body is not JSON") from None
    req = chat.parse_request(body, service.model_name, settings.max_items)
    service.at_most("the number of earlier turns", len(req.history), settings.max_history_turns)
    service.text_at_most("the text of the messages", req.texts(), "send a shorter conversation")
    defaults = dict(CAPTION_DEFAULTS) if req.question is None else service.ask_defaults()
    # max_tokens above the server's most counts as it (OpenAI clients, lmms-eval, ask for 1024 and more)
    most = None if req.max_tokens is None else min(req.max_tokens, settings.max_new_tokens)
    given = {**req.sampling, "max_new_tokens": most}
    if req.stream:  # as `Captioner.stream`: the defaults' lengths, one beam
        defaults = {"max_new_tokens": 10 if req.question is not None else 30, "min_new_tokens": 1}
        given["num_beams"] = 1
    group = service.options(defaults, given)
    payload = (req.question, req.history, req.stop)
    files = [("the image", req.image)]
    try:
        if req.stream:
            return await _stream(service, group, payload, files, deadline, req.include_usage)
        async with service.decoded_files(files, deadline) as [pil]:
            done = await service.submit(("chat", group), (pil, *payload), deadline)
    except UserError as e:  # a generation longer than the model reads: said in the request's terms
        said = chat.length_error(str(e), req.max_tokens, dict(group)["max_new_tokens"])
        if said == str(e):
            raise
        raise UserError(said) from None
    return chat.completion(
        service.model_name,
        done["text"],
        done["finish_reason"],
        done["prompt_tokens"],
        done["completion_tokens"],
    )


async def _stream(
    service: Service,
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
    hold = Hold(service.budget)
    released = threading.Lock()
    model_name = service.model_name

    def release() -> None:  # once: when the job has run, or when it is cancelled before it runs
        if released.acquire(blocking=False):
            hold.end()

    def emit(piece: str) -> None:  # in the batcher's thread
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    try:
        [pil] = await service.decode_files(files, deadline, hold)
        queued = service.start(("stream", group, object()), (pil, *payload, emit), on_done=release)
    except BaseException:
        release()
        raise
    result = asyncio.ensure_future(queued.result)
    getter = asyncio.ensure_future(pieces.get())

    async def wait() -> bool:
        """Until a piece or the result comes (False: the request's time is over)."""
        left = max(0.0, deadline - time.monotonic())
        finished, _ = await asyncio.wait({getter, result}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        return bool(finished)

    def stop() -> None:
        getter.cancel()
        service.batcher.cancel(queued.job)
        if queued.job.cancelled:  # it never ran: its `on_done` never comes
            release()

    try:
        if not await wait():
            raise service.too_slow()
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
                    yield event(chat.error(service.too_slow().detail, 504, "timeout"))
                    break
            yield b"data: [DONE]\n\n"
        finally:
            stop()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
