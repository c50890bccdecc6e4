"""Longformer attention (Beltagy et al. 2020): sliding window + a few global tokens.

Query i attends to keys j with |i - j| <= r, r = window // 2 (the band), and the first
`num_global` tokens are global: they attend to every key and every query attends to them.

Band: the padded sequence is cut into N blocks of S = r positions; query block n scores its
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

from lra.models.attention.base import (AttentionConfig, DistanceBias, ExactSoftmax,
                                       blocks_head_major, neighbour_blocks, pad_to_blocks,
                                       register, unblock_head_major)
from lra.models.attention.softmax import NEG_INF, softmax_attention, softmax_pieces


@dataclasses.dataclass
class LongformerConfig(AttentionConfig):
    kind: str = "longformer"
    # Full window width w: each token sees w // 2 keys on each side (Longformer's w).
    window: int = 256
    # Number of leading global tokens (1 = the CLS token the encoder pools).
    num_global: int = 1

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: a band of L/16 each side (window L/8) + 1 global token up to
        L=128; at 256 window 64, set with copy256 (the default 256 reaches its offset of 128)."""
        return {"window": seq_len // 8 if seq_len <= 128 else seq_len // 4}


@register
class LongformerAttention(ExactSoftmax):
    config_cls = LongformerConfig
    check_settings = {'window': 8, 'num_global': 2}  # lra.check: small-but-real

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
                 bias: DistanceBias | None = None) -> jax.Array:
        """Band attention over neighbouring blocks + global columns; global rows are full."""
        b, length, h, d = q_BxLxHxD.shape
        r = self.cfg.window // 2
        g = self.cfg.num_global

        key_mask_BxP, q_BxPxHxD, k_BxPxHxD, v_BxPxHxD = pad_to_blocks(
            r, mask_BxL, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
        n = key_mask_BxP.shape[1] // r

        # Head-major blocks so each einsum is a plain batched matmul over (B, H, N).
        q_BxHxNxSxD = blocks_head_major(q_BxPxHxD, r) * d ** -0.5
        # Keys/values of blocks n-1, n, n+1 for every query block: [B, H, N, 3R, D].
        kw_BxHxNxWxD = neighbour_blocks(blocks_head_major(k_BxPxHxD, r), axis=2)
        vw_BxHxNxWxD = neighbour_blocks(blocks_head_major(v_BxPxHxD, r), axis=2)
        # Out-of-range neighbour blocks are zero-padded to False, so they are masked too.
        kw_mask_BxNxW = neighbour_blocks(key_mask_BxP.reshape(b, n, r), axis=1)

        # Query at offset a of block n is position n*r + a; key t of the window is (n-1)*r + t.
        # |i - j| = |r + a - t| <= r  <=>  a <= t <= a + 2r (independent of n).
        a_S, t_W = jnp.arange(r), jnp.arange(3 * r)
        band_SxW = (t_W[None, :] >= a_S[:, None]) & (t_W[None, :] <= a_S[:, None] + 2 * r)
        allowed_Bx1xNxSxW = band_SxW[None, None, None] & kw_mask_BxNxW[:, None, :, None, :]
        scores_BxHxNxSxW = jnp.einsum("bhnqd,bhnkd->bhnqk", q_BxHxNxSxD, kw_BxHxNxWxD)
        dtype = scores_BxHxNxSxW.dtype
        if bias is not None:  # i - j = r + a - t in every block (see the band above)
            bias_HxSxW = bias(r + a_S[:, None] - t_W[None, :], dtype)
            scores_BxHxNxSxW = scores_BxHxNxSxW + bias_HxSxW[None, :, None]
        scores_BxHxNxSxW = jnp.where(allowed_Bx1xNxSxW, scores_BxHxNxSxW, NEG_INF)
        scores, values = [scores_BxHxNxSxW], [("bhnqk,bhnkd->bhnqd", vw_BxHxNxWxD)]

        if g > 0:
            # Global columns: every query sees keys 0..g-1, unless already inside its band.
            kg_BxHxGxD = k_BxPxHxD[:, :g].transpose(0, 2, 1, 3)
            vg_BxHxGxD = v_BxPxHxD[:, :g].transpose(0, 2, 1, 3)
            pos_P, pos_G = jnp.arange(n * r), jnp.arange(g)
            outside_band_PxG = jnp.abs(pos_P[:, None] - pos_G[None, :]) > r
            allowed_Bx1xNxSxG = (outside_band_PxG[None] & key_mask_BxP[:, None, :g]).reshape(
                b, 1, n, r, g)
            scores_BxHxNxSxG = jnp.einsum("bhnqd,bhgd->bhnqg", q_BxHxNxSxD, kg_BxHxGxD)
            if bias is not None:
                bias_HxPxG = bias(pos_P[:, None] - pos_G[None, :], dtype)
                scores_BxHxNxSxG = scores_BxHxNxSxG + bias_HxPxG.reshape(h, n, r, g)[None]
            scores_BxHxNxSxG = jnp.where(allowed_Bx1xNxSxG, scores_BxHxNxSxG, NEG_INF)
            scores.append(scores_BxHxNxSxG)
            values.append(("bhnqg,bhgd->bhnqd", vg_BxHxGxD))

        # One softmax over band + global columns, normalised jointly without concatenating.
        drop = self.drop(rng)  # probabilities dropped in the numerator only (no renormalising)
        out_BxPxHxD = unblock_head_major(softmax_pieces(scores, values, drop))
        if g == 0:
            return out_BxPxHxD[:, :length]

        # Global rows attend to every real key: a g x P dense block (and a g x P bias).
        bias_HxGxP = None
        if bias is not None:
            pos_G, pos_P = jnp.arange(g), jnp.arange(n * r)
            bias_HxGxP = bias(pos_G[:, None] - pos_P[None, :], dtype)
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
