"""Tasks: generators for synthetic tasks, readers for released files. `tasks.build(cfg)`."""

from __future__ import annotations

import importlib

from tasks.base import ArrayTask, DataError, TaskConfig, TaskSpec

# name -> ("module:TaskClass", "module:ConfigClass")
REGISTRY: dict[str, tuple[str, str]] = {
    "listops": ("tasks.listops:ListOps", "tasks.listops:ListOpsConfig"),
    "text": ("tasks.text:Text", "tasks.text:TextConfig"),
    "retrieval": ("tasks.retrieval:Retrieval", "tasks.retrieval:RetrievalConfig"),
    "pathfinder": ("tasks.pathfinder:Pathfinder", "tasks.pathfinder:PathfinderConfig"),
    "pathx": ("tasks.pathfinder:Pathfinder", "tasks.pathfinder:PathXConfig"),
    "copy": ("tasks.copy:Copy", "tasks.copy:CopyConfig"),
    "image": ("tasks.image:Image", "tasks.image:ImageConfig"),
}


def _load(path: str):
    module_name, attr = path.split(":")
    return getattr(importlib.import_module(module_name), attr)


def task_class(name: str) -> type[ArrayTask]:
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return _load(REGISTRY[name][0])


def config_class(name: str) -> type[TaskConfig]:
    return _load(REGISTRY[name][1])


def build(cfg: TaskConfig) -> ArrayTask:
    if cfg.name not in REGISTRY:
        raise ValueError(f"unknown task {cfg.name!r}; known: {', '.join(sorted(REGISTRY))}")
    return _load(REGISTRY[cfg.name][0])(cfg)
