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

from models.attention.base import (NEG_INF, Attention, AttentionConfig, masked_softmax_attention,
                                   pad_to_multiple)


@dataclasses.dataclass
class LongformerConfig(AttentionConfig):
    kind: str = "longformer"
    # Full window width w: each token sees w // 2 keys on each side (Longformer's w).
    window: int = 256
    # Number of leading global tokens (1 = the CLS token the encoder pools).
    num_global: int = 1


def _shift_blocks(x_BxNxRx: jax.Array, offset: int) -> jax.Array:
    """Block n of the result is block n + offset of x (zeros beyond either end)."""
    n = x_BxNxRx.shape[1]
    widths = [(0, 0), (1, 1)] + [(0, 0)] * (x_BxNxRx.ndim - 2)
    return jnp.pad(x_BxNxRx, widths)[:, 1 + offset:1 + offset + n]


def _neighbour_blocks(x_BxNxRx: jax.Array) -> jax.Array:
    """Concatenate blocks n-1, n, n+1 along axis 2: [B, N, 3R, ...]."""
    return jnp.concatenate([_shift_blocks(x_BxNxRx, -1), x_BxNxRx, _shift_blocks(x_BxNxRx, 1)],
                           axis=2)


class LongformerAttention(Attention):
    config_cls = LongformerConfig
    exact_pattern = True

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
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """Band attention over neighbouring blocks + global columns; global rows are full."""
        b, length, h, d = q_BxLxHxD.shape
        self.check_seq_len(self.cfg, length)
        r = self.cfg.window // 2
        g = self.cfg.num_global

        q_BxPxHxD, key_mask_BxP, _ = pad_to_multiple(q_BxLxHxD, mask_BxL, r)
        k_BxPxHxD, _, _ = pad_to_multiple(k_BxLxHxD, mask_BxL, r)
        v_BxPxHxD, _, _ = pad_to_multiple(v_BxLxHxD, mask_BxL, r)
        n = q_BxPxHxD.shape[1] // r

        q_BxNxRxHxD = q_BxPxHxD.reshape(b, n, r, h, d) * d ** -0.5
        # Keys/values of blocks n-1, n, n+1 for every query block: [B, N, 3R, H, D].
        kw_BxNxWxHxD = _neighbour_blocks(k_BxPxHxD.reshape(b, n, r, h, d))
        vw_BxNxWxHxD = _neighbour_blocks(v_BxPxHxD.reshape(b, n, r, h, d))
        # Out-of-range neighbour blocks are zero-padded to False, so they are masked too.
        kw_mask_BxNxW = _neighbour_blocks(key_mask_BxP.reshape(b, n, r))

        # Query at offset a of block n is position n*r + a; key t of the window is (n-1)*r + t.
        # |i - j| = |r + a - t| <= r  <=>  a <= t <= a + 2r (independent of n).
        a_R, t_W = jnp.arange(r), jnp.arange(3 * r)
        band_RxW = (t_W[None, :] >= a_R[:, None]) & (t_W[None, :] <= a_R[:, None] + 2 * r)
        allowed_Bx1xNxRxW = band_RxW[None, None, None] & kw_mask_BxNxW[:, None, :, None, :]
        scores_BxHxNxRxW = jnp.einsum("bnqhd,bnkhd->bhnqk", q_BxNxRxHxD, kw_BxNxWxHxD)
        scores_BxHxNxRxW = jnp.where(allowed_Bx1xNxRxW, scores_BxHxNxRxW, NEG_INF)

        if g == 0:
            probs_BxHxNxRxW = jax.nn.softmax(scores_BxHxNxRxW, axis=-1)
            out_BxNxRxHxD = jnp.einsum("bhnqk,bnkhd->bnqhd", probs_BxHxNxRxW, vw_BxNxWxHxD)
            return out_BxNxRxHxD.reshape(b, n * r, h, d)[:, :length]

        # Global columns: every query sees keys 0..g-1, unless already inside its band.
        kg_BxGxHxD, vg_BxGxHxD = k_BxPxHxD[:, :g], v_BxPxHxD[:, :g]
        pos_P, pos_G = jnp.arange(n * r), jnp.arange(g)
        outside_band_PxG = jnp.abs(pos_P[:, None] - pos_G[None, :]) > r
        allowed_Bx1xNxRxG = (outside_band_PxG[None] & key_mask_BxP[:, None, :g]).reshape(
            b, 1, n, r, g)
        scores_BxHxNxRxG = jnp.einsum("bnqhd,bghd->bhnqg", q_BxNxRxHxD, kg_BxGxHxD)
        scores_BxHxNxRxG = jnp.where(allowed_Bx1xNxRxG, scores_BxHxNxRxG, NEG_INF)

        # One softmax over band + global columns, then split for the two value sets.
        scores_BxHxNxRxT = jnp.concatenate([scores_BxHxNxRxW, scores_BxHxNxRxG], axis=-1)
        probs_BxHxNxRxT = jax.nn.softmax(scores_BxHxNxRxT, axis=-1)
        out_BxNxRxHxD = (
            jnp.einsum("bhnqk,bnkhd->bnqhd", probs_BxHxNxRxT[..., :3 * r], vw_BxNxWxHxD)
            + jnp.einsum("bhnqg,bghd->bnqhd", probs_BxHxNxRxT[..., 3 * r:], vg_BxGxHxD))
        out_BxPxHxD = out_BxNxRxHxD.reshape(b, n * r, h, d)

        # Global rows attend to every real key: a g x P dense block.
        out_global_BxGxHxD = masked_softmax_attention(
            q_BxPxHxD[:, :g], k_BxPxHxD, v_BxPxHxD, key_mask_BxP[:, None, None, :])
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
