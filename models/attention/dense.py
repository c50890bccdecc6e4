"""Dense softmax attention: the O(L^2) baseline every other variant is compared against."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.attention.base import Attention, AttentionConfig, alibi_bias, masked_softmax_attention


@dataclasses.dataclass
class DenseConfig(AttentionConfig):
    kind: str = "dense"
    # einsum: explicit softmax (fastest on CPU); fused: jax.nn.dot_product_attention, which
    # dispatches to cuDNN flash attention on a GPU (implementation="cudnn" when fused_cudnn).
    impl: str = "einsum"


class DenseAttention(Attention):
    config_cls = DenseConfig
    exact_pattern = True
    quadratic = True
    supports_alibi = True

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None, alibi_H=None):
        bias_1xHxLxL = None
        if alibi_H is not None:  # the scores are L x L anyway: so is the bias
            pos_L = jnp.arange(q_BxLxHxD.shape[1])
            bias_1xHxLxL = alibi_bias(alibi_H, pos_L[:, None] - pos_L[None, :],
                                      q_BxLxHxD.dtype)[None]
        if self.cfg.impl == "fused":
            key_mask_Bx1x1xL = mask_BxL[:, None, None, :]
            return jax.nn.dot_product_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD,
                                                bias=bias_1xHxLxL, mask=key_mask_Bx1x1xL)
        if self.cfg.impl != "einsum":
            raise ValueError(f"model.attention.impl={self.cfg.impl!r}; use einsum or fused")
        return masked_softmax_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD,
                                        mask_BxL[:, None, None, :], bias_1xHxLxL)

    def reference_mask(self, q_BxLxHxD, k_BxLxHxD, mask_BxL):
        b, length, h, _ = q_BxLxHxD.shape
        return jnp.broadcast_to(mask_BxL[:, None, None, :], (b, h, length, length))
