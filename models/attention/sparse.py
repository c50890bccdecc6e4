"""Sparse Transformer "fixed" factorized attention (Child et al. 2019), bidirectional by default.

The sequence is cut into blocks of `l` positions. Query i attends to
  (A1) every key in its own block:           floor(j / l) == floor(i / l)
  (A2) the "summary" keys of every block:    the last c *real* positions of j's block
       (j mod l >= l - c when the block has no padding; in the last, partly padded block they
       are its last c real tokens, so that block is never cut off from the rest)
Both heads of the factorisation are merged into one softmax over the union, as in the paper's
"merged" variant, so every key is counted once: summary keys of the query's own block are
already in A1 and are masked in A2.

Two options reproduce the Long Range Arena code's setting (its Sparse Transformer port ran the
fixed pattern causally, with block 50 and c = 10, and made the CLS token global):
  causal:       query i sees only keys j <= i, in A1 and in A2 alike (a real query always keeps
                itself, so no real row is empty).
  global_first: position 0 (the CLS token of CLS-pooled tasks) is global in both directions,
                regardless of `causal`: every query sees key 0 and query 0 sees every real key.

Layout: queries/keys as N blocks of l (one einsum for A1, scores [B, H, N, l, l]) and the N*c
summary keys gathered once as shared extra columns (scores [B, H, N, l, N*c]). With
global_first, key 0 is one more column (scores [B, H, N, l, 1]) in the same joint softmax,
masked where it already is an A1 or A2 key so it counts once, and row 0 is recomputed as one
dense row over all keys ([B, H, 1, L]).
Cost O(L * (l + c * L / l)), i.e. O(L * sqrt(L)) at the automatic l ~ sqrt(L); global_first
adds O(L).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lra.models.attention.base import (AttentionConfig, DistanceBias, ExactSoftmax,
                                       blocks_head_major, pad_to_blocks, register,
                                       unblock_head_major)
from lra.models.attention.softmax import NEG_INF, softmax_attention, softmax_pieces


@dataclasses.dataclass
class SparseConfig(AttentionConfig):
    kind: str = "sparse"
    # Block (stride) length l; 0 = automatic: ceil(sqrt(L)), at least summary + 1 (the paper
    # sets l ~ sqrt(L) for O(L sqrt L) cost).
    block_size: int = 0
    # c, summary positions per block; the paper reports c in {8, 16, 32} working well.
    # (The LRA code used block_size=50 with c=10.)
    summary: int = 8
    # Query i sees only keys j <= i (A1 and A2 alike). The LRA code's setting: its Sparse
    # Transformer ran the fixed pattern causally (as the paper's autoregressive models do).
    causal: bool = False
    # Position 0 (the CLS token of CLS-pooled tasks) global in both directions, whatever
    # `causal` says: every query sees key 0 and query 0 sees every real key. The LRA code's
    # setting with CLS pooling (its mask had ones on row and column 0).
    global_first: bool = False


def resolve_block_size(cfg: SparseConfig, seq_len: int) -> int:
    """The block length used at `seq_len`: cfg.block_size, or the automatic ~sqrt(L) choice."""
    if cfg.block_size > 0:
        return cfg.block_size
    # ceil(sqrt(L)), at least summary + 1 so a block is more than its summary: l follows sqrt(L)
    # at every L (the kernel pads to whole blocks, so any l works). Rounding l up to a power of
    # two kept it fixed from L = 4^k / 2 to 4^k, where the cost grew like L^2; to a multiple of 8,
    # as much as L^1.8 between neighbouring lengths (L = 1040 -> 2080).
    target = math.isqrt(seq_len - 1) + 1 if seq_len > 1 else 1
    return max(target, cfg.summary + 1)


def summary_slots(key_mask_BxP: jax.Array, n: int, l: int, c: int
                  ) -> tuple[jax.Array, jax.Array]:
    """Positions of each block's summary keys, the last c real positions of the block, as
    int32[B, N*c] (block-major, slot k = k-th real position from the block's end), and whether
    each slot exists (a block with r < c real positions has c - r empty slots)."""
    real_BxNxS = key_mask_BxP.reshape(-1, n, l).astype(jnp.int32)
    # Rank from the block's end among real positions: 1 for the last real one, 2, ...
    rank_BxNxS = jnp.flip(jnp.cumsum(jnp.flip(real_BxNxS, -1), -1), -1) * real_BxNxS
    slot_J = jnp.arange(1, c + 1)
    hit_BxNxJxS = rank_BxNxS[:, :, None, :] == slot_J[None, None, :, None]
    offset_BxNxJ = jnp.argmax(hit_BxNxJxS, axis=-1)
    exists_BxNxJ = hit_BxNxJxS.any(-1)
    pos_BxNxJ = offset_BxNxJ + (jnp.arange(n) * l)[None, :, None]
    return pos_BxNxJ.reshape(-1, n * c).astype(jnp.int32), exists_BxNxJ.reshape(-1, n * c)


@register
class SparseAttention(ExactSoftmax):
    config_cls = SparseConfig
    check_settings = {'block_size': 16}  # lra.check: small-but-real
    # O(L sqrt L) at the automatic block size (a fixed block would be O(L^2)): the largest
    # intermediate, the summary scores [B, H, N l, N c] (N = ceil(L / l) blocks), grows like
    # L^1.5; 1.6 leaves room for rounding l and N up to whole numbers (1.40-1.57 between L and
    # 2L for every L from 512 to 16K).
    growth_settings = {"block_size": 0}
    growth_limit = 1.6

    @classmethod
    def check_seq_len(cls, cfg: SparseConfig, seq_len: int) -> None:
        if cfg.summary < 1:
            raise ValueError(f"sparse needs model.attention.summary >= 1 (got {cfg.summary}); "
                             "set model.attention.summary to e.g. 8")
        if cfg.block_size < 0:
            raise ValueError(f"sparse needs model.attention.block_size >= 0 (got "
                             f"{cfg.block_size}); use 0 for automatic ~sqrt(seq_len)")
        block = resolve_block_size(cfg, seq_len)
        if block <= cfg.summary:
            raise ValueError(f"sparse needs model.attention.block_size={block} > "
                             f"model.attention.summary={cfg.summary}; raise block_size "
                             "(or 0 for automatic) or lower summary")

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None,
                 bias: DistanceBias | None = None) -> jax.Array:
        """Merged fixed-pattern attention: own block (A1) + all blocks' summaries (A2)."""
        b, length, h, d = q_BxLxHxD.shape
        l = resolve_block_size(self.cfg, length)
        c = self.cfg.summary

        key_mask_BxP, q_BxPxHxD, k_BxPxHxD, v_BxPxHxD = pad_to_blocks(
            l, mask_BxL, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
        n = key_mask_BxP.shape[1] // l

        # Head-major layout so every einsum below is a plain batched matmul over (B, H, N).
        q_BxHxNxSxD = blocks_head_major(q_BxPxHxD, l) * d ** -0.5
        k_BxHxNxSxD = blocks_head_major(k_BxPxHxD, l)
        v_BxHxNxSxD = blocks_head_major(v_BxPxHxD, l)
        key_mask_BxNxS = key_mask_BxP.reshape(b, n, l)

        # A2 keys: the last c real positions of each block, gathered once, shared by all queries.
        summary_pos_BxM, summary_mask_BxM = summary_slots(key_mask_BxP, n, l, c)

        def gather(x_BxPxHxD: jax.Array) -> jax.Array:
            picked_BxMxHxD = jnp.take_along_axis(x_BxPxHxD, summary_pos_BxM[:, :, None, None],
                                                 axis=1)
            return picked_BxMxHxD.transpose(0, 2, 1, 3)

        ks_BxHxMxD, vs_BxHxMxD = gather(k_BxPxHxD), gather(v_BxPxHxD)
        summary_block_M = jnp.arange(n * c) // c
        # Own-block summaries are already in A1: drop them here so each key counts once.
        # Causal: only earlier blocks' summaries (all of them lie before any query of block n).
        if self.cfg.causal:
            other_NxM = summary_block_M[None, :] < jnp.arange(n)[:, None]
        else:
            other_NxM = summary_block_M[None, :] != jnp.arange(n)[:, None]
        summary_ok_BxM = summary_mask_BxM
        if self.cfg.global_first:  # key 0 has its own column below: not a summary as well
            summary_ok_BxM = summary_ok_BxM & (summary_pos_BxM != 0)
        allowed2_Bx1xNx1xM = (other_NxM[None] & summary_ok_BxM[:, None, :])[:, None, :, None]

        scores1_BxHxNxSxS = jnp.einsum("bhnqd,bhnkd->bhnqk", q_BxHxNxSxD, k_BxHxNxSxD)
        scores2_BxHxNxSxM = jnp.einsum("bhnqd,bhsd->bhnqs", q_BxHxNxSxD, ks_BxHxMxD)
        dtype = scores1_BxHxNxSxS.dtype
        if bias is not None:
            # A1: query a and key t of one block are a - t apart. A2: query n*l + a and
            # summary s at summary_pos[b, s]: [B, H, N, l, M], like scores2.
            a_S = jnp.arange(l)
            bias1_HxSxS = bias(a_S[:, None] - a_S[None, :], q_BxLxHxD.dtype)
            query_pos_NxS = jnp.arange(n * l).reshape(n, l)
            distance_BxNxSxM = query_pos_NxS[None, ..., None] - summary_pos_BxM[:, None, None, :]
            bias2_HxBxNxSxM = bias(distance_BxNxSxM, q_BxLxHxD.dtype)
            scores1_BxHxNxSxS = scores1_BxHxNxSxS + bias1_HxSxS[None, :, None]
            scores2_BxHxNxSxM = scores2_BxHxNxSxM + jnp.swapaxes(bias2_HxBxNxSxM, 0, 1)
        if self.cfg.causal:  # key t <= query a inside a block <=> j <= i
            a_S = jnp.arange(l)
            allowed1_Bx1xNxSxS = (key_mask_BxNxS[:, None, :, None, :]
                                  & (a_S[None, :] <= a_S[:, None])[None, None, None])
        else:
            allowed1_Bx1xNxSxS = key_mask_BxNxS[:, None, :, None, :]
        scores1_BxHxNxSxS = jnp.where(allowed1_Bx1xNxSxS, scores1_BxHxNxSxS, NEG_INF)
        scores2_BxHxNxSxM = jnp.where(allowed2_Bx1xNx1xM, scores2_BxHxNxSxM, NEG_INF)

        # One softmax over the union A1 | A2 (the paper's merged head), normalised jointly
        # without concatenating the two score sets.
        scores = [scores1_BxHxNxSxS, scores2_BxHxNxSxM]
        values = [("bhnqk,bhnkd->bhnqd", v_BxHxNxSxD), ("bhnqs,bhsd->bhnqd", vs_BxHxMxD)]
        if self.cfg.global_first:
            # Key 0 as one more column for every query outside block 0 (block 0 has it in A1;
            # A2 never has it, see above).
            k0_BxHxD = k_BxPxHxD[:, 0]
            v0_BxHx1xD = v_BxPxHxD[:, :1].transpose(0, 2, 1, 3)
            scores0_BxHxNxSx1 = jnp.einsum("bhnqd,bhd->bhnq", q_BxHxNxSxD, k0_BxHxD)[..., None]
            if bias is not None:  # query n*l + a is that far from key 0
                bias0_HxNxS = bias(jnp.arange(n * l).reshape(n, l), dtype)
                scores0_BxHxNxSx1 = scores0_BxHxNxSx1 + bias0_HxNxS[None, ..., None]
            allowed0_Bx1xNx1x1 = (key_mask_BxP[:, :1] & (jnp.arange(n) > 0)[None, :]
                                  ).reshape(b, 1, n, 1, 1)
            scores0_BxHxNxSx1 = jnp.where(allowed0_Bx1xNx1x1, scores0_BxHxNxSx1, NEG_INF)
            scores.append(scores0_BxHxNxSx1)
            values.append(("bhnqo,bhod->bhnqd", v0_BxHx1xD))  # one key: o has size 1
        drop = self.drop(rng)  # probabilities dropped in the numerator only (no renormalising)
        out_BxPxHxD = unblock_head_major(softmax_pieces(scores, values, drop))
        if not self.cfg.global_first:
            return out_BxPxHxD[:, :length]

        # Row 0 attends to every real key (also when causal): one dense [B, H, 1, P] row.
        bias_Hx1xP = None
        if bias is not None:
            bias_Hx1xP = bias(-jnp.arange(n * l)[None, :], dtype)
        out_first_Bx1xHxD = softmax_attention(q_BxPxHxD[:, :1], k_BxPxHxD, v_BxPxHxD,
                                              key_mask_BxP, bias_Hx1xP,
                                              None if drop is None else drop.piece(3))
        return out_BxPxHxD.at[:, :1].set(out_first_Bx1xHxD)[:, :length]

    def reference_mask(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array,
                       mask_BxL: jax.Array) -> jax.Array:
        """Test-only dense pattern: same block OR key among the last c real ones of its block;
        causal keeps j <= i; global_first adds row 0 and column 0."""
        b, length, h, _ = q_BxLxHxD.shape
        l, c = resolve_block_size(self.cfg, length), self.cfg.summary
        pos_L = jnp.arange(length)
        same_block_LxL = (pos_L[:, None] // l) == (pos_L[None, :] // l)
        # Rank of each real key from its block's end, written out position by position.
        later_same_block_LxL = same_block_LxL & (pos_L[None, :] >= pos_L[:, None])
        rank_BxL = jnp.einsum("lm,bm->bl", later_same_block_LxL.astype(jnp.int32),
                              mask_BxL.astype(jnp.int32))
        summary_BxL = mask_BxL & (rank_BxL <= c)
        allowed_BxLxL = same_block_LxL[None] | summary_BxL[:, None, :]
        if self.cfg.causal:
            allowed_BxLxL = allowed_BxLxL & (pos_L[None, :] <= pos_L[:, None])[None]
        if self.cfg.global_first:
            first_L = pos_L == 0
            allowed_BxLxL = allowed_BxLxL | (first_L[:, None] | first_L[None, :])[None]
        allowed_BxLxL = allowed_BxLxL & mask_BxL[:, None, :]
        return jnp.broadcast_to(allowed_BxLxL[:, None], (b, h, length, length))
