"""Objectives: a task is a model plus its losses, the module DDP wraps (`base.Task`).

* `stage1.py`: `Stage1Task`, ITC + ITM + ITG on a `RetrievalModel` (tasks `stage1`, `retrieval`);
* `stage2.py`: `Stage2Task`, the LM loss on a `LanguageBridge` (tasks `stage2`, `caption`, `vqa`);
* `registry.py`: task names -> task types; `register` adds one (the training loop needs no change).

Importing this package does not import torch; the task types are imported where they are used.
"""

from blip2.tasks.registry import get, names, register, unregister

__all__ = ["get", "names", "register", "unregister"]
