"""Performer attention, FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers").

exp(q.k / sqrt(D)) is estimated without bias by positive random features
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),  x scaled by D^-1/4,
with W [m, D] made of orthogonal Gaussian blocks whose rows carry chi-distributed norms. Then
out = phi(Q) (phi(K)^T V) / (phi(Q) . sum phi(K)): cost O(L m D), never L x L.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention.base import Attention, AttentionConfig, Buffer


@dataclasses.dataclass
class PerformerConfig(AttentionConfig):
    kind: str = "performer"
    num_features: int = 256  # m; nb_features=256 in the authors' fast_attention code and LRA
    # Fresh projection every training step (rng given); the fixed Buffer is used at evaluation.
    # redraw_features=True is the authors' fast_attention default.
    redraw: bool = True
    # Added to every feature (authors' numerical_stabilizer) so normalisers never reach 0.
    eps: float = 1e-6


def gaussian_orthogonal_matrix(key: jax.Array, num_rows: int, dim: int) -> jax.Array:
    """[num_rows, dim]: stacked orthogonal blocks (QR of Gaussian blocks), rows of chi norms."""
    num_blocks = -(-num_rows // dim)
    block_key, norm_key = jax.random.split(key)
    gauss_NxDxD = jax.random.normal(block_key, (num_blocks, dim, dim))
    q_NxDxD, r_NxDxD = jnp.linalg.qr(gauss_NxDxD)
    # Sign fix makes Q exactly Haar-distributed (QR alone is biased by its sign convention).
    q_NxDxD = q_NxDxD * jnp.sign(jnp.diagonal(r_NxDxD, axis1=1, axis2=2))[:, None, :]
    # Rows of Q^T are orthonormal; the last block is truncated to the remaining rows.
    rows_MxD = jnp.swapaxes(q_NxDxD, 1, 2).reshape(num_blocks * dim, dim)[:num_rows]
    # Norms of D-dim Gaussian vectors (chi_D), so each row is marginally N(0, I_D).
    norms_M = jnp.linalg.norm(jax.random.normal(norm_key, (num_rows, dim)), axis=1)
    return rows_MxD * norms_M[:, None]


def positive_features(x_BxLxHxD: jax.Array, proj_MxD: jax.Array, stab_axes: tuple[int, ...],
                      keep_BxLx1x1: jax.Array | None, eps: float) -> jax.Array:
    """phi(x) [B, L, H, m] of the softmax kernel, stabilised by a max subtracted in log space.

    The max over `stab_axes` is a constant factor per query row (queries) or per (batch, head)
    (keys), so it cancels in the normalised output; it is computed over real tokens only.
    """
    num_features, dim = proj_MxD.shape
    x_scaled = x_BxLxHxD * dim ** -0.25
    wx_BxLxHxM = jnp.einsum("blhd,md->blhm", x_scaled, proj_MxD)
    half_sq_norm_BxLxHx1 = 0.5 * jnp.sum(x_scaled ** 2, axis=-1, keepdims=True)
    log_phi_BxLxHxM = wx_BxLxHxM - half_sq_norm_BxLxHx1
    masked_log = log_phi_BxLxHxM if keep_BxLx1x1 is None else jnp.where(
        keep_BxLx1x1 > 0, log_phi_BxLxHxM, -jnp.inf)
    stab = jax.lax.stop_gradient(jnp.max(masked_log, axis=stab_axes, keepdims=True))
    # An all-padding sequence has max -inf: use 0 there (its features are zeroed anyway).
    stab = jnp.where(jnp.isfinite(stab), stab, 0.0)
    phi = (jnp.exp(log_phi_BxLxHxM - stab) + eps) * num_features ** -0.5
    return phi if keep_BxLx1x1 is None else phi * keep_BxLx1x1


class PerformerAttention(Attention):
    """Bidirectional FAVOR+ with positive orthogonal random features."""

    config_cls = PerformerConfig

    def __init__(self, cfg: PerformerConfig, *, num_heads: int, head_dim: int, max_len: int,
                 rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, head_dim=head_dim, max_len=max_len, rngs=rngs)
        # Fixed per layer, shared by the heads (as in the authors' code), drawn from rngs.
        self.proj_MxD = Buffer(gaussian_orthogonal_matrix(rngs.params(), cfg.num_features,
                                                          head_dim))

    def projection(self, rng: jax.Array | None) -> jax.Array:
        """The layer's fixed projection, or a fresh draw when redrawing during training."""
        if self.cfg.redraw and rng is not None:
            return gaussian_orthogonal_matrix(rng, self.cfg.num_features, self.head_dim)
        return self.proj_MxD[...]

    def features(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, mask_BxL: jax.Array,
                 proj_MxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """phi(Q), phi(K) [B, L, H, m]; padded keys have phi = 0."""
        keep_BxLx1x1 = mask_BxL[:, :, None, None].astype(k_BxLxHxD.dtype)
        phi_q = positive_features(q_BxLxHxD, proj_MxD, (-1,), None, self.cfg.eps)
        phi_k = positive_features(k_BxLxHxD, proj_MxD, (1, 3), keep_BxLx1x1, self.cfg.eps)
        return phi_q, phi_k

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        proj_MxD = self.projection(rng)
        phi_q_BxLxHxM, phi_k_BxLxHxM = self.features(q_BxLxHxD, k_BxLxHxD, mask_BxL, proj_MxD)
        kv_BxHxMxD = jnp.einsum("blhm,blhd->bhmd", phi_k_BxLxHxM, v_BxLxHxD)
        k_sum_BxHxM = jnp.sum(phi_k_BxLxHxM, axis=1)
        numer_BxLxHxD = jnp.einsum("blhm,bhmd->blhd", phi_q_BxLxHxM, kv_BxHxMxD)
        denom_BxLxH = jnp.einsum("blhm,bhm->blh", phi_q_BxLxHxM, k_sum_BxHxM)
        # Only a sequence with no real token has denom 0 (its numerator is 0 too): avoid 0/0.
        denom_BxLxH = jnp.where(denom_BxLxH > 0, denom_BxLxH, 1.0)
        return numer_BxLxHxD / denom_BxLxH[..., None]
