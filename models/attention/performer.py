"""Performer attention (Choromanski et al. 2021, "Rethinking Attention with Performers").

kernel=softmax (default), FAVOR+: exp(q.k / sqrt(D)) is estimated without bias by positive
random features
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),  x scaled by D^-1/4,
with W [m, D] made of orthogonal Gaussian blocks whose rows carry chi-distributed norms.
Numerics as in the authors' fast_attention code: a max is subtracted in log space (per query
row; per sequence and head for keys, over real keys) and eps is added to every feature.

kernel=relu, the paper's "generalized attention" as the LRA code ran it
(make_fast_generalized_attention with features_type='deterministic', kernel_fn=relu,
kernel_epsilon=0.001, no data normalisation): the deterministic feature map
    phi(x) = relu(x) + kernel_eps  on the D head dims, no random projection and no D^-1/4
scaling, so num_features, redraw and eps are unused (no projection buffer is built).

Either way out = phi(Q) (phi(K)^T V) / (phi(Q) . sum_j phi(k_j)) over real keys j: cost
O(L m D) (O(L D^2) for relu), never L x L.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from lra.models.attention.base import Attention, AttentionConfig, Buffer, check_choice, register

KERNELS = ("softmax", "relu")


@dataclasses.dataclass
class PerformerConfig(AttentionConfig):
    kind: str = "performer"
    # softmax: FAVOR+ positive orthogonal random features (estimates softmax attention).
    # relu: LRA code's generalized attention, deterministic features relu(x) + kernel_eps on the
    # head dims (num_features, redraw and eps are then unused).
    kernel: str = "softmax"
    kernel_eps: float = 1e-3  # relu only: LRA's kernel_epsilon
    num_features: int = 256  # m; nb_features=256 in the authors' fast_attention code and LRA
    # Fresh projection every training step (rng given); the fixed Buffer is used at evaluation.
    # redraw_features=True is the authors' fast_attention default.
    redraw: bool = True
    # Added to every feature (authors' numerical_stabilizer) so normalisers never reach 0.
    eps: float = 1e-6
    # Execution knob, not part of the method: heads computed per lax.map step (with remat).
    # 2 measured fastest and ~0.2x dense peak RSS at L=4096, 8 heads on CPU.
    heads_per_step: int = 2


def gram_schmidt_q(a_NxDxD: jax.Array) -> jax.Array:
    """Q of A = QR with R's diagonal positive (the Haar-distributed Q) for each of N square
    blocks: Gram-Schmidt with one re-orthogonalisation pass ("twice is enough"), plain jnp.

    Not jnp.linalg.qr: jaxlib 0.10's CPU LAPACK kernels split a batch over XLA's intra-op pool
    from inside a pool thread and block on it, so two such calls at once (two layers) fill a
    2-thread pool and deadlock. Measured here: `model=performer task=copy task.seq_len=256` hung
    at 0% CPU in `lapack_sorgqr_ffi` -> `ParallelBatchMap` -> `BlockingCounter::Wait` (gdb).
    """
    dim = a_NxDxD.shape[-1]

    def column(j, q_NxDxD):
        v_NxD = q_NxDxD[:, :, j]
        done_D = (jnp.arange(dim) < j).astype(v_NxD.dtype)  # columns already orthonormal
        for _ in range(2):
            coeff_NxD = jnp.einsum("nd,ndk->nk", v_NxD, q_NxDxD) * done_D
            v_NxD = v_NxD - jnp.einsum("ndk,nk->nd", q_NxDxD, coeff_NxD)
        v_NxD = v_NxD / jnp.linalg.norm(v_NxD, axis=-1, keepdims=True)
        return q_NxDxD.at[:, :, j].set(v_NxD)

    return jax.lax.fori_loop(0, dim, column, a_NxDxD)


def orthogonal_rows(gauss_NxDxD: ArrayLike, gauss_KxD: ArrayLike, xp: Any = jnp) -> ArrayLike:
    """[K, D] from Gaussian draws: rows of orthogonal blocks (QR of each Gaussian block),
    scaled by chi_D norms (of the rows of gauss_KxD). `xp` is numpy or jax.numpy."""
    num_blocks, dim, _ = gauss_NxDxD.shape
    if xp is np:
        q_NxDxD, r_NxDxD = np.linalg.qr(gauss_NxDxD)
        # Sign fix makes Q exactly Haar-distributed (QR alone is biased by its sign convention).
        q_NxDxD = q_NxDxD * np.sign(np.diagonal(r_NxDxD, axis1=1, axis2=2))[:, None, :]
    else:
        q_NxDxD = gram_schmidt_q(gauss_NxDxD)  # positive diagonal of R: already sign-fixed
    # Rows of Q^T are orthonormal; the last block is truncated to the remaining rows.
    rows_KxD = xp.swapaxes(q_NxDxD, 1, 2).reshape(num_blocks * dim, dim)[:gauss_KxD.shape[0]]
    # Norms of D-dim Gaussian vectors (chi_D), so each row is marginally N(0, I_D).
    return rows_KxD * xp.linalg.norm(gauss_KxD, axis=1)[:, None]


def gaussian_orthogonal_matrix(key: jax.Array, num_rows: int, dim: int) -> jax.Array:
    """Per-step redraw inside the jitted step (jax.random)."""
    block_key, norm_key = jax.random.split(key)
    num_blocks = -(-num_rows // dim)
    return orthogonal_rows(jax.random.normal(block_key, (num_blocks, dim, dim)),
                           jax.random.normal(norm_key, (num_rows, dim)))


def gaussian_orthogonal_matrix_np(seed: int | np.ndarray, num_rows: int, dim: int
                                  ) -> np.ndarray:
    """The layer's fixed projection, drawn with numpy from `seed` (deterministic)."""
    gen = np.random.default_rng(seed)
    num_blocks = -(-num_rows // dim)
    return orthogonal_rows(gen.standard_normal((num_blocks, dim, dim)),
                           gen.standard_normal((num_rows, dim)), xp=np).astype(np.float32)


def positive_features(x_BxHxLxD: jax.Array, proj_KxD: jax.Array, stab_axes: tuple[int, ...],
                      keep_Bx1xLx1: jax.Array | None) -> jax.Array:
    """exp(W x - |x|^2 / 2 - stab) / sqrt(m) [B, H, L, m]: the positive softmax-kernel features
    without the additive eps (0 at padded keys).

    The max `stab` over `stab_axes` is a constant factor per query row (queries) or per
    (batch, head) (keys), so it cancels in the normalised output; it is taken over real tokens.
    """
    num_features, dim = proj_KxD.shape
    x_scaled = x_BxHxLxD * dim ** -0.25
    wx_BxHxLxK = jnp.einsum("bhld,md->bhlm", x_scaled, proj_KxD)
    half_sq_norm_BxHxLx1 = 0.5 * jnp.sum(x_scaled ** 2, axis=-1, keepdims=True)
    log_phi_BxHxLxK = wx_BxHxLxK - half_sq_norm_BxHxLx1
    if keep_Bx1xLx1 is not None:
        # Padded keys get log-feature -inf (feature 0): out of the max, and no exp overflow.
        log_phi_BxHxLxK = jnp.where(keep_Bx1xLx1 > 0, log_phi_BxHxLxK, -jnp.inf)
    stab = jax.lax.stop_gradient(jnp.max(log_phi_BxHxLxK, axis=stab_axes, keepdims=True))
    # An all-padding sequence has max -inf: use 0 there (its features are all 0 anyway).
    stab = jnp.where(jnp.isfinite(stab), stab, 0.0) + 0.5 * np.log(num_features)
    # A bare exp: its derivative reuses its output, so autodiff keeps one [B, H, L, m] array.
    return jnp.exp(log_phi_BxHxLxK - stab)


@register
class PerformerAttention(Attention):
    """Bidirectional FAVOR+ with positive orthogonal random features, or deterministic ReLU
    features (kernel=relu)."""

    config_cls = PerformerConfig
    check_settings = {'num_features': 64}  # lra.check: small-but-real

    @classmethod
    def check_seq_len(cls, cfg: PerformerConfig, seq_len: int) -> None:
        check_choice(cfg, "kernel", KERNELS)

    def init_variables(self, rngs: nnx.Rngs) -> None:
        if self.cfg.kernel == "relu":
            return  # deterministic features: no projection to hold
        # Fixed per layer, shared by the heads (as in the authors' code); numpy draw seeded
        # by the bits of a key from rngs (no jax.random compile at construction).
        seed = np.asarray(jax.random.key_data(rngs.params()))
        self.proj_KxD = Buffer(jnp.asarray(gaussian_orthogonal_matrix_np(
            seed, self.cfg.num_features, self.head_dim)))

    def projection(self, rng: jax.Array | None) -> jax.Array | None:
        """The layer's fixed projection, or a fresh draw when redrawing during training; None
        for the deterministic relu kernel."""
        if self.cfg.kernel == "relu":
            return None
        if self.cfg.redraw and rng is not None:
            return gaussian_orthogonal_matrix(rng, self.cfg.num_features, self.head_dim)
        return self.proj_KxD[...]

    def features(self, q_BxHxLxD: jax.Array, k_BxHxLxD: jax.Array, mask_BxL: jax.Array,
                 proj_KxD: jax.Array | None) -> tuple[jax.Array, jax.Array, float]:
        """(E_Q, E_K, c) with phi(Q) = E_Q + c and phi(K) = E_K + c at real keys; E_K [B, H, L, m]
        is 0 at padded keys. softmax: E = the exp-parts, c = eps / sqrt(m); relu: E = relu(x)
        (m = D), c = kernel_eps."""
        if self.cfg.kernel == "relu":
            keep_Bx1xLx1 = mask_BxL[:, None, :, None].astype(k_BxHxLxD.dtype)
            return (jax.nn.relu(q_BxHxLxD), jax.nn.relu(k_BxHxLxD) * keep_Bx1xLx1,
                    self.cfg.kernel_eps)
        exp_q = positive_features(q_BxHxLxD, proj_KxD, (-1,), None)
        exp_k = positive_features(k_BxHxLxD, proj_KxD, (2, 3), mask_BxL[:, None, :, None])
        return exp_q, exp_k, self.cfg.eps * self.cfg.num_features ** -0.5

    def attend(self, q_BxHxLxD: jax.Array, k_BxHxLxD: jax.Array, v_BxHxLxD: jax.Array,
               mask_BxL: jax.Array, proj_KxD: jax.Array | None) -> jax.Array:
        """Linear attention for a group of heads:
        phi(Q) (phi(K)^T V) / (phi(Q) . sum_j phi(k_j))."""
        e_q_BxHxLxK, e_k_BxHxLxK, c = self.features(q_BxHxLxD, k_BxHxLxD, mask_BxL, proj_KxD)
        # phi = E + c (on real keys only). The constant is applied to the small [m, D] / [m]
        # reductions instead of the [L, m] features, exactly:
        #   phi_K^T V = E_K^T V + c sum_j v_j,   phi_q . s = e_q . s + c sum_m s_m.
        keep_Bx1xLx1 = mask_BxL[:, None, :, None].astype(v_BxHxLxD.dtype)
        v_sum_BxHx1xD = jnp.sum(v_BxHxLxD * keep_Bx1xLx1, axis=2, keepdims=True)
        kv_BxHxKxD = (jnp.einsum("bhlm,bhld->bhmd", e_k_BxHxLxK, v_BxHxLxD)
                      + c * v_sum_BxHx1xD)
        k_sum_BxHxK = jnp.sum(e_k_BxHxLxK, axis=2) + c * jnp.sum(keep_Bx1xLx1, axis=2)
        numer_BxHxLxD = (jnp.einsum("bhlm,bhmd->bhld", e_q_BxHxLxK, kv_BxHxKxD)
                         + c * jnp.sum(kv_BxHxKxD, axis=2, keepdims=True))
        denom_BxHxL = (jnp.einsum("bhlm,bhm->bhl", e_q_BxHxLxK, k_sum_BxHxK)
                       + c * jnp.sum(k_sum_BxHxK, axis=2, keepdims=True))
        # Only a sequence with no real token has denom 0 (its numerator is 0 too): avoid 0/0.
        denom_BxHxL = jnp.where(denom_BxHxL > 0, denom_BxHxL, 1.0)
        return numer_BxHxLxD / denom_BxHxL[..., None]

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        b, length, h, d = q_BxLxHxD.shape
        proj_KxD = self.projection(rng)
        # Heads go through lax.map in I groups of J heads, each rematerialised in the backward
        # pass: only one group's [B, J, L, K] features are alive at a time (heads are independent).
        group = math.gcd(h, max(self.cfg.heads_per_step, 1))
        q_IxBxJxLxD, k_IxBxJxLxD, v_IxBxJxLxD = (
            jnp.transpose(x.reshape(b, length, h // group, group, d), (2, 0, 3, 1, 4))
            for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
        attend_group = jax.checkpoint(lambda qkv: self.attend(*qkv, mask_BxL, proj_KxD))
        out_IxBxJxLxD = jax.lax.map(attend_group, (q_IxBxJxLxD, k_IxBxJxLxD, v_IxBxJxLxD))
        return jnp.transpose(out_IxBxJxLxD, (1, 3, 0, 2, 4)).reshape(b, length, h, d)
