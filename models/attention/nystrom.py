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
from flax import nnx

from models.attention.base import NEG_INF, Attention, AttentionConfig, pad_to_multiple


@dataclasses.dataclass
class NystromConfig(AttentionConfig):
    kind: str = "nystrom"
    num_landmarks: int = 64  # m; the paper's LRA runs use 64 ("nystrom-64")
    pinv_iters: int = 6  # iterative Moore-Penrose steps; 6 in the paper and authors' code
    conv_kernel: int = 35  # depthwise conv skip on V over length (authors' LRA code); 0 = off


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
        az = a_BxHxMxM @ z_BxHxMxM
        z_BxHxMxM = 0.25 * z_BxHxMxM @ (13 * eye_MxM - az @ (15 * eye_MxM - az @ (7 * eye_MxM - az)))
    return z_BxHxMxM


def segment_means(x_BxLxHxD: jax.Array, mask_BxL: jax.Array, num_segments: int
                  ) -> tuple[jax.Array, jax.Array]:
    """Means over the real tokens of each of `num_segments` contiguous segments [B, M, H, D],
    and whether a segment holds any real token [B, M]."""
    b, length, h, d = x_BxLxHxD.shape
    keep_BxMxS = mask_BxL.reshape(b, num_segments, length // num_segments)
    x_BxMxSxHxD = x_BxLxHxD.reshape(b, num_segments, length // num_segments, h, d)
    sums_BxMxHxD = jnp.einsum("bmshd,bms->bmhd", x_BxMxSxHxD, keep_BxMxS.astype(x_BxLxHxD.dtype))
    counts_BxM = jnp.sum(keep_BxMxS, axis=-1)
    means_BxMxHxD = sums_BxMxHxD / jnp.maximum(counts_BxM, 1)[:, :, None, None].astype(
        x_BxLxHxD.dtype)
    return means_BxMxHxD, counts_BxM > 0


class NystromAttention(Attention):
    """Nystrom approximation of softmax attention with segment-mean landmarks."""

    config_cls = NystromConfig

    def __init__(self, cfg: NystromConfig, *, num_heads: int, head_dim: int, max_len: int,
                 rngs: nnx.Rngs):
        super().__init__(cfg, num_heads=num_heads, head_dim=head_dim, max_len=max_len, rngs=rngs)
        if cfg.conv_kernel > 0:
            # One length-kernel per head shared over head_dim (authors: Conv2d groups=heads);
            # PyTorch's default Conv2d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = cfg.conv_kernel ** -0.5
            self.conv_KxH = nnx.Param(jax.random.uniform(
                rngs.params(), (cfg.conv_kernel, num_heads), minval=-bound, maxval=bound))
        else:
            self.conv_KxH = None

    @classmethod
    def check_seq_len(cls, cfg: NystromConfig, seq_len: int) -> None:
        if cfg.num_landmarks > seq_len:
            raise ValueError(
                f"nystrom needs seq_len >= model.attention.num_landmarks={cfg.num_landmarks} "
                f"(got {seq_len}); lower model.attention.num_landmarks or raise task.seq_len")

    def conv_skip(self, v_BxLxHxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        """Depthwise 'same' convolution of the (padding-zeroed) values along the length axis."""
        size = self.cfg.conv_kernel
        v_BxLxHxD = v_BxLxHxD * mask_BxL[:, :, None, None].astype(v_BxLxHxD.dtype)
        # Layout: N=batch, spatial=(length, head_dim), channels=heads; kernel (size, 1) per head.
        v_BxLxDxH = jnp.swapaxes(v_BxLxHxD, 2, 3)
        kernel_Kx1x1xH = self.conv_KxH[...][:, None, None, :].astype(v_BxLxHxD.dtype)
        out_BxLxDxH = jax.lax.conv_general_dilated(
            v_BxLxDxH, kernel_Kx1x1xH, window_strides=(1, 1),
            padding=((size // 2, size - 1 - size // 2), (0, 0)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.num_heads)
        return jnp.swapaxes(out_BxLxDxH, 2, 3)

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        num_lm = self.cfg.num_landmarks
        scale = q_BxLxHxD.shape[-1] ** -0.5
        # Pad to a multiple of m so the landmarks are equal-length segments; padding is masked.
        q_pad, mask_pad_BxP, length = pad_to_multiple(q_BxLxHxD * scale, mask_BxL, num_lm)
        k_pad, _, _ = pad_to_multiple(k_BxLxHxD, mask_BxL, num_lm)
        v_pad, _, _ = pad_to_multiple(v_BxLxHxD, mask_BxL, num_lm)
        q_lm_BxMxHxD, lm_valid_BxM = segment_means(q_pad, mask_pad_BxP, num_lm)
        k_lm_BxMxHxD, _ = segment_means(k_pad, mask_pad_BxP, num_lm)  # same segments as q

        # Landmarks of all-padding segments are excluded: masked as keys in F and A, and their
        # rows of A zeroed, so A^+ is the pseudo-inverse of the real-landmark block alone.
        lm_key_ok_Bx1x1xM = lm_valid_BxM[:, None, None, :]
        f_logits_BxHxPxM = jnp.einsum("bphd,bmhd->bhpm", q_pad, k_lm_BxMxHxD)
        f_BxHxPxM = jax.nn.softmax(jnp.where(lm_key_ok_Bx1x1xM, f_logits_BxHxPxM, NEG_INF), -1)
        a_logits_BxHxMxM = jnp.einsum("bmhd,bnhd->bhmn", q_lm_BxMxHxD, k_lm_BxMxHxD)
        a_BxHxMxM = jax.nn.softmax(jnp.where(lm_key_ok_Bx1x1xM, a_logits_BxHxMxM, NEG_INF), -1)
        a_BxHxMxM = a_BxHxMxM * lm_valid_BxM[:, None, :, None].astype(a_BxHxMxM.dtype)
        b_logits_BxHxMxP = jnp.einsum("bmhd,bphd->bhmp", q_lm_BxMxHxD, k_pad)
        b_BxHxMxP = jax.nn.softmax(
            jnp.where(mask_pad_BxP[:, None, None, :], b_logits_BxHxMxP, NEG_INF), -1)

        # Right-to-left products keep every intermediate at most [L, m] or [m, D].
        bv_BxHxMxD = jnp.einsum("bhmp,bphd->bhmd", b_BxHxMxP, v_pad)
        a_pinv_BxHxMxM = iterative_pinv(a_BxHxMxM, self.cfg.pinv_iters)
        out_BxPxHxD = jnp.einsum("bhpm,bhmd->bphd", f_BxHxPxM, a_pinv_BxHxMxM @ bv_BxHxMxD)
        out_BxLxHxD = out_BxPxHxD[:, :length]
        if self.conv_KxH is not None:
            out_BxLxHxD = out_BxLxHxD + self.conv_skip(v_BxLxHxD, mask_BxL)
        return out_BxLxHxD
