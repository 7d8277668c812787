"""Task names -> task types (`blip2.tasks.base.Task` subclasses). No torch import: the config reads
the names, and a built-in type is imported when it is first asked for."""

from __future__ import annotations

import importlib
from typing import Any

# the built-in tasks: the config's task name -> "module:class"
BUILTIN = {
    "stage1": "blip2.tasks.stage1:Stage1Task",
    "retrieval": "blip2.tasks.stage1:RetrievalTask",
    "stage2": "blip2.tasks.stage2:Stage2Task",
    "caption": "blip2.tasks.stage2:CaptionTask",
    "vqa": "blip2.tasks.stage2:VQATask",
    "instruct": "blip2.tasks.instruct:InstructTask",
}
_REGISTERED: dict[str, Any] = {}


def register(name: str, task_type: type) -> None:
    """Make `task_type` (a `Task` subclass) trainable as `task: <name>` in a training config."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in task; register yours under another name")
    _REGISTERED[name] = task_type


def names() -> tuple[str, ...]:
    """Every task name a training config may use."""
    return (*BUILTIN, *_REGISTERED)


def get(name: str) -> Any:
    """The task type trained as `task: <name>`; a `KeyError` for an unknown name."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    module, _, cls = BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), cls)
