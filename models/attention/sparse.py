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

from lra.models.attention.base import (Attention, AttentionConfig, NEG_INF, alibi_bias, drop_piece,
                                   pad_to_multiple, register, softmax_attention)


@dataclasses.dataclass
class SparseConfig(AttentionConfig):
    kind: str = "sparse"
    # Block (stride) length l; 0 = automatic: smallest power of two >= sqrt(L) that also
    # exceeds `summary` (the paper sets l ~ sqrt(L) for O(L sqrt L) cost).
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
    # Power of two >= sqrt(L); at least summary + 1 so a block is more than its summary.
    target = max(math.isqrt(seq_len - 1) + 1 if seq_len > 1 else 1, cfg.summary + 1)
    return 1 << (target - 1).bit_length()


def summary_slots(key_mask_BxP: jax.Array, n: int, l: int, c: int
                  ) -> tuple[jax.Array, jax.Array]:
    """Positions of each block's summary keys, the last c real positions of the block, as
    int32[B, N*c] (block-major, slot k = k-th real position from the block's end), and whether
    each slot exists (a block with r < c real positions has c - r empty slots)."""
    real_BxNxl = key_mask_BxP.reshape(-1, n, l).astype(jnp.int32)
    # Rank from the block's end among real positions: 1 for the last real one, 2, ...
    rank_BxNxl = jnp.flip(jnp.cumsum(jnp.flip(real_BxNxl, -1), -1), -1) * real_BxNxl
    slot_C = jnp.arange(1, c + 1)
    hit_BxNxCxl = rank_BxNxl[:, :, None, :] == slot_C[None, None, :, None]
    offset_BxNxC = jnp.argmax(hit_BxNxCxl, axis=-1)
    exists_BxNxC = hit_BxNxCxl.any(-1)
    pos_BxNxC = offset_BxNxC + (jnp.arange(n) * l)[None, :, None]
    return pos_BxNxC.reshape(-1, n * c).astype(jnp.int32), exists_BxNxC.reshape(-1, n * c)


def _blocks_head_major(x_BxPxHxD: jax.Array, n: int, l: int) -> jax.Array:
    """[B, N*l, H, D] -> [B, H, N, l, D]."""
    b, _, h, d = x_BxPxHxD.shape
    return x_BxPxHxD.reshape(b, n, l, h, d).transpose(0, 3, 1, 2, 4)


