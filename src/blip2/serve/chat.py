"""The OpenAI-compatible chat endpoint's side of things: a `POST /v1/chat/completions` body read into
what a `Captioner` runs, and its answer written as OpenAI writes one (see `blip2.serve.openai_routes`).

A BLIP-2 model sees one image and answers in its own prompt format, so a conversation maps onto
`Captioner.chat`: the one image (a base64 `data:` URL in a user message), the last user message's text
as the question and the earlier user/assistant pairs as its history (a pair whose user message has no
text, the image alone answered by its caption, is left out). A request whose last user message has no
text captions the image (`Captioner.caption`). System and developer messages are ignored (BLIP-2
has no system prompt). Refused with one sentence: more or fewer than one image, remote image URLs (the
server fetches nothing), tools, `n` other than 1, more messages (or parts of one message) than the
server's `max_items`, and the options listed in `NEUTRAL` unless they have their neutral value.

Generation: without `temperature` or `top_p`, the model's defaults (`/ask`'s beam search, or
`/caption`'s); `temperature` 0 is greedy search; `temperature` above 0 (or `top_p` below 1) samples.
A stream is greedy unless it samples (beam search knows its text only at the end). `max_tokens` (or
`max_completion_tokens`) is the most new tokens; above the server's `max_new_tokens` it counts as that
(the route clamps it; `length_error` says so when it does not fit the model). `stop` cuts the text at the
first of its strings (the model has generated it; it is not sent).
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from blip2.errors import UserError

MAX_STOPS = 4  # as OpenAI
# accepted and ignored: they change nothing in what the model generates
IGNORED = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "stream_options",
    "reasoning_effort",
)
# accepted only with the value that changes nothing (OpenAI's default)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
}
HANDLED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop")
HANDLED += ("stream",)


class ModelNotFound(UserError):
    """A request for another model than the one served (404, as OpenAI answers)."""


@dataclass
class ChatRequest:
    """A chat completion request as the server runs it.

    Attributes:
        image: the bytes of the conversation's image (decoded later, within the server's limits).
        question: the last user message's text; None: caption the image.
        history: the earlier (user text, assistant text) turns.
        sampling: the generation options the request sets (`generation_options` adds the defaults).
        max_tokens: the request's `max_tokens` (or `max_completion_tokens`), as given (the server
            clamps it to its `max_new_tokens`); None: the model's default.
        stop: strings that end the text.
        stream: answer as server-sent events.
        include_usage: a stream's last chunk carries the token counts (`stream_options`).
    """

    image: bytes
    question: str | None
    history: list[tuple[str, str]]
    sampling: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    def texts(self) -> list[str]:
        return [self.question or "", *(t for turn in self.history for t in turn)]


def _number(body: dict[str, Any], name: str, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise UserError(f"{name} must be {kind} between {low:g} and {high:g}, not {value!r}")
    return value


def _check_options(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if name in HANDLED or name in IGNORED:
            continue
        if name in NEUTRAL:
            if value is None or value in NEUTRAL[name]:
                continue
            raise UserError(f"{name} is not supported by this server: leave it out")
        raise UserError(
            f"{name} is not supported by this server: leave it out (see the README's Server section)"
        )


def _image_bytes(url: Any) -> bytes:
    """The bytes of a base64 `data:` URL."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise UserError('an image_url part needs {"url": "data:image/jpeg;base64,..."}')
    if url.startswith(("http://", "https://")):
        raise UserError(
            "the server fetches nothing: send the image as a base64 data URL (data:image/jpeg;base64,...)"
        )
    head, comma, data = url.partition(",")
    if not url.startswith("data:") or not comma or not head.endswith(";base64"):
        raise UserError("an image URL must be a base64 data URL (data:image/jpeg;base64,...)")
    try:
        image = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("the image's data URL is not valid base64") from None
    if not image:
        raise UserError("the image's data URL is empty")
    return image


