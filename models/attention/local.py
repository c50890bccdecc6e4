"""Blocked local attention (the "Local Attention" baseline of Long Range Arena, Tay et al. 2021).

The padded sequence is cut into blocks of `block_size` tokens; each query block attends to its
own key block and `num_neighbours` key blocks on each side (missing neighbours at the sequence
ends are masked). Keys of every query block are assembled by shifting the blocked keys, so one
batched einsum scores all blocks: time and memory O(L * (2w + 1) * block_size), linear in L.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lra.models.attention.base import (AttentionConfig, ExactSoftmax, blocks_head_major,
                                       neighbour_blocks, pad_to_blocks, register,
                                       unblock_head_major)
from lra.models.attention.softmax import softmax_pv


@dataclasses.dataclass
class LocalConfig(AttentionConfig):
    kind: str = "local"
    # LRA's LocalTransformerEncoder default (lra_benchmarks/models/local/local.py, block_size=50;
    # the task configs keep it).
    block_size: int = 50
    # Key blocks seen on each side of a query block. LRA's baseline uses 0 (non-overlapping
    # blocks, so the first token of a block sees nothing to its left); 1 gives every token at
    # least block_size of context on both sides, at 3x the cost.
    num_neighbours: int = 1

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: blocks of L/8 + one neighbour each side (reach L/8 to L/4 - 1) up to
        L=128; from 256 the default 50."""
        return {"block_size": seq_len // 8} if seq_len <= 128 else {}


@register
class LocalAttention(ExactSoftmax):
    """Each query block attends to key blocks i - w .. i + w (w = num_neighbours)."""

    config_cls = LocalConfig
    check_settings = {'block_size': 16}  # lra.check: small-but-real

    @classmethod
    def check_seq_len(cls, cfg: LocalConfig, seq_len: int) -> None:
        # Any length works (padding is masked); only the pattern's own fields can be invalid.
        if cfg.block_size < 1 or cfg.num_neighbours < 0:
            raise ValueError(f"local needs model.attention.block_size >= 1 and "
                             f"model.attention.num_neighbours >= 0 (got {cfg.block_size}, "
                             f"{cfg.num_neighbours}); fix them for task.seq_len={seq_len}")

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None, bias=None):
        bs, w = self.cfg.block_size, self.cfg.num_neighbours
        length = q_BxLxHxD.shape[1]
        mask_BxP, q_BxPxHxD, k_BxPxHxD, v_BxPxHxD = pad_to_blocks(
            bs, mask_BxL, q_BxLxHxD * q_BxLxHxD.shape[-1] ** -0.5, k_BxLxHxD, v_BxLxHxD)
        b, padded = mask_BxP.shape
        # Window keys of block n: blocks n-w .. n+w side by side (zero padding beyond the ends).
        q_BxHxNxSxD = blocks_head_major(q_BxPxHxD, bs)
        k_BxHxNxWxD = neighbour_blocks(blocks_head_major(k_BxPxHxD, bs), axis=2, width=w)
        v_BxHxNxWxD = neighbour_blocks(blocks_head_major(v_BxPxHxD, bs), axis=2, width=w)
        key_ok_BxNxW = neighbour_blocks(mask_BxP.reshape(b, padded // bs, bs), axis=1, width=w)

        scores_BxHxNxSxW = jnp.einsum("bhnsd,bhntd->bhnst", q_BxHxNxSxD, k_BxHxNxWxD)
        if bias is not None:
            # Query s of block n is n*bs + s; window key t is (n - w)*bs + t: i - j is
            # w*bs + s - t for every block, so one [H, S, W] bias serves them all.
            s_S, t_W = jnp.arange(bs), jnp.arange((2 * w + 1) * bs)
            bias_HxSxW = bias(w * bs + s_S[:, None] - t_W[None, :], scores_BxHxNxSxW.dtype)
            scores_BxHxNxSxW = scores_BxHxNxSxW + bias_HxSxW[None, :, None]
        # Normalised after the value einsum, with softmax_pv's hand-written VJP.
        out_BxHxNxSxD = softmax_pv(scores_BxHxNxSxW, key_ok_BxNxW[:, None, :, None, :],
                                   v_BxHxNxWxD, self.drop(rng))
        return unblock_head_major(out_BxHxNxSxD)[:, :length]

    def reference_mask(self, q_BxLxHxD, k_BxLxHxD, mask_BxL):
        b, length, h, _ = q_BxLxHxD.shape
        block_L = jnp.arange(length) // self.cfg.block_size
        near_LxL = jnp.abs(block_L[:, None] - block_L[None, :]) <= self.cfg.num_neighbours
        return near_LxL[None, None] & mask_BxL[:, None, None, :]
