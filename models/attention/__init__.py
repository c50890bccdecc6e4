"""Registry of attention variants: `model.attention.kind` -> Attention subclass.

Variants register themselves with the `@register` class decorator (models/attention/base.py);
importing this package imports the built-in ones. A plugin module registers its own when
imported (`plugins=[pkg.module]`, or the `lra_bench.plugins` entry-point group: lra.plugins).
"""

from __future__ import annotations

import importlib
import pkgutil

from lra.models.attention.base import (REGISTRY, Attention, AttentionConfig, DistanceBias,
                                       ExactSoftmax, TokenMixer, register)
from lra.registry import lookup

# Every module of this package is imported, so a built-in variant is its file alone (no list to
# edit); the kinds they register, before any plugin's, are BUILTIN.
for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):  # noqa: F821
    importlib.import_module(f"{__name__}.{_module}")
BUILTIN = frozenset(REGISTRY)


def get(kind: str) -> type[Attention]:
    return lookup(REGISTRY, kind, "attention kind", "a plugin's kind needs plugins=[its.module]")


def config_class(kind: str) -> type[AttentionConfig]:
    return get(kind).config_cls


__all__ = ["REGISTRY", "Attention", "AttentionConfig", "DistanceBias", "ExactSoftmax", "TokenMixer",
           "config_class", "get", "register"]
