"""Registry of attention variants: `model.attention.kind` -> module class (imported lazily)."""

from __future__ import annotations

import importlib

from models.attention.base import Attention, AttentionConfig

# kind -> "module:Class". Adding a line here adds the variant to every registry-driven test.
REGISTRY: dict[str, str] = {
    "dense": "models.attention.dense:DenseAttention",
    "flash": "models.attention.flash:FlashAttention",
    "local": "models.attention.local:LocalAttention",
    "sparse": "models.attention.sparse:SparseAttention",
    "longformer": "models.attention.longformer:LongformerAttention",
    "bigbird": "models.attention.bigbird:BigBirdAttention",
    "reformer": "models.attention.reformer:ReformerAttention",
    "sinkhorn": "models.attention.sinkhorn:SinkhornAttention",
    "synthesizer": "models.attention.synthesizer:SynthesizerAttention",
    "linformer": "models.attention.linformer:LinformerAttention",
    "linear": "models.attention.linear:LinearAttention",
    "performer": "models.attention.performer:PerformerAttention",
    "nystrom": "models.attention.nystrom:NystromAttention",
    "fnet": "models.attention.fnet:FourierMixer",
    "lstm": "models.attention.lstm:LSTMMixer",
    "s4d": "models.attention.s4d:S4DMixer",
    "lru": "models.attention.lru:LRUMixer",
    "transformer_xl": "models.attention.transformer_xl:TransformerXLAttention",
}


def get(kind: str) -> type[Attention]:
    if kind not in REGISTRY:
        raise ValueError(f"unknown attention kind {kind!r}; known: {', '.join(sorted(REGISTRY))}")
    module_name, class_name = REGISTRY[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def config_class(kind: str) -> type[AttentionConfig]:
    return get(kind).config_cls
