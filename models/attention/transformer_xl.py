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
distinct distances (O(segment_len) of them) and gathered into segment_len x keys: linear in L.

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

from lra.models.attention.base import (Attention, AttentionConfig, pad_to_multiple, register,
                                   softmax_pv, softmax_rows)


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


def relative_sinusoid(distances_N: np.ndarray, dim: int) -> np.ndarray:
    """TXL's sinusoid [sin(d w) | cos(d w)], w_k = 10000^(-2k/dim), for real distances [N, dim]."""
    inv_freq = np.exp(-np.log(10000.0) * np.arange(0, dim, 2) / dim)
    angle_NxF = distances_N[:, None] * inv_freq[None, :]
    return np.concatenate([np.sin(angle_NxF), np.cos(angle_NxF)], axis=-1)[:, :dim]


def pool_windows(x_BxHxSxTxD: jax.Array, keep_BxSxT: jax.Array, rate: int
                 ) -> tuple[jax.Array, jax.Array]:
    """Mean over the real tokens of each window of `rate` positions per segment [B, H, S, C, D],
    and whether a window holds any real token [B, S, C] (C = ceil(T / rate))."""
    b, h, s, t, d = x_BxHxSxTxD.shape
    windows = -(-t // rate)
    pad = windows * rate - t
    x_BxHxSxTxD = jnp.pad(x_BxHxSxTxD, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
    keep_BxSxCxR = jnp.pad(keep_BxSxT, ((0, 0), (0, 0), (0, pad))).reshape(b, s, windows, rate)
    x_BxHxSxCxRxD = x_BxHxSxTxD.reshape(b, h, s, windows, rate, d)
    # where, not multiply: padded content must not reach the sum even if it is inf.
    sums_BxHxSxCxD = jnp.where(keep_BxSxCxR[:, None, :, :, :, None], x_BxHxSxCxRxD, 0.0).sum(4)
    counts_BxSxC = keep_BxSxCxR.sum(-1)
    inv_BxSxC = 1.0 / jnp.maximum(counts_BxSxC, 1).astype(x_BxHxSxTxD.dtype)
    return sums_BxHxSxCxD * inv_BxSxC[:, None, :, :, None], counts_BxSxC > 0


def shift_segments(x_BxHxSx: jax.Array, by: int, axis: int = 2) -> jax.Array:
    """Segment s gets segment s - by (zeros/False before the first one), gradient stopped."""
    widths = [(0, 0)] * x_BxHxSx.ndim
    widths[axis] = (by, 0)
    shifted = jnp.pad(x_BxHxSx, widths)
    return jax.lax.stop_gradient(jax.lax.slice_in_dim(shifted, 0, x_BxHxSx.shape[axis], axis=axis))


@register
class TransformerXLAttention(Attention):
    """Segment-recurrent attention: own segment + previous segment (+ pooled older ones)."""

    config_cls = TransformerXLConfig
    check_settings = {'segment_len': 32, 'memory': 'compressive', 'compressed_segments': 2}  # lra.check: small-but-real
    prob_dropout = True

    def __init__(self, cfg: TransformerXLConfig, *, num_heads: int, head_dim: int, max_len: int,
                 rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, head_dim=head_dim, max_len=max_len, rngs=rngs)
        if cfg.rel_pos:
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
        if cfg.memory not in ("plain", "compressive"):
            raise ValueError(f"model.attention.memory={cfg.memory!r}; use plain or compressive")
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
        q_BxPxHxD, mask_BxP, _ = pad_to_multiple(q_BxLxHxD, mask_BxL, seg)
        k_BxPxHxD, _, _ = pad_to_multiple(k_BxLxHxD, mask_BxL, seg)
        v_BxPxHxD, _, _ = pad_to_multiple(v_BxLxHxD, mask_BxL, seg)
        b, padded, h, d = q_BxPxHxD.shape
        ns = padded // seg

        def segments(x_BxPxHxD: jax.Array) -> jax.Array:
            return x_BxPxHxD.reshape(b, ns, seg, h, d).transpose(0, 3, 1, 2, 4)

        q_BxHxSxTxD = segments(q_BxPxHxD)
        k_BxHxSxTxD, v_BxHxSxTxD = segments(k_BxPxHxD), segments(v_BxPxHxD)
        keep_BxSxT = mask_BxP.reshape(b, ns, seg)

        # Keys of segment s: [pooled s-C-1 .. s-2 | s-1 | s]; memory parts are stop-gradient.
        keys, values, keeps = [], [], []
        num_compressed = self.num_compressed(ns)
        if num_compressed:
            kc_BxHxSxCxD, keep_BxSxC = pool_windows(k_BxHxSxTxD, keep_BxSxT, self.cfg.compress_rate)
            vc_BxHxSxCxD, _ = pool_windows(v_BxHxSxTxD, keep_BxSxT, self.cfg.compress_rate)
            for m in range(num_compressed + 1, 1, -1):
                keys.append(shift_segments(kc_BxHxSxCxD, m))
                values.append(shift_segments(vc_BxHxSxCxD, m))
                keeps.append(shift_segments(keep_BxSxC, m, axis=1))
        if ns > 1:  # segment 0's memory is the False padding of the shift: masked
            keys.append(shift_segments(k_BxHxSxTxD, 1))
            values.append(shift_segments(v_BxHxSxTxD, 1))
            keeps.append(shift_segments(keep_BxSxT, 1, axis=1))
        keys.append(k_BxHxSxTxD)
        values.append(v_BxHxSxTxD)
        keeps.append(keep_BxSxT)
        k_BxHxSxWxD = jnp.concatenate(keys, axis=3)
        v_BxHxSxWxD = jnp.concatenate(values, axis=3)
        keep_Bx1xSx1xW = jnp.concatenate(keeps, axis=2)[:, None, :, None, :]

        scale = d ** -0.5
        if self.rel_proj is None:
            scores_BxHxSxTxW = jnp.einsum("bhstd,bhswd->bhstw", q_BxHxSxTxD * scale, k_BxHxSxWxD)
        else:
            u_1xHx1x1xD = self.content_bias_HxD[...].astype(q_BxHxSxTxD.dtype)[None, :, None, None]
            v_1xHx1x1xD = self.position_bias_HxD[...].astype(q_BxHxSxTxD.dtype)[None, :, None, None]
            content_BxHxSxTxW = jnp.einsum("bhstd,bhswd->bhstw",
                                           (q_BxHxSxTxD + u_1xHx1x1xD) * scale, k_BxHxSxWxD)
            # i - j depends only on (query slot, key slot), not on the segment: one table.
            dist_TxW = np.arange(seg, dtype=np.float64)[:, None] - self.key_offsets(seg, ns)[None]
            distances_N, index_TW = np.unique(dist_TxW, return_inverse=True)
            r_NxE = jnp.asarray(relative_sinusoid(distances_N, h * d), q_BxHxSxTxD.dtype)
            rel_NxHxD = self.rel_proj(r_NxE).reshape(-1, h, d)
            rel_BxHxSxTxN = jnp.einsum("bhstd,nhd->bhstn",
                                       (q_BxHxSxTxD + v_1xHx1x1xD) * scale, rel_NxHxD)
            index_1x1x1xTxW = jnp.asarray(index_TW.reshape(dist_TxW.shape))[None, None, None]
            position_BxHxSxTxW = jnp.take_along_axis(rel_BxHxSxTxN, index_1x1x1xTxW, axis=-1)
            scores_BxHxSxTxW = content_BxHxSxTxW + position_BxHxSxTxW
        drop = self.drop(rng)
        out_BxHxSxTxD = softmax_pv(scores_BxHxSxTxW, keep_Bx1xSx1xW, v_BxHxSxWxD,
                                   None if drop is None else drop.piece(0))
        out_BxPxHxD = out_BxHxSxTxD.transpose(0, 2, 3, 1, 4).reshape(b, padded, h, d)
        if self.cfg.global_first and ns > 1:  # one segment: row 0 already sees every key
            out_BxPxHxD = out_BxPxHxD.at[:, 0].set(
                self.global_row(q_BxPxHxD[:, 0], k_BxPxHxD, v_BxPxHxD, mask_BxP,
                                None if drop is None else drop.piece(1)))
        return out_BxPxHxD[:, :length]

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
