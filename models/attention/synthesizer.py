"""Synthesizer attention (Tay et al. 2021, "Synthesizer: Rethinking Self-Attention for
Transformer Models").

The attention logits are synthesised instead of computed from query-key dot products:
  dense:  each token's query vector goes through a per-head 2-layer MLP to max_len logits
          (one per key position), sliced to the call's length L;
  random: a [H, max_len, max_len] logit matrix independent of the input (learned, or fixed with
          trainable=False).
Factorized variants: dense -> two heads of sizes a and b (a * b = max_len) combined as the
flattened outer product; random -> R1 R2^T of rank factor_k. Softmax over real keys, times V.
plus_dot adds the vanilla scores q.k / sqrt(D) to the synthetic logits (the paper's mixtures
"R + V" / "D + V"); the LRA code ran mode=random with plus_dot everywhere:
  logits = Q K^T / sqrt(D) + R.
The L x L logits are inherent to the method (quadratic = True).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import (Attention, AttentionConfig, Buffer, DistanceBias,
                                       check_choice, register)
from lra.models.attention.softmax import softmax_pv

MODES = ("dense", "random")


@dataclasses.dataclass
class SynthesizerConfig(AttentionConfig):
    kind: str = "synthesizer"
    # dense | random. The paper/issue calls this the synthesizer "kind"; the field is `mode`
    # because `kind` is the registry key.
    mode: str = "dense"
    factorized: bool = False
    trainable: bool = True  # random mode: learned R, else a fixed random Buffer
    factor_k: int = 32  # rank of the factorized random logits (LRA's k=32)
    # Add q.k / sqrt(D) to the synthetic logits (any mode): the paper's "+ vanilla" mixtures;
    # LRA's code = mode random + plus_dot.
    plus_dot: bool = False


def split_length(max_len: int) -> tuple[int, int]:
    """(a, b) with a * b = max_len and a the largest divisor <= sqrt(max_len)."""
    a = max(d for d in range(1, math.isqrt(max_len) + 1) if max_len % d == 0)
    return a, max_len // a


@register
class SynthesizerAttention(Attention):
    """Dense or random Synthesizer, optionally factorized."""

    config_cls = SynthesizerConfig
    prob_dropout = True
    quadratic = True
    # The L x L logits are explicit, so a distance bias can be added to them. The synthetic
    # logits are not q.k dot products, so RoPE would have nothing to act on (the flag is per
    # class, so it stays off with plus_dot too).
    supports_distance_bias = True
    supports_rope = False

    @classmethod
    def check_seq_len(cls, cfg: SynthesizerConfig, seq_len: int) -> None:
        check_choice(cfg, "mode", MODES)

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg, max_len = self.cfg, self.max_len
        # Dense mode maps each query x_i to its logits; random mode reads neither q nor k;
        # plus_dot's q.k scores read both.
        self.reads_queries = cfg.mode == "dense" or cfg.plus_dot
        self.reads_keys = cfg.plus_dot
        # LRA's kernel_init (lecun normal), fan-in per head: the head axis is a batch axis.
        init = jax.nn.initializers.lecun_normal(batch_axis=(0,))
        h, d = self.num_heads, self.head_dim
        if cfg.mode == "dense":
            # F(x) = W2 relu(W1 x + b1) + b2 per head (paper eq. for the dense synthesizer).
            self.w1_HxDxD = nnx.Param(init(rngs.params(), (h, d, d)))
            self.b1_HxD = nnx.Param(jnp.zeros((h, d)))
            out_sizes = split_length(max_len) if cfg.factorized else (max_len,)
            self.w2 = nnx.List([nnx.Param(init(rngs.params(), (h, d, n))) for n in out_sizes])
            self.b2 = nnx.List([nnx.Param(jnp.zeros((h, n))) for n in out_sizes])
            return
        var = nnx.Param if cfg.trainable else Buffer
        shapes = ([(h, max_len, cfg.factor_k)] * 2 if cfg.factorized
                  else [(h, max_len, max_len)])
        self.random = nnx.List([var(init(rngs.params(), shape)) for shape in shapes])

    def synthetic_logits(self, q_BxLxHxD: jax.Array) -> jax.Array:
        """Unmasked logits [H, B or 1, L, L] for a call of length L (head-major: the big
        arrays then never need a transpose)."""
        length = q_BxLxHxD.shape[1]
        if self.cfg.mode == "random":
            if self.cfg.factorized:
                r1_HxLxK = self.random[0][...][:, :length]
                r2_HxLxK = self.random[1][...][:, :length]
                return jnp.einsum("hik,hjk->hij", r1_HxLxK, r2_HxLxK)[:, None]
            return self.random[0][...][:, None, :length, :length]
        q_HxBxLxD = jnp.transpose(q_BxLxHxD, (2, 0, 1, 3))
        hidden_HxBxLxD = jax.nn.relu(jnp.einsum("hbld,hde->hble", q_HxBxLxD, self.w1_HxDxD[...])
                                     + self.b1_HxD[...][:, None, None, :])
        # W2 broadcast over the batch, so (head, batch) are both dot batch dims: its gradient is
        # then per-sequence h^T dlogits (like dense's dK), not a copy-transposed [L, B*L] dot.
        batch = q_BxLxHxD.shape[0]
        heads = [jnp.einsum("hble,hben->hbln", hidden_HxBxLxD,
                            jnp.broadcast_to(w[...][:, None], (w.shape[0], batch, *w.shape[1:])))
                 + b[...][:, None, None, :] for w, b in zip(self.w2, self.b2)]
        if self.cfg.factorized:
            # H_A tiles the a-vector b times, H_B repeats each b-entry a times: their product is
            # the flattened outer product, so every (i, j) pair appears exactly once.
            a_HxBxLxI, b_HxBxLxJ = heads
            outer_HxBxLxJxI = b_HxBxLxJ[..., :, None] * a_HxBxLxI[..., None, :]
            logits_HxBxLxM = outer_HxBxLxJxI.reshape(*outer_HxBxLxJxI.shape[:3], -1)
        else:
            logits_HxBxLxM = heads[0]
        return logits_HxBxLxM[..., :length]  # key positions beyond L do not exist in this call

    def __call__(self, q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                 mask_BxL: jax.Array, *, rng: jax.Array | None = None,
                 bias: DistanceBias | None = None) -> jax.Array:
        logits_HxBxLxL = self.synthetic_logits(q_BxLxHxD)
        if self.cfg.plus_dot:
            # Vanilla scores in the logits' head-major layout, added before the bias and mask.
            scaled_q_BxLxHxD = q_BxLxHxD * q_BxLxHxD.shape[-1] ** -0.5
            logits_HxBxLxL = logits_HxBxLxL + jnp.einsum("bihd,bjhd->hbij", scaled_q_BxLxHxD,
                                                         k_BxLxHxD)
        if bias is not None:
            pos_L = jnp.arange(q_BxLxHxD.shape[1])
            logits_HxBxLxL = logits_HxBxLxL + bias(pos_L[:, None] - pos_L[None, :],
                                                   logits_HxBxLxL.dtype)[:, None]
        v_HxBxLxD = jnp.transpose(v_BxLxHxD, (2, 0, 1, 3))  # match the logits' layout
        out_HxBxLxD = softmax_pv(logits_HxBxLxL, mask_BxL[None, :, None, :], v_HxBxLxD,
                                 self.drop(rng))
        return jnp.transpose(out_HxBxLxD, (1, 2, 0, 3))
