"""Longformer attention (Beltagy et al. 2020): sliding window + a few global tokens.

Query i attends to keys j with |i - j| <= r, r = window // 2 (the band), and the first
`num_global` tokens are global: they attend to every key and every query attends to them.

Band: the padded sequence is cut into N blocks of r positions; query block n scores its
previous, own and next key blocks (3r keys, which contain the whole band of every query in
the block) and a band mask keeps |i - j| <= r. The global keys are appended as g extra
columns, masked where they already lie inside the query's band so each key counts once.
The g global query rows are recomputed as full attention over all L keys.
Memory O(L * (3r + g) + g * L) instead of O(L^2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lra.models.attention.base import (Attention, AttentionConfig, NEG_INF, alibi_bias, drop_piece,
                                   pad_to_multiple, register, softmax_attention)


@dataclasses.dataclass
class LongformerConfig(AttentionConfig):
    kind: str = "longformer"
    # Full window width w: each token sees w // 2 keys on each side (Longformer's w).
    window: int = 256
    # Number of leading global tokens (1 = the CLS token the encoder pools).
    num_global: int = 1


def _blocks_head_major(x_BxPxHxD: jax.Array, n: int, r: int) -> jax.Array:
    """[B, N*R, H, D] -> [B, H, N, R, D]."""
    b, _, h, d = x_BxPxHxD.shape
    return x_BxPxHxD.reshape(b, n, r, h, d).transpose(0, 3, 1, 2, 4)


def _neighbour_blocks(x: jax.Array, axis: int) -> jax.Array:
    """Blocks n-1, n, n+1 (block axis `axis`) side by side on axis+1; zeros beyond the ends."""
    n = x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (1, 1)
    padded = jnp.pad(x, widths)
    shifted = [jax.lax.slice_in_dim(padded, start, start + n, axis=axis) for start in (0, 1, 2)]
    return jnp.concatenate(shifted, axis=axis + 1)


@register
class LongformerAttention(Attention):
    config_cls = LongformerConfig
    check_settings = {'window': 8, 'num_global': 2}  # lra.check: small-but-real
    prob_dropout = True
    exact_pattern = True
    supports_alibi = True

    @classmethod
    def check_seq_len(cls, cfg: LongformerConfig, seq_len: int) -> None:
        if cfg.window < 2:
            raise ValueError(f"longformer needs model.attention.window >= 2 (got {cfg.window}); "
                             "raise model.attention.window")
        if not 0 <= cfg.num_global < seq_len:
            raise ValueError(f"longformer needs 0 <= model.attention.num_global < seq_len "
                             f"(got {cfg.num_global} at seq_len={seq_len}); lower "
                             "model.attention.num_global")

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None,
                 alibi_H: jax.Array | None = None) -> jax.Array:
        """Band attention over neighbouring blocks + global columns; global rows are full."""
        b, length, h, d = q_BxLxHxD.shape
        self.check_seq_len(self.cfg, length)
        r = self.cfg.window // 2
        g = self.cfg.num_global

        q_BxPxHxD, key_mask_BxP, _ = pad_to_multiple(q_BxLxHxD, mask_BxL, r)
        k_BxPxHxD, _, _ = pad_to_multiple(k_BxLxHxD, mask_BxL, r)
        v_BxPxHxD, _, _ = pad_to_multiple(v_BxLxHxD, mask_BxL, r)
        n = q_BxPxHxD.shape[1] // r

        # Head-major blocks so each einsum is a plain batched matmul over (B, H, N).
        q_BxHxNxRxD = _blocks_head_major(q_BxPxHxD, n, r) * d ** -0.5
        # Keys/values of blocks n-1, n, n+1 for every query block: [B, H, N, 3R, D].
        kw_BxHxNxWxD = _neighbour_blocks(_blocks_head_major(k_BxPxHxD, n, r), axis=2)
        vw_BxHxNxWxD = _neighbour_blocks(_blocks_head_major(v_BxPxHxD, n, r), axis=2)
        # Out-of-range neighbour blocks are zero-padded to False, so they are masked too.
        kw_mask_BxNxW = _neighbour_blocks(key_mask_BxP.reshape(b, n, r), axis=1)

        # Query at offset a of block n is position n*r + a; key t of the window is (n-1)*r + t.
        # |i - j| = |r + a - t| <= r  <=>  a <= t <= a + 2r (independent of n).
        a_R, t_W = jnp.arange(r), jnp.arange(3 * r)
        band_RxW = (t_W[None, :] >= a_R[:, None]) & (t_W[None, :] <= a_R[:, None] + 2 * r)
        allowed_Bx1xNxRxW = band_RxW[None, None, None] & kw_mask_BxNxW[:, None, :, None, :]
        scores_BxHxNxRxW = jnp.einsum("bhnqd,bhnkd->bhnqk", q_BxHxNxRxD, kw_BxHxNxWxD)
        dtype = scores_BxHxNxRxW.dtype
        if alibi_H is not None:  # i - j = r + a - t in every block (see the band above)
            bias_HxRxW = alibi_bias(alibi_H, r + a_R[:, None] - t_W[None, :], dtype)
            scores_BxHxNxRxW = scores_BxHxNxRxW + bias_HxRxW[None, :, None]
        scores_BxHxNxRxW = jnp.where(allowed_Bx1xNxRxW, scores_BxHxNxRxW, NEG_INF)
        max_BxHxNxRx1 = scores_BxHxNxRxW.max(-1, keepdims=True)

        if g > 0:
            # Global columns: every query sees keys 0..g-1, unless already inside its band.
            kg_BxHxGxD = k_BxPxHxD[:, :g].transpose(0, 2, 1, 3)
            vg_BxHxGxD = v_BxPxHxD[:, :g].transpose(0, 2, 1, 3)
            pos_P, pos_G = jnp.arange(n * r), jnp.arange(g)
            outside_band_PxG = jnp.abs(pos_P[:, None] - pos_G[None, :]) > r
            allowed_Bx1xNxRxG = (outside_band_PxG[None] & key_mask_BxP[:, None, :g]).reshape(
                b, 1, n, r, g)
            scores_BxHxNxRxG = jnp.einsum("bhnqd,bhgd->bhnqg", q_BxHxNxRxD, kg_BxHxGxD)
            if alibi_H is not None:
                bias_HxPxG = alibi_bias(alibi_H, pos_P[:, None] - pos_G[None, :], dtype)
                scores_BxHxNxRxG = scores_BxHxNxRxG + bias_HxPxG.reshape(h, n, r, g)[None]
            scores_BxHxNxRxG = jnp.where(allowed_Bx1xNxRxG, scores_BxHxNxRxG, NEG_INF)
            max_BxHxNxRx1 = jnp.maximum(max_BxHxNxRx1, scores_BxHxNxRxG.max(-1, keepdims=True))

        # One softmax over band + global columns, normalised jointly without concatenating;
        # the max shift cancels in the ratio, so it needs no gradient.
        max_BxHxNxRx1 = jax.lax.stop_gradient(max_BxHxNxRx1)
        exp_BxHxNxRxW = jnp.exp(scores_BxHxNxRxW - max_BxHxNxRx1)
        denom_BxHxNxRx1 = exp_BxHxNxRxW.sum(-1, keepdims=True)
        drop = self.drop(rng)  # probabilities dropped in the numerator only (no renormalising)
        num_BxHxNxRxD = jnp.einsum("bhnqk,bhnkd->bhnqd", drop_piece(exp_BxHxNxRxW, drop, 0),
                                   vw_BxHxNxWxD)
        if g > 0:
            exp_BxHxNxRxG = jnp.exp(scores_BxHxNxRxG - max_BxHxNxRx1)
            denom_BxHxNxRx1 = denom_BxHxNxRx1 + exp_BxHxNxRxG.sum(-1, keepdims=True)
            num_BxHxNxRxD = num_BxHxNxRxD + jnp.einsum(
                "bhnqg,bhgd->bhnqd", drop_piece(exp_BxHxNxRxG, drop, 1), vg_BxHxGxD)
        out_BxHxNxRxD = num_BxHxNxRxD / denom_BxHxNxRx1
        out_BxPxHxD = out_BxHxNxRxD.transpose(0, 2, 3, 1, 4).reshape(b, n * r, h, d)
        if g == 0:
            return out_BxPxHxD[:, :length]

        # Global rows attend to every real key: a g x P dense block (and a g x P bias).
        bias_HxGxP = None
        if alibi_H is not None:
            pos_G, pos_P = jnp.arange(g), jnp.arange(n * r)
            bias_HxGxP = alibi_bias(alibi_H, pos_G[:, None] - pos_P[None, :], dtype)
        out_global_BxGxHxD = softmax_attention(q_BxPxHxD[:, :g], k_BxPxHxD, v_BxPxHxD,
                                               key_mask_BxP, bias_HxGxP,
                                               None if drop is None else drop.piece(2))
        out_BxPxHxD = out_BxPxHxD.at[:, :g].set(out_global_BxGxHxD)
        return out_BxPxHxD[:, :length]

    def reference_mask(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array,
                       mask_BxL: jax.Array) -> jax.Array:
        """Test-only dense pattern: band |i-j| <= window//2, plus global rows and columns."""
        b, length, h, _ = q_BxLxHxD.shape
        r, g = self.cfg.window // 2, self.cfg.num_global
        pos_L = jnp.arange(length)
        band_LxL = jnp.abs(pos_L[:, None] - pos_L[None, :]) <= r
        is_global_L = pos_L < g
        allowed_LxL = band_LxL | is_global_L[:, None] | is_global_L[None, :]
        allowed_BxLxL = allowed_LxL[None] & mask_BxL[:, None, :]
        return jnp.broadcast_to(allowed_BxLxL[:, None], (b, h, length, length))
