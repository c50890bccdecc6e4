"""Tasks: generators for synthetic tasks, readers for released files. `tasks.build(cfg)`.

Tasks register themselves with `@register_task(ConfigClass)` (tasks/base.py); importing this
package imports the built-in ones, a plugin module registers its own (lra.plugins).
"""

from __future__ import annotations

import importlib
import pkgutil

from lra.registry import lookup
from lra.tasks.base import REGISTRY, ArrayTask, DataError, TaskConfig, TaskSpec, register_task

# Every module and sub-package here is imported (a built-in task is its file alone); the tasks
# they register, before any plugin's, are BUILTIN.
for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):  # noqa: F821
    importlib.import_module(f"{__name__}.{_module}")
BUILTIN = frozenset(REGISTRY)


def task_class(name: str) -> type[ArrayTask]:
    return lookup(REGISTRY, name, "task", "a plugin's task needs plugins=[its.module]")[0]


def config_class(name: str) -> type[TaskConfig]:
    task_class(name)
    return REGISTRY[name][1]


def build(cfg: TaskConfig) -> ArrayTask:
    return task_class(cfg.name)(cfg)


__all__ = ["REGISTRY", "ArrayTask", "DataError", "TaskConfig", "TaskSpec", "build",
           "config_class", "register_task", "task_class"]
