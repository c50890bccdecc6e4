"""Transformer-XL segment recurrence (Dai et al. 2019, "Transformer-XL: Attentive Language Models
Beyond a Fixed-Length Context"), optionally with compressive memory (Rae et al. 2020,
"Compressive Transformers for Long-Range Sequence Modelling"), in LRA's bidirectional setting.

The sequence is cut into segments of `segment_len`. Segment s attends to its own keys, to the
keys/values of segment s-1 (the memory) and, with memory=compressive, to the `compressed_segments`
segments before that, mean-pooled over windows of `compress_rate` positions. All segments are
processed in parallel: memories are built by shifting the segmented keys along the segment axis,
so each query sees at most segment_len + segment_len + compressed keys and the cost is linear in L.

Memory goes through `jax.lax.stop_gradient`. TXL caches stop-gradient *hidden states* and
recomputes memory keys with the current W_k; here the projected keys/values themselves are
stopped. The forward values are identical; the difference is only that W_k, W_v get no gradient
through the memory path. Mean pooling commutes with the affine K/V projections, so pooling keys
equals projecting pooled hidden states (the paper's mean-pool compression function; its
attention-reconstruction loss is not needed since mean pooling has no parameters).

Relative positions (rel_pos=True) follow TXL's decomposition, scaled by 1/sqrt(D):
    score_ij = (q_i + u) . k_j + (q_i + v) . W_R r_{i-j},
with a sinusoidal r, learned per-head u, v (init 0) and W_R, and i - j measured over the
concatenated [compressed | memory | segment] positions (a pooled key sits at its window centre).
The distances are the same for every segment, so (q + v) . W_R r is computed per segment over the
distinct distances (O(segment_len) of them) and read into segment_len x keys by TXL's shift (a
reshape; pooled keys' window centres by a gather): linear in L.

Classification pools the CLS token (position 0), which the recurrence never lets see later
segments (memory flows from segment s-1 to s only). With `global_first` (default) position 0
attends to every real key of the sequence, scored like any other pair (content + relative term
at distance 0 - j), in the way Longformer and BigBird make CLS global.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models.attention.base import (Attention, AttentionConfig, blocks_head_major,
                                       check_choice, pad_to_blocks, register,
                                       unblock_head_major)
from lra.models.attention.softmax import softmax_pv, softmax_rows


MEMORIES = ("plain", "compressive")


@dataclasses.dataclass
class TransformerXLConfig(AttentionConfig):
    kind: str = "transformer_xl"
    # Tokens per segment; a segment_len >= L gives one segment (plain attention, no memory).
    segment_len: int = 512
    memory: str = "plain"  # plain (previous segment) | compressive (+ pooled older segments)
    compress_rate: int = 4  # mean-pooling window of the compressed memory (Rae et al. use 3-4)
    compressed_segments: int = 1  # older segments kept compressed (memory=compressive)
    rel_pos: bool = True  # TXL relative positions (u, v, W_R); False = content scores only
    # The first token (CLS) attends to every real position of every segment, with the same
    # (relative) scores, so CLS pooling summarises the whole sequence: under the pure segment
    # recurrence it sees segment 0 only and nothing after it. O(L) extra for one query row.
    global_first: bool = True

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: segments of L/4 (L/2 from 256) + the previous segment's
        memory; the default 512 holds the whole sequence."""
        return {"segment_len": seq_len // 4 if seq_len <= 128 else seq_len // 2}


def relative_sinusoid(distances_U: np.ndarray, dim: int) -> np.ndarray:
    """TXL's sinusoid [sin(d w) | cos(d w)], w_k = 10000^(-2k/dim), for real distances [U, dim]."""
    inv_freq = np.exp(-np.log(10000.0) * np.arange(0, dim, 2) / dim)
    angle_UxF = distances_U[:, None] * inv_freq[None, :]
    return np.concatenate([np.sin(angle_UxF), np.cos(angle_UxF)], axis=-1)[:, :dim]


def pool_windows(x_BxHxNxSxD: jax.Array, keep_BxNxS: jax.Array, rate: int
                 ) -> tuple[jax.Array, jax.Array]:
    """Mean over the real tokens of each window of J = `rate` positions per segment
    [B, H, N, M, D], and whether a window holds any real token [B, N, M] (M = ceil(S / rate))."""
    b, h, n, s, d = x_BxHxNxSxD.shape
    windows = -(-s // rate)
    pad = windows * rate - s
    x_BxHxNxSxD = jnp.pad(x_BxHxNxSxD, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    keep_BxNxMxJ = jnp.pad(keep_BxNxS, ((0, 0), (0, 0), (0, pad))).reshape(b, n, windows, rate)
    x_BxHxNxMxJxD = x_BxHxNxSxD.reshape(b, h, n, windows, rate, d)
    # where, not multiply: padded content must not reach the sum even if it is inf.
    sums_BxHxNxMxD = jnp.where(keep_BxNxMxJ[:, None, :, :, :, None], x_BxHxNxMxJxD, 0.0).sum(4)
    counts_BxNxM = keep_BxNxMxJ.sum(-1)
    inv_BxNxM = 1.0 / jnp.maximum(counts_BxNxM, 1).astype(x_BxHxNxSxD.dtype)
    return sums_BxHxNxMxD * inv_BxNxM[:, None, :, :, None], counts_BxNxM > 0


def shift_segments(x_BxHxNx: jax.Array, by: int, axis: int = 2) -> jax.Array:
    """Segment s gets segment s - by (zeros/False before the first one), gradient stopped."""
    widths = [(0, 0)] * x_BxHxNx.ndim
    widths[axis] = (by, 0)
    shifted = jnp.pad(x_BxHxNx, widths)
    return jax.lax.stop_gradient(jax.lax.slice_in_dim(shifted, 0, x_BxHxNx.shape[axis], axis=axis))


def shift_rows(table_xSxU: jax.Array, width: int) -> jax.Array:
    """[.., S, width] with out[.., i, w] = table[.., i, w + S - 1 - i]: row i's window of a
    table whose columns are consecutive distances in descending order (the relative terms of
    query i and key w), by one reshape (TXL's shift, Dai et al. 2019, appendix B) instead of a
    gather: element (i, w) sits at flat position i * (U - 1) + w + S - 1. Needs U >= S + width."""
    *lead, s, u = table_xSxU.shape
    flat_xF = table_xSxU.reshape(*lead, s * u)[..., s - 1:s - 1 + s * (u - 1)]
    return flat_xF.reshape(*lead, s, u - 1)[..., :width]


@register
class TransformerXLAttention(Attention):
    """Segment-recurrent attention: own segment + previous segment (+ pooled older ones)."""

    config_cls = TransformerXLConfig
    check_settings = {'segment_len': 32, 'memory': 'compressive', 'compressed_segments': 2}  # lra.check: small-but-real
    prob_dropout = True

    def init_variables(self, rngs: nnx.Rngs) -> None:
        num_heads, head_dim = self.num_heads, self.head_dim
        if self.cfg.rel_pos:
            dim = num_heads * head_dim
            # TXL's r_w_bias (u) and r_r_bias (v), zero at init; W_R maps r to per-head keys.
            self.content_bias_HxD = nnx.Param(jnp.zeros((num_heads, head_dim)))
            self.position_bias_HxD = nnx.Param(jnp.zeros((num_heads, head_dim)))
            self.rel_proj = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
        else:
            self.content_bias_HxD = self.position_bias_HxD = self.rel_proj = None

    @classmethod
    def check_seq_len(cls, cfg: TransformerXLConfig, seq_len: int) -> None:
        # Any length works (padding is masked); only the pattern's own fields can be invalid.
        check_choice(cfg, "memory", MEMORIES)
        if cfg.segment_len < 1 or cfg.compress_rate < 1 or cfg.compressed_segments < 0:
            raise ValueError(f"transformer_xl needs model.attention.segment_len >= 1, "
                             f"compress_rate >= 1 and compressed_segments >= 0 (got "
                             f"{cfg.segment_len}, {cfg.compress_rate}, {cfg.compressed_segments}); "
                             f"fix them for task.seq_len={seq_len}")

    def key_offsets(self, seg: int, num_segments: int) -> np.ndarray:
        """Key positions relative to the segment start, in [compressed | memory | own] order."""
        offsets = []
        for m in range(self.num_compressed(num_segments) + 1, 1, -1):  # oldest first
            starts = np.arange(0, seg, self.cfg.compress_rate)
            ends = np.minimum(starts + self.cfg.compress_rate, seg) - 1
            offsets.append(-m * seg + (starts + ends) / 2.0)  # window centres
        if num_segments > 1:
            offsets.append(np.arange(-seg, 0, dtype=np.float64))
        offsets.append(np.arange(seg, dtype=np.float64))
        return np.concatenate(offsets)

    def num_compressed(self, num_segments: int) -> int:
        if self.cfg.memory != "compressive":
            return 0
        return max(0, min(self.cfg.compressed_segments, num_segments - 2))

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None):
        length = q_BxLxHxD.shape[1]
        seg = min(self.cfg.segment_len, length)
        mask_BxP, q_BxPxHxD, k_BxPxHxD, v_BxPxHxD = pad_to_blocks(
            seg, mask_BxL, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
        b, padded, h, d = q_BxPxHxD.shape
        ns = padded // seg

        q_BxHxNxSxD, k_BxHxNxSxD, v_BxHxNxSxD = (blocks_head_major(x, seg)
                                                 for x in (q_BxPxHxD, k_BxPxHxD, v_BxPxHxD))
        keep_BxNxS = mask_BxP.reshape(b, ns, seg)

        # Keys of segment s: [pooled s-C-1 .. s-2 | s-1 | s]; memory parts are stop-gradient.
        keys, values, keeps = [], [], []
        num_compressed = self.num_compressed(ns)
        if num_compressed:
            kc_BxHxNxMxD, keep_BxNxM = pool_windows(k_BxHxNxSxD, keep_BxNxS, self.cfg.compress_rate)
            vc_BxHxNxMxD, _ = pool_windows(v_BxHxNxSxD, keep_BxNxS, self.cfg.compress_rate)
            for m in range(num_compressed + 1, 1, -1):
                keys.append(shift_segments(kc_BxHxNxMxD, m))
                values.append(shift_segments(vc_BxHxNxMxD, m))
                keeps.append(shift_segments(keep_BxNxM, m, axis=1))
        if ns > 1:  # segment 0's memory is the False padding of the shift: masked
            keys.append(shift_segments(k_BxHxNxSxD, 1))
            values.append(shift_segments(v_BxHxNxSxD, 1))
            keeps.append(shift_segments(keep_BxNxS, 1, axis=1))
        keys.append(k_BxHxNxSxD)
        values.append(v_BxHxNxSxD)
        keeps.append(keep_BxNxS)
        k_BxHxNxWxD = jnp.concatenate(keys, axis=3)
        v_BxHxNxWxD = jnp.concatenate(values, axis=3)
        keep_Bx1xNx1xW = jnp.concatenate(keeps, axis=2)[:, None, :, None, :]

        scale = d ** -0.5
        if self.rel_proj is None:
            scores_BxHxNxSxW = jnp.einsum("bhstd,bhswd->bhstw", q_BxHxNxSxD * scale, k_BxHxNxWxD)
        else:
            u_1xHx1x1xD = self.content_bias_HxD[...].astype(q_BxHxNxSxD.dtype)[None, :, None, None]
            v_1xHx1x1xD = self.position_bias_HxD[...].astype(q_BxHxNxSxD.dtype)[None, :, None, None]
            content_BxHxNxSxW = jnp.einsum("bhstd,bhswd->bhstw",
                                           (q_BxHxNxSxD + u_1xHx1x1xD) * scale, k_BxHxNxWxD)
            position_BxHxNxSxW = self.position_scores((q_BxHxNxSxD + v_1xHx1x1xD) * scale, ns)
            scores_BxHxNxSxW = content_BxHxNxSxW + position_BxHxNxSxW
        drop = self.drop(rng)
        out_BxHxNxSxD = softmax_pv(scores_BxHxNxSxW, keep_Bx1xNx1xW, v_BxHxNxWxD,
                                   None if drop is None else drop.piece(0))
        out_BxPxHxD = unblock_head_major(out_BxHxNxSxD)
        if self.cfg.global_first and ns > 1:  # one segment: row 0 already sees every key
            out_BxPxHxD = out_BxPxHxD.at[:, 0].set(
                self.global_row(q_BxPxHxD[:, 0], k_BxPxHxD, v_BxPxHxD, mask_BxP,
                                None if drop is None else drop.piece(1)))
        return out_BxPxHxD[:, :length]

    def position_scores(self, qv_BxHxNxSxD: jax.Array, num_segments: int) -> jax.Array:
        """(q + v) . W_R r_{i-j} for every query slot i and key slot j of a segment [B, H, N, S, W]
        (the distances are the same in every segment). The memory and own keys sit at the
        consecutive offsets -M .. S-1, so their terms are one table over the S + W' consecutive
        distances, read by TXL's shift (Dai et al. 2019, appendix B, `shift_rows`); the pooled
        keys' window centres are gathered from a table over their distinct distances."""
        seg = qv_BxHxNxSxD.shape[3]
        h, d = qv_BxHxNxSxD.shape[1], qv_BxHxNxSxD.shape[-1]
        offsets_W = self.key_offsets(seg, num_segments)
        pooled = len(offsets_W) - (2 * seg if num_segments > 1 else seg)
        width = len(offsets_W) - pooled
        # Descending from the largest (query S-1, first key): one more than the shift reads,
        # so its row stride is >= W' even at S = 1.
        shifted_U = (seg - 1 - offsets_W[pooled]) - np.arange(seg + width, dtype=np.float64)
        dist_SxC = np.arange(seg, dtype=np.float64)[:, None] - offsets_W[None, :pooled]
        pooled_C, index_flat = np.unique(dist_SxC, return_inverse=True)
        distances_U = np.concatenate([pooled_C, shifted_U])
        r_UxE = jnp.asarray(relative_sinusoid(distances_U, h * d), qv_BxHxNxSxD.dtype)
        rel_UxHxD = self.rel_proj(r_UxE).reshape(-1, h, d)
        table_BxHxNxSxU = jnp.einsum("bhstd,nhd->bhstn", qv_BxHxNxSxD, rel_UxHxD)
        position_BxHxNxSxW = shift_rows(table_BxHxNxSxU[..., len(pooled_C):], width)
        if pooled:
            index_1x1x1xSxC = jnp.asarray(index_flat.reshape(dist_SxC.shape))[None, None, None]
            pooled_BxHxNxSxC = jnp.take_along_axis(table_BxHxNxSxU[..., :len(pooled_C)],
                                                   index_1x1x1xSxC, axis=-1)
            position_BxHxNxSxW = jnp.concatenate([pooled_BxHxNxSxC, position_BxHxNxSxW], -1)
        return position_BxHxNxSxW

    def global_row(self, q0_BxHxD: jax.Array, k_BxPxHxD: jax.Array, v_BxPxHxD: jax.Array,
                   mask_BxP: jax.Array, drop=None) -> jax.Array:
        """Position 0 over every real key: [B, H, D]. Scores as in the segments (u, v, W_R r at
        distance 0 - j); no memory here, so no stop-gradient either."""
        padded, h, d = k_BxPxHxD.shape[1:]
        scale = d ** -0.5
        if self.rel_proj is None:
            scores_BxHxP = jnp.einsum("bhd,bphd->bhp", q0_BxHxD * scale, k_BxPxHxD)
        else:
            u_HxD = self.content_bias_HxD[...].astype(q0_BxHxD.dtype)
            v_HxD = self.position_bias_HxD[...].astype(q0_BxHxD.dtype)
            r_PxE = jnp.asarray(relative_sinusoid(-np.arange(padded, dtype=np.float64), h * d),
                                q0_BxHxD.dtype)
            rel_PxHxD = self.rel_proj(r_PxE).reshape(padded, h, d)
            scores_BxHxP = (jnp.einsum("bhd,bphd->bhp", (q0_BxHxD + u_HxD) * scale, k_BxPxHxD)
                            + jnp.einsum("bhd,phd->bhp", (q0_BxHxD + v_HxD) * scale, rel_PxHxD))
        weights_BxHxP, sums_BxHx1 = softmax_rows(scores_BxHxP, mask_BxP[:, None, :])
        if drop is not None:
            weights_BxHxP = weights_BxHxP * drop.keep(weights_BxHxP.shape, weights_BxHxP.dtype)
        return jnp.einsum("bhp,bphd->bhd", weights_BxHxP, v_BxPxHxD) / sums_BxHx1
