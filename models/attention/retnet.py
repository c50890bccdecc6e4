"""RetNet's multi-scale retention (Sun et al. 2023, "Retentive Network") and gated linear
attention, GLA (Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient
Training"): linear attention whose D x D state per head decays.

Both are the recurrence  S_n = diag(a_n) S_{n-1} + k_n^T v_n,  o_n = q_n S_n,  with k scaled by
1/sqrt(D) (torchscale's retention; fla's GLA scales q by the same factor):
  retnet  a_n = gamma_h on every channel, gamma_h = 1 - 2^(-5-h), h = 0..H-1 (fixed, per head);
          parallel form O = (Q K^T . D) V, D[n, m] = gamma^(n-m) for n >= m, else 0.
  gla     a_n = sigmoid(x_n W_1 W_2 + b)^(1/tau) per key channel, W_1 W_2 of rank 16, tau = 16.

Chunkwise form (what runs): N chunks of S positions; b_i = cumulative log decay from the chunk's
start to position i (inclusive, <= 0), so with S_prev the state entering the chunk
  o_i    = (q_i . e^b_i) S_prev + sum_{j <= i in the chunk} (q_i . e^(b_i - b_j) . k_j) v_j
  S_next = e^b_S . S_prev + sum_j (k_j . e^(b_S - b_j))^T v_j
The chunks' entering states come from one associative scan over N; every exponent is <= 0.
The pairs inside a chunk: retnet takes the S x S decay matrix gamma^(i-j) itself; gla takes the
paper's secondary chunks of s positions: pairs in different sub-chunks factor through the later
sub-chunk's start (both factors <= 1), pairs inside one sub-chunk use the explicit s x s x D
tensor e^(b_i - b_j). Cost per head: O(L S D + L D^2) time, O(L S + L D^2 / S) memory (gla also
O(L (S/s + s) D)), linear in L; no L x L array.

Bidirectional (default; an encoder for classification): the causal pass plus the causal pass of
the reversed sequence, summed, with the diagonal counted once: retnet's decay is gamma^|n-m|;
gla's anti-causal state is S_n = diag(a_n) S_{n+1} + k_n^T v_n. Padding: k and v are zeroed at
padded positions and gla's log-gates are 0 there (the state is held), so padding adds nothing to
any state, in either direction.

Output: per-head GroupNorm of O (non-affine, as torchscale's: a per-channel scale would fold into
W_O), times the swish gate, then the encoder's output projection W_O:
    MSR(X) = (swish(X W_G) . GroupNorm_h(O)) W_O        (GLA: the same, with a bias in the gate)
The papers compute both gates (swish's and GLA's decay) from the layer input X; a variant sees
v = X W_V + b_V only, so it reads them from v: v W_G = X (W_V W_G) + b_V W_G spans the same
functions as X W_G' (+ a bias) whenever W_V is invertible, a reparametrisation that shares W_V.
Positions: retnet's Theta rotation of q and k is RoPE (xPos-free: its per-position scaling is
what the decay replaces), so configs/model/retnet.yaml sets pos: rope. Left out: the paper's
retention-score normalisations (sec. 2.3: each query row divided by a positive number), which
the GroupNorm cancels; they are fp16 overflow guards.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models.attention.base import (Attention, AttentionConfig, blocks_head_major,
                                       pad_to_blocks, register, unblock_head_major)
from lra.models.attention.lru import linear_recurrence_op

# GroupNorm epsilon (torchscale's RetNet layernorm_eps).
NORM_EPS = 1e-6


@dataclasses.dataclass
class RetNetConfig(AttentionConfig):
    kind: str = "retnet"
    # S: positions per chunk of the chunkwise form (64: the GLA paper's chunk; RetNet's is a
    # free choice of the implementation).
    chunk_size: int = 64
    # Causal + anti-causal passes, the diagonal once (decay gamma^|n-m|); False = causal, as the
    # paper's language model.
    bidirectional: bool = True


@dataclasses.dataclass
class GLAConfig(AttentionConfig):
    kind: str = "gla"
    # S and the secondary (sub-)chunk s of the chunkwise form. The GLA paper's kernels use 64 and
    # 16 on a GPU; on CPU 32 and 8 were faster at 1K and 4K (the s x s x D tensor inside each
    # sub-chunk is half the size): bench step 3.89 -> 5.13 steps/s at 1K, 0.98 -> 1.34 at 4K
    # (text model, 1 layer, batch 1, 2 cores, 2026-12-07). The same maths either way.
    chunk_size: int = 32
    sub_chunk: int = 8
    # alpha = sigmoid(x W_1 W_2 + b)^(1/tau): W_1 W_2 of rank 16 and tau = 16 (the paper's).
    gate_rank: int = 16
    gate_temperature: float = 16.0
    # As retnet's: causal + anti-causal passes, the diagonal once; False = causal.
    bidirectional: bool = True

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: chunks of 16 in two sub-chunks of 8. The same function as the paper's
        64/16 (the chunkwise form is exact); on this CPU the train step's GLA layer costs 0.6x the
        64/16 one at L=64 and 256 (forward + backward, batch 32, 4 heads of 32)."""
        return {"chunk_size": 16, "sub_chunk": 8}


