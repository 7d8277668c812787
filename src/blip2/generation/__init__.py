"""Opt-in speed paths of generation, behind one object that owns its state (`Decoding`).

* `decoding.py`: `Decoding`, what `LanguageBridge.generate` asks which way to decode;
* `greedy.py`: the lean greedy loop (stateless functions of an LM);
* `graphs.py`: `GraphCache`, CUDA graphs of a function of one tensor.
"""

from blip2.generation.decoding import Decoding
from blip2.generation.graphs import GraphCache

__all__ = ["Decoding", "GraphCache"]