@register
class SparseAttention(Attention):
    config_cls = SparseConfig
    check_settings = {'block_size': 16}  # lra.check: small-but-real
    # O(L sqrt L) at the automatic block size; a fixed block would be O(L^2).
    growth_settings = {"block_size": 0}
    growth_limit = 1.6
    prob_dropout = True
    exact_pattern = True
    supports_alibi = True

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
                 alibi_H: jax.Array | None = None) -> jax.Array:
        """Merged fixed-pattern attention: own block (A1) + all blocks' summaries (A2)."""
        b, length, h, d = q_BxLxHxD.shape
        self.check_seq_len(self.cfg, length)
        l = resolve_block_size(self.cfg, length)
        c = self.cfg.summary

        q_BxPxHxD, key_mask_BxP, _ = pad_to_multiple(q_BxLxHxD, mask_BxL, l)
        k_BxPxHxD, _, _ = pad_to_multiple(k_BxLxHxD, mask_BxL, l)
        v_BxPxHxD, _, _ = pad_to_multiple(v_BxLxHxD, mask_BxL, l)
        n = q_BxPxHxD.shape[1] // l

        # Head-major layout so every einsum below is a plain batched matmul over (B, H, N).
        q_BxHxNxlxD = _blocks_head_major(q_BxPxHxD, n, l) * d ** -0.5
        k_BxHxNxlxD = _blocks_head_major(k_BxPxHxD, n, l)
        v_BxHxNxlxD = _blocks_head_major(v_BxPxHxD, n, l)
        key_mask_BxNxl = key_mask_BxP.reshape(b, n, l)

        # A2 keys: the last c real positions of each block, gathered once, shared by all queries.
        summary_pos_BxS, summary_mask_BxS = summary_slots(key_mask_BxP, n, l, c)

        def gather(x_BxPxHxD: jax.Array) -> jax.Array:
            picked_BxSxHxD = jnp.take_along_axis(x_BxPxHxD, summary_pos_BxS[:, :, None, None],
                                                 axis=1)
            return picked_BxSxHxD.transpose(0, 2, 1, 3)

        ks_BxHxSxD, vs_BxHxSxD = gather(k_BxPxHxD), gather(v_BxPxHxD)
        summary_block_S = jnp.arange(n * c) // c
        # Own-block summaries are already in A1: drop them here so each key counts once.
        # Causal: only earlier blocks' summaries (all of them lie before any query of block n).
        if self.cfg.causal:
            other_NxS = summary_block_S[None, :] < jnp.arange(n)[:, None]
        else:
            other_NxS = summary_block_S[None, :] != jnp.arange(n)[:, None]
        summary_ok_BxS = summary_mask_BxS
        if self.cfg.global_first:  # key 0 has its own column below: not a summary as well
            summary_ok_BxS = summary_ok_BxS & (summary_pos_BxS != 0)
        allowed2_Bx1xNx1xS = (other_NxS[None] & summary_ok_BxS[:, None, :])[:, None, :, None]

        scores1_BxHxNxlxl = jnp.einsum("bhnqd,bhnkd->bhnqk", q_BxHxNxlxD, k_BxHxNxlxD)
        scores2_BxHxNxlxS = jnp.einsum("bhnqd,bhsd->bhnqs", q_BxHxNxlxD, ks_BxHxSxD)
        dtype = scores1_BxHxNxlxl.dtype
        if alibi_H is not None:
            # A1: query a and key t of one block are a - t apart. A2: query n*l + a and
            # summary s at summary_pos[b, s]: [B, H, N, l, S], like scores2.
            a_l = jnp.arange(l)
            bias1_Hxlxl = alibi_bias(alibi_H, a_l[:, None] - a_l[None, :], q_BxLxHxD.dtype)
            query_pos_Nxl = jnp.arange(n * l).reshape(n, l)
            distance_BxNxlxS = query_pos_Nxl[None, ..., None] - summary_pos_BxS[:, None, None, :]
            bias2_HxBxNxlxS = alibi_bias(alibi_H, distance_BxNxlxS, q_BxLxHxD.dtype)
            scores1_BxHxNxlxl = scores1_BxHxNxlxl + bias1_Hxlxl[None, :, None]
            scores2_BxHxNxlxS = scores2_BxHxNxlxS + jnp.swapaxes(bias2_HxBxNxlxS, 0, 1)
        if self.cfg.causal:  # key t <= query a inside a block <=> j <= i
            a_l = jnp.arange(l)
            allowed1_Bx1xNxlxl = (key_mask_BxNxl[:, None, :, None, :]
                                  & (a_l[None, :] <= a_l[:, None])[None, None, None])
        else:
            allowed1_Bx1xNxlxl = key_mask_BxNxl[:, None, :, None, :]
        scores1_BxHxNxlxl = jnp.where(allowed1_Bx1xNxlxl, scores1_BxHxNxlxl, NEG_INF)
        scores2_BxHxNxlxS = jnp.where(allowed2_Bx1xNx1xS, scores2_BxHxNxlxS, NEG_INF)

        # One softmax over the union A1 | A2 (the paper's merged head), normalised jointly
        # without concatenating the two score sets.
        max_BxHxNxlx1 = jnp.maximum(scores1_BxHxNxlxl.max(-1, keepdims=True),
                                    scores2_BxHxNxlxS.max(-1, keepdims=True))
        if self.cfg.global_first:
            # Key 0 as one more column for every query outside block 0 (block 0 has it in A1;
            # A2 never has it, see above).
            k0_BxHxD = k_BxPxHxD[:, 0]
            v0_BxHxD = v_BxPxHxD[:, 0]
            scores0_BxHxNxlx1 = jnp.einsum("bhnqd,bhd->bhnq", q_BxHxNxlxD, k0_BxHxD)[..., None]
            if alibi_H is not None:  # query n*l + a is that far from key 0
                bias0_HxNxl = alibi_bias(alibi_H, jnp.arange(n * l).reshape(n, l), dtype)
                scores0_BxHxNxlx1 = scores0_BxHxNxlx1 + bias0_HxNxl[None, ..., None]
            allowed0_Bx1xNx1x1 = (key_mask_BxP[:, :1] & (jnp.arange(n) > 0)[None, :]
                                  ).reshape(b, 1, n, 1, 1)
            scores0_BxHxNxlx1 = jnp.where(allowed0_Bx1xNx1x1, scores0_BxHxNxlx1, NEG_INF)
            max_BxHxNxlx1 = jnp.maximum(max_BxHxNxlx1, scores0_BxHxNxlx1)
        max_BxHxNxlx1 = jax.lax.stop_gradient(max_BxHxNxlx1)
        exp1_BxHxNxlxl = jnp.exp(scores1_BxHxNxlxl - max_BxHxNxlx1)
        exp2_BxHxNxlxS = jnp.exp(scores2_BxHxNxlxS - max_BxHxNxlx1)
        denom_BxHxNxlx1 = exp1_BxHxNxlxl.sum(-1, keepdims=True) + exp2_BxHxNxlxS.sum(
            -1, keepdims=True)
        drop = self.drop(rng)  # probabilities dropped in the numerator only (no renormalising)
        num_BxHxNxlxD = (
            jnp.einsum("bhnqk,bhnkd->bhnqd", drop_piece(exp1_BxHxNxlxl, drop, 0), v_BxHxNxlxD)
            + jnp.einsum("bhnqs,bhsd->bhnqd", drop_piece(exp2_BxHxNxlxS, drop, 1), vs_BxHxSxD))
        if self.cfg.global_first:
            exp0_BxHxNxlx1 = jnp.exp(scores0_BxHxNxlx1 - max_BxHxNxlx1)
            denom_BxHxNxlx1 = denom_BxHxNxlx1 + exp0_BxHxNxlx1
            num_BxHxNxlxD = num_BxHxNxlxD + drop_piece(exp0_BxHxNxlx1, drop, 2) * v0_BxHxD[
                :, :, None, None, :]
        out_BxHxNxlxD = num_BxHxNxlxD / denom_BxHxNxlx1
        out_BxNxlxHxD = out_BxHxNxlxD.transpose(0, 2, 3, 1, 4)
        out_BxPxHxD = out_BxNxlxHxD.reshape(b, n * l, h, d)
        if not self.cfg.global_first:
            return out_BxPxHxD[:, :length]

        # Row 0 attends to every real key (also when causal): one dense [B, H, 1, P] row.
        bias_Hx1xP = None
        if alibi_H is not None:
            bias_Hx1xP = alibi_bias(alibi_H, -jnp.arange(n * l)[None, :], dtype)
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
