"""Position encodings (`model.pos`), owned by the encoder.

learned | sinusoidal are added to the token embeddings; rope rotates q and k inside every
block (Su et al. 2021); alibi biases every attention score by -m_h |i - j| (Press et al. 2022),
handed to the variants that form scores as a generic `DistanceBias`; none adds nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lra.models import attention as attention_registry
from lra.models.attention.base import DistanceBias
from lra.models.config import ModelConfig

POS_KINDS = ("learned", "sinusoidal", "rope", "alibi", "none")
ROPE_BASE = 10000.0  # RoFormer's theta_i = base^(-2i/D)


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    position = np.arange(length)[:, None]
    inv_freq = np.exp(-np.log(10000.0) * np.arange(0, dim, 2) / dim)
    table_LxE = np.zeros((length, dim), np.float32)
    table_LxE[:, 0::2] = np.sin(position * inv_freq)
    table_LxE[:, 1::2] = np.cos(position * inv_freq)[:, : dim // 2]
    return table_LxE


def rope(x_BxLxHxD: jax.Array, offset: int = 0) -> jax.Array:
    """RoPE (Su et al. 2021, RoFormer): rotate dims (2i, 2i+1) of every head at position p by the
    angle p * theta_i, theta_i = 10000^(-2i/D); positions are offset + 0..L-1.

    Then <rope(q)_i, rope(k)_j> depends on i - j only. Angles are computed in float64 numpy
    (positions are static), so long sequences keep their precision.
    """
    length, dim = x_BxLxHxD.shape[1], x_BxLxHxD.shape[-1]
    theta_F = ROPE_BASE ** (-np.arange(0, dim, 2) / dim)  # F = D / 2 frequencies
    angle_LxF = (offset + np.arange(length))[:, None] * theta_F[None, :]
    cos_1xLx1xF = jnp.asarray(np.cos(angle_LxF)[None, :, None], x_BxLxHxD.dtype)
    sin_1xLx1xF = jnp.asarray(np.sin(angle_LxF)[None, :, None], x_BxLxHxD.dtype)
    even_BxLxHxF, odd_BxLxHxF = x_BxLxHxD[..., 0::2], x_BxLxHxD[..., 1::2]
    rotated_BxLxHxFx2 = jnp.stack([even_BxLxHxF * cos_1xLx1xF - odd_BxLxHxF * sin_1xLx1xF,
                                   even_BxLxHxF * sin_1xLx1xF + odd_BxLxHxF * cos_1xLx1xF], -1)
    return rotated_BxLxHxFx2.reshape(x_BxLxHxD.shape)


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


@dataclasses.dataclass(frozen=True)
class AlibiBias(DistanceBias):
    """ALiBi's score offset -m_h |i - j|. The slopes are constants of the model (never trained),
    held as floats so the bias is a static, hashable part of the compiled step."""

    slopes_H: tuple[float, ...]

    @classmethod
    def for_heads(cls, num_heads: int) -> "AlibiBias":
        return cls(tuple(float(m) for m in alibi_slopes(num_heads)))

    def per_head(self, distance_Hx: jax.Array, dtype=jnp.float32) -> jax.Array:
        slopes_Hx = jnp.asarray(self.slopes_H, dtype).reshape(-1, *([1] * (distance_Hx.ndim - 1)))
        return -slopes_Hx * jnp.abs(distance_Hx).astype(dtype)


def check_pos(cfg: ModelConfig) -> None:
    """Raise a one-line ValueError naming the fix when `cfg.pos` does not apply to the variant
    (in a stack, model.layers: to each of its kinds that forms scores; its mixers ignore it)."""
    if cfg.pos not in POS_KINDS:
        raise ValueError(f"model.pos={cfg.pos!r}; use {', '.join(POS_KINDS[:-1])} or none")
    if cfg.pos not in ("rope", "alibi"):
        return  # added to the embeddings: fits every variant
    kinds = list(dict.fromkeys(cfg.layers)) or [cfg.attention.kind]
    scored = [k for k in kinds if not attention_registry.get(k).mixer]
    for kind in scored or kinds[:1]:
        _check_kind(cfg, kind)


def _check_kind(cfg: ModelConfig, kind: str) -> None:
    pos = cfg.pos
    attn_cls = attention_registry.get(kind)
    if attn_cls.mixer:
        raise ValueError(f"model.pos={pos} acts on attention scores, which the token mixer "
                         f"{kind} does not have; use model.pos=learned, sinusoidal or none")

    def supporting(flag: str) -> str:
        classes = {k: attention_registry.get(k) for k in sorted(attention_registry.REGISTRY)}
        return ", ".join(k for k, c in classes.items() if not c.mixer and getattr(c, flag))

    if pos == "alibi" and not attn_cls.supports_distance_bias:
        other = "rope or sinusoidal" if attn_cls.supports_rope else "learned or sinusoidal"
        raise ValueError(f"model.pos=alibi needs explicit attention scores, which {kind} never "
                         f"forms; kinds that support it: {supporting('supports_distance_bias')}; "
                         f"use model.pos={other} for {kind}")
    if pos == "rope" and not attn_cls.supports_rope:
        other = ("alibi or sinusoidal" if attn_cls.supports_distance_bias
                 else "learned or sinusoidal")
        raise ValueError(f"model.pos=rope rotates q and k for their dot product, which {kind} "
                         f"does not compute; kinds that support it: {supporting('supports_rope')}"
                         f"; use model.pos={other} for {kind}")
    head_dim = cfg.emb_dim // cfg.num_heads
    if pos == "rope" and head_dim % 2:
        raise ValueError(f"model.pos=rope rotates pairs of dims and needs an even head dim "
                         f"(model.emb_dim / model.num_heads = {head_dim}); change model.emb_dim "
                         f"or model.num_heads")
