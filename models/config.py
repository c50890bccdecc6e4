"""Structured model config: shared encoder fields + the variant's own attention config."""

from __future__ import annotations

import dataclasses
from typing import Any

from models.attention.base import AttentionConfig


@dataclasses.dataclass
class ModelConfig:
    name: str = "transformer"      # the key in every result table
    emb_dim: int = 128
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int = 256
    dropout: float = 0.1
    pool: str = "auto"             # cls | mean | auto (the task's default)
    pos: str = "learned"           # learned | sinusoidal | none
    attention: Any = dataclasses.field(default_factory=AttentionConfig)
