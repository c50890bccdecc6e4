"""Structured model config: shared encoder fields + the variant's own attention config."""

from __future__ import annotations

import dataclasses
from typing import Any

from lra.models.attention.dense import DenseConfig


@dataclasses.dataclass
class ModelConfig:
    name: str = "transformer"      # the key in every result table
    emb_dim: int = 128
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int = 256
    dropout: float = 0.1
    pool: str = "auto"             # cls | mean | auto (the task's default)
    # learned | sinusoidal (added to embeddings, every kind) | rope (q, k rotated; kinds that
    # compute q.k) | alibi (-m_h |i-j| score bias; kinds with explicit scores) | none
    pos: str = "learned"
    attention: Any = dataclasses.field(default_factory=DenseConfig)  # the variant's own config
    # A hybrid stack (Griffin's [hawk, hawk, local], Jamba-like, MAD's striped hybrids): layer i
    # mixes with the kind layers[i % len(layers)], a repeating pattern over num_layers. A kind's
    # config is `attention` when it is attention's kind, else `mixers.<kind>` over that kind's
    # defaults (e.g. +model.mixers.local.block_size=16). Empty: every layer is `attention`.
    layers: list[str] = dataclasses.field(default_factory=list)
    mixers: dict[str, Any] = dataclasses.field(default_factory=dict)


def display_name(cfg) -> str:
    """The model's name in result rows: `name`, or for a stack built on a plain model from the
    command line (model=hawk model.layers=[hawk,hawk,local]) the stack itself, hawk+hawk+local;
    a stack's own YAML (configs/model/griffin.yaml) names it."""
    from lra.models import attention

    layers = list(cfg.layers or [])
    if layers and (cfg.name in layers or cfg.name in attention.REGISTRY
                   or cfg.name == "transformer"):
        return "+".join(layers)
    return cfg.name


def layer_configs(cfg: ModelConfig) -> list:
    """Each layer's attention config, first layer first (the stack's pattern repeated); a
    one-line ValueError naming the fix for an unknown kind or field."""
    from lra.models import attention

    if not cfg.layers:
        if cfg.mixers:
            raise ValueError(f"model.mixers configures the kinds of model.layers, which is empty; "
                             f"set model.layers=[...] or drop model.mixers "
                             f"({', '.join(cfg.mixers)})")
        return [cfg.attention] * cfg.num_layers
    stray = [k for k in cfg.mixers if k not in cfg.layers]
    if stray:
        raise ValueError(f"model.mixers.{stray[0]}: {stray[0]} is not in model.layers="
                         f"[{', '.join(cfg.layers)}]; add it there or drop its config")
    configs = {}
    for kind in dict.fromkeys(cfg.layers):
        if kind == cfg.attention.kind and kind not in cfg.mixers:
            configs[kind] = cfg.attention
            continue
        try:
            cls = attention.config_class(kind)
        except ValueError as err:  # one line listing the known kinds
            raise ValueError(f"model.layers: {err}") from None
        base = cfg.attention if kind == cfg.attention.kind else cls()
        fields = dict(cfg.mixers.get(kind) or {})
        fields.pop("kind", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"model.mixers.{kind}.{unknown[0]}: {kind} has no such field; it "
                             f"has {', '.join(sorted(names - {'kind'}))}")
        configs[kind] = dataclasses.replace(base, **fields)
    unused = [k for k in configs if k not in cfg.layers[:cfg.num_layers]]
    if unused:
        raise ValueError(f"model.layers=[{','.join(cfg.layers)}] over model.num_layers="
                         f"{cfg.num_layers} never reaches {unused[0]}; set model.num_layers >= "
                         f"{cfg.layers.index(unused[0]) + 1} (a multiple of {len(cfg.layers)} "
                         f"repeats the pattern whole)")
    return [configs[cfg.layers[i % len(cfg.layers)]] for i in range(cfg.num_layers)]
