"""Tasks: generators for synthetic tasks, readers for released files. `tasks.build(cfg)`.

Tasks register themselves with `@register_task(ConfigClass)` (tasks/base.py); importing this
package imports the built-in ones, a plugin module registers its own (lra.plugins).
"""

from __future__ import annotations

import importlib

from lra.registry import lookup
from lra.tasks.base import REGISTRY, ArrayTask, DataError, TaskConfig, TaskSpec, register_task

BUILTIN = ("listops", "text", "retrieval", "pathfinder", "copy", "image", "mqar", "mad")
for _module in BUILTIN:
    importlib.import_module(f"lra.tasks.{_module}")


def task_class(name: str) -> type[ArrayTask]:
    return lookup(REGISTRY, name, "task", "a plugin's task needs plugins=[its.module]")[0]


def config_class(name: str) -> type[TaskConfig]:
    task_class(name)
    return REGISTRY[name][1]


def build(cfg: TaskConfig) -> ArrayTask:
    return task_class(cfg.name)(cfg)


__all__ = ["REGISTRY", "ArrayTask", "DataError", "TaskConfig", "TaskSpec", "build",
           "config_class", "register_task", "task_class"]
