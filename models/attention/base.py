"""The one attention interface every variant implements.

An attention module receives already-projected queries, keys and values and decides who
attends to whom and how. The encoder owns projections, residuals, norms and MLPs.

    out_BxLxHxD = module(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, rng=None)

``mask_BxL`` is True at real tokens and False at padding. Outputs at padded query positions
may be anything finite; outputs at real positions must not depend on padded keys/values.
``rng`` is a PRNG key during training (None at evaluation) for variants that draw
randomness per step (e.g. Performer feature redraw); deterministic variants ignore it.
``alibi_H`` (only for variants with ``supports_alibi``) are per-head ALiBi slopes m_h: every
score of query i and key j gets -m_h * |i - j| before the softmax (None = off).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NEG_INF = -1e9  # finite, so fully-masked rows stay NaN-free


class Buffer(nnx.Variable):
    """A fixed, non-trained array (random projections, sampled block indices)."""


@dataclasses.dataclass
class AttentionConfig:
    """Fields every variant's config has; variants subclass this with their own fields."""

    kind: str = "dense"


class Attention(nnx.Module):
    """Base class. Subclasses set ``config_cls`` and implement ``__call__``."""

    config_cls: ClassVar[type[AttentionConfig]] = AttentionConfig
    # Reformer shares the query and key projection: the encoder then passes k = q.
    shared_qk: ClassVar[bool] = False
    # True for variants whose output equals dense softmax under `reference_mask`.
    exact_pattern: ClassVar[bool] = False
    # True for variants allowed to build an L x L array (dense, synthesizer).
    quadratic: ClassVar[bool] = False
    # True for token mixers without projections (FNet): the encoder passes the block's
    # normalised input x as v (reshaped to BxLxHxD) and uses the output as is.
    mixer: ClassVar[bool] = False
    # True for variants that form explicit per-pair scores and can add the ALiBi bias to them
    # (they accept `alibi_H`); kernel/low-rank/hashing variants never see a (query, key) pair.
    supports_alibi: ClassVar[bool] = False
    # False for non-mixers whose scores are not q.k dot products (RoPE has nothing to rotate).
    supports_rope: ClassVar[bool] = True

    def __init__(self, cfg: AttentionConfig, *, num_heads: int, head_dim: int, max_len: int,
                 rngs: nnx.Rngs):
        self.check_seq_len(cfg, max_len)  # every variant validates its pattern at build time
        self.cfg = cfg
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_len = max_len

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None,
                 alibi_H: jax.Array | None = None) -> jax.Array:
        raise NotImplementedError

    def reference_mask(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array,
                       mask_BxL: jax.Array) -> jax.Array:
        """Test-only: bool[B, H, L, L], who may attend to whom (exact-pattern variants)."""
        raise NotImplementedError(f"{type(self).__name__} has no exact dense pattern")

    @classmethod
    def check_seq_len(cls, cfg: AttentionConfig, seq_len: int) -> None:
        """Raise ValueError with a one-line fix when `seq_len` cannot work with `cfg`."""


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (Press et al. 2022, sec. 3): 2^(-8h/H), h = 1..H, for H a power of two.

    Other H: the slopes of the largest power of two n < H, then the first H - n of every other
    slope (1st, 3rd, ...) of the 2n-head sequence, which fall between them (the paper's rule).
    """
    if num_heads < 1:
        raise ValueError(f"alibi needs num_heads >= 1 (got {num_heads})")
    n = 1 << (num_heads.bit_length() - 1)  # largest power of two <= num_heads
    geometric_n = 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
    if n == num_heads:
        return geometric_n.astype(np.float32)
    geometric_2n = 2.0 ** (-8.0 * np.arange(1, 2 * n + 1) / (2 * n))
    return np.concatenate([geometric_n, geometric_2n[0::2][:num_heads - n]]).astype(np.float32)


def alibi_bias(alibi_H: jax.Array, distance: jax.Array, dtype=jnp.float32) -> jax.Array:
    """-m_h * |i - j| with the head axis first: [H, *distance.shape] (distance = i - j)."""
    slopes_H = alibi_H.astype(dtype).reshape(-1, *([1] * distance.ndim))
    return -slopes_H * jnp.abs(distance).astype(dtype)


def masked_softmax_attention(q_BxLxHxD: jax.Array, k_BxMxHxD: jax.Array, v_BxMxHxD: jax.Array,
                             allowed_BxHxLxM: jax.Array, bias_BxHxLxM: jax.Array | None = None
                             ) -> jax.Array:
    """Dense softmax attention restricted to `allowed` (broadcastable to [B, H, L, M]), with an
    optional additive score bias (broadcastable likewise)."""
    scale = q_BxLxHxD.shape[-1] ** -0.5
    scores_BxHxLxM = jnp.einsum("blhd,bmhd->bhlm", q_BxLxHxD * scale, k_BxMxHxD)
    if bias_BxHxLxM is not None:
        scores_BxHxLxM = scores_BxHxLxM + bias_BxHxLxM
    scores_BxHxLxM = jnp.where(allowed_BxHxLxM, scores_BxHxLxM, NEG_INF)
    probs_BxHxLxM = jax.nn.softmax(scores_BxHxLxM, axis=-1)
    return jnp.einsum("bhlm,bmhd->blhd", probs_BxHxLxM, v_BxMxHxD)


def pad_to_multiple(x_BxLx: jax.Array, mask_BxL: jax.Array, multiple: int
                    ) -> tuple[jax.Array, jax.Array, int]:
    """Pad the length axis (axis 1) to a multiple of `multiple`; padding is masked out."""
    length = x_BxLx.shape[1]
    pad = (-length) % multiple
    if pad == 0:
        return x_BxLx, mask_BxL, length
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x_BxLx.ndim - 2)
    return jnp.pad(x_BxLx, widths), jnp.pad(mask_BxL, [(0, 0), (0, pad)]), length


def numpy_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)

