"""Blocked local attention (the "Local Attention" baseline of Long Range Arena, Tay et al. 2021).

The padded sequence is cut into blocks of `block_size` tokens; each query block attends to its
own key block and `num_neighbours` key blocks on each side (missing neighbours at the sequence
ends are masked). Keys of every query block are assembled by shifting the blocked keys, so one
batched einsum scores all blocks: time and memory O(L * (2w + 1) * block_size), linear in L.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lra.models.attention.base import (Attention, AttentionConfig, alibi_bias, pad_to_multiple,
                                   register, softmax_pv)


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


@register
class LocalAttention(Attention):
    """Each query block attends to key blocks i - w .. i + w (w = num_neighbours)."""

    config_cls = LocalConfig
    check_settings = {'block_size': 16}  # lra.check: small-but-real
    prob_dropout = True
    exact_pattern = True
    supports_alibi = True

    @classmethod
    def check_seq_len(cls, cfg: LocalConfig, seq_len: int) -> None:
        # Any length works (padding is masked); only the pattern's own fields can be invalid.
        if cfg.block_size < 1 or cfg.num_neighbours < 0:
            raise ValueError(f"local needs model.attention.block_size >= 1 and "
                             f"model.attention.num_neighbours >= 0 (got {cfg.block_size}, "
                             f"{cfg.num_neighbours}); fix them for task.seq_len={seq_len}")

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None, alibi_H=None):
        bs, w = self.cfg.block_size, self.cfg.num_neighbours
        length = q_BxLxHxD.shape[1]
        q_BxPxHxD, mask_BxP, _ = pad_to_multiple(q_BxLxHxD * q_BxLxHxD.shape[-1] ** -0.5,
                                                 mask_BxL, bs)
        k_BxPxHxD, _, _ = pad_to_multiple(k_BxLxHxD, mask_BxL, bs)
        v_BxPxHxD, _, _ = pad_to_multiple(v_BxLxHxD, mask_BxL, bs)
        b, padded, h, d = q_BxPxHxD.shape
        nb = padded // bs

        # Heads-major blocked layout so the einsums batch over (b, h, block).
        def blocked(x_BxPxHxD: jax.Array) -> jax.Array:
            return x_BxPxHxD.transpose(0, 2, 1, 3).reshape(b, h, nb, bs, d)

        # Window keys of block i: blocks i-w .. i+w, from w masked blocks of zero padding on
        # each side and 2w+1 shifted slices concatenated along the key axis.
        def window(x_BxHxNxSxD: jax.Array) -> jax.Array:
            x_BxHxExSxD = jnp.pad(x_BxHxNxSxD, ((0, 0), (0, 0), (w, w), (0, 0), (0, 0)))
            return jnp.concatenate([x_BxHxExSxD[:, :, j:j + nb] for j in range(2 * w + 1)],
                                   axis=3)

        q_BxHxNxSxD = blocked(q_BxPxHxD)
        k_BxHxNxWxD = window(blocked(k_BxPxHxD))
        v_BxHxNxWxD = window(blocked(v_BxPxHxD))
        key_ok_BxExS = jnp.pad(mask_BxP.reshape(b, nb, bs), ((0, 0), (w, w), (0, 0)))
        key_ok_Bx1xNx1xW = jnp.concatenate(
            [key_ok_BxExS[:, j:j + nb] for j in range(2 * w + 1)], axis=2
        ).reshape(b, 1, nb, 1, (2 * w + 1) * bs)

        scores_BxHxNxSxW = jnp.einsum("bhnsd,bhntd->bhnst", q_BxHxNxSxD, k_BxHxNxWxD)
        if alibi_H is not None:
            # Query s of block n is n*bs + s; window key t is (n - w)*bs + t: i - j is
            # w*bs + s - t for every block, so one [H, S, W] bias serves them all.
            s_S, t_W = jnp.arange(bs), jnp.arange((2 * w + 1) * bs)
            bias_HxSxW = alibi_bias(alibi_H, w * bs + s_S[:, None] - t_W[None, :],
                                    scores_BxHxNxSxW.dtype)
            scores_BxHxNxSxW = scores_BxHxNxSxW + bias_HxSxW[None, :, None]
        # Normalised after the value einsum, with softmax_pv's hand-written VJP.
        out_BxHxNxSxD = softmax_pv(scores_BxHxNxSxW, key_ok_Bx1xNx1xW, v_BxHxNxWxD,
                                   self.drop(rng))
        out_BxPxHxD = out_BxHxNxSxD.reshape(b, h, padded, d).transpose(0, 2, 1, 3)
        return out_BxPxHxD[:, :length]

    def reference_mask(self, q_BxLxHxD, k_BxLxHxD, mask_BxL):
        b, length, h, _ = q_BxLxHxD.shape
        block_L = jnp.arange(length) // self.cfg.block_size
        near_LxL = jnp.abs(block_L[:, None] - block_L[None, :]) <= self.cfg.num_neighbours
        return near_LxL[None, None] & mask_BxL[:, None, None, :]
