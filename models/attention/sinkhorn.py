"""Sparse Sinkhorn attention (Tay et al. 2020), bidirectional.

The sequence is cut into N blocks of `block_size` b. Each block's summary (mean of its real
keys) goes through a small per-head sorting network (2-layer ReLU MLP, as the paper's SortNet)
to give logits R [N, N]: row i scores which block j block i should be matched with. Sinkhorn
balancing in log space (`sinkhorn_iters` alternating row/column log-normalisations of R / tau)
gives a soft permutation P, rows and columns summing to ~1. The sorted blocks are
K_sorted[i] = sum_j P[i, j] K[j] (and the same for V), and every query block attends, in one
softmax, to its own block plus its sorted block: 2b keys.

`hard=True` replaces P in the forward pass by a hard permutation pi (greedy matching on the
Sinkhorn log-probabilities), with straight-through gradients to the soft P. Then the output is
exactly dense attention under the mask block i -> {i, pi(i)}; when pi(i) == i the sorted copy
is masked so each key counts once.

Padding: summaries average real keys only, padded keys/values are zeroed before mixing with P,
and a sorted key slot is kept only if it carries real mass (sum_j P[i, j] * mask[j, s] > 0).
Cost O(L * b) for attention, O(N^2) for the sort, O(N * L * D) for mixing blocks with P.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import (Attention, AttentionConfig, blocks_head_major, check_choice,
                                       pad_to_blocks, register, unblock_head_major)
from lra.models.attention.softmax import NEG_INF, softmax_pieces


@dataclasses.dataclass
class SinkhornConfig(AttentionConfig):
    kind: str = "sinkhorn"
    # Block size b. LRA's port uses 50; 64 divides LRA's power-of-two lengths (1K-4K) and is
    # the block size of the public reimplementation (lucidrains/sinkhorn-transformer).
    block_size: int = 64
    # Sinkhorn balancing iterations and temperature tau: paper tunes both (iterations up to
    # ~10, tau < 1); 5 and 0.75 are the reimplementation's defaults. (LRA's port: 1 and 1.0.)
    sinkhorn_iters: int = 5
    temperature: float = 0.75
    # Gumbel noise on the sort logits at training time (rng given), the paper's
    # Gumbel-Sinkhorn option; off by default, as in LRA.
    gumbel: bool = False
    # Forward with a hard permutation (straight-through to soft P): exact block pattern.
    hard: bool = False
    # sinkhorn: the paper's balanced soft permutation | softmax: each row of R / tau
    # softmax-normalised only (rows sum to 1, columns need not): LRA code's sort_activation.
    sort: str = "sinkhorn"

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: sorted blocks of L/8 up to L=128; from 256 the default 64."""
        return {"block_size": seq_len // 8} if seq_len <= 128 else {}


SORTS = ("sinkhorn", "softmax")


def sinkhorn_log(logits_BxHxNxN: jax.Array, iters: int, temperature: float) -> jax.Array:
    """Log of a (near) doubly stochastic matrix: alternate row and column log-normalisation."""
    log_p_BxHxNxN = logits_BxHxNxN / temperature
    for _ in range(iters):  # a handful of iterations, unrolled
        log_p_BxHxNxN = log_p_BxHxNxN - jax.nn.logsumexp(log_p_BxHxNxN, axis=-1, keepdims=True)
        log_p_BxHxNxN = log_p_BxHxNxN - jax.nn.logsumexp(log_p_BxHxNxN, axis=-2, keepdims=True)
    return log_p_BxHxNxN


def greedy_permutation(log_p_BxHxNxN: jax.Array) -> jax.Array:
    """One-hot permutation matrix: repeatedly take the largest entry of a free row and column."""
    n = log_p_BxHxNxN.shape[-1]
    rows_N = jnp.arange(n)

    def take_best(_, carry):
        free_BxHxNxN, perm_BxHxNxN = carry
        flat_BxH = jnp.argmax(free_BxHxNxN.reshape(*free_BxHxNxN.shape[:2], n * n), axis=-1)
        row_BxHxNx1 = (rows_N == (flat_BxH // n)[..., None])[..., :, None]
        col_BxHx1xN = (rows_N == (flat_BxH % n)[..., None])[..., None, :]
        perm_BxHxNxN = perm_BxHxNxN + (row_BxHxNx1 & col_BxHx1xN)
        free_BxHxNxN = jnp.where(row_BxHxNx1 | col_BxHx1xN, -jnp.inf, free_BxHxNxN)
        return free_BxHxNxN, perm_BxHxNxN

    # N sequential argmaxes over the small N x N matrix (not over tokens): O(N^3), tiny.
    _, perm_BxHxNxN = jax.lax.fori_loop(
        0, n, take_best, (log_p_BxHxNxN, jnp.zeros_like(log_p_BxHxNxN)))
    return perm_BxHxNxN


@register
class SinkhornAttention(Attention):
    config_cls = SinkhornConfig
    check_settings = {'block_size': 16, 'hard': True}  # lra.check: small-but-real
    prob_dropout = True

    def init_variables(self, rngs: nnx.Rngs) -> None:
        # Soft sorting is not a fixed pattern; the hard mode is.
        self.exact_pattern = self.cfg.hard
        max_blocks = -(-self.max_len // self.cfg.block_size)
        k1, k2 = rngs.params(), rngs.params()
        h, d = self.num_heads, self.head_dim
        # Per-head SortNet: summary [D] -> ReLU(D) -> ReLU(max_blocks) logits (sliced to N).
        self.sort_w1 = nnx.Param(jax.random.normal(k1, (h, d, d)) * d ** -0.5)
        self.sort_b1 = nnx.Param(jnp.zeros((h, d)))
        self.sort_w2 = nnx.Param(jax.random.normal(k2, (h, d, max_blocks)) * d ** -0.5)
        self.sort_b2 = nnx.Param(jnp.zeros((h, max_blocks)))

    @classmethod
    def check_seq_len(cls, cfg: SinkhornConfig, seq_len: int) -> None:
        check_choice(cfg, "sort", SORTS)
        if cfg.block_size < 1 or cfg.sinkhorn_iters < 0 or cfg.temperature <= 0:
            raise ValueError("sinkhorn needs model.attention.block_size >= 1, sinkhorn_iters >= 0 "
                             f"and temperature > 0 (got {cfg.block_size}, {cfg.sinkhorn_iters}, "
                             f"{cfg.temperature}); use e.g. 64, 5, 0.75")
        if seq_len <= cfg.block_size:
            raise ValueError(f"sinkhorn needs seq_len > model.attention.block_size="
                             f"{cfg.block_size} (>= 2 blocks to sort; got {seq_len}); lower "
                             "model.attention.block_size or raise task.seq_len")

    def sort_matrix(self, k_BxNxSxHxD: jax.Array, key_mask_BxNxS: jax.Array,
                    rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """Block sorting matrix P [B, H, N, N] used in the forward pass, and the hard one-hot."""
        n = k_BxNxSxHxD.shape[1]
        real_BxNxSx1x1 = key_mask_BxNxS[..., None, None]
        count_BxNx1x1 = jnp.maximum(jnp.sum(real_BxNxSx1x1, axis=2), 1)
        # Mean of real keys; a fully padded block summarises to 0 whatever its content.
        summary_BxNxHxD = jnp.sum(jnp.where(real_BxNxSx1x1, k_BxNxSxHxD, 0.0), axis=2) / count_BxNx1x1
        hidden_BxNxHxD = jax.nn.relu(
            jnp.einsum("bnhd,hde->bnhe", summary_BxNxHxD, self.sort_w1[...]) + self.sort_b1[...])
        logits_BxNxHxN = jax.nn.relu(
            jnp.einsum("bnhe,hem->bnhm", hidden_BxNxHxD, self.sort_w2[..., :n])
            + self.sort_b2[..., :n])
        logits_BxHxNxN = jnp.transpose(logits_BxNxHxN, (0, 2, 1, 3))
        if self.cfg.gumbel and rng is not None:
            logits_BxHxNxN = logits_BxHxNxN + jax.random.gumbel(rng, logits_BxHxNxN.shape)
        if self.cfg.sort == "softmax":
            log_p_BxHxNxN = jax.nn.log_softmax(logits_BxHxNxN / self.cfg.temperature, axis=-1)
        else:
            log_p_BxHxNxN = sinkhorn_log(logits_BxHxNxN, self.cfg.sinkhorn_iters,
                                         self.cfg.temperature)
        soft_BxHxNxN = jnp.exp(log_p_BxHxNxN)
        if not self.cfg.hard:
            return soft_BxHxNxN, None
        hard_BxHxNxN = greedy_permutation(jax.lax.stop_gradient(log_p_BxHxNxN))
        # Straight-through: forward value is exactly the one-hot, gradient flows to soft P.
        return hard_BxHxNxN + (soft_BxHxNxN - jax.lax.stop_gradient(soft_BxHxNxN)), hard_BxHxNxN

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """Each query block attends to its own block and its Sinkhorn-sorted block."""
        b, length, h, d = q_BxLxHxD.shape
        bs = self.cfg.block_size
        key_mask_BxP, q_BxPxHxD, k_BxPxHxD, v_BxPxHxD = pad_to_blocks(
            bs, mask_BxL, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
        n = q_BxPxHxD.shape[1] // bs
        key_mask_BxNxS = key_mask_BxP.reshape(b, n, bs)
        real_BxNxSx1x1 = key_mask_BxNxS[..., None, None]
        # Zero padded keys/values so mixing blocks with P cannot carry their content.
        k_BxNxSxHxD = jnp.where(real_BxNxSx1x1, k_BxPxHxD.reshape(b, n, bs, h, d), 0.0)
        v_BxNxSxHxD = jnp.where(real_BxNxSx1x1, v_BxPxHxD.reshape(b, n, bs, h, d), 0.0)

        # Heads-major blocks, so every einsum below is a batched matmul over leading (B, H).
        q_BxHxNxSxD = blocks_head_major(q_BxPxHxD * d ** -0.5, bs)
        k_BxHxNxSxD, v_BxHxNxSxD = (jnp.transpose(x_BxNxSxHxD, (0, 3, 1, 2, 4))
                                    for x_BxNxSxHxD in (k_BxNxSxHxD, v_BxNxSxHxD))

        p_BxHxNxN, hard_BxHxNxN = self.sort_matrix(k_BxNxSxHxD, key_mask_BxNxS, rng)
        sk_BxHxNxSxD = jnp.einsum("bhij,bhjsd->bhisd", p_BxHxNxN, k_BxHxNxSxD)
        sv_BxHxNxSxD = jnp.einsum("bhij,bhjsd->bhisd", p_BxHxNxN, v_BxHxNxSxD)
        mass_BxHxNxS = jnp.einsum("bhij,bjs->bhis", jax.lax.stop_gradient(p_BxHxNxN),
                                  key_mask_BxNxS.astype(p_BxHxNxN.dtype))
        sorted_ok_BxHxNxS = mass_BxHxNxS > 0
        if hard_BxHxNxN is not None:
            # pi(i) == i: the sorted block repeats the local one; count its keys once.
            stays_BxHxNx1 = jnp.diagonal(hard_BxHxNxN, axis1=-2, axis2=-1)[..., None] > 0.5
            sorted_ok_BxHxNxS = sorted_ok_BxHxNxS & ~stays_BxHxNx1

        local_BxHxNxSxS = jnp.einsum("bhnqd,bhnkd->bhnqk", q_BxHxNxSxD, k_BxHxNxSxD)
        local_BxHxNxSxS = jnp.where(key_mask_BxNxS[:, None, :, None, :], local_BxHxNxSxS, NEG_INF)
        sorted_BxHxNxSxS = jnp.einsum("bhnqd,bhnkd->bhnqk", q_BxHxNxSxD, sk_BxHxNxSxD)
        sorted_BxHxNxSxS = jnp.where(sorted_ok_BxHxNxS[..., None, :], sorted_BxHxNxSxS, NEG_INF)
        # One softmax over own + sorted block, normalised jointly without concatenating.
        drop = self.drop(rng)  # probabilities dropped in the numerator only (no renormalising)
        out_BxHxNxSxD = softmax_pieces(
            [local_BxHxNxSxS, sorted_BxHxNxSxS],
            [("bhnqk,bhnkd->bhnqd", v_BxHxNxSxD), ("bhnqk,bhnkd->bhnqd", sv_BxHxNxSxD)], drop)
        return unblock_head_major(out_BxHxNxSxD)[:, :length]

    def reference_mask(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array,
                       mask_BxL: jax.Array) -> jax.Array:
        """Test-only O(L^2), hard mode: block i sees blocks i and pi(i), real keys only."""
        if not self.cfg.hard:
            raise NotImplementedError("sinkhorn has an exact pattern only with hard=True")
        b, length, h, d = k_BxLxHxD.shape
        bs = self.cfg.block_size
        key_mask_BxP, k_BxPxHxD = pad_to_blocks(bs, mask_BxL, k_BxLxHxD)
        n = k_BxPxHxD.shape[1] // bs
        key_mask_BxNxS = key_mask_BxP.reshape(b, n, bs)
        k_BxNxSxHxD = jnp.where(key_mask_BxNxS[..., None, None],
                                k_BxPxHxD.reshape(b, n, bs, h, d), 0.0)
        _, hard_BxHxNxN = self.sort_matrix(k_BxNxSxHxD, key_mask_BxNxS)
        target_BxHxN = jnp.argmax(hard_BxHxNxN, axis=-1)
        block_L = jnp.arange(length) // bs
        partner_BxHxL = target_BxHxN[..., block_L]
        same_LxL = block_L[:, None] == block_L[None, :]
        sorted_BxHxLxL = partner_BxHxL[..., :, None] == block_L[None, None, None, :]
        return (same_LxL | sorted_BxHxLxL) & mask_BxL[:, None, None, :]
