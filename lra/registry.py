"""One lookup for the name -> class registries (attention kinds, tasks): unknown names fail at
start-up in one line that lists what exists."""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str, hint: str) -> T:
    """registry[name], or ValueError "unknown <what> 'name'; known: a, b (<hint>)"."""
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))} "
                         f"({hint})")
    return registry[name]
