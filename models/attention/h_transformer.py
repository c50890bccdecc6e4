"""H-Transformer-1D hierarchical attention (Zhu & Soricut 2021, "H-Transformer-1D: Fast
One-Dimensional Hierarchical Attention for Sequences"), bidirectional, as in its LRA runs.

The attention matrix exp(S) is replaced by an H-matrix of blocks of Nr x Nr entries
(Nr = block_size). Level 0 is exact: query block n scores key blocks n-1, n, n+1. Level l >= 1
works on the sequence coarsened l times (position p stands for fine tokens p*2^l .. p*2^l +
2^l - 1): q and k are averaged over those tokens, v (and the ones vector that counts keys) is
summed, so one coarse entry exp(q~ . k~) stands for each of the 2^l x 2^l fine pairs it covers.
Coarse query block I scores coarse key blocks I-1 and I+1, less the corner that level l-1
already covers (its query half-block next to that key half-block); the levels partition the
matrix, each (query, key) pair counted exactly once, and stop at the level with two blocks.

Each level gives, per query row, unnormalised Y_l = sum exp(s - m_l) v~ and D_l = sum
exp(s - m_l) c (c: real fine keys a coarse key sums) with its own row max m_l. From the
coarsest level down they are repeated to the next finer resolution and added under a shared
max (Y = P(Y_coarse) + Y_l, the paper's interpolation), and out = Y / D: one softmax over the
whole pattern. Each level costs O(L_l * Nr) for L_l = L / 2^l: O(L * Nr) time and memory.

Padding: q and k are averaged over the real tokens a coarse position holds (the paper's plain
mean when none is padded), padded v are zeroed and c counts only real keys, so padded tokens
reach no real output at any level. Each level is padded (masked) to whole pairs of blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lra.models.attention.base import (Attention, AttentionConfig, blocks_head_major,
                                       neighbour_blocks, pad_to_blocks, register,
                                       unblock_head_major)
from lra.models.attention.softmax import NEG_INF


@dataclasses.dataclass
class HTransformerConfig(AttentionConfig):
    kind: str = "h_transformer"
    # Nr, the block size at every level (the paper's numerical rank of the off-diagonal
    # blocks). 16: issue 17's default, the Nr of the paper's LRA runs as we recall it (the
    # paper's text was not at hand to re-check).
    block_size: int = 16

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: the exact band in blocks of 8 + coarser levels up to L=128;
        from 256 the default 16."""
        return {"block_size": 8} if seq_len <= 128 else {}


def side_blocks(x: jax.Array, axis: int) -> jax.Array:
    """Blocks n - 1 and n + 1 (block axis `axis`) side by side along axis + 1, zeros beyond
    the ends: the sub- and super-diagonal key blocks of query block n."""
    n = x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (1, 1)
    padded = jnp.pad(x, widths)
    return jnp.concatenate([jax.lax.slice_in_dim(padded, 0, n, axis=axis),
                            jax.lax.slice_in_dim(padded, 2, n + 2, axis=axis)], axis=axis + 1)


def finer_corner(size: int) -> np.ndarray:
    """bool[S, 2S]: the entries of a coarse query block x its (left, right) key blocks that are
    not already covered one level finer, where blocks are half as long: there query half-block
    2I+1 sees key half-block 2I+2 (the right block's first half) and 2I sees 2I-1 (the left
    block's second half)."""
    half = size // 2
    s_S, t_W = np.arange(size)[:, None], np.arange(2 * size)[None, :]
    left_covered = (s_S < half) & (t_W >= half) & (t_W < size)
    right_covered = (s_S >= half) & (t_W >= size) & (t_W < size + half)
    return ~(left_covered | right_covered)


