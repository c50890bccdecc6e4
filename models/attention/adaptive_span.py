"""Adaptive attention span (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers",
https://arxiv.org/abs/1905.07799), in LRA's bidirectional setting.

Head h has a learned span z_h in [0, S] (S = `max_span`) and a soft mask on the distance x between
query and key, m_z(x) = clip((R + z - x) / R, 0, 1) (R = `ramp`): 1 up to distance z, a linear
ramp to 0 over the next R positions. The attention weights are the masked, renormalised softmax

    a_ij = m_z(|i - j|) exp(s_ij) / sum_r m_z(|i - r|) exp(s_ir),    s_ij = q_i . k_j / sqrt(D).

The paper is causal (x = i - j >= 0); classification here is bidirectional, so the mask acts on
|i - j|, the same span on both sides. m > 0 only for x < z + R <= S + R, so the computation is
banded: the padded sequence is cut into blocks of `block_size` and each query block scores its own
and w = ceil((S + R - 1) / block_size) neighbouring key blocks on each side (local.py's layout).
m exp(s) is formed as exp(s + log m) with m = 0 keys left out of the softmax, so the row maximum
is taken over the keys that count. Time and memory O(L * (2w + 1) * block_size), ~O(L (S + R)).

z_h is stored as a fraction of S (the paper's code), init 0. The paper clamps it to [0, 1] after
each optimizer update; the harness's optimizer is shared by every variant, so the clamp is in the
forward pass (`projected_clip`) with a gradient that lets only updates pointing back into [0, 1]
through when the parameter is outside, as that projection does. The L1 penalty
lambda * mean_h z_h (the paper's lambda / M * sum_i z_i, M heads per layer; the trainer sums it
over layers) is sown as an `AuxLoss`. The loss is piecewise smooth in z: where z or z + R is a
whole number (z = 0 at init) a key sits on a kink of the ramp, and the gradient there is JAX's
clip convention (half the slope at m = 1; none from the key at m = 0, outside the softmax).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import errors, nnx

from lra.models.attention.base import (Attention, AttentionConfig, AuxLoss, NoDecayParam,
                                       blocks_head_major, neighbour_blocks, pad_to_blocks,
                                       register, unblock_head_major)
from lra.models.attention.softmax import softmax_pv


@dataclasses.dataclass
class AdaptiveSpanConfig(AttentionConfig):
    kind: str = "adaptive_span"
    # Largest span S in tokens (each side). The paper uses 8192 for character LM; on LRA's 1K-4K
    # inputs 256 keeps the band (2 (S + R) = 576 keys per query) near the key budget of the blocked
    # baselines (BigBird's 8 blocks of 64, Longformer's window 256) and under L.
    max_span: int = 256
    # Ramp length R of the soft mask: the paper's (and its code's adapt_span_ramp) 32.
    ramp: int = 32
    # Query/key block size of the banded computation (BigBird's LRA block; 64 is also the paper
    # code's default block): w = ceil((S + R - 1) / 64) = 5 blocks a side, 704 keys per query for
    # the 575 the band needs.
    block_size: int = 64
    # Initial span as a fraction of max_span: the paper code's adapt_span_init default, 0.
    span_init: float = 0.0
    # lambda of the L1 span penalty: 2e-6, the paper's small-model setting
    # (facebookresearch/adaptive-span experiments/enwik8_small.sh; its 12-layer runs use 5e-7).
    span_penalty: float = 2e-6

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: learned spans up to L/4 (ramp L/16, at least 8) in blocks of L/8; the
        default span of 256 would cover all of L <= 256."""
        return {"max_span": seq_len // 4, "ramp": max(8, seq_len // 16), "block_size": seq_len // 8}


@jax.custom_vjp
def projected_clip(p: jax.Array) -> jax.Array:
    """clip(p, 0, 1) whose gradient passes inside [0, 1] and, outside, only where gradient
    descent would move p back towards [0, 1] (the paper's clamp after each update: a parameter
    just past a bound still learns to come back, instead of a flat clip's zero gradient)."""
    return jnp.clip(p, 0.0, 1.0)


def _projected_clip_fwd(p):
    return jnp.clip(p, 0.0, 1.0), p


def _projected_clip_bwd(p, g):
    inside = (p >= 0.0) & (p <= 1.0)
    inward = ((p < 0.0) & (g < 0.0)) | ((p > 1.0) & (g > 0.0))  # descent step -g points inside
    return (jnp.where(inside | inward, g, jnp.zeros_like(g)),)


projected_clip.defvjp(_projected_clip_fwd, _projected_clip_bwd)


def soft_mask(distance: jax.Array, span_Hx: jax.Array, ramp: int) -> jax.Array:
    """m_z(x) = clip((R + z - x) / R, 0, 1) for distances x >= 0 and spans z (tokens)."""
    return jnp.clip((ramp + span_Hx - distance) / ramp, 0.0, 1.0)


def reach(span: float, ramp: int) -> int:
    """The largest integer distance with m_z > 0 (m_z(x) > 0 iff x < z + R)."""
    return max(math.ceil(span + ramp) - 1, 0)


def neighbour_count(span: float, ramp: int, block_size: int) -> int:
    """Key blocks a side a query block needs to see every key with m_z > 0."""
    return -(-reach(span, ramp) // block_size)


@register
class AdaptiveSpanAttention(Attention):
    """Banded softmax with a learned per-head soft span mask and an L1 span penalty."""

    config_cls = AdaptiveSpanConfig
    prob_dropout = True
    supports_distance_bias = True
    # lra.check: small-but-real (the band, 2 * 39 + 1 keys, is well under L = 128).
    check_settings = {"max_span": 32, "ramp": 8, "block_size": 16}

    @classmethod
    def check_seq_len(cls, cfg: AdaptiveSpanConfig, seq_len: int) -> None:
        # Any length works (padding is masked); only the span's own fields can be invalid.
        for field in ("max_span", "ramp", "block_size"):
            if getattr(cfg, field) < 1:
                raise ValueError(f"model.attention.{field}={getattr(cfg, field)} must be >= 1 "
                                 f"(adaptive_span at task.seq_len={seq_len})")
        if not 0.0 <= cfg.span_init <= 1.0:
            raise ValueError(f"model.attention.span_init={cfg.span_init} must be in [0, 1] (a "
                             f"fraction of model.attention.max_span)")
        if cfg.span_penalty < 0.0:
            raise ValueError(f"model.attention.span_penalty={cfg.span_penalty} must be >= 0")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        # No weight decay on z (NoDecayParam, the base learning rate): its regulariser is the L1
        # span penalty; decay would add a second pull towards span 0 scaled by train.weight_decay.
        # The paper's code trains without weight decay (SGD / Adagrad) at one rate for all.
        self.span_H = NoDecayParam(jnp.full((self.num_heads,), self.cfg.span_init, jnp.float32))

    def spans(self) -> jax.Array:
        """z_h in tokens, [H]: the stored fraction clipped to [0, 1], times max_span."""
        return projected_clip(self.span_H[...]) * self.cfg.max_span

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None, bias=None):
        cfg = self.cfg
        bs = cfg.block_size
        length = q_BxLxHxD.shape[1]
        mask_BxP, q_BxPxHxD, k_BxPxHxD, v_BxPxHxD = pad_to_blocks(
            bs, mask_BxL, q_BxLxHxD * q_BxLxHxD.shape[-1] ** -0.5, k_BxLxHxD, v_BxLxHxD)
        b, padded = mask_BxP.shape
        # Blocks farther than the sequence has are never needed: a short input costs no more.
        w = min(neighbour_count(cfg.max_span, cfg.ramp, bs), padded // bs - 1)
        q_BxHxNxSxD = blocks_head_major(q_BxPxHxD, bs)
        k_BxHxNxWxD = neighbour_blocks(blocks_head_major(k_BxPxHxD, bs), axis=2, width=w)
        v_BxHxNxWxD = neighbour_blocks(blocks_head_major(v_BxPxHxD, bs), axis=2, width=w)
        key_ok_BxNxW = neighbour_blocks(mask_BxP.reshape(b, padded // bs, bs), axis=1, width=w)

        scores_BxHxNxSxW = jnp.einsum("bhnsd,bhntd->bhnst", q_BxHxNxSxD, k_BxHxNxWxD)
        # Query s of block n is n*bs + s; window key t is (n - w)*bs + t: i - j is w*bs + s - t
        # in every block, so one [H, S, W] mask (and bias) serves them all.
        s_S, t_W = jnp.arange(bs), jnp.arange((2 * w + 1) * bs)
        distance_SxW = w * bs + s_S[:, None] - t_W[None, :]
        if bias is not None:
            bias_HxSxW = bias(distance_SxW, scores_BxHxNxSxW.dtype)
            scores_BxHxNxSxW = scores_BxHxNxSxW + bias_HxSxW[None, :, None]
        span_H = self.spans()
        soft_HxSxW = soft_mask(jnp.abs(distance_SxW)[None], span_H[:, None, None], cfg.ramp)
        live_HxSxW = soft_HxSxW > 0.0
        # m exp(s) = exp(s + log m); keys with m = 0 leave the softmax (the inner where keeps
        # log's gradient finite there).
        log_soft_HxSxW = jnp.log(jnp.where(live_HxSxW, soft_HxSxW, 1.0))
        scores_BxHxNxSxW = scores_BxHxNxSxW + log_soft_HxSxW[None, :, None]
        allowed_BxHxNxSxW = key_ok_BxNxW[:, None, :, None, :] & live_HxSxW[None, :, None]
        out_BxHxNxSxD = softmax_pv(scores_BxHxNxSxW, allowed_BxHxNxSxW, v_BxHxNxWxD,
                                   self.drop(rng))
        self._sow_penalty(cfg.span_penalty * jnp.mean(span_H))
        return unblock_head_major(out_BxHxNxSxD)[:, :length]

    def _sow_penalty(self, value: jax.Array) -> None:
        """Sow the L1 span penalty for the trainer (lra.train.steps.make_steps collects it)."""
        try:
            self.sow(AuxLoss, "span_penalty", value)
        except errors.TraceContextError:
            # Called from inside a jax transform that closed over this module (tests, lra.check)
            # instead of nnx.merge / nnx.jit: nothing there collects the value, so none is kept.
            pass

    def summary(self) -> dict:
        """Learned spans (tokens, per head), and the share of the banded computation a
        span-trimmed evaluation would need: (2 w' + 1) / (2 w + 1) key blocks per query block,
        w' the blocks a side that the longest learned span (+ ramp) reaches."""
        cfg = self.cfg
        spans = [float(z) for z in jax.device_get(self.spans())]
        blocks = -(-self.max_len // cfg.block_size)
        now = min(neighbour_count(cfg.max_span, cfg.ramp, cfg.block_size), blocks - 1)
        trimmed = min(neighbour_count(max(spans), cfg.ramp, cfg.block_size), blocks - 1)
        return {"spans": spans, "mean_span": sum(spans) / len(spans), "max_span": cfg.max_span,
                "ramp": cfg.ramp, "trimmed_cost": (2 * trimmed + 1) / (2 * now + 1)}