def group_norm(o_BxLxHxD: jax.Array) -> jax.Array:
    """Each head's D outputs at each position to zero mean and unit variance."""
    mean = o_BxLxHxD.mean(-1, keepdims=True)
    centred = o_BxLxHxD - mean
    return centred * jax.lax.rsqrt((centred ** 2).mean(-1, keepdims=True) + NORM_EPS)


def log_gammas(num_heads: int) -> np.ndarray:
    """log gamma_h, gamma_h = 1 - 2^(-5-h) for h = 0..H-1 (RetNet's per-head decays), float64."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads))))


def cross_chunk(q_xNxSxD: jax.Array, k_xNxSxD: jax.Array, v_xNxSxD: jax.Array,
                b_xNxSxD: jax.Array) -> jax.Array:
    """(q_i . e^b_i) S_prev at every position: what all earlier chunks contribute. Arrays are
    [B, H, N, S, D]; `b`, the cumulative log decay inside each chunk, broadcasts to them."""
    b_last_xNx1xD = b_xNxSxD[..., -1:, :]
    k_decayed_xNxSxD = k_xNxSxD * jnp.exp(b_last_xNx1xD - b_xNxSxD)
    u_xNxDxD = jnp.einsum("bhnsd,bhnse->bhnde", k_decayed_xNxSxD, v_xNxSxD)
    # Chunk n maps the state S to e^(b_S) . S + U_n (rows = key channels); composed by an
    # associative scan over N, that gives the state leaving every chunk.
    decay_xNxDx1 = jnp.swapaxes(jnp.exp(b_last_xNx1xD), -1, -2)  # retnet's: [1, H, 1, 1, 1]
    decay_xNxDx1 = jnp.broadcast_to(decay_xNxDx1, decay_xNxDx1.shape[:2] + u_xNxDxD.shape[2:3]
                                    + decay_xNxDx1.shape[3:])
    _, leaving_xNxDxD = jax.lax.associative_scan(linear_recurrence_op, (decay_xNxDx1, u_xNxDxD),
                                                 axis=2)
    entering_xNxDxD = jnp.pad(leaving_xNxDxD[:, :, :-1], [(0, 0), (0, 0), (1, 0), (0, 0), (0, 0)])
    return jnp.einsum("bhnsd,bhnde->bhnse", q_xNxSxD * jnp.exp(b_xNxSxD), entering_xNxDxD)


class DecayedLinearAttention(Attention):
    """The shared part: masking, directions, the chunkwise and recurrent forms, norm and gate.
    Subclasses give the log decays and the pairs inside a chunk."""

    # True when the decay depends on the position's data (gla), False for one per head (retnet).
    per_position: ClassVar[bool] = False
    gate_bias: ClassVar[bool] = False

    def init_variables(self, rngs: nnx.Rngs) -> None:
        e = self.num_heads * self.head_dim
        self.gate = nnx.Linear(e, e, use_bias=self.gate_bias, rngs=rngs)

    def log_decay(self, v_BxLxHxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        """log a_n <= 0: [B, L, H, D] (0 at padded positions) when `per_position`, else [H]."""
        raise NotImplementedError

    def intra_chunk(self, q_xNxSxD, k_xNxSxD, v_xNxSxD, b_xNxSxD) -> jax.Array:
        """sum_{j <= i in the chunk} (q_i . e^(b_i - b_j) . k_j) v_j, [B, H, N, S, D]."""
        raise NotImplementedError

    def chunkwise(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, g, mask_BxL) -> jax.Array:
        """The causal recurrence, chunk by chunk; g = `log_decay` (k, v, g zero at padding)."""
        length = q_BxLxHxD.shape[1]
        sub = getattr(self.cfg, "sub_chunk", 1)
        size = min(self.cfg.chunk_size, -(-length // sub) * sub)
        padded = pad_to_blocks(size, mask_BxL, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD,
                               *([g] if self.per_position else []))
        q, k, v = (blocks_head_major(x, size) for x in padded[1:4])
        if self.per_position:  # gla: cumulative log-gates relative to each chunk's start
            b_xNxSxD = jnp.cumsum(blocks_head_major(padded[4], size), axis=3)
        else:                  # retnet: (i + 1) log gamma_h, the same in every chunk
            steps_S = jnp.arange(1, size + 1, dtype=q.dtype)
            b_xNxSxD = g[None, :, None, None, None] * steps_S[:, None]
        out_xNxSxD = cross_chunk(q, k, v, b_xNxSxD) + self.intra_chunk(q, k, v, b_xNxSxD)
        return unblock_head_major(out_xNxSxD)[:, :length]

    def recurrent(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, g, mask_BxL) -> jax.Array:
        """The causal recurrence one position at a time (a lax.scan over L): the reference form,
        O(L D^2) per head in L sequential steps."""
        b, length, h, d = q_BxLxHxD.shape
        g_BxLxHxD = g if self.per_position else jnp.broadcast_to(g[:, None], (b, length, h, 1))

        def step(s_BxHxDxD, inputs):
            q_BxHxD, k_BxHxD, v_BxHxD, g_BxHxD = inputs
            s_BxHxDxD = (jnp.exp(g_BxHxD)[..., None] * s_BxHxDxD
                         + k_BxHxD[..., :, None] * v_BxHxD[..., None, :])
            return s_BxHxDxD, jnp.einsum("bhd,bhde->bhe", q_BxHxD, s_BxHxDxD)

        xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, g_BxLxHxD))
        _, out_LxBxHxD = jax.lax.scan(step, jnp.zeros((b, h, d, d), q_BxLxHxD.dtype), xs)
        return jnp.swapaxes(out_LxBxHxD, 0, 1)

    def retain(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, form: str = "chunkwise"):
        """O before the norm: the causal pass (+ the anti-causal one, the diagonal once);
        `form` chunkwise (what trains) or recurrent (the reference)."""
        keep_BxLx1x1 = mask_BxL[:, :, None, None]
        k_BxLxHxD = jnp.where(keep_BxLx1x1, k_BxLxHxD / math.sqrt(self.head_dim), 0.0)
        g = self.log_decay(v_BxLxHxD, mask_BxL)
        v_BxLxHxD = jnp.where(keep_BxLx1x1, v_BxLxHxD, 0.0)
        run = {"chunkwise": self.chunkwise, "recurrent": self.recurrent}[form]
        if not self.cfg.bidirectional:
            return run(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, g, mask_BxL)
        # Both directions in one pass: the anti-causal one is the causal pass of the flipped
        # sequence, stacked on the batch axis (its leading padding meets a zero state).
        b = q_BxLxHxD.shape[0]
        both = lambda x: jnp.concatenate([x, x[:, ::-1]], axis=0)
        out_2BxLxHxD = run(both(q_BxLxHxD), both(k_BxLxHxD), both(v_BxLxHxD),
                           both(g) if self.per_position else g, both(mask_BxL))
        diagonal_BxLxHx1 = jnp.sum(q_BxLxHxD * k_BxLxHxD, -1, keepdims=True)
        return out_2BxLxHxD[:b] + out_2BxLxHxD[b:, ::-1] - diagonal_BxLxHx1 * v_BxLxHxD

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None):
        b, length, h, d = v_BxLxHxD.shape
        y_BxLxHxD = group_norm(self.retain(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL))
        gate_BxLxE = jax.nn.swish(self.gate(v_BxLxHxD.reshape(b, length, h * d)))
        return gate_BxLxE.reshape(b, length, h, d) * y_BxLxHxD


@register
class MultiScaleRetention(DecayedLinearAttention):
    """Retention with a fixed decay gamma_h = 1 - 2^(-5-h) per head, GroupNorm, swish gate."""

    config_cls = RetNetConfig
    check_settings = {"chunk_size": 32}  # lra.check: small-but-real

    @classmethod
    def check_seq_len(cls, cfg: RetNetConfig, seq_len: int) -> None:
        if cfg.chunk_size < 1:
            raise ValueError(f"retnet needs model.attention.chunk_size >= 1 (got "
                             f"{cfg.chunk_size}); 64 suits task.seq_len={seq_len}")

    def log_decay(self, v_BxLxHxD, mask_BxL):
        return jnp.asarray(log_gammas(self.num_heads), v_BxLxHxD.dtype)

    def intra_chunk(self, q_xNxSxD, k_xNxSxD, v_xNxSxD, b_xNxSxD):
        # D[i, j] = gamma^(i-j) for i >= j: a constant of the compiled step, built in float64.
        size = q_xNxSxD.shape[3]
        gap_SxS = np.arange(size)[:, None] - np.arange(size)[None, :]
        decay_HxSxS = np.where(gap_SxS >= 0, np.exp(log_gammas(self.num_heads)[:, None, None]
                                                    * np.maximum(gap_SxS, 0)), 0.0)
        scores_xNxSxS = jnp.einsum("bhnid,bhnjd->bhnij", q_xNxSxD, k_xNxSxD)
        decay_1xHx1xSxS = jnp.asarray(decay_HxSxS[None, :, None], q_xNxSxD.dtype)
        return jnp.einsum("bhnij,bhnjd->bhnid", scores_xNxSxS * decay_1xHx1xSxS, v_xNxSxD)


@register
class GatedLinearAttention(DecayedLinearAttention):
    """Linear attention with data-dependent per-channel forget gates, GroupNorm, swish gate."""

    config_cls = GLAConfig
    check_settings = {"chunk_size": 32, "sub_chunk": 8}  # lra.check: small-but-real
    per_position: ClassVar[bool] = True
    gate_bias: ClassVar[bool] = True  # GLA's output gate swish(x W_r + b_r) has one; RetNet's has none

    @classmethod
    def check_seq_len(cls, cfg: GLAConfig, seq_len: int) -> None:
        if cfg.sub_chunk < 1 or cfg.chunk_size < 1 or cfg.chunk_size % cfg.sub_chunk \
                or cfg.gate_rank < 1 or cfg.gate_temperature <= 0:
            raise ValueError(f"gla needs model.attention.chunk_size a multiple of sub_chunk >= 1, "
                             f"gate_rank >= 1 and gate_temperature > 0 (got {cfg.chunk_size}, "
                             f"{cfg.sub_chunk}, {cfg.gate_rank}, {cfg.gate_temperature}); fix "
                             f"them for task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        super().init_variables(rngs)
        e = self.num_heads * self.head_dim
        self.decay_down = nnx.Linear(e, self.cfg.gate_rank, use_bias=False, rngs=rngs)
        self.decay_up = nnx.Linear(self.cfg.gate_rank, e, rngs=rngs)

    def log_decay(self, v_BxLxHxD, mask_BxL):
        """log alpha = log sigmoid(v W_1 W_2 + b) / tau per key channel; 0 (hold) at padding."""
        b, length, h, d = v_BxLxHxD.shape
        logits_BxLxE = self.decay_up(self.decay_down(v_BxLxHxD.reshape(b, length, h * d)))
        g_BxLxHxD = jax.nn.log_sigmoid(logits_BxLxE).reshape(b, length, h, d)
        return jnp.where(mask_BxL[:, :, None, None], g_BxLxHxD / self.cfg.gate_temperature, 0.0)

    def intra_chunk(self, q_xNxSxD, k_xNxSxD, v_xNxSxD, b_xNxSxD):
        *lead, size, d = q_xNxSxD.shape
        sub = self.cfg.sub_chunk
        split = lambda x: x.reshape(*lead, size // sub, sub, d)  # S -> I sub-chunks x J
        q_xIxJxD, k_xIxJxD, v_xIxJxD, b_xIxJxD = map(split, (q_xNxSxD, k_xNxSxD, v_xNxSxD,
                                                             b_xNxSxD))
        # Keys in earlier sub-chunks, through the start of the query's sub-chunk (b there: the
        # value at the previous sub-chunk's last position): e^(b_i - start) e^(start - b_j).
        start_xIxD = jnp.pad(b_xIxJxD[..., :-1, -1, :], [(0, 0)] * 3 + [(1, 0), (0, 0)])
        earlier_IxS = np.arange(size)[None, :] < sub * np.arange(size // sub)[:, None]
        key_gap_xIxSxD = start_xIxD[..., :, None, :] - b_xNxSxD[..., None, :, :]
        k_xIxSxD = k_xNxSxD[..., None, :, :] * jnp.exp(
            jnp.where(earlier_IxS[:, :, None], key_gap_xIxSxD, -jnp.inf))
        q_xIxJxD_start = q_xIxJxD * jnp.exp(b_xIxJxD - start_xIxD[..., None, :])
        scores_xIxJxS = jnp.einsum("bhnijd,bhnisd->bhnijs", q_xIxJxD_start, k_xIxSxD)
        out_xIxJxD = jnp.einsum("bhnijs,bhnsd->bhnijd", scores_xIxJxS, v_xNxSxD)
        # Keys in the query's own sub-chunk: the decays themselves, s x s x D.
        gap_xIxJxJxD = b_xIxJxD[..., :, None, :] - b_xIxJxD[..., None, :, :]
        causal_JxJ = np.tril(np.ones((sub, sub), bool))
        decay_xIxJxJxD = jnp.exp(jnp.where(causal_JxJ[:, :, None], gap_xIxJxJxD, -jnp.inf))
        # One einsum, not sum(q * k * decay, -1): XLA on CPU runs that broadcast-and-reduce
        # ~4x slower (forward + backward, measured at L=64 and the paper's 64/16 chunks).
        scores_xIxJxJ = jnp.einsum("bhnijd,bhnikd,bhnijkd->bhnijk", q_xIxJxD, k_xIxJxD,
                                   decay_xIxJxJxD)
        out_xIxJxD = out_xIxJxD + jnp.einsum("bhnijk,bhnikd->bhnijd", scores_xIxJxJ, v_xIxJxD)
        return out_xIxJxD.reshape(*lead, size, d)
