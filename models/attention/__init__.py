"""Registry of attention variants: `model.attention.kind` -> Attention subclass.

Variants register themselves with the `@register` class decorator (models/attention/base.py);
importing this package imports the built-in ones. A plugin module registers its own when
imported (`plugins=[pkg.module]`, or the `lra_bench.plugins` entry-point group: lra.plugins).
"""

from __future__ import annotations

import importlib

from lra.models.attention.base import (REGISTRY, Attention, AttentionConfig, DistanceBias,
                                       ExactSoftmax, TokenMixer, register)
from lra.registry import lookup

BUILTIN = ("dense", "flash", "local", "sparse", "longformer", "bigbird", "reformer", "sinkhorn",
           "synthesizer", "linformer", "linear", "performer", "nystrom", "fnet", "lstm", "s4d",
           "lru", "transformer_xl", "h_transformer",
           "adaptive_span", "hyena", "mamba", "retnet", "mamba2", "mlstm", "hawk",
           "deltanet", "rwkv7", "based", "mh_hyena", "nsa")
for _module in BUILTIN:
    importlib.import_module(f"lra.models.attention.{_module}")


def get(kind: str) -> type[Attention]:
    return lookup(REGISTRY, kind, "attention kind", "a plugin's kind needs plugins=[its.module]")


def config_class(kind: str) -> type[AttentionConfig]:
    return get(kind).config_cls


__all__ = ["REGISTRY", "Attention", "AttentionConfig", "DistanceBias", "ExactSoftmax", "TokenMixer",
           "config_class", "get", "register"]
