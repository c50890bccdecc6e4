"""Output heads: classify (CLS/mean pool), match (dual encoder, LRA's [u, v, u*v, u-v]), per-token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def pool(x_BxLxE: jax.Array, mask_BxL: jax.Array, how: str) -> jax.Array:
    if how == "cls":
        return x_BxLxE[:, 0]
    if how == "mean":
        weights_BxL = mask_BxL.astype(x_BxLxE.dtype)
        total_BxE = jnp.einsum("bl,ble->be", weights_BxL, x_BxLxE)
        return total_BxE / jnp.maximum(weights_BxL.sum(-1, keepdims=True), 1.0)
    raise ValueError(f"model.pool={how!r}; use cls, mean or auto")


class MLPHead(nnx.Module):
    """Dense -> gelu -> Dense, the LRA classifier head."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_dim, hidden, rngs=rngs)
        self.logits = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.logits(jax.nn.gelu(self.hidden(x)))


class ClassifyHead(MLPHead):
    def __init__(self, emb_dim, hidden, num_classes, pool_how, rngs):
        super().__init__(emb_dim, hidden, num_classes, rngs)
        self.pool_how = pool_how

    def __call__(self, x_BxLxE, mask_BxL):
        return super().__call__(pool(x_BxLxE, mask_BxL, self.pool_how))


class MatchHead(MLPHead):
    """Two pooled encodings u, v -> logits of MLP([u, v, u*v, u-v])."""

    def __init__(self, emb_dim, hidden, num_classes, pool_how, rngs):
        super().__init__(4 * emb_dim, hidden, num_classes, rngs)
        self.pool_how = pool_how

    def __call__(self, encoded1, encoded2):
        u_BxE = pool(*encoded1, self.pool_how)
        v_BxE = pool(*encoded2, self.pool_how)
        return super().__call__(jnp.concatenate([u_BxE, v_BxE, u_BxE * v_BxE, u_BxE - v_BxE], -1))


class TokenHead(nnx.Module):
    def __init__(self, emb_dim, num_classes, rngs):
        self.logits = nnx.Linear(emb_dim, num_classes, rngs=rngs)

    def __call__(self, x_BxLxE, mask_BxL):
        return self.logits(x_BxLxE)
