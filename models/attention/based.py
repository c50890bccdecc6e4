"""Based (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff", arXiv 2402.18668): its Taylor linear-attention layer, with a short
causal conv, as a token mixer.

Per head, q_t, k_t in R^F (F = d' = feature_dim, 16) and v_t in R^D, projected from the block's
input x (E -> H F, E -> H F, E -> E; no biases, as Based's proj_q / proj_k / proj_v):
    [q | k | v] = conv_W(x [W_q | W_k | W_v])          (causal depthwise, W = 3 taps, no bias)
    phi(x) = [1, x / F^(1/4), vec(x x^T) / sqrt(2 F)]   in R^K, K = 1 + F + F^2 (273 at F = 16)
    phi(q) . phi(k) = 1 + s + s^2 / 2,   s = q . k / sqrt(F)   (the 2nd-order Taylor expansion of
                                                                exp(s), always >= 1/2)
    o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps),  S_t = sum_{j<=t} phi(k_j) v_j^T,
          z_t = sum_{j<=t} phi(k_j)
    out = (sum of the directions' o) W_out                (E -> E, no bias)
The scaling is that of Based's code: its TaylorExp feature map (HazyResearch/based
`based/models/mixers/linear_attention.py`: x / sqrt(sqrt(d')), x x^T / (sqrt(2) sqrt(d'))) and the
fla `parallel_based` kernel its 360M config trains with (q scaled by d'^-1/2, then 1 + s + s^2/2).
Numerator over denominator with eps added to the denominator (Based's LinearAttention, eps 1e-12).

Chunked form (what trains): the padded sequence is cut into N chunks of S positions. Inside a
chunk the kernel is a scalar matrix, A[i, j] = 1 + s_ij + s_ij^2 / 2 for j <= i (0 above the
diagonal and at padded keys), so its part is A V and A 1 (an S x S matmul, no features). Across
chunks: each chunk's state phi(K)^T V [K, D] and phi(K)^T 1 [K]; an exclusive cumulative sum over
the chunk axis gives the state entering each chunk, which phi(Q) reads:
    num = A V + phi(Q) S_entering,   den = A 1 + phi(Q) z_entering,   o = num / (den + eps).
Per head O(L S (F + D) + L K D) time, O(L S + L K + (L / S) K D) memory; no L x L array.
`recurrent` (a lax.scan over positions carrying S [K, D] and z [K]) is the reference form.

Bidirectional (default; an encoder for classification): the causal pass plus the causal pass of
the reversed sequence (reversed whole rows; padding, then at the front, is inert), each with its
own normaliser, summed before W_out. Each direction has its own short conv (causal in its own
time, as deltanet.py's); W_q, W_k, W_v, W_out are shared. Token t is in both directions' sums:
each direction is a normalised average (its weights are > 0 and sum to 1 up to eps), so no
diagonal is subtracted. Padding: the conv input is zeroed at padded positions and phi(k) is 0
there (the kernel matrix is masked), so padded tokens are in no sum; the reversed pass starts
from an empty state at the last real token and real outputs never depend on padding.

Mapping to the paper's architecture. Based stacks three layer types, each its own residual block
with an MLP: Taylor linear attention (this layer), sliding-window softmax attention (window
64-128; the reference 360M config gives flash-attn a left window of 128) and gated short-conv
BaseConv layers (y = (SiLU(conv_3(x W_1)) * (x W_2)) W_out); the reference 360M config has 27
layers, linear attention at 1, 6, 11, 16, 21, sliding window at 2, 7, 12, 17, 22, BaseConv at the
other 17. This harness composes layer types with model.layers, and `local` already is a banded
softmax, so this mixer is the linear-attention layer plus the short conv, and the sliding window
comes from stacking: model.layers=[based, local] with +model.mixers.local.block_size=64 (and
num_neighbours 1: every query sees 64-128 keys on each side), one LA and one window layer per
pair, as the paper's 5 + 5. Summing a window branch into this mixer (the other option) would merge
two of the paper's residual blocks into one and repeat local.py's kernel.

Departures, and why:
- The short conv sits on the projected q, k, v of this layer (as in fla-style linear-attention
  layers and deltanet.py), not in separate gated BaseConv layers: the harness has no BaseConv kind
  and every model.layers entry is a whole block with an MLP. It keeps the conv's job in Based
  (mixing each token with its few predecessors, e.g. a key that carries the previous token: the
  local work Based gives its BaseConv layers); no activation, so phi's argument stays a linear
  map of the stream, as in Based's linear-attention layer. conv_size = 3 is BaseConv's kernel.
- Causal in the paper; bidirectional here by default (above).
- Projections: nnx.Linear's LeCun normal (the harness's mixers), not Based's GPT initializer
  N(0, 0.02); the conv U(+-1/sqrt(W)) is PyTorch Conv1d's default, which Based's ShortConvolution
  keeps (bias off).
- eps = 1e-12 (Based's LinearAttention; fla's kernel adds 1e-6): the denominator is >= 1/2 at
  every real query (its own key), so eps only acts where all keys are padding (0 / eps = 0).

Shape letters beyond base.py's table, used only in this module: F is the q / k feature dim d'
per head (no sinusoid here), K = 1 + F + F^2 the expanded features (a variant's inner width),
W the conv's taps and U its channels, 2 H F + E (q | k | v).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import (AttentionConfig, TokenMixer, blocks_head_major,
                                       pad_to_blocks, register, unblock_head_major)
from lra.models.attention.mamba import causal_depthwise_conv


@dataclasses.dataclass
class BasedConfig(AttentionConfig):
    kind: str = "based"
    # F = d': q and k features per head (the paper's d' = 16; the reference configs'
    # feature_dim: 16). The expanded feature phi has 1 + F + F^2 entries (273).
    feature_dim: int = 16
    # S: positions per chunk of the chunked form. fla's based kernels use blocks of 64 on a GPU;
    # on CPU 128 was faster at 1K and 4K (half the 273 x D chunk states to sum): bench step
    # 5.39 -> 5.95 steps/s at 1K, 1.10 -> 1.37 at 4K (text model, 1 layer, batch 1, 2 cores,
    # 2026-12-07). The same maths either way.
    chunk_size: int = 128
    # W: taps of the causal depthwise conv on q, k, v (Based's BaseConv short conv, kernel 3 in
    # the reference configs).
    conv_size: int = 3
    # Added to the normaliser (Based's LinearAttention default).
    eps: float = 1e-12
    # Causal pass + the causal pass of the reversed sequence, summed; False = causal.
    bidirectional: bool = True


def taylor_features(x_xF: jax.Array) -> jax.Array:
    """phi(x) [..., 1 + F + F^2]: phi(q) . phi(k) = 1 + q.k / sqrt(F) + (q.k)^2 / (2 F)."""
    f = x_xF.shape[-1]
    second_xFxF = x_xF[..., :, None] * x_xF[..., None, :]
    return jnp.concatenate([jnp.ones_like(x_xF[..., :1]), x_xF * f ** -0.25,
                            second_xFxF.reshape(*x_xF.shape[:-1], f * f) * (2 * f) ** -0.5],
                           axis=-1)


def taylor_attention_chunked(q_BxLxHxF: jax.Array, k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array,
                             real_BxL: jax.Array, chunk_size: int, eps: float) -> jax.Array:
    """Causal Taylor linear attention chunk by chunk (the module docstring's form); keys at
    positions where `real_BxL` is False are in no sum."""
    length, f = q_BxLxHxF.shape[1], q_BxLxHxF.shape[-1]
    size = min(chunk_size, length)
    real_BxP, q_BxPxHxF, k_BxPxHxF, v_BxPxHxD = pad_to_blocks(size, real_BxL, q_BxLxHxF,
                                                              k_BxLxHxF, v_BxLxHxD)
    b, padded = real_BxP.shape
    q_xNxSxF, k_xNxSxF, v_xNxSxD = (blocks_head_major(x, size)
                                    for x in (q_BxPxHxF, k_BxPxHxF, v_BxPxHxD))
    key_ok_Bx1xNx1xS = real_BxP.reshape(b, 1, padded // size, 1, size)
    # Inside a chunk: the scalar kernel, causal and over real keys only.
    s_xNxSxS = jnp.einsum("bhnif,bhnjf->bhnij", q_xNxSxF, k_xNxSxF) * f ** -0.5
    allowed_xNxSxS = jnp.tril(jnp.ones((size, size), bool)) & key_ok_Bx1xNx1xS
    kernel_xNxSxS = jnp.where(allowed_xNxSxS, 1.0 + s_xNxSxS + 0.5 * s_xNxSxS ** 2, 0.0)
    num_xNxSxD = jnp.einsum("bhnij,bhnjd->bhnid", kernel_xNxSxS, v_xNxSxD)
    den_xNxS = jnp.sum(kernel_xNxSxS, axis=-1)
    # Across chunks: each chunk's feature state, summed over the chunks before it.
    phi_k_xNxSxK = taylor_features(k_xNxSxF) * key_ok_Bx1xNx1xS[:, :, :, 0, :, None]
    chunk_kv_xNxKxD = jnp.einsum("bhnsk,bhnsd->bhnkd", phi_k_xNxSxK, v_xNxSxD)
    chunk_z_xNxK = jnp.sum(phi_k_xNxSxK, axis=-2)
    before = lambda x: jnp.cumsum(jnp.pad(x[:, :, :-1], [(0, 0), (0, 0), (1, 0)]
                                          + [(0, 0)] * (x.ndim - 3)), axis=2)
    phi_q_xNxSxK = taylor_features(q_xNxSxF)
    num_xNxSxD = num_xNxSxD + jnp.einsum("bhnsk,bhnkd->bhnsd", phi_q_xNxSxK,
                                         before(chunk_kv_xNxKxD))
    den_xNxS = den_xNxS + jnp.einsum("bhnsk,bhnk->bhns", phi_q_xNxSxK, before(chunk_z_xNxK))
    return unblock_head_major(num_xNxSxD / (den_xNxS[..., None] + eps))[:, :length]


def taylor_attention_recurrent(q_BxLxHxF: jax.Array, k_BxLxHxF: jax.Array, v_BxLxHxD: jax.Array,
                               real_BxL: jax.Array, eps: float) -> jax.Array:
    """The same outputs one position at a time (a lax.scan over L carrying S [K, D] and z [K]):
    the reference form, O(L K D) per head in L sequential steps."""
    b, _, h, d = v_BxLxHxD.shape
    phi_q_BxLxHxK = taylor_features(q_BxLxHxF)
    phi_k_BxLxHxK = taylor_features(k_BxLxHxF) * real_BxL[:, :, None, None]

    def step(carry, inputs):
        kv_BxHxKxD, z_BxHxK = carry
        phi_q_BxHxK, phi_k_BxHxK, v_BxHxD = inputs
        kv_BxHxKxD = kv_BxHxKxD + phi_k_BxHxK[..., :, None] * v_BxHxD[..., None, :]
        z_BxHxK = z_BxHxK + phi_k_BxHxK
        num_BxHxD = jnp.einsum("bhk,bhkd->bhd", phi_q_BxHxK, kv_BxHxKxD)
        den_BxH = jnp.einsum("bhk,bhk->bh", phi_q_BxHxK, z_BxHxK)
        return (kv_BxHxKxD, z_BxHxK), num_BxHxD / (den_BxH[..., None] + eps)

    k = phi_q_BxLxHxK.shape[-1]
    dtype = phi_q_BxLxHxK.dtype
    carry = (jnp.zeros((b, h, k, d), dtype), jnp.zeros((b, h, k), dtype))
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (phi_q_BxLxHxK, phi_k_BxLxHxK, v_BxLxHxD))
    _, out_LxBxHxD = jax.lax.scan(step, carry, xs)
    return jnp.swapaxes(out_LxBxHxD, 0, 1)


@register
class BasedMixer(TokenMixer):
    """x -> W_out(Taylor linear attention of conv(x W_q), conv(x W_k), conv(x W_v)), both
    directions summed."""

    config_cls = BasedConfig
    check_settings = {"chunk_size": 32}  # lra.check: small-but-real (L = 128: 4 chunks)

    @classmethod
    def check_seq_len(cls, cfg: BasedConfig, seq_len: int) -> None:
        if min(cfg.feature_dim, cfg.chunk_size, cfg.conv_size) < 1 or not cfg.eps >= 0:
            raise ValueError(f"based needs model.attention.feature_dim, chunk_size, conv_size "
                             f">= 1 and eps >= 0 (got {cfg.feature_dim}, {cfg.chunk_size}, "
                             f"{cfg.conv_size}, {cfg.eps}); 16, 64, 3, 1e-12 suit "
                             f"task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        e, taps = self.width, self.cfg.conv_size
        u = 2 * self.num_heads * self.cfg.feature_dim + e
        directions = 2 if self.cfg.bidirectional else 1
        # [W_q | W_k | W_v] as one E -> 2 H F + E layer, and W_out; no biases (Based's).
        self.in_proj = nnx.Linear(e, u, use_bias=False, rngs=rngs)
        self.out_proj = nnx.Linear(e, e, use_bias=False, rngs=rngs)
        # Depthwise conv on q | k | v, one per direction: fan-in = W taps, U(+-1/sqrt(W)).
        bound = 1.0 / math.sqrt(taps)
        self.conv_kernel_CxWxU = nnx.Param(jax.random.uniform(
            rngs.params(), (directions, taps, u), minval=-bound, maxval=bound))

    def attend(self, x_BxLxE: jax.Array, mask_BxL: jax.Array, form: str = "chunked") -> jax.Array:
        """o [B, L, H, D] before W_out: the causal pass (+ the reversed one, summed); `form`
        chunked (what trains) or recurrent (the reference)."""
        b, length, _ = x_BxLxE.shape
        h, d, f = self.num_heads, self.head_dim, self.cfg.feature_dim
        # Zero at padding: the conv reads padding as it reads the zeros before a start.
        x_BxLxU = jnp.where(mask_BxL[..., None], self.in_proj(x_BxLxE), 0.0)
        kernel_CxWxU = self.conv_kernel_CxWxU[...]
        directions = kernel_CxWxU.shape[0]
        # Direction 1 reads the flipped rows, stacked on the batch axis after the conv.
        both = lambda x: jnp.stack([x, x[:, ::-1]][:directions])
        no_bias_CxU = jnp.zeros((directions, kernel_CxWxU.shape[-1]), kernel_CxWxU.dtype)
        x_CxBxLxU = causal_depthwise_conv(both(x_BxLxU), kernel_CxWxU, no_bias_CxU)
        x_xLxU = x_CxBxLxU.reshape(directions * b, length, -1)
        q_xLxHxF = x_xLxU[..., :h * f].reshape(directions * b, length, h, f)
        k_xLxHxF = x_xLxU[..., h * f:2 * h * f].reshape(directions * b, length, h, f)
        v_xLxHxD = x_xLxU[..., 2 * h * f:].reshape(directions * b, length, h, d)
        real_xL = both(mask_BxL).reshape(directions * b, length)
        if form == "chunked":
            o_xLxHxD = taylor_attention_chunked(q_xLxHxF, k_xLxHxF, v_xLxHxD, real_xL,
                                                self.cfg.chunk_size, self.cfg.eps)
        elif form == "recurrent":
            o_xLxHxD = taylor_attention_recurrent(q_xLxHxF, k_xLxHxF, v_xLxHxD, real_xL,
                                                  self.cfg.eps)
        else:
            raise ValueError(f"form={form!r}; use chunked or recurrent")
        o_CxBxLxHxD = o_xLxHxD.reshape(directions, b, length, h, d)
        return o_CxBxLxHxD[0] if directions == 1 else o_CxBxLxHxD[0] + o_CxBxLxHxD[1, :, ::-1]

    def mix(self, x_BxLxE, mask_BxL, form: str = "chunked"):
        b, length, e = x_BxLxE.shape
        return self.out_proj(self.attend(x_BxLxE, mask_BxL, form).reshape(b, length, e))
