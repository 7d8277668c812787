"""The web page, `/health`, and the routes over uploaded images: caption and ask (a stage-2 model),
match and search (a stage-1 model). Each checks its request's limits, decodes its images within the
pixel budget and queues one job per answer on the batcher (`blip2.serve.service`), so that concurrent
requests of the same kind share a forward pass.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime

import asyncio
import json
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import HTMLResponse

from blip2.pipelines.captioner import CAPTION_DEFAULTS
from blip2.serve.service import HTTPProblem, ServiceDep

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> str:
    return resources.files("blip2.serve").joinpath("page.html").read_text(encoding="utf-8")


@router.get("/health")
async def health(service: ServiceDep) -> dict[str, Any]:
    """Liveness and what the server does (`model`: the name `/v1/` serves, `index`: the images `GET
    /search` searches); `requests` / `batches` count the work batched so far, `pixels_in_flight` the
    decoded pixels the requests in flight hold (`max_server_pixels`)."""
    batcher, methods = service.batcher, service.models.by_method
    return {
        "status": "ok",
        "methods": sorted(methods),
        "model": service.model_name if "ask" in methods else None,
        "index": None if service.index is None else len(service.index),
        "requests": batcher.requests,
        "batches": batcher.batches,
        "largest_batch": batcher.largest_batch,
        "pixels_in_flight": service.budget.used,
    }


@router.post("/caption")
async def caption(
    service: ServiceDep,
    image: Annotated[UploadFile, File(description="the image")],
    prompt: Annotated[str | None, Form(description="text the caption continues")] = None,
    num_beams: Annotated[int | None, Form()] = None,
    max_new_tokens: Annotated[int | None, Form()] = None,
    min_new_tokens: Annotated[int | None, Form()] = None,
    repetition_penalty: Annotated[float | None, Form()] = None,
    length_penalty: Annotated[float | None, Form()] = None,
) -> dict[str, str]:
    """Caption an image."""
    deadline = service.deadline()
    pipe = service.models.pipe("caption")
    text = pipe.config.llm.prompt if prompt is None else prompt
    service.text_at_most("the prompt", [text], "shorten it")
    given = dict(
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty,
        length_penalty=length_penalty,
    )
    group = ("caption", service.options(CAPTION_DEFAULTS, given))
    async with service.decoded([image], deadline) as [pil]:
        return {"caption": await service.submit(group, (pil, text), deadline)}


@router.post("/ask")
async def ask(
    service: ServiceDep,
    image: Annotated[UploadFile, File(description="the image")],
    question: Annotated[str | None, Form(description="the question")] = None,
    history: Annotated[
        str | None, Form(description='earlier turns as JSON: [["question", "answer"], ...]')
    ] = None,
    num_beams: Annotated[int | None, Form()] = None,
    max_new_tokens: Annotated[int | None, Form()] = None,
) -> dict[str, str]:
    """Answer a question about an image, given the earlier turns of the conversation."""
    deadline = service.deadline()
    service.models.pipe("ask")
    if not question or not question.strip():
        raise HTTPProblem(400, "the question is empty: type one")
    turns: list[tuple[str, str]] = []
    if history:
        service.text_at_most("the history", [history], "leave out earlier turns")  # before parsing it
        try:
            pairs = json.loads(history)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            pairs = None
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise HTTPProblem(400, 'history must be JSON like [["question", "answer"], ...]')
        turns = [(str(q), str(a)) for q, a in pairs]
    service.at_most("the number of history turns", len(turns), service.settings.max_history_turns)
    texts = [question, *(t for turn in turns for t in turn)]
    service.text_at_most("the question with its history", texts, "leave out earlier turns")
    given = dict(num_beams=num_beams, max_new_tokens=max_new_tokens)
    group = ("ask", service.options(service.ask_defaults(), given))
    async with service.decoded([image], deadline) as [pil]:
        return {"answer": await service.submit(group, (pil, question, turns), deadline)}


@router.post("/match")
async def match(
    service: ServiceDep,
    image: Annotated[UploadFile, File(description="the image")],
    text: Annotated[list[str], Form(description="one or more texts")],
) -> dict[str, list[float]]:
    """ITM match probability and ITC similarity of the image with each text."""
    deadline = service.deadline()
    service.models.pipe("match")
    service.at_most("the number of texts", len(text), service.settings.max_items)
    if not text or any(not t.strip() for t in text):
        raise HTTPProblem(400, "a text is empty: give some words")
    service.text_at_most("the texts together", text, "send fewer or shorter texts")
    async with service.decoded([image], deadline) as [pil]:
        pairs = await asyncio.gather(*(service.submit(("match", ()), (pil, t), deadline) for t in text))
    return {"itm": [p[0] for p in pairs], "itc": [p[1] for p in pairs]}


@router.post("/search")
async def search(
    service: ServiceDep,
    images: Annotated[list[UploadFile], File(description="the images to rank")],
    query: Annotated[str | None, Form(description="the text to search for")] = None,
    top_k: Annotated[int, Form()] = 10,
    rerank: Annotated[int, Form()] = 16,
) -> dict[str, Any]:
    """Rank the uploaded images for a text query (ITC, then ITM re-ranking of the best)."""
    deadline = service.deadline()
    service.models.pipe("search")
    if not query or not query.strip():
        raise HTTPProblem(400, "the query is empty: type some words")
    service.text_at_most("the query", [query], "shorten it")
    service.at_most("the number of images", len(images), service.settings.max_items)
    service.check_ranks(top_k, rerank)
    async with service.decoded(images, deadline) as pils:
        group = ("search", (("request", id(pils)),))  # never batched
        hits = await service.submit(group, (pils, query, top_k, rerank), deadline)
    return {
        "results": [
            {"index": h.index, "filename": images[h.index].filename, "itc": h.itc, "itm": h.itm} for h in hits
        ]
    }
