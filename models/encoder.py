"""The one shared encoder: embeddings, positions, pre-LN blocks; attention is a plug-in.

Positions (`model.pos`, models/posenc.py): learned | sinusoidal are added to the token
embeddings here; rope rotates q and k in every block before the variant sees them; alibi is
handed to the variants that form scores as a `DistanceBias`; none adds nothing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models import attention as attention_registry
from lra.models.attention.base import Buffer
from lra.models.attention.softmax import drop_threshold, hash_bits
from lra.models.config import ModelConfig, layer_configs
from lra.models.posenc import AlibiBias, check_pos, rope, sinusoidal_table


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


class SelfAttentionBlock(nnx.Module):
    """Projections around a registry attention variant (mixers such as FNet skip them)."""

    def __init__(self, cfg: ModelConfig, max_len: int, rngs: nnx.Rngs, attn_cfg=None):
        attn_cfg = cfg.attention if attn_cfg is None else attn_cfg  # a stack's layer: its own
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.emb_dim // cfg.num_heads
        attn_cls = attention_registry.get(attn_cfg.kind)
        self.attn = attn_cls(attn_cfg, num_heads=cfg.num_heads, head_dim=self.head_dim,
                             max_len=max_len, rngs=rngs)
        self.is_mixer = attn_cls.mixer
        # rope and alibi act here (a stack's mixers ignore them, as Griffin's recurrences do);
        # the others were added to the embeddings
        self.pos = cfg.pos
        # ALiBi's slopes are static per head count: a constant of the compiled step.
        self.score_bias = AlibiBias.for_heads(cfg.num_heads) if cfg.pos == "alibi" else None
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
        extra = {} if self.score_bias is None else {"bias": self.score_bias}
        out_BxLxHxD = self.attn(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, rng=rng, **extra)
        return self.out(out_BxLxHxD.reshape(x_BxLxE.shape))


class EncoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, max_len: int, rngs: nnx.Rngs, attn_cfg=None):
        self.norm1 = nnx.LayerNorm(cfg.emb_dim, rngs=rngs)
        self.attention = SelfAttentionBlock(cfg, max_len, rngs, attn_cfg)
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
        per_layer = layer_configs(cfg)
        self.blocks = nnx.List([EncoderBlock(cfg, max_len, rngs, attn_cfg)
                                for attn_cfg in per_layer])
        for kind in dict.fromkeys(c.kind for c in per_layer):  # sharing within a kind's layers
            attention_registry.get(kind).tie_layers(
                [b.attention.attn for b, c in zip(self.blocks, per_layer) if c.kind == kind])
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
