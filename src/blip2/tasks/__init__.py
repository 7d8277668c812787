"""Objectives: a task is a model plus its losses, the module DDP wraps (`base.Task`).

* `stage1.py`: ITC + ITM + ITG on a `RetrievalModel`: `Stage1Task` (task `stage1`), `RetrievalTask`
  (`retrieval`);
* `stage2.py`: the LM loss on a `LanguageBridge`: `Stage2Task` (task `stage2`), `CaptionTask`
  (`caption`), `VQATask` (`vqa`);
* `registry.py`: task names -> task types; `register` adds one (the training loop needs no change).

Importing this package does not import torch; the task types are imported where they are used.
"""

from blip2.tasks.registry import get, names, register

__all__ = ["get", "names", "register"]
