"""A minimal attention plugin: ReLU-kernel linear attention with a learned per-head sharpness.

    PYTHONPATH=examples python -m lra.run model=my_attention task=listops preset=tiny plugins=[my_attention]

out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j)), phi(x) = relu(s_h x):
O(L D^2) time and memory. Padded keys are zeroed out of phi(k), so they never contribute.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention import Attention, AttentionConfig, register


@dataclasses.dataclass
class MyAttentionConfig(AttentionConfig):
    kind: str = "my_attention"   # the name: model=my_attention, model.attention.kind=my_attention
    eps: float = 1e-6            # keeps an all-padding row at 0 instead of 0/0


@register
class MyAttention(Attention):
    config_cls = MyAttentionConfig

    def init_variables(self, rngs):  # self.cfg, num_heads, head_dim and max_len are set
        self.sharpness_H = nnx.Param(jnp.ones((self.num_heads,)))

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None):
        phi_q = jax.nn.relu(q_BxLxHxD * self.sharpness_H[:, None])
        keep_BxLx1x1 = mask_BxL[:, :, None, None].astype(k_BxLxHxD.dtype)
        phi_k = jax.nn.relu(k_BxLxHxD * self.sharpness_H[:, None]) * keep_BxLx1x1
        kv_BxHxDxD = jnp.einsum("blhd,blhe->bhde", phi_k, v_BxLxHxD)
        numer_BxLxHxD = jnp.einsum("blhd,bhde->blhe", phi_q, kv_BxHxDxD)
        denom_BxLxH = jnp.einsum("blhd,bhd->blh", phi_q, phi_k.sum(axis=1))
        return numer_BxLxHxD / (denom_BxLxH[..., None] + self.cfg.eps)
