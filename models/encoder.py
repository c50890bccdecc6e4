"""The one shared encoder: embeddings, positions, pre-LN blocks; attention is a plug-in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import attention as attention_registry
from models.attention.base import Buffer
from models.config import ModelConfig


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout with an explicit key; identity at evaluation (rng None)."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    position = np.arange(length)[:, None]
    inv_freq = np.exp(-np.log(10000.0) * np.arange(0, dim, 2) / dim)
    table_LxE = np.zeros((length, dim), np.float32)
    table_LxE[:, 0::2] = np.sin(position * inv_freq)
    table_LxE[:, 1::2] = np.cos(position * inv_freq)[:, : dim // 2]
    return table_LxE


class SelfAttentionBlock(nnx.Module):
    """Projections around a registry attention variant (mixers such as FNet skip them)."""

    def __init__(self, cfg: ModelConfig, max_len: int, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.emb_dim // cfg.num_heads
        attn_cls = attention_registry.get(cfg.attention.kind)
        self.attn = attn_cls(cfg.attention, num_heads=cfg.num_heads, head_dim=self.head_dim,
                             max_len=max_len, rngs=rngs)
        self.is_mixer = attn_cls.mixer
        if not self.is_mixer:
            dim = cfg.emb_dim
            self.query = nnx.Linear(dim, dim, rngs=rngs)
            self.key = None if attn_cls.shared_qk else nnx.Linear(dim, dim, rngs=rngs)
            self.value = nnx.Linear(dim, dim, rngs=rngs)
            self.out = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x_BxLxE, mask_BxL, rng):
        b, length, _ = x_BxLxE.shape
        split = (b, length, self.num_heads, self.head_dim)
        if self.is_mixer:
            x_BxLxHxD = x_BxLxE.reshape(split)
            return self.attn(x_BxLxHxD, x_BxLxHxD, x_BxLxHxD, mask_BxL, rng=rng).reshape(x_BxLxE.shape)
        q_BxLxHxD = self.query(x_BxLxE).reshape(split)
        k_BxLxHxD = q_BxLxHxD if self.key is None else self.key(x_BxLxE).reshape(split)
        v_BxLxHxD = self.value(x_BxLxE).reshape(split)
        out_BxLxHxD = self.attn(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, rng=rng)
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
        self.embed = nnx.Embed(vocab_size, cfg.emb_dim, rngs=rngs)
        self.pos_kind = cfg.pos
        if cfg.pos == "learned":
            self.pos_embed = nnx.Embed(max_len, cfg.emb_dim, rngs=rngs)
        elif cfg.pos == "sinusoidal":
            self.pos_table = Buffer(jnp.asarray(sinusoidal_table(max_len, cfg.emb_dim)))
        elif cfg.pos != "none":
            raise ValueError(f"model.pos={cfg.pos!r}; use learned, sinusoidal or none")
        self.blocks = nnx.List([EncoderBlock(cfg, max_len, rngs) for _ in range(cfg.num_layers)])
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
