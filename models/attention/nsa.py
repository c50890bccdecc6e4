"""Native Sparse Attention (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and
Natively Trainable Sparse Attention", arXiv 2502.11089): three attention branches per query,
mixed by learned gates,

    o_t = g_cmp Attn(q_t, K_cmp, V_cmp) + g_slc Attn(q_t, K_slc, V_slc)
          + g_win Attn(q_t, K_win, V_win)

with Attn the exact softmax(q k / sqrt(D)) v over the branch's keys. As implemented, per head:
- compressed (eq. 7): blocks of l keys at stride d, block m = k_{md .. md+l-1}, each mapped to one
  key by phi(block) = W2 SiLU(sum_s k_s W1[s] + b1_h) + b2 (phi_K and phi_V have their own
  weights, shared by the heads). W1 holds one D x K matrix per block position s: that is the
  intra-block position encoding (an added encoding e_s would only shift b1 by sum_s e_s W1[s],
  so a per-head b1 is exactly a per-head position encoding).
- selected (eqs. 8-11): p_cmp = softmax(q K_cmp^T / sqrt(D)) over the visible compressed keys;
  selection block j is positions j l' .. j l' + l' - 1 and scores
      p_slc[j] = sum_{a=0}^{l'/d-1} sum_{b=0}^{l/d-1} p_cmp[(l'/d) j + a - b],
  i.e. compressed block m counts once per stride-d piece it shares with block j (eq. 9; see the
  departures). p_slc is summed over the heads of a selection group (eq. 10; the
  `selection_groups` field, default 1: all heads of the layer share one selection, as one GQA
  group of the paper does). The n blocks of highest score are gathered (a real gather,
  take_along_axis of the blocks' keys and values, n l' keys per query) and attended with exact
  softmax. As in the paper (sec. 4.1), the initial block and the 2 local blocks are always among
  the n (`num_init_blocks`, `num_local_blocks`); top-k is not differentiable: the gradient
  reaches the selected keys / values, the gates and everything else, never the scores p_slc.
- sliding window: the keys within distance < w of the query.
- gates: g_t = sigmoid(q_t W_g + b_g), one per head and branch (the paper's MLP + sigmoid).

Forms. One lax.map over chunks of Q queries (Q = query_chunk) computes all three branches of a
chunk: scores [Q, L/d] against every compressed key, the selection, the gather of n blocks, a
window of Q + 2w - 2 keys; each chunk is rematerialised in the backward pass (jax.checkpoint),
so its gathers are never stored. Cost per head: time O(L^2 D / d) in the compressed branch
(every query scores all L/d compressed keys, as in the paper) + O(L n l' D) selected
+ O(L (Q + 2w) D) window + O(L l D K / d) compression; memory O(L l D / d) for the compression
blocks plus one chunk's O(Q (L/d + n l' D + w)). No L x L array; linear memory.

Bidirectional (default): every compressed block that starts at a real token (the last ones
zero-extended past the end), every selection block, a two-sided window |t - s| < w; the local
blocks are the query's own block, then the neighbours alternately, the nearer side first
(offsets 0, s, -s, 2s, .. with s the side of the nearer neighbour; one that does not exist is
not replaced). `causal=True`, the paper's form: compressed block m is visible once complete
(md + l - 1 <= t; none visible yields o_cmp = 0), selection blocks are those starting at or
before t, with their keys after t masked (the current partial block), window t - w < s <= t,
local blocks the current and the previous one.
Padding: keys and values at padded positions are zeroed on entry and masked in every softmax;
compressed / selection blocks starting in the padding are invalid (never visible or selected).
Real outputs read nothing at padded positions.

Departures from the paper, with reasons:
- The gates read q (this harness's variant sees q, k, v, not x): q = x W_Q + b_Q spans x W' + b
  whenever W_Q is invertible (deltanet.py derives its gates from v likewise). One linear layer.
- Eq. 9 as printed indexes p_cmp[(l'/d) j - a - b]: its weights (1, 2, 2, 2, 1 at the paper's
  l, d, l') are the overlaps / d, but with blocks numbered from 0 as in eqs. 7 and 11 it scores
  block j by compressed blocks 4j-4 .. 4j, mostly before block j (negative for j = 0);
  lucidrains' reference "cannot parse" it. Here the overlap reading, index (l'/d) j + a - b:
  exactly the compressed blocks overlapping block j, each weighted by the overlap / d (any l,
  l' that d divides; the paper states it for l <= l').
- The paper gives each branch its own keys and values; here the three branches share the
  encoder's k, v (its projections are the encoder's; three would triple W_K and W_V).
- phi's hidden width K = compress_hidden_factor * D and SiLU: the paper names neither.
- Non-causal by default (an encoder for classification); the paper's causal form is `causal`.
- With MHA every head keeps its own K, V: groups share the selected block indices, not the keys.

Shape letters beyond base.py's table, used only in this module: M compressed keys (the "second
sequence" of base.py's M), N selection blocks (or, after `chunks`, query chunks), S positions in
a block, A selected blocks per query (n), I selection groups, J heads per group (H = I J), K the
compression MLP's hidden width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import (Attention, AttentionConfig, blocks_head_major,
                                       pad_to_blocks, register)
from lra.models.attention.softmax import heads_first, softmax_pv, softmax_rows


@dataclasses.dataclass
class NSAConfig(AttentionConfig):
    kind: str = "nsa"
    # l, d, l', n, w: the paper's sec. 4.1 (compression block 32 at stride 16, selection block
    # 64, 16 selected blocks counting the initial and 2 local ones, window 512).
    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    num_selected: int = 16
    window: int = 512
    # Always among the n selected (the paper's sec. 4.1: 1 initial block and 2 local blocks).
    num_init_blocks: int = 1
    num_local_blocks: int = 2
    # Heads split into this many groups; a group's heads share one selection (eq. 10). 1: all
    # heads of the layer share it (the paper's model: 4 GQA groups of 16 heads).
    selection_groups: int = 1
    # phi's hidden width in units of D (the paper does not give it).
    compress_hidden_factor: int = 1
    # Q: queries per chunk of the lax.map (this harness's choice: memory ~ Q n l' D per chunk).
    query_chunk: int = 64
    # The paper's causal form; False: bidirectional (an encoder).
    causal: bool = False

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: compression blocks of min(16, L/8) at half that stride, 4 selected
        blocks of L/8, window L/4: the paper's sizes (32, 16, 64, 16 blocks, 512) select every
        key below L ~ 2K."""
        block = min(16, seq_len // 8)
        return {"compress_block": block, "compress_stride": block // 2,
                "select_block": seq_len // 8, "num_selected": 4, "window": seq_len // 4}


class Branches(NamedTuple):
    """The three branch outputs [B, L, H, D] before the gates, and the selection: block indices
    [B, I, L, A] and whether each slot holds a valid block."""

    cmp: jax.Array
    slc: jax.Array
    win: jax.Array
    chosen_BxIxLxA: jax.Array
    chosen_ok_BxIxLxA: jax.Array


def selection_scores(p_cmp_xM: jax.Array, compress_block: int, stride: int, select_block: int,
                     num_blocks: int) -> jax.Array:
    """p_slc [.., N] from p_cmp [.., M] (eq. 9, overlap reading): compressed block m covers the
    stride pieces m .. m + l/d - 1, selection block j the pieces (l'/d) j .. (l'/d) j + l'/d - 1;
    each piece adds the score of every compressed block covering it."""
    per_block, per_select = compress_block // stride, select_block // stride
    pieces, m = num_blocks * per_select, p_cmp_xM.shape[-1]
    lead = [(0, 0)] * (p_cmp_xM.ndim - 1)
    padded_xP = jnp.pad(p_cmp_xM, lead + [(per_block - 1, pieces - m)])
    piece_xP = sum(padded_xP[..., per_block - 1 - b: per_block - 1 - b + pieces]
                   for b in range(per_block))
    return piece_xP.reshape(*piece_xP.shape[:-1], num_blocks, per_select).sum(-1)


@register
class NativeSparseAttention(Attention):
    """Compressed + selected + sliding-window softmax attention, gated per head."""

    config_cls = NSAConfig
    # lra.check: at L = 128, 32 compressed keys, 4 of 8 selection blocks, a +-15 window.
    check_settings = {"compress_block": 8, "compress_stride": 4, "select_block": 16,
                      "num_selected": 4, "window": 16, "query_chunk": 16}

    @classmethod
    def check_seq_len(cls, cfg: NSAConfig, seq_len: int) -> None:
        sizes = (cfg.compress_stride, cfg.window, cfg.query_chunk, cfg.selection_groups,
                 cfg.compress_hidden_factor)
        if min(sizes) < 1 or cfg.num_init_blocks < 0 or cfg.num_local_blocks < 0:
            raise ValueError(f"nsa needs model.attention.compress_stride, window, query_chunk, "
                             f"selection_groups, compress_hidden_factor >= 1 and num_init_blocks, "
                             f"num_local_blocks >= 0 (got {sizes}, {cfg.num_init_blocks}, "
                             f"{cfg.num_local_blocks})")
        if (cfg.compress_block < cfg.compress_stride or cfg.compress_block % cfg.compress_stride
                or cfg.select_block < cfg.compress_stride
                or cfg.select_block % cfg.compress_stride):
            raise ValueError(f"nsa needs compress_block and select_block to be multiples of "
                             f"compress_stride (the paper's eq. 9), got l={cfg.compress_block}, "
                             f"l'={cfg.select_block}, d={cfg.compress_stride}; e.g. 32, 64, 16")
        forced = cfg.num_init_blocks + cfg.num_local_blocks
        if cfg.num_selected < max(1, forced):
            raise ValueError(f"nsa needs model.attention.num_selected >= num_init_blocks + "
                             f"num_local_blocks = {forced} (got {cfg.num_selected}) for "
                             f"task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg, h, d = self.cfg, self.num_heads, self.head_dim
        if h % cfg.selection_groups:
            raise ValueError(f"nsa: model.attention.selection_groups={cfg.selection_groups} must "
                             f"divide num_heads={h}")
        l, k = cfg.compress_block, cfg.compress_hidden_factor * d
        # phi_K (index 0) and phi_V (1): LeCun-normal weights (fan-in l D, then K), zero biases.
        self.compress_in_2xSxDxK = nnx.Param(
            jax.random.normal(rngs.params(), (2, l, d, k)) / math.sqrt(l * d))
        self.compress_in_bias_2xHxK = nnx.Param(jnp.zeros((2, h, k)))
        self.compress_out_2xKxD = nnx.Param(
            jax.random.normal(rngs.params(), (2, k, d)) / math.sqrt(k))
        self.compress_out_bias_2xD = nnx.Param(jnp.zeros((2, d)))
        # Gates: E -> 3H, output h * 3 + c for head h and branch c (cmp, slc, win).
        self.gate = nnx.Linear(h * d, 3 * h, rngs=rngs)

    def gates(self, q_BxLxHxD: jax.Array) -> jax.Array:
        """g [B, L, H, 3] in (0, 1): branch c of head h."""
        b, length, h, d = q_BxLxHxD.shape
        return jax.nn.sigmoid(self.gate(q_BxLxHxD.reshape(b, length, h * d))).reshape(
            b, length, h, 3)

    def compress(self, k_BxHxLxD: jax.Array, v_BxHxLxD: jax.Array) -> jax.Array:
        """[K_cmp, V_cmp] as [2, B, H, M, D], M = ceil(L / d): phi of every block of l positions
        at stride d (the sequence zero-extended past its end)."""
        cfg = self.cfg
        stride, per_block = cfg.compress_stride, cfg.compress_block // cfg.compress_stride
        b, h, length, d = k_BxHxLxD.shape
        m = -(-length // stride)
        kv_2xBxHxLxD = jnp.stack([k_BxHxLxD, v_BxHxLxD])
        padded = jnp.pad(kv_2xBxHxLxD, [(0, 0)] * 3 + [(0, (m + per_block - 1) * stride - length),
                                                       (0, 0)])
        pieces_2xBxHxMxSxD = padded.reshape(2, b, h, m + per_block - 1, stride, d)
        blocks_2xBxHxMxSxD = jnp.concatenate(
            [pieces_2xBxHxMxSxD[:, :, :, r:r + m] for r in range(per_block)], axis=4)
        hidden_2xBxHxMxK = jax.nn.silu(
            jnp.einsum("cbhmsd,csdk->cbhmk", blocks_2xBxHxMxSxD, self.compress_in_2xSxDxK[...])
            + self.compress_in_bias_2xHxK[...][:, None, :, None, :])
        return (jnp.einsum("cbhmk,ckd->cbhmd", hidden_2xBxHxMxK, self.compress_out_2xKxD[...])
                + self.compress_out_bias_2xD[...][:, None, None, None, :])

    def local_blocks(self, t_Q: jax.Array, num_blocks: int) -> jax.Array:
        """bool [Q, N]: the `num_local_blocks` blocks nearest to each query (module docstring)."""
        size, count = self.cfg.select_block, self.cfg.num_local_blocks
        own_Q = t_Q // size
        offset_QxN = jnp.arange(num_blocks)[None, :] - own_Q[:, None]
        if self.cfg.causal:
            return (offset_QxN <= 0) & (-offset_QxN < count)
        left_gap_Q, right_gap_Q = t_Q - own_Q * size + 1, (own_Q + 1) * size - t_Q
        near_Q = jnp.where(left_gap_Q <= right_gap_Q, -1, 1)  # the nearer neighbour's side
        rank_QxN = 2 * jnp.abs(offset_QxN) - (jnp.sign(offset_QxN) == near_Q[:, None])
        return rank_QxN < count

    def branches(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array) -> Branches:
        cfg = self.cfg
        b, length, h, d = q_BxLxHxD.shape
        stride, size, causal = cfg.compress_stride, cfg.select_block, cfg.causal
        groups = cfg.selection_groups
        k_BxLxHxD, v_BxLxHxD = (jnp.where(mask_BxL[:, :, None, None], x, 0.0)
                                for x in (k_BxLxHxD, v_BxLxHxD))
        q_BxHxLxD, k_BxHxLxD, v_BxHxLxD = (heads_first(x) for x in (
            q_BxLxHxD * d ** -0.5, k_BxLxHxD, v_BxLxHxD))
        k_cmp_BxHxMxD, v_cmp_BxHxMxD = self.compress(k_BxHxLxD, v_BxHxLxD)
        m = k_cmp_BxHxMxD.shape[2]
        cmp_real_BxM = mask_BxL[:, ::stride]
        cmp_end_M = jnp.arange(m) * stride + cfg.compress_block - 1

        mask_BxP, k_BxPxHxD, v_BxPxHxD = pad_to_blocks(size, mask_BxL, k_BxLxHxD, v_BxLxHxD)
        n = mask_BxP.shape[1] // size
        k_blocks_BxHxNxSxD, v_blocks_BxHxNxSxD = (blocks_head_major(x, size)
                                                  for x in (k_BxPxHxD, v_BxPxHxD))
        key_ok_BxNxS = mask_BxP.reshape(b, n, size)
        select_real_BxN = key_ok_BxNxS[:, :, 0]
        a = min(cfg.num_selected, n)

        chunk = min(cfg.query_chunk, length)
        chunks = -(-length // chunk)
        w = min(cfg.window, length)
        width = chunk + (w - 1 if causal else 2 * (w - 1))
        right = chunks * chunk - length + (0 if causal else w - 1)
        k_win_BxHxPxD, v_win_BxHxPxD = (jnp.pad(x, [(0, 0), (0, 0), (w - 1, right), (0, 0)])
                                        for x in (k_BxHxLxD, v_BxHxLxD))
        win_real_BxP = jnp.pad(mask_BxL, [(0, 0), (w - 1, right)])
        q_NxBxHxQxD = jnp.pad(q_BxHxLxD, [(0, 0), (0, 0), (0, chunks * chunk - length), (0, 0)]
                              ).reshape(b, h, chunks, chunk, d).transpose(2, 0, 1, 3, 4)

        def one_chunk(inputs):
            start, q_BxHxQxD = inputs
            t_Q = start + jnp.arange(chunk)
            # Compressed branch, and p_cmp for the selection (no gradient through it).
            visible_BxQxM = jnp.broadcast_to(cmp_real_BxM[:, None, :], (b, chunk, m))
            if causal:
                visible_BxQxM = visible_BxQxM & (cmp_end_M[None, :] <= t_Q[:, None])[None]
            scores_BxHxQxM = jnp.einsum("bhqd,bhmd->bhqm", q_BxHxQxD, k_cmp_BxHxMxD)
            seen_BxHxQxM = visible_BxQxM[:, None]
            o_cmp_BxHxQxD = softmax_pv(scores_BxHxQxM, seen_BxHxQxM, v_cmp_BxHxMxD)
            o_cmp_BxHxQxD = jnp.where(visible_BxQxM.any(-1)[:, None, :, None], o_cmp_BxHxQxD, 0.0)
            weights_BxHxQxM, sums_BxHxQx1 = softmax_rows(jax.lax.stop_gradient(scores_BxHxQxM),
                                                         seen_BxHxQxM)
            p_cmp_BxHxQxM = jnp.where(seen_BxHxQxM, weights_BxHxQxM / sums_BxHxQx1, 0.0)
            # Selection: eq. 9, summed over each group's heads (eq. 10), forced blocks first.
            p_BxIxQxN = selection_scores(p_cmp_BxHxQxM, cfg.compress_block, stride, size, n
                                         ).reshape(b, groups, h // groups, chunk, n).sum(2)
            valid_BxQxN = jnp.broadcast_to(select_real_BxN[:, None, :], (b, chunk, n))
            if causal:
                valid_BxQxN = valid_BxQxN & (jnp.arange(n)[None, :] * size <= t_Q[:, None])[None]
            forced_QxN = (jnp.arange(n) < cfg.num_init_blocks)[None, :] | self.local_blocks(t_Q, n)
            priority_BxIxQxN = jnp.where(valid_BxQxN[:, None],
                                         jnp.where(forced_QxN, jnp.inf, p_BxIxQxN), -jnp.inf)
            top_BxIxQxA, chosen_BxIxQxA = jax.lax.top_k(priority_BxIxQxN, a)
            chosen_ok_BxIxQxA = top_BxIxQxA > -jnp.inf
            # Selected branch: gather the blocks' keys and values, exact softmax over them.
            ok_BxIxQxAxS = chosen_ok_BxIxQxA[..., None] & jnp.take_along_axis(
                key_ok_BxNxS[:, None, None], chosen_BxIxQxA[..., None], axis=3)
            if causal:
                position_BxIxQxAxS = chosen_BxIxQxA[..., None] * size + jnp.arange(size)
                ok_BxIxQxAxS = ok_BxIxQxAxS & (position_BxIxQxAxS <= t_Q[:, None, None])
            chosen_BxHxQxAx1x1 = jnp.repeat(chosen_BxIxQxA, h // groups, axis=1)[..., None, None]
            k_sel_BxHxQxAxSxD, v_sel_BxHxQxAxSxD = (
                jnp.take_along_axis(x[:, :, None], chosen_BxHxQxAx1x1, axis=3)
                for x in (k_blocks_BxHxNxSxD, v_blocks_BxHxNxSxD))
            scores_BxHxQxAxS = jnp.einsum("bhqd,bhqasd->bhqas", q_BxHxQxD, k_sel_BxHxQxAxSxD)
            keys = a * size
            o_slc_BxHxQxD = softmax_pv(
                scores_BxHxQxAxS.reshape(b, h, chunk, 1, keys),
                jnp.repeat(ok_BxIxQxAxS, h // groups, axis=1).reshape(b, h, chunk, 1, keys),
                v_sel_BxHxQxAxSxD.reshape(b, h, chunk, keys, d))[:, :, :, 0]
            # Sliding window: keys start - w + 1 .. start + Q + w - 2 (causal: .. start + Q - 1).
            k_win_BxHxWxD, v_win_BxHxWxD = (jax.lax.dynamic_slice_in_dim(x, start, width, axis=2)
                                            for x in (k_win_BxHxPxD, v_win_BxHxPxD))
            gap_QxW = t_Q[:, None] - (start - (w - 1) + jnp.arange(width))[None, :]
            near_QxW = (gap_QxW >= 0) & (gap_QxW < w) if causal else jnp.abs(gap_QxW) < w
            win_ok_BxQxW = near_QxW[None] & jax.lax.dynamic_slice_in_dim(
                win_real_BxP, start, width, axis=1)[:, None, :]
            scores_BxHxQxW = jnp.einsum("bhqd,bhwd->bhqw", q_BxHxQxD, k_win_BxHxWxD)
            o_win_BxHxQxD = softmax_pv(scores_BxHxQxW, win_ok_BxQxW[:, None], v_win_BxHxWxD)
            return (o_cmp_BxHxQxD, o_slc_BxHxQxD, o_win_BxHxQxD, chosen_BxIxQxA,
                    chosen_ok_BxIxQxA)

        starts_N = jnp.arange(chunks) * chunk
        outs = jax.lax.map(jax.checkpoint(one_chunk, prevent_cse=False), (starts_N, q_NxBxHxQxD))
        o_cmp, o_slc, o_win = (
            x.transpose(1, 0, 3, 2, 4).reshape(b, chunks * chunk, h, d)[:, :length]
            for x in outs[:3])
        chosen, chosen_ok = (x.transpose(1, 2, 0, 3, 4).reshape(b, groups, chunks * chunk, a)[
            :, :, :length] for x in outs[3:])
        return Branches(o_cmp, o_slc, o_win, chosen, chosen_ok)

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None, bias=None):
        out = self.branches(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL)
        g_BxLxHx3 = self.gates(q_BxLxHxD)
        return (g_BxLxHx3[..., 0:1] * out.cmp + g_BxLxHx3[..., 1:2] * out.slc
                + g_BxLxHx3[..., 2:3] * out.win)
