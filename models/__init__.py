"""Flax NNX X-formers: one shared encoder with pluggable attention, plus task-kind heads.

`models.build(cfg, spec)` is the only entry point the harness uses; `spec` is any object with
vocab_size, num_classes, seq_len, kind (classify | match | tokens) and default_pool.
"""

from __future__ import annotations

import jax
from flax import nnx

from lra.models import attention
from lra.models.config import ModelConfig
from lra.models.encoder import Encoder
from lra.models.heads import ClassifyHead, MatchHead, TokenHead


class LRAModel(nnx.Module):
    """Encoder + head; `__call__(batch, rng=None) -> logits` for every task kind."""

    def __init__(self, cfg: ModelConfig, spec, rngs: nnx.Rngs):
        self.kind = spec.kind
        self.encoder = Encoder(cfg, spec.vocab_size, spec.seq_len, rngs)
        how = spec.default_pool if cfg.pool == "auto" else cfg.pool
        if spec.kind == "classify":
            self.head = ClassifyHead(cfg.emb_dim, cfg.mlp_dim, spec.num_classes, how, rngs)
        elif spec.kind == "match":
            self.head = MatchHead(cfg.emb_dim, cfg.mlp_dim, spec.num_classes, how, rngs)
        elif spec.kind == "tokens":
            self.head = TokenHead(cfg.emb_dim, spec.num_classes, rngs)
        else:
            raise ValueError(f"unknown task kind {spec.kind!r}")

    def __call__(self, batch: dict, rng: jax.Array | None = None) -> jax.Array:
        if self.kind == "match":
            keys = jax.random.split(rng) if rng is not None else (None, None)
            return self.head(self.encoder(batch["inputs1"], keys[0]),
                             self.encoder(batch["inputs2"], keys[1]))
        return self.head(*self.encoder(batch["inputs"], rng))


def build(cfg: ModelConfig, spec, seed: int = 0) -> LRAModel:
    """Initialise the model. The attention variant checks its config against `spec.seq_len` as it
    is built (Attention.__init__, the one place), so a length it cannot serve fails here."""
    return LRAModel(cfg, spec, nnx.Rngs(params=seed))


def summary(model: nnx.Module) -> dict:
    """{"blocks.0.attention.attn": {...}, ...}: each attention module's own `summary()` (what it
    learned that a row should show), for the modules that report something."""
    out = {}
    walk = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
    for path, module in walk:
        if isinstance(module, attention.Attention):
            reported = module.summary()
            if reported:
                out[".".join(map(str, path))] = reported
    return out


def param_count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# LRA's parameter budget: a model may have at most 10% more parameters than the Transformer.
PARAM_BUDGET = 1.10


def param_ratio(model: nnx.Module, cfg: ModelConfig, spec) -> float:
    """Parameters of `model` / those of the dense Transformer with the same dims, positions and
    task head (counted on abstract shapes: nothing is allocated)."""
    import dataclasses

    from lra.models.attention.dense import DenseConfig

    base_cfg = dataclasses.replace(cfg, attention=DenseConfig(), layers=[], mixers={})
    baseline = nnx.eval_shape(lambda: LRAModel(base_cfg, spec, nnx.Rngs(params=0)))
    return param_count(model) / param_count(baseline)


__all__ = ["LRAModel", "PARAM_BUDGET", "attention", "build", "param_count", "param_ratio"]
