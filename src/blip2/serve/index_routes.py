"""Search over the server's index (`blip2 serve --index`): `GET /search?q=` ranks the indexed images
for a text as `Index.search` (and `blip2 search --index`) ranks them, and `GET /thumbnail/{n}` shows
the image at position `n` of the index (`blip2.serve.thumbnails`). Only the index's images are ever
read, by position, never from a path a request names.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime

import asyncio
import json
import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from blip2.serve.service import HTTPProblem, ServiceDep
from blip2.serve.thumbnails import ServerBusy, make_thumbnail

router = APIRouter()


@router.get("/search")
async def search_index(
    service: ServiceDep,
    q: Annotated[str, Query(description="the text to search for")] = "",
    top_k: Annotated[int, Query()] = 10,
    rerank: Annotated[int, Query(description="the best by ITC re-ranked by ITM")] = 32,
) -> Response:
    """Rank the images of the server's index (`--index`) for a text, as `Index.search` (and
    `blip2 search --index`) ranks them; each hit names its thumbnail (`/thumbnail/{n}`)."""
    deadline = service.deadline()
    index = service.index
    if index is None:
        raise HTTPProblem(
            400, "this server has no index: start it with --index, or POST the images to /search"
        )
    if not q.strip():
        raise HTTPProblem(400, "the query is empty: type some words")
    service.text_at_most("the query", [q], "shorten it")
    service.check_ranks(top_k, rerank)
    query = {"query": q, "top_k": top_k, "rerank": rerank, "max_pixels": service.settings.max_pixels}
    hits = await service.submit(("index", (), object()), query, deadline)  # never batched
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


@router.get("/thumbnail/{n}", response_class=Response)
async def thumbnail(service: ServiceDep, n: int) -> Response:
    """A JPEG, at most 256 pixels a side, of the index's image at position `n` (a search hit's
    `index`); only the index's images are ever read."""
    deadline = service.deadline()
    index = service.index
    if index is None or not 0 <= n < len(index):
        raise HTTPProblem(404, f"the index has no image {n}")
    data = service.thumbnails.get(n)
    if data is None:
        path, member = index.source(n)
        work = asyncio.get_running_loop().run_in_executor(
            service.decoder, make_thumbnail, path, member, service.settings.max_pixels, service.budget
        )
        try:
            data = await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise service.too_slow() from None
        except ServerBusy as e:
            raise HTTPProblem(503, f"{e}; try again in a moment") from None
        service.thumbnails.put(n, data)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
