"""Linformer attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity").

Keys and values are projected along the length axis to k rows by learned matrices E, F
[max_len, k]: K' = E^T K, V' = F^T V, then ordinary softmax attention of the L queries over the
k projected keys. The paper's three sharing options (sec. 4): one E (and F) is shared by all
heads (headwise, always); `share_kv` also ties F = E (key-value); `share_layers` uses one E (and
F) in every layer (layerwise: with share_kv, a single [max_len, k] matrix in the whole model).
LRA's code: k = 16 (`low_rank_features`), one matrix for K and V, separate per layer.
Cost O(L k D) instead of O(L^2 D).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import Attention, AttentionConfig, register


@dataclasses.dataclass
class LinformerConfig(AttentionConfig):
    kind: str = "linformer"
    k: int = 256  # projected length (LRA's low_rank_features=256; paper uses 128-256)
    share_kv: bool = False  # paper's "key-value sharing": one projection for K and V
    share_layers: bool = False  # paper's "layerwise sharing": the same projection(s) in every layer

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: keys and values projected to k = L/4 (the default 256 = L at
        L=256: no compression)."""
        return {"k": seq_len // 4}


@register
class LinformerAttention(Attention):
    """Softmax attention over k learned length-projections of the keys and values."""

    config_cls = LinformerConfig
    check_settings = {'k': 32}  # lra.check: small-but-real
    prob_dropout = True

    def init_variables(self, rngs: nnx.Rngs) -> None:
        # Xavier-uniform over (max_len -> k), as for a bias-free linear layer on the length axis.
        init = jax.nn.initializers.xavier_uniform()
        shape_LxK = (self.max_len, self.cfg.k)
        self.proj_k_LxK = nnx.Param(init(rngs.params(), shape_LxK))
        self.proj_v_LxK = None if self.cfg.share_kv else nnx.Param(init(rngs.params(), shape_LxK))

    @classmethod
    def tie_layers(cls, modules: list["LinformerAttention"]) -> None:
        """Layerwise sharing: every layer reads the first layer's projection Param objects (one
        Variable referenced from each layer: counted once, trained with the summed gradient)."""
        first = modules[0]
        if not first.cfg.share_layers:
            return
        for module in modules[1:]:
            module.proj_k_LxK = first.proj_k_LxK
            module.proj_v_LxK = first.proj_v_LxK

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        length = q_BxLxHxD.shape[1]
        # Shorter inputs use the first `length` rows: position j keeps its own projection row.
        proj_k_LxK = self.proj_k_LxK[...][:length]
        proj_v_LxK = proj_k_LxK if self.proj_v_LxK is None else self.proj_v_LxK[...][:length]
        # Zero padded keys/values first, so the projected rows are mixtures of real tokens only.
        keep_BxLx1x1 = mask_BxL[:, :, None, None].astype(k_BxLxHxD.dtype)
        k_proj_BxKxHxD = jnp.einsum("blhd,lk->bkhd", k_BxLxHxD * keep_BxLx1x1, proj_k_LxK)
        v_proj_BxKxHxD = jnp.einsum("blhd,lk->bkhd", v_BxLxHxD * keep_BxLx1x1, proj_v_LxK)
        scale = q_BxLxHxD.shape[-1] ** -0.5
        scores_BxHxLxK = jnp.einsum("blhd,bkhd->bhlk", q_BxLxHxD * scale, k_proj_BxKxHxD)
        # Every projected key is a (possibly zero) mixture of real tokens: nothing to mask here.
        probs_BxHxLxK = jax.nn.softmax(scores_BxHxLxK, axis=-1)
        drop = self.drop(rng)
        if drop is not None:
            probs_BxHxLxK = drop.apply(probs_BxHxLxK)
        return jnp.einsum("bhlk,bkhd->blhd", probs_BxHxLxK, v_proj_BxKxHxD)
