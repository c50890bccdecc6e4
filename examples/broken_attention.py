"""A plugin with a bug `lra.check` must catch: padded keys leak into the real positions.

    PYTHONPATH=examples python -m lra.check broken_attention plugins=[broken_attention]   # exits 1

The same ReLU-kernel linear attention as examples/my_attention.py, but phi(k) is not zeroed at
padding, so whatever sits at padded positions changes every real output ("padding invariance"
fails). In a batch of mixed lengths that makes a sequence's prediction depend on its padding.
"""

import dataclasses

import jax
import jax.numpy as jnp

from lra.models.attention import Attention, AttentionConfig, register


@dataclasses.dataclass
class BrokenAttentionConfig(AttentionConfig):
    kind: str = "broken_attention"
    eps: float = 1e-6


@register
class BrokenAttention(Attention):
    config_cls = BrokenAttentionConfig

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None):
        phi_q, phi_k = jax.nn.relu(q_BxLxHxD), jax.nn.relu(k_BxLxHxD)  # bug: mask_BxL unused
        kv_BxHxDxD = jnp.einsum("blhd,blhe->bhde", phi_k, v_BxLxHxD)
        numer_BxLxHxD = jnp.einsum("blhd,bhde->blhe", phi_q, kv_BxHxDxD)
        denom_BxLxH = jnp.einsum("blhd,bhd->blh", phi_q, phi_k.sum(axis=1))
        return numer_BxLxHxD / (denom_BxLxH[..., None] + self.cfg.eps)