def _message_parts(message: Any, index: int, max_parts: int) -> tuple[str, list[str], list[Any]]:
    """A message's role, its texts and its `image_url` values (not yet decoded)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise UserError(f'messages[{index}] must be an object like {{"role": "user", "content": ...}}')
    role, content = message["role"], message.get("content")
    if role not in ("system", "developer", "user", "assistant"):
        raise UserError(
            f"messages[{index}] has the role {role!r}; this server reads user and assistant messages"
        )
    if message.get("tool_calls") or message.get("function_call"):
        raise UserError("tool calls are not supported by this server")
    if content is None:
        return role, [], []
    if isinstance(content, str):
        return role, [content], []
    if not isinstance(content, list):
        raise UserError(f"messages[{index}].content must be a string or a list of parts")
    if len(content) > max_parts:
        raise UserError(
            f"the number of parts of messages[{index}] is {len(content)}, more than the limit of "
            f"{max_parts}: join its texts"
        )
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise UserError(f'messages[{index}] has a text part without a string "text"')
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise UserError(
                    f"messages[{index}] is an {role} message with an image: send images from the user"
                )
            images.append(part.get("image_url"))
        else:
            raise UserError(
                f"messages[{index}] has a part of type {kind!r}; this server reads text and image_url parts"
            )
    return role, texts, images


def parse_request(body: Any, model_name: str, max_items: int) -> ChatRequest:
    """Read a `/v1/chat/completions` body (`UserError` with one sentence for what it cannot serve;
    `ModelNotFound` for another model); `max_items`: the most messages, and parts of one message."""
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise UserError(f'model is missing: send "model": "{model_name}"')
    if model != model_name:
        raise ModelNotFound(f"the model {model!r} does not exist here: this server serves {model_name!r}")
    _check_options(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a list of at least one message")
    if len(messages) > max_items:
        raise UserError(
            f"the number of messages is {len(messages)}, more than the limit of {max_items}: "
            "send a shorter conversation"
        )

    turns: list[tuple[str, list[str]]] = []  # (role, texts): consecutive messages of a role joined
    images: list[Any] = []  # the image_url values, decoded once there is exactly one
    for i, message in enumerate(messages):
        role, texts, found = _message_parts(message, i, max_items)
        images += found
        if role in ("system", "developer"):
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(texts)
        else:
            turns.append((role, list(texts)))
    if len(images) != 1:
        raise UserError(
            f"the messages hold {len(images)} images; this server reads exactly one image per request "
            "(a base64 data URL in a user message)"
        )
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise UserError("the conversation must start and end with a user message")
    said = [" ".join(t.strip() for t in texts if t.strip()) for _, texts in turns]
    # an earlier turn without a question (the image alone, answered by its caption) is left out, as the
    # web page leaves the caption out of the conversation it sends to /ask
    history = [(q, a) for q, a in zip(said[:-1:2], said[1:-1:2], strict=True) if q]

    if body.get("n") not in (None, 1):
        raise UserError(f"n must be 1, not {body['n']!r}: this server answers with one choice")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        stops = []
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) and s for s in stops)
        or len(stops) > MAX_STOPS
    ):
        raise UserError(f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings")
    most = body.get("max_completion_tokens")
    most = body.get("max_tokens") if most is None else most
    if most is not None:
        if isinstance(most, bool) or not isinstance(most, int) or most < 1:
            raise UserError(f"max_tokens must be a whole number, 1 or more, not {most!r}")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        raise UserError("top_p must be more than 0")
    sampling: dict[str, Any] = {}
    if (temperature is not None and temperature > 0) or (
        temperature is None and top_p is not None and top_p < 1
    ):
        sampling = {"do_sample": True, "num_beams": 1, "temperature": float(temperature or 1.0)}
        if top_p is not None:
            sampling["top_p"] = float(top_p)
    elif temperature == 0:
        sampling = {"num_beams": 1}
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise UserError("stream must be true or false")
    if stream:
        sampling.setdefault("num_beams", 1)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise UserError('stream_options must be an object like {"include_usage": true}')
    return ChatRequest(
        image=_image_bytes(images[0]),
        question=said[-1] or None,
        history=history,
        sampling=sampling,
        max_tokens=most,
        stop=list(stops),
        stream=stream,
        include_usage=bool(stream_options.get("include_usage")),
    )


def length_error(message: str, max_tokens: int | None, used: int) -> str:
    """A generation-length error (`Captioner.check_generation_length`, which names the
    `max_new_tokens={used}` generated) in the request's terms: its `max_tokens`, and the server's
    clamp or default when `used` is not what it asked for."""
    if max_tokens is None:
        said = f"max_tokens={used} (the default)"
    elif max_tokens != used:
        said = f"max_tokens={max_tokens} (counted as {used}, this server's most)"
    else:
        said = f"max_tokens={used}"
    return message.replace(f"max_new_tokens={used}", said, 1)


class StopCut:
    """Text as it streams, cut at the first stop string and stripped as `Captioner.generate` strips:
    `feed` returns what can be sent now, holding back trailing whitespace and what may begin a stop
    string; `stopped` once one was seen (what follows is dropped)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held, self.stopped, self.text = "", False, ""

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        held = self.held + piece
        if not self.text:  # nothing sent yet: the text starts at its first non-space
            held = held.lstrip()
        ends = [held.find(s) for s in self.stops if s in held]
        if ends:
            self.stopped = True
            held = held[: min(ends)].rstrip()
            self.held = ""
            return self._out(held)
        keep = len(held) - len(held.rstrip())  # trailing whitespace: it may be the end
        for s in self.stops:  # the longest tail that begins a stop string
            for n in range(min(len(s) - 1, len(held)), 0, -1):
                if s.startswith(held[-n:]):
                    keep = max(keep, n)
                    break
        self.held = held[len(held) - keep :]
        return self._out(held[: len(held) - keep])

    def finish(self) -> str:
        """What is left at the end (the held text, less trailing whitespace)."""
        rest, self.held = self.held.rstrip(), ""
        return "" if self.stopped else self._out(rest)

    def _out(self, text: str) -> str:
        self.text += text
        return text


def cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (stripped), and whether one was found."""
    cutter = StopCut(stops)
    out = cutter.feed(text) + cutter.finish()
    return out, cutter.stopped


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A `chat.completion` object."""
    return {
        "id": new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    chat_id: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A `chat.completion.chunk` object (no choices when `delta` is None: the usage chunk)."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    return {
        "id": chat_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }


def error(message: str, status: int, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for a status."""
    kind = {
        401: "authentication_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
