"""The one shared encoder: embeddings, positions, pre-LN blocks; attention is a plug-in.

Positions (`model.pos`): learned | sinusoidal are added to the token embeddings; rope rotates
q and k inside every block (Su et al. 2021); alibi biases every attention score by -m_h |i - j|
(Press et al. 2022) inside the variants that form scores; none adds nothing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models import attention as attention_registry
from lra.models.attention.base import Buffer, alibi_slopes, drop_threshold, hash_bits
from lra.models.config import ModelConfig

POS_KINDS = ("learned", "sinusoidal", "rope", "alibi", "none")
ROPE_BASE = 10000.0  # RoFormer's theta_i = base^(-2i/D)


def dropout_bits(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 random bits for a dropout mask: a keyed counter-based hash of each element's index,
    bits = mix(mix(index + k0) ^ k1), with (k0, k1) drawn from `rng` (threefry).

    Threefry's 20 rounds per element cost ~2 ns on this CPU (15% of a dense step at L=1024) and
    XLA's RngBitGenerator (the `rbg` key) is 4-5x slower still on CPU; two rounds of an
    avalanche mixer cost ~0.25 ns. Statistically this is plenty for Bernoulli masks (tests check
    the rate, independence of neighbours and of keys); it is a pure function of (key, index),
    so the same seed gives the same masks on any device count.
    """
    size = math.prod(shape)
    if size >= 2 ** 32:
        raise ValueError(f"dropout on {size} elements needs a 64-bit counter; split the array")
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    return hash_bits(jax.random.bits(rng, (2,), jnp.uint32), index)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout with an explicit key; identity at evaluation (rng None). A unit is
    dropped when its bits (`dropout_bits`) fall below rate * 2^32: one integer compare."""
    if rng is None or rate == 0.0:
        return x
    keep = dropout_bits(rng, x.shape) >= drop_threshold(rate)
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), 0.0).astype(x.dtype)


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


def check_pos(cfg: ModelConfig) -> None:
    """Raise a one-line ValueError naming the fix when `cfg.pos` does not apply to the variant."""
    pos, kind = cfg.pos, cfg.attention.kind
    if pos not in POS_KINDS:
        raise ValueError(f"model.pos={pos!r}; use {', '.join(POS_KINDS[:-1])} or none")
    if pos not in ("rope", "alibi"):
        return  # added to the embeddings: fits every variant
    attn_cls = attention_registry.get(kind)
    if attn_cls.mixer:
        raise ValueError(f"model.pos={pos} acts on attention scores, which the token mixer "
                         f"{kind} does not have; use model.pos=learned, sinusoidal or none")

    def supporting(flag: str) -> str:
        classes = {k: attention_registry.get(k) for k in sorted(attention_registry.REGISTRY)}
        return ", ".join(k for k, c in classes.items() if not c.mixer and getattr(c, flag))

    if pos == "alibi" and not attn_cls.supports_alibi:
        other = "rope or sinusoidal" if attn_cls.supports_rope else "learned or sinusoidal"
        raise ValueError(f"model.pos=alibi needs explicit attention scores, which {kind} never "
                         f"forms; kinds that support it: {supporting('supports_alibi')}; use "
                         f"model.pos={other} for {kind}")
    if pos == "rope" and not attn_cls.supports_rope:
        other = "alibi or sinusoidal" if attn_cls.supports_alibi else "learned or sinusoidal"
        raise ValueError(f"model.pos=rope rotates q and k for their dot product, which {kind} "
                         f"does not compute; kinds that support it: {supporting('supports_rope')}"
                         f"; use model.pos={other} for {kind}")
    head_dim = cfg.emb_dim // cfg.num_heads
    if pos == "rope" and head_dim % 2:
        raise ValueError(f"model.pos=rope rotates pairs of dims and needs an even head dim "
                         f"(model.emb_dim / model.num_heads = {head_dim}); change model.emb_dim "
                         f"or model.num_heads")


class SelfAttentionBlock(nnx.Module):
    """Projections around a registry attention variant (mixers such as FNet skip them)."""

    def __init__(self, cfg: ModelConfig, max_len: int, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.emb_dim // cfg.num_heads
        attn_cls = attention_registry.get(cfg.attention.kind)
        self.attn = attn_cls(cfg.attention, num_heads=cfg.num_heads, head_dim=self.head_dim,
                             max_len=max_len, rngs=rngs)
        self.is_mixer = attn_cls.mixer
        self.pos = cfg.pos  # rope and alibi act here; the others were added to the embeddings
        if not self.is_mixer:
            dim = cfg.emb_dim
            self.query = nnx.Linear(dim, dim, rngs=rngs) if self.attn.reads_queries else None
            unread_keys = attn_cls.shared_qk or not self.attn.reads_keys
            self.key = None if unread_keys else nnx.Linear(dim, dim, rngs=rngs)
            self.value = nnx.Linear(dim, dim, rngs=rngs)
            self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x_BxLxE, mask_BxL, rng):
        b, length, _ = x_BxLxE.shape
        split = (b, length, self.num_heads, self.head_dim)
        if self.is_mixer:
            x_BxLxHxD = x_BxLxE.reshape(split)
            return self.attn(x_BxLxHxD, x_BxLxHxD, x_BxLxHxD, mask_BxL, rng=rng).reshape(x_BxLxE.shape)
        # A module that reads no queries still gets an array of the right shape (its input).
        q_BxLxHxD = (self.query(x_BxLxE) if self.query is not None else x_BxLxE).reshape(split)
        k_BxLxHxD = None if self.key is None else self.key(x_BxLxE).reshape(split)
        if self.pos == "rope":  # before the variant: kernel methods see rotated q, k too
            q_BxLxHxD = rope(q_BxLxHxD)
            k_BxLxHxD = None if k_BxLxHxD is None else rope(k_BxLxHxD)
        k_BxLxHxD = q_BxLxHxD if k_BxLxHxD is None else k_BxLxHxD  # shared QK, or keys unread
        v_BxLxHxD = self.value(x_BxLxE).reshape(split)
        extra = {}
        if self.pos == "alibi":  # static per-head slopes, a constant of the compiled step
            extra["alibi_H"] = jnp.asarray(alibi_slopes(self.num_heads))
        out_BxLxHxD = self.attn(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, rng=rng, **extra)
        return self.out(out_BxLxHxD.reshape(x_BxLxE.shape))


class EncoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, max_len: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(cfg.emb_dim, rngs=rngs)
        self.attention = SelfAttentionBlock(cfg, max_len, rngs)
        self.norm2 = nnx.LayerNorm(cfg.emb_dim, rngs=rngs)
        self.mlp_in = nnx.Linear(cfg.emb_dim, cfg.mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(cfg.mlp_dim, cfg.emb_dim, rngs=rngs)
        self.rate = cfg.dropout

    def __call__(self, x_BxLxE, mask_BxL, rng):
        keys = jax.random.split(rng, 4) if rng is not None else [None] * 4
        h = self.attention(self.norm1(x_BxLxE), mask_BxL, keys[0])
        x_BxLxE = x_BxLxE + dropout(h, self.rate, keys[1])
        h = self.mlp_out(dropout(jax.nn.gelu(self.mlp_in(self.norm2(x_BxLxE))), self.rate, keys[2]))
        return x_BxLxE + dropout(h, self.rate, keys[3])


class Encoder(nnx.Module):
    """Token ids int32[B, L] (0 = padding) -> hidden states [B, L, E]."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_len: int, rngs: nnx.Rngs):
        if cfg.emb_dim % cfg.num_heads:
            raise ValueError(f"model.emb_dim={cfg.emb_dim} must be divisible by "
                             f"model.num_heads={cfg.num_heads}")
        check_pos(cfg)
        self.embed = nnx.Embed(vocab_size, cfg.emb_dim, rngs=rngs)
        self.pos_kind = cfg.pos
        if cfg.pos == "learned":
            self.pos_embed = nnx.Embed(max_len, cfg.emb_dim, rngs=rngs)
        elif cfg.pos == "sinusoidal":
            self.pos_table = Buffer(jnp.asarray(sinusoidal_table(max_len, cfg.emb_dim)))
        self.blocks = nnx.List([EncoderBlock(cfg, max_len, rngs) for _ in range(cfg.num_layers)])
        attention_registry.get(cfg.attention.kind).tie_layers(
            [block.attention.attn for block in self.blocks])
        self.final_norm = nnx.LayerNorm(cfg.emb_dim, rngs=rngs)
        self.rate = cfg.dropout

    def __call__(self, inputs_BxL, rng: jax.Array | None = None):
        mask_BxL = inputs_BxL != 0
        length = inputs_BxL.shape[1]
        x_BxLxE = self.embed(inputs_BxL)
        if self.pos_kind == "learned":
            x_BxLxE = x_BxLxE + self.pos_embed(jnp.arange(length))[None]
        elif self.pos_kind == "sinusoidal":
            x_BxLxE = x_BxLxE + self.pos_table[...][:length][None]
        keys = jax.random.split(rng, len(self.blocks) + 1) if rng is not None else [None] * (len(self.blocks) + 1)
        x_BxLxE = dropout(x_BxLxE, self.rate, keys[-1])
        for block, key in zip(self.blocks, keys):
            x_BxLxE = block(x_BxLxE, mask_BxL, key)
        return self.final_norm(x_BxLxE), mask_BxL
