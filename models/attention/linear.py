"""Linear Transformer attention (Katharopoulos et al. 2020, "Transformers are RNNs").

softmax(q.k) is replaced by the kernel phi(q).phi(k) with phi(x) = elu(x) + 1, so attention
factorises: out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j)). Cost O(L D^2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lra.models.attention.base import Attention, AttentionConfig, register


@dataclasses.dataclass
class LinearConfig(AttentionConfig):
    kind: str = "linear"
    # Added to the normaliser so rows whose keys are all padding give 0, not 0/0
    # (the value used in the authors' fast-transformers LinearAttention).
    eps: float = 1e-6


def elu_feature_map(x: jax.Array) -> jax.Array:
    """phi(x) = elu(x) + 1: positive everywhere, so the kernel is a valid similarity."""
    return jax.nn.elu(x) + 1.0


@register
class LinearAttention(Attention):
    """Non-causal linear attention with the elu+1 feature map; padded keys are dropped."""

    config_cls = LinearConfig

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        phi_q_BxLxHxD = elu_feature_map(q_BxLxHxD)
        # Zeroing phi(k) at padding removes those keys from both numerator and normaliser.
        key_keep_BxLx1x1 = mask_BxL[:, :, None, None].astype(q_BxLxHxD.dtype)
        phi_k_BxLxHxD = elu_feature_map(k_BxLxHxD) * key_keep_BxLx1x1
        kv_BxHxDxD = jnp.einsum("blhd,blhe->bhde", phi_k_BxLxHxD, v_BxLxHxD)
        k_sum_BxHxD = jnp.sum(phi_k_BxLxHxD, axis=1)
        numer_BxLxHxD = jnp.einsum("blhd,bhde->blhe", phi_q_BxLxHxD, kv_BxHxDxD)
        denom_BxLxH = jnp.einsum("blhd,bhd->blh", phi_q_BxLxHxD, k_sum_BxHxD)
        return numer_BxLxHxD / (denom_BxLxH[..., None] + self.cfg.eps)
