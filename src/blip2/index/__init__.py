"""A persistent image index for text-to-image search: built once (resumable, torchrun-sharded), grown
and pruned, searched in milliseconds with ITC candidates from FAISS and the paper's ITM re-ranking.

```python
index = retriever.index(["photos/"], "photos.index")     # build (or resume, or grow) it
index = blip2.index.Index.open("photos.index")            # later
hits = index.search(retriever, "a dog on a beach", top_k=10)
[index.paths[h.index] for h in hits]
```

`store` holds the files and their crash-safe log, `build` fills them, `search` ranks.
"""

from blip2.index.search import Index

__all__ = ["Index"]
