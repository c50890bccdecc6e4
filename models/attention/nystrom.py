"""Nystromformer attention (Xiong et al. 2021, "Nystromformer: A Nystrom-Based Algorithm for
Approximating Self-Attention").

softmax(Q K^T) is approximated through m landmarks (segment means of Q and K):
    out = F A^+ (B V),  F = softmax(Q K~^T), A = softmax(Q~ K~^T), B = softmax(Q~ K^T),
with A^+ from the paper's iterative Moore-Penrose method, plus an optional depthwise
convolution skip on V (authors' LRA code). Cost O(L m D + m^3 pinv_iters), never L x L.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models.attention.base import Attention, AttentionConfig, register
from lra.models.attention.softmax import NEG_INF


@dataclasses.dataclass
class NystromConfig(AttentionConfig):
    kind: str = "nystrom"
    num_landmarks: int = 64  # m; the paper's LRA runs use 64 ("nystrom-64")
    pinv_iters: int = 6  # iterative Moore-Penrose steps; 6 in the paper and authors' code
    conv_kernel: int = 35  # depthwise conv skip on V over length (authors' LRA code); 0 = off

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: L/8 landmarks up to L=128; from 256 the default 64."""
        return {"num_landmarks": seq_len // 8} if seq_len <= 128 else {}


def iterative_pinv(a_BxHxMxM: jax.Array, num_iters: int) -> jax.Array:
    """Moore-Penrose pseudo-inverse by the paper's iteration (Razavi et al. 2014).

    Z0 = A^T / (||A||_1 ||A||_inf);  Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4.
    """
    col_norm_BxHx1x1 = jnp.max(jnp.sum(jnp.abs(a_BxHxMxM), axis=-2), axis=-1)[..., None, None]
    row_norm_BxHx1x1 = jnp.max(jnp.sum(jnp.abs(a_BxHxMxM), axis=-1), axis=-1)[..., None, None]
    norm_BxHx1x1 = col_norm_BxHx1x1 * row_norm_BxHx1x1
    # A = 0 (a sequence with no real token) has pseudo-inverse 0: keep Z0 = 0 instead of 0/0.
    norm_BxHx1x1 = jnp.where(norm_BxHx1x1 > 0, norm_BxHx1x1, 1.0)
    z_BxHxMxM = jnp.swapaxes(a_BxHxMxM, -1, -2) / norm_BxHx1x1
    eye_MxM = jnp.eye(a_BxHxMxM.shape[-1], dtype=a_BxHxMxM.dtype)
    for _ in range(num_iters):  # a handful of fixed steps: unrolled, static shapes
        az_BxHxMxM = a_BxHxMxM @ z_BxHxMxM
        inner = 15 * eye_MxM - az_BxHxMxM @ (7 * eye_MxM - az_BxHxMxM)
        z_BxHxMxM = 0.25 * z_BxHxMxM @ (13 * eye_MxM - az_BxHxMxM @ inner)
    return z_BxHxMxM


def segment_means(x_BxHxLxD: jax.Array, mask_BxL: jax.Array, num_segments: int
                  ) -> tuple[jax.Array, jax.Array]:
    """Means over the real tokens of each of `num_segments` contiguous segments [B, H, M, D],
    and whether a segment holds any real token [B, M]."""
    b, h, length, d = x_BxHxLxD.shape
    keep_BxMxS = mask_BxL.reshape(b, num_segments, length // num_segments)
    x_BxHxMxSxD = x_BxHxLxD.reshape(b, h, num_segments, length // num_segments, d)
    sums_BxHxMxD = jnp.einsum("bhmsd,bms->bhmd", x_BxHxMxSxD, keep_BxMxS.astype(x_BxHxLxD.dtype))
    counts_BxM = jnp.sum(keep_BxMxS, axis=-1)
    inv_count_Bx1xMx1 = 1.0 / jnp.maximum(counts_BxM, 1)[:, None, :, None].astype(x_BxHxLxD.dtype)
    return sums_BxHxMxD * inv_count_Bx1xMx1, counts_BxM > 0


@register
class NystromAttention(Attention):
    """Nystrom approximation of softmax attention with segment-mean landmarks."""

    config_cls = NystromConfig
    check_settings = {'num_landmarks': 16}  # lra.check: small-but-real

    def init_variables(self, rngs: nnx.Rngs) -> None:
        size = self.cfg.conv_kernel
        if size > 0:
            # One length-kernel per head shared over head_dim (authors: Conv2d groups=heads);
            # PyTorch's default Conv2d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = size ** -0.5
            self.conv_KxH = nnx.Param(jax.random.uniform(
                rngs.params(), (size, self.num_heads), minval=-bound, maxval=bound))
        else:
            self.conv_KxH = None

    @classmethod
    def check_seq_len(cls, cfg: NystromConfig, seq_len: int) -> None:
        if cfg.num_landmarks > seq_len:
            raise ValueError(
                f"nystrom needs seq_len >= model.attention.num_landmarks={cfg.num_landmarks} "
                f"(got {seq_len}); lower model.attention.num_landmarks or raise task.seq_len")

    def conv_skip(self, v_BxHxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        """Depthwise 'same' convolution of the (padding-zeroed) values along the length axis.

        Computed as banded block-Toeplitz matmuls over chunks of C positions (out chunk i =
        band_lo chunk_i + band_hi head of chunk_{i+1}): XLA's grouped conv is ~10x slower on CPU.
        """
        size = self.cfg.conv_kernel
        b, h, length, d = v_BxHxLxD.shape
        chunk = max(64, size - 1)  # the next chunk must hold the size-1 trailing taps
        num_chunks = -(-length // chunk)
        v_BxHxLxD = v_BxHxLxD * mask_BxL[:, None, :, None].astype(v_BxHxLxD.dtype)
        front = size // 2  # 'same' padding: output i sees inputs i - front .. i - front + size-1
        back = (num_chunks + 1) * chunk - length - front
        v_pad = jnp.pad(v_BxHxLxD, ((0, 0), (0, 0), (front, back), (0, 0)))
        chunks_BxHxNxSxD = v_pad.reshape(b, h, num_chunks + 1, chunk, d)
        # band[h, i, j] = w[j - i, h] for 0 <= j - i < size: output row i of a chunk reads
        # padded inputs i .. i + size - 1 of the window chunk_i ++ chunk_{i+1}[:size-1].
        offset_SxW = np.arange(chunk + size - 1)[None, :] - np.arange(chunk)[:, None]
        in_band_SxW = (offset_SxW >= 0) & (offset_SxW < size)
        taps_HxK = jnp.swapaxes(self.conv_KxH[...], 0, 1).astype(v_BxHxLxD.dtype)
        band_HxSxW = jnp.where(in_band_SxW[None], taps_HxK[:, np.clip(offset_SxW, 0, size - 1)],
                               0.0)
        out_BxHxNxSxD = (
            jnp.einsum("hij,bhnjd->bhnid", band_HxSxW[:, :, :chunk],
                       chunks_BxHxNxSxD[:, :, :num_chunks])
            + jnp.einsum("hij,bhnjd->bhnid", band_HxSxW[:, :, chunk:],
                         chunks_BxHxNxSxD[:, :, 1:, :size - 1]))
        return out_BxHxNxSxD.reshape(b, h, num_chunks * chunk, d)[:, :, :length]

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        num_lm = self.cfg.num_landmarks
        scale = q_BxLxHxD.shape[-1] ** -0.5
        # Head-major layout: every product below is a plain batched matmul.
        q_BxHxLxD, k_BxHxLxD, v_BxHxLxD = (jnp.swapaxes(x, 1, 2)
                                           for x in (q_BxLxHxD * scale, k_BxLxHxD, v_BxLxHxD))
        # Pad to a multiple of m so the landmarks are equal-length segments; padding is masked.
        pad = (-q_BxHxLxD.shape[2]) % num_lm
        q_pad, k_pad, v_pad = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
                               for x in (q_BxHxLxD, k_BxHxLxD, v_BxHxLxD))
        mask_pad_BxP = jnp.pad(mask_BxL, ((0, 0), (0, pad)))
        q_lm_BxHxMxD, lm_valid_BxM = segment_means(q_pad, mask_pad_BxP, num_lm)
        k_lm_BxHxMxD, _ = segment_means(k_pad, mask_pad_BxP, num_lm)  # same segments as q

        # Landmarks of all-padding segments are excluded: masked as keys in F and A, and their
        # rows of A zeroed, so A^+ is the pseudo-inverse of the real-landmark block alone.
        lm_key_ok_Bx1x1xM = lm_valid_BxM[:, None, None, :]
        f_logits_BxHxPxM = jnp.einsum("bhpd,bhmd->bhpm", q_pad, k_lm_BxHxMxD)
        f_BxHxPxM = jax.nn.softmax(jnp.where(lm_key_ok_Bx1x1xM, f_logits_BxHxPxM, NEG_INF), -1)
        a_logits_BxHxMxM = jnp.einsum("bhmd,bhnd->bhmn", q_lm_BxHxMxD, k_lm_BxHxMxD)
        a_BxHxMxM = jax.nn.softmax(jnp.where(lm_key_ok_Bx1x1xM, a_logits_BxHxMxM, NEG_INF), -1)
        a_BxHxMxM = a_BxHxMxM * lm_valid_BxM[:, None, :, None].astype(a_BxHxMxM.dtype)
        b_logits_BxHxMxP = jnp.einsum("bhmd,bhpd->bhmp", q_lm_BxHxMxD, k_pad)
        b_BxHxMxP = jax.nn.softmax(
            jnp.where(mask_pad_BxP[:, None, None, :], b_logits_BxHxMxP, NEG_INF), -1)

        # Right-to-left products keep every intermediate at most [L, m] or [m, D].
        bv_BxHxMxD = b_BxHxMxP @ v_pad
        a_pinv_BxHxMxM = iterative_pinv(a_BxHxMxM, self.cfg.pinv_iters)
        out_BxHxLxD = (f_BxHxPxM @ (a_pinv_BxHxMxM @ bv_BxHxMxD))[:, :, :q_BxLxHxD.shape[1]]
        if self.conv_KxH is not None:
            out_BxHxLxD = out_BxHxLxD + self.conv_skip(v_BxHxLxD, mask_BxL)
        return jnp.swapaxes(out_BxHxLxD, 1, 2)
