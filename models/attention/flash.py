"""Memory-efficient exact attention: the FlashAttention algorithm (Dao et al. 2022) in pure JAX.

Keys and values are taken in blocks of `block_size`; each query row keeps a running max m, a
running sum l and an unnormalised output acc (the online softmax, Alg. 1), so the forward holds
one [B, H, L, block] score block at a time and saves only O and the row log-sum-exp. A custom
VJP recomputes each block's scores in the backward pass (Alg. 2 / 4): with delta = rowsum(dO * O)
and P = exp(S - lse), dS = P * (dO V^T - delta), dQ += dS K, dK_j = dS^T Q, dV_j = P^T dO.
Memory is O(L x block) per head in both passes; the result equals dense softmax attention
(values and gradients), padding masks and a distance bias included (RoPE rotates q, k before
the call).
Attention-probability dropout regenerates each block's mask from its keys and the probabilities'
global indices, so its masks (and numbers) are dense's whenever the block divides L.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lra.models.attention.base import (AttentionConfig, DistanceBias, ExactSoftmax, pad_to_blocks,
                                       register)
from lra.models.attention.dense import every_real_key
from lra.models.attention.softmax import _NO_KEYS, NEG_INF, ProbDropout, heads_first


@dataclasses.dataclass
class FlashConfig(AttentionConfig):
    kind: str = "flash"
    block_size: int = 256  # keys per block (256 was fastest on CPU at L=4096: docs/efficiency.md)

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: 4 key blocks of L/4."""
        return {"block_size": seq_len // 4}


def _key_blocks(x_BxHxMxD: jax.Array, block: int) -> jax.Array:
    """[B, H, M, D] -> [N, B, H, block, D] (N = M / block), the scan axis first."""
    b, h, m, d = x_BxHxMxD.shape
    return jnp.moveaxis(x_BxHxMxD.reshape(b, h, m // block, block, d), 2, 0)


def _block_scores(q_BxHxLxD, k_BxHxWxD, ok_Bx1x1xW, j, block, bias):
    """Scores of every query against key block j, masked (and biased): [B, H, L, W]."""
    scores_BxHxLxW = jnp.einsum("bhld,bhwd->bhlw", q_BxHxLxD, k_BxHxWxD)
    if bias is not None:
        pos_q_L = jnp.arange(q_BxHxLxD.shape[2])
        pos_k_W = j * block + jnp.arange(block)
        scores_BxHxLxW = scores_BxHxLxW + bias(pos_q_L[:, None] - pos_k_W[None, :],
                                               scores_BxHxLxW.dtype)[None]
    return jnp.where(ok_Bx1x1xW, scores_BxHxLxW, NEG_INF)


def _blocked_inputs(k_BxHxMxD, v_BxHxMxD, key_mask_BxM, block):
    b, _, m, _ = k_BxHxMxD.shape
    ok_NxBx1x1xW = jnp.moveaxis(key_mask_BxM.reshape(b, m // block, block), 1, 0)[:, :, None, None]
    return (_key_blocks(k_BxHxMxD, block), _key_blocks(v_BxHxMxD, block), ok_NxBx1x1xW,
            jnp.arange(m // block))


def _row_index(q_BxHxLxD, m):
    """uint32[B, H, L, 1]: the row-major index of each query row's first probability in the
    [B, H, L, M] matrix (`ProbDropout.keep`'s indexing); a block's are these + j * block + w."""
    b, h, length, _ = q_BxHxLxD.shape
    ProbDropout.check_count(b * h * length * m)
    return (jax.lax.iota(jnp.uint32, b * h * length) * jnp.uint32(m)).reshape(b, h, length, 1)


def _block_keep(keys_2, rate, rows_BxHxLx1, j, block, dtype):
    """Dropout multipliers of key block j, or None at rate 0."""
    if rate == 0.0:
        return None
    index_BxHxLxW = rows_BxHxLx1 + (j * block + jnp.arange(block)).astype(jnp.uint32)
    return ProbDropout(keys_2, rate).keep_at(index_BxHxLxW, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, key_mask_BxM, keys_2, block, bias, rate):
    return _flash_fwd(q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, key_mask_BxM, keys_2, block, bias,
                      rate)[0]


def _flash_fwd(q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, key_mask_BxM, keys_2, block, bias, rate):
    b, h, length, d = q_BxHxLxD.shape
    qs_BxHxLxD = q_BxHxLxD * d ** -0.5
    rows_BxHxLx1 = _row_index(q_BxHxLxD, k_BxHxMxD.shape[2]) if rate else None

    def step(carry, xs):
        max_BxHxL, sum_BxHxL, acc_BxHxLxD = carry
        k_BxHxWxD, v_BxHxWxD, ok_Bx1x1xW, j = xs
        scores_BxHxLxW = _block_scores(qs_BxHxLxD, k_BxHxWxD, ok_Bx1x1xW, j, block, bias)
        new_max_BxHxL = jnp.maximum(max_BxHxL, scores_BxHxLxW.max(-1))
        rescale_BxHxL = jnp.exp(max_BxHxL - new_max_BxHxL)
        p_BxHxLxW = jnp.exp(scores_BxHxLxW - new_max_BxHxL[..., None])
        sum_BxHxL = sum_BxHxL * rescale_BxHxL + p_BxHxLxW.sum(-1)
        keep_BxHxLxW = _block_keep(keys_2, rate, rows_BxHxLx1, j, block, p_BxHxLxW.dtype)
        if keep_BxHxLxW is not None:  # dropped after the row sum: no renormalisation
            p_BxHxLxW = p_BxHxLxW * keep_BxHxLxW
        acc_BxHxLxD = (acc_BxHxLxD * rescale_BxHxL[..., None]
                       + jnp.einsum("bhlw,bhwd->bhld", p_BxHxLxW, v_BxHxWxD))
        return (new_max_BxHxL, sum_BxHxL, acc_BxHxLxD), None

    init = (jnp.full((b, h, length), -jnp.inf, q_BxHxLxD.dtype),
            jnp.zeros((b, h, length), q_BxHxLxD.dtype), jnp.zeros_like(q_BxHxLxD))
    xs = _blocked_inputs(k_BxHxMxD, v_BxHxMxD, key_mask_BxM, block)
    (max_BxHxL, sum_BxHxL, acc_BxHxLxD), _ = jax.lax.scan(step, init, xs)
    out_BxHxLxD = acc_BxHxLxD / sum_BxHxL[..., None]
    lse_BxHxL = max_BxHxL + jnp.log(sum_BxHxL)
    return out_BxHxLxD, (q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, key_mask_BxM, keys_2, out_BxHxLxD,
                         lse_BxHxL)


def _flash_bwd(block, bias, rate, residuals, dout_BxHxLxD):
    q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, key_mask_BxM, keys_2, out_BxHxLxD, lse_BxHxL = residuals
    b, h, m, d = k_BxHxMxD.shape
    scale = d ** -0.5
    qs_BxHxLxD = q_BxHxLxD * scale
    rows_BxHxLx1 = _row_index(q_BxHxLxD, m) if rate else None
    delta_BxHxLx1 = (dout_BxHxLxD * out_BxHxLxD).sum(-1, keepdims=True)

    def step(dq_BxHxLxD, xs):
        k_BxHxWxD, v_BxHxWxD, ok_Bx1x1xW, j = xs
        scores_BxHxLxW = _block_scores(qs_BxHxLxD, k_BxHxWxD, ok_Bx1x1xW, j, block, bias)
        p_BxHxLxW = jnp.exp(scores_BxHxLxW - lse_BxHxL[..., None])
        dp_BxHxLxW = jnp.einsum("bhld,bhwd->bhlw", dout_BxHxLxD, v_BxHxWxD)
        keep_BxHxLxW = _block_keep(keys_2, rate, rows_BxHxLx1, j, block, p_BxHxLxW.dtype)
        if keep_BxHxLxW is not None:  # dP through the mask; dV sees the dropped P
            dp_BxHxLxW = dp_BxHxLxW * keep_BxHxLxW
        ds_BxHxLxW = p_BxHxLxW * (dp_BxHxLxW - delta_BxHxLx1)
        if keep_BxHxLxW is not None:
            p_BxHxLxW = p_BxHxLxW * keep_BxHxLxW
        dq_BxHxLxD = dq_BxHxLxD + jnp.einsum("bhlw,bhwd->bhld", ds_BxHxLxW, k_BxHxWxD)
        # Contract the query axis as [D, L] x [L, W] (XLA's faster CPU orientation; see
        # base._dense_core_bwd), transposed back to [W, D] outside the loop.
        dk_BxHxDxW = jnp.einsum("bhld,bhlw->bhdw", qs_BxHxLxD, ds_BxHxLxW)
        dv_BxHxDxW = jnp.einsum("bhld,bhlw->bhdw", dout_BxHxLxD, p_BxHxLxW)
        return dq_BxHxLxD, (dk_BxHxDxW, dv_BxHxDxW)

    xs = _blocked_inputs(k_BxHxMxD, v_BxHxMxD, key_mask_BxM, block)
    dq_BxHxLxD, (dk_NxBxHxDxW, dv_NxBxHxDxW) = jax.lax.scan(step, jnp.zeros_like(q_BxHxLxD), xs)

    def unblock(x_NxBxHxDxW):
        return jnp.moveaxis(jnp.swapaxes(x_NxBxHxDxW, -1, -2), 0, 2).reshape(b, h, m, d)

    # The bias is a constant of the model (never trained): a static argument, no cotangent.
    return dq_BxHxLxD * scale, unblock(dk_NxBxHxDxW), unblock(dv_NxBxHxDxW), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BxLxHxD: jax.Array, k_BxMxHxD: jax.Array, v_BxMxHxD: jax.Array,
                    key_mask_BxM: jax.Array, bias: DistanceBias | None = None,
                    block_size: int = 256, drop: ProbDropout | None = None) -> jax.Array:
    """Exact softmax attention of L queries over M keys in O(L x block) memory (fwd and bwd).

    Keys are padded to a multiple of the block (padding masked); the bias sees query positions
    0..L-1 and key positions 0..M-1, one key block at a time."""
    block = min(block_size, k_BxMxHxD.shape[1])
    key_mask_BxM, k_BxMxHxD, v_BxMxHxD = pad_to_blocks(block, key_mask_BxM, k_BxMxHxD, v_BxMxHxD)
    keys_2, rate = (_NO_KEYS, 0.0) if drop is None else (drop.keys_2, drop.rate)
    out_BxHxLxD = _flash(heads_first(q_BxLxHxD), heads_first(k_BxMxHxD), heads_first(v_BxMxHxD),
                         key_mask_BxM, keys_2, block, bias, rate)
    return heads_first(out_BxHxLxD)


@register
class FlashAttention(ExactSoftmax):
    """Dense softmax attention computed blockwise: same outputs, O(L) memory, no L x L array."""

    config_cls = FlashConfig
    check_settings = {'block_size': 32}  # lra.check: small-but-real

    @classmethod
    def check_seq_len(cls, cfg: FlashConfig, seq_len: int) -> None:
        if cfg.block_size < 1:
            raise ValueError(f"model.attention.block_size={cfg.block_size} must be >= 1 "
                             f"(256 is a good CPU default)")

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None, bias=None):
        return flash_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, bias,
                               self.cfg.block_size, self.drop(rng))

    def reference_mask(self, q_BxLxHxD, k_BxLxHxD, mask_BxL):
        return every_real_key(q_BxLxHxD, mask_BxL)  # dense's pattern (flash has no causal form)