def level_terms(sum_q_BxPxHxD: jax.Array, sum_k_BxPxHxD: jax.Array, sum_v_BxPxHxD: jax.Array,
                count_BxP: jax.Array, size: int, level: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One level's row max m, numerator Y and denominator D ([B, P, H, 1 | D | 1]) from the
    sums of q, k, v over the real fine tokens of each position and their counts."""
    b, padded = count_BxP.shape
    inv_count_BxPx1x1 = 1.0 / jnp.maximum(count_BxP, 1.0)[:, :, None, None]
    q_BxHxNxSxD = blocks_head_major(sum_q_BxPxHxD * inv_count_BxPx1x1, size)
    k_BxHxNxSxD = blocks_head_major(sum_k_BxPxHxD * inv_count_BxPx1x1, size)
    v_BxHxNxSxD = blocks_head_major(sum_v_BxPxHxD, size)
    count_BxNxS = count_BxP.reshape(b, padded // size, size)
    if level == 0:  # exact: own block and both neighbours
        window = neighbour_blocks
        allowed_SxW = np.ones((size, 3 * size), bool)
    else:  # coarse: the two off-diagonal blocks, less what level - 1 covers
        window = side_blocks
        allowed_SxW = finer_corner(size)
    k_BxHxNxWxD, v_BxHxNxWxD = window(k_BxHxNxSxD, axis=2), window(v_BxHxNxSxD, axis=2)
    count_BxNxW = window(count_BxNxS, axis=1)
    allowed_Bx1xNxSxW = (count_BxNxW > 0)[:, None, :, None, :] & allowed_SxW

    scores_BxHxNxSxW = jnp.einsum("bhnsd,bhntd->bhnst", q_BxHxNxSxD, k_BxHxNxWxD)
    scores_BxHxNxSxW = jnp.where(allowed_Bx1xNxSxW, scores_BxHxNxSxW, NEG_INF)
    # The max shift cancels in Y / D, so it needs no gradient; a row with nothing allowed keeps
    # m = NEG_INF and zero weights (where, not exp(0)), so it drops out of the merge.
    max_BxHxNxSx1 = jax.lax.stop_gradient(scores_BxHxNxSxW.max(-1, keepdims=True))
    weights_BxHxNxSxW = jnp.where(allowed_Bx1xNxSxW,
                                  jnp.exp(scores_BxHxNxSxW - max_BxHxNxSx1), 0.0)
    num_BxHxNxSxD = jnp.einsum("bhnst,bhntd->bhnsd", weights_BxHxNxSxW, v_BxHxNxWxD)
    # Each coarse key stands for c real fine keys: the normaliser counts every one of them.
    den_BxHxNxSx1 = jnp.einsum("bhnst,bnt->bhns", weights_BxHxNxSxW, count_BxNxW)[..., None]
    return tuple(unblock_head_major(x) for x in (max_BxHxNxSx1, num_BxHxNxSxD, den_BxHxNxSx1))


def coarsen(*xs_BxPx: jax.Array) -> list[jax.Array]:
    """Sum adjacent position pairs (length axis 1, even): [B, P, ...] -> [B, P / 2, ...]."""
    return [x.reshape(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:]).sum(2) for x in xs_BxPx]


@register
class HTransformerAttention(Attention):
    """Hierarchical (H-matrix) softmax attention: exact near the diagonal, coarsened q, k and
    summed v on the off-diagonal blocks of ever coarser levels."""

    config_cls = HTransformerConfig
    check_settings = {'block_size': 8}  # lra.check: L=128 gives 16 blocks and 4 levels

    @classmethod
    def check_seq_len(cls, cfg: HTransformerConfig, seq_len: int) -> None:
        # Any length works (padding is masked); a coarse block halves into finer blocks.
        if cfg.block_size < 2 or cfg.block_size % 2:
            raise ValueError(f"h_transformer needs an even model.attention.block_size >= 2 (got "
                             f"{cfg.block_size}); fix it for task.seq_len={seq_len}")

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None):
        size = self.cfg.block_size
        length = q_BxLxHxD.shape[1]
        count_BxP, q_BxPxHxD, k_BxPxHxD, v_BxPxHxD = pad_to_blocks(
            size, mask_BxL.astype(q_BxLxHxD.dtype),
            q_BxLxHxD * q_BxLxHxD.shape[-1] ** -0.5, k_BxLxHxD, v_BxLxHxD)
        # Per position: sums over its real fine tokens (level 0: the token itself, or zero).
        keep_BxPx1x1 = count_BxP[:, :, None, None]
        sums = [x * keep_BxPx1x1 for x in (q_BxPxHxD, k_BxPxHxD, v_BxPxHxD)]

        levels, level = [], 0
        while True:  # log2(L / Nr) levels, each a static shape
            levels.append(level_terms(*sums, count_BxP, size, level))
            if count_BxP.shape[1] <= 2 * size:  # two blocks or fewer: every pair is covered
                break
            count_BxP, *sums = pad_to_blocks(2 * size, count_BxP, *sums)
            count_BxP, *sums = coarsen(count_BxP, *sums)
            level += 1

        # Coarse to fine: repeat each coarse position over its two finer ones and add, both
        # sides rescaled to their shared row max.
        max_BxPxHx1, num_BxPxHxD, den_BxPxHx1 = levels.pop()
        while levels:
            fine_max, fine_num, fine_den = levels.pop()
            finer = fine_max.shape[1]
            up_max, up_num, up_den = (jnp.repeat(x, 2, axis=1)[:, :finer]
                                      for x in (max_BxPxHx1, num_BxPxHxD, den_BxPxHx1))
            max_BxPxHx1 = jnp.maximum(up_max, fine_max)
            up_scale, fine_scale = jnp.exp(up_max - max_BxPxHx1), jnp.exp(fine_max - max_BxPxHx1)
            num_BxPxHxD = up_num * up_scale + fine_num * fine_scale
            den_BxPxHx1 = up_den * up_scale + fine_den * fine_scale
        # A padded query may see no real key at all: any finite output will do there.
        out_BxPxHxD = num_BxPxHxD / jnp.where(den_BxPxHx1 > 0, den_BxPxHx1, 1.0)
        return out_BxPxHxD[:, :length]
