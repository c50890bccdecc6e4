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
