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


def positive_features(x_BxHxLxD: jax.Array, proj_MxD: jax.Array, stab_axes: tuple[int, ...],
                      keep_Bx1xLx1: jax.Array | None, eps: float) -> jax.Array:
    """phi(x) [B, H, L, m] of the softmax kernel, stabilised by a max subtracted in log space.

    The max over `stab_axes` is a constant factor per query row (queries) or per (batch, head)
    (keys), so it cancels in the normalised output; it is taken over real tokens only.
    """
    num_features, dim = proj_MxD.shape
    x_scaled = x_BxHxLxD * dim ** -0.25
    wx_BxHxLxM = jnp.einsum("bhld,md->bhlm", x_scaled, proj_MxD)
    half_sq_norm_BxHxLx1 = 0.5 * jnp.sum(x_scaled ** 2, axis=-1, keepdims=True)
    log_phi_BxHxLxM = wx_BxHxLxM - half_sq_norm_BxHxLx1
    real_log_phi = log_phi_BxHxLxM if keep_Bx1xLx1 is None else jnp.where(
        keep_Bx1xLx1 > 0, log_phi_BxHxLxM, -jnp.inf)
    stab = jax.lax.stop_gradient(jnp.max(real_log_phi, axis=stab_axes, keepdims=True))
    # An all-padding sequence has max -inf: use 0 there (its features are zeroed anyway).
    stab = jnp.where(jnp.isfinite(stab), stab, 0.0)
    shifted_BxHxLxM = log_phi_BxHxLxM - stab
    if keep_Bx1xLx1 is not None:
        # Padded keys are not under the max and could overflow exp (inf * 0 = NaN): drop them.
        shifted_BxHxLxM = jnp.where(keep_Bx1xLx1 > 0, shifted_BxHxLxM, -jnp.inf)
    phi_BxHxLxM = (jnp.exp(shifted_BxHxLxM) + eps) * num_features ** -0.5
    return phi_BxHxLxM if keep_Bx1xLx1 is None else phi_BxHxLxM * keep_Bx1xLx1


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

    def features(self, q_BxHxLxD: jax.Array, k_BxHxLxD: jax.Array, mask_BxL: jax.Array,
                 proj_MxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """phi(Q), phi(K) [B, H, L, m]; padded keys have phi = 0."""
        keep_Bx1xLx1 = mask_BxL[:, None, :, None].astype(k_BxHxLxD.dtype)
        phi_q = positive_features(q_BxHxLxD, proj_MxD, (-1,), None, self.cfg.eps)
        phi_k = positive_features(k_BxHxLxD, proj_MxD, (2, 3), keep_Bx1xLx1, self.cfg.eps)
        return phi_q, phi_k

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        # Head-major layout makes every product a plain batched matmul (~25% faster on CPU).
        q_BxHxLxD, k_BxHxLxD, v_BxHxLxD = (jnp.swapaxes(x, 1, 2)
                                           for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
        phi_q_BxHxLxM, phi_k_BxHxLxM = self.features(q_BxHxLxD, k_BxHxLxD, mask_BxL,
                                                     self.projection(rng))
        kv_BxHxMxD = jnp.einsum("bhlm,bhld->bhmd", phi_k_BxHxLxM, v_BxHxLxD)
        k_sum_BxHxM = jnp.sum(phi_k_BxHxLxM, axis=2)
        numer_BxHxLxD = jnp.einsum("bhlm,bhmd->bhld", phi_q_BxHxLxM, kv_BxHxMxD)
        denom_BxHxL = jnp.einsum("bhlm,bhm->bhl", phi_q_BxHxLxM, k_sum_BxHxM)
        # Only a sequence with no real token has denom 0 (its numerator is 0 too): avoid 0/0.
        denom_BxHxL = jnp.where(denom_BxHxL > 0, denom_BxHxL, 1.0)
        return jnp.swapaxes(numer_BxHxLxD / denom_BxHxL[..., None], 1, 2)
