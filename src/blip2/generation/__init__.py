"""Opt-in speed paths of generation, behind one object that owns its state (`Decoding`).

* `decoding.py`: `Decoding`, the decode policy and its caches; `Decoding.generate(model, ...)` gives
  what the model's plain `generate` gives, faster;
* `greedy.py`: the lean greedy loop (stateless functions of an LM);
* `beam.py`: beam search with transformers' semantics, the prefix computed once per image;
* `graphs.py`: `GraphCache`, CUDA graphs of a function of one tensor.
"""

from blip2.generation.decoding import Decoding
from blip2.generation.graphs import GraphCache

__all__ = ["Decoding", "GraphCache"]
