"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality"): the Mamba-2 block as a token mixer.

The block (the paper's Sec. 7.1, its code's Mamba2) on the block's normalised input u: inner
width K = expand * E cut into H heads of P channels, state N, one group of B and C shared by
every head (ngroups = 1, the paper's multi-value pattern, Sec. 7.2):
    [z | x | B | C | dt] = u W_in                       (E -> 2K + 2N + H, no bias: parallel
                                                         projections, not Mamba-1's x -> dt, B, C)
    [x | B | C] = SiLU(causal depthwise conv_W([x | B | C]) + b_conv)      (W = d_conv taps)
    dt_h = softplus(dt_h + dt_bias_h),  A_h = -exp(A_log_h)                (a scalar per head)
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,   y_t = h_t^T C_t + D x_t  (per head: h [N, P])
    out = RMSNorm(y * SiLU(z)) W_out                   (gated RMSNorm over all K, then K -> E)
The SSM is SSD's scalar-times-identity A_t = a_t I (Sec. 5.1): one decay a_t = exp(dt_t A_h) per
head and step, shared by the N x P state. Init (its code's): A ~ U[1, 16], stored as A_log;
dt_bias = softplus^-1(dt), dt ~ logU[dt_min, dt_max] floored at dt_floor; D = 1; norm scale 1;
conv U(+-1/sqrt(W)) (PyTorch's Conv1d default); W_in, W_out as nnx.Linear's (as mamba.py).

Heads: H = K / P with P = ssd_head_dim (the paper's headdim, 64), so the encoder's num_heads is
not used (the mixer sees the E channels of x); ssd_head_dim = 0 takes P = expand * (the encoder's
head dim), i.e. H = the encoder's num_heads. At the harness's widths (E a multiple of 32) P = 64
gives H = 2E / 64 (one head at E = 32).

SSD's chunked algorithm (Sec. 6, Listing 1; what trains): chunks of S positions; with g_t = dt_t
A_h <= 0 and b_i = g_1 + ... + g_i, cumulated from the chunk's start, per head
  diagonal blocks   y_i  = sum_{j <= i in the chunk} (C_i . B_j) exp(g_{j+1} + ... + g_i) dt_j x_j
  chunk states      s_n  = sum_j exp(b_S - b_j) B_j (dt_j x_j)^T             [N, P]
  state passing     h_n  = exp(b_S) h_{n-1} + s_n     (an associative scan over the chunks)
  state to output   y_i += exp(b_i) C_i . h_{n-1}
The segment sums g_{j+1} + ... + g_i are cumulated over the segment itself (Listing 1's stable
`segsum`), not as b_i - b_j (which cancels two large numbers); every exponent is <= 0. Cost per
head O(L S (N + P) + L N P) time, O(L S + L N P / S) memory (C_i . B_j is shared by the heads);
no L x L array. The `recurrent` form runs h_t step by step (a lax.scan over L), the reference.

Bidirectional (the default, as mamba.py's Vision-Mamba scheme; Mamba-2 itself is causal): the
in-projection of z, x, B, C, the gated norm and the out-projection are shared; each direction
has its own conv, H dt columns of W_in (so W_in is E x (2K + 2N + 2H); Mamba-1's dt projection is
per direction too), dt_bias, A_log and D; the backward one runs on the reversed sequence and the
two y are summed before the gate. Padding: the conv input is zero at padded steps and dt = 0
there, so exp(dt A) = 1 and dt B x = 0: they hold the state; the backward direction starts from
a zero state at the last real token, and padding never reaches a real output.

Shape letters beyond base.py's table, used only in this module: N is the SSM state and P the
head dim (the paper's letters; base.py's P, a padded length, is not used here), H the SSD heads
(not the encoder's), K = H P the inner width; W the conv's taps, X its channels K + 2N
([x | B | C]); S the positions of one chunk and Z the number of chunks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models.attention.base import (AttentionConfig, NoDecayParam, SSMParam, TokenMixer,
                                       register)
from lra.models.attention.lru import linear_recurrence_op
from lra.models.attention.mamba import causal_depthwise_conv


@dataclasses.dataclass
class Mamba2Config(AttentionConfig):
    kind: str = "mamba2"
    # N: state size, shared by a head's P channels (the paper's d_state, 64-128; its code's 64).
    state_dim: int = 64
    # K = expand * E inner channels (the paper's expand = 2).
    expand: int = 2
    # P: channels per SSD head, H = K / P (the paper's headdim = 64); 0 = expand * the encoder's
    # head dim, so H = the encoder's num_heads.
    ssd_head_dim: int = 64
    # Taps of the causal depthwise conv over [x | B | C] (the paper's code, d_conv = 4).
    d_conv: int = 4
    # S: positions per chunk of the SSD algorithm (the paper's Listing 1 and benchmarks: 64).
    chunk_size: int = 64
    # A_h ~ U[a_init_min, a_init_max] (the paper's code's A_init_range = (1, 16)).
    a_init_min: float = 1.0
    a_init_max: float = 16.0
    # dt ~ logU[dt_min, dt_max], floored at dt_floor, sets dt_bias (the paper's code's defaults).
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_floor: float = 1e-4
    # Epsilon of the gated RMSNorm (the paper's code's 1e-5).
    norm_eps: float = 1e-5
    # Forward + backward SSMs summed (as mamba.py); False = causal, as the paper's language model.
    bidirectional: bool = True


def segment_sums(g_xSxH: jax.Array) -> jax.Array:
    """[..., H, S, S]: g_{j+1} + ... + g_i at (i, j) for i >= j (0 on the diagonal and above
    it), each entry summed over its own segment (no difference of two long cumulative sums)."""
    size = g_xSxH.shape[-2]
    g_xHxS = jnp.swapaxes(g_xSxH, -1, -2)
    later_SxS = np.tril(np.ones((size, size), bool), -1)  # (k, j): g_k is in the sums from j
    return jnp.cumsum(jnp.where(later_SxS, g_xHxS[..., :, None], 0.0), axis=-2)


def ssd_chunked(x_xLxHxP: jax.Array, dt_xLxH: jax.Array, a_xH: jax.Array, b_xLxN: jax.Array,
                c_xLxN: jax.Array, size: int) -> jax.Array:
    """y_i = sum_{j <= i} (C_i . B_j) exp(dt_{j+1} A + ... + dt_i A) dt_j x_j by SSD's chunks of
    `size`. Leading axes are batch axes; `a_xH` (A per head) has them too, or size 1."""
    *lead, length, h, p = x_xLxHxP.shape
    chunks = -(-length // size)
    pad = chunks * size - length

    def chunked(t_xLx):  # [..., L, ...] -> [..., Z, S, ...], padded with dt = 0 (state held)
        tail = t_xLx.shape[len(lead) + 1:]
        t_xLx = jnp.pad(t_xLx, [(0, 0)] * len(lead) + [(0, pad)] + [(0, 0)] * len(tail))
        return t_xLx.reshape(*lead, chunks, size, *tail)

    xdt_xZxSxHxP = chunked(x_xLxHxP * dt_xLxH[..., None])
    b_xZxSxN, c_xZxSxN = chunked(b_xLxN), chunked(c_xLxN)
    g_xZxSxH = chunked(dt_xLxH) * a_xH[..., None, None, :]
    cum_xZxSxH = jnp.cumsum(g_xZxSxH, axis=-2)        # b_i, from the chunk's start
    seg_xZxHxSxS = segment_sums(g_xZxSxH)
    # Diagonal blocks: the chunk's own C B^T (shared by the heads), masked and decayed.
    causal_SxS = np.tril(np.ones((size, size), bool))
    decay_xZxHxSxS = jnp.where(causal_SxS, jnp.exp(seg_xZxHxSxS), 0.0)
    scores_xZxSxS = jnp.einsum("...zin,...zjn->...zij", c_xZxSxN, b_xZxSxN)
    y_xZxSxHxP = jnp.einsum("...zhij,...zjhp->...zihp",
                            decay_xZxHxSxS * scores_xZxSxS[..., None, :, :], xdt_xZxSxHxP)
    # Chunk states: what each chunk leaves in h from its own inputs; b_S - b_j is the last row of
    # the segment sums.
    to_end_xZxSxH = jnp.swapaxes(jnp.exp(seg_xZxHxSxS[..., -1, :]), -1, -2)
    states_xZxHxNxP = jnp.einsum("...zjn,...zjhp->...zhnp", b_xZxSxN,
                                 xdt_xZxSxHxP * to_end_xZxSxH[..., None])
    # State passing: chunk z maps h to exp(b_S) h + s_z; composed by an associative scan over Z.
    decay_xZxHx1x1 = jnp.exp(cum_xZxSxH[..., -1, :])[..., None, None]
    _, leaving_xZxHxNxP = jax.lax.associative_scan(
        linear_recurrence_op, (decay_xZxHx1x1, states_xZxHxNxP), axis=len(lead))
    entering_xZxHxNxP = jnp.concatenate([jnp.zeros_like(leaving_xZxHxNxP[..., :1, :, :, :]),
                                         leaving_xZxHxNxP[..., :-1, :, :, :]], axis=-4)
    # State to output: the entering state read by C_i, decayed from the chunk's start to i.
    y_xZxSxHxP = y_xZxSxHxP + (jnp.einsum("...zin,...zhnp->...zihp", c_xZxSxN, entering_xZxHxNxP)
                               * jnp.exp(cum_xZxSxH)[..., None])
    return y_xZxSxHxP.reshape(*lead, chunks * size, h, p)[..., :length, :, :]


def ssd_recurrent(x_xLxHxP: jax.Array, dt_xLxH: jax.Array, a_xH: jax.Array, b_xLxN: jax.Array,
                  c_xLxN: jax.Array) -> jax.Array:
    """The same y one step at a time (a lax.scan over L): h_t = exp(dt_t A) h_{t-1} + B_t
    (dt_t x_t)^T, y_t = h_t^T C_t. The reference form: O(L N P) per head in L sequential steps."""
    *lead, length, h, p = x_xLxHxP.shape
    n = b_xLxN.shape[-1]
    axis = len(lead)

    def step(h_xHxNxP, inputs):
        x_xHxP, dt_xH, b_xN, c_xN = inputs
        h_xHxNxP = (jnp.exp(dt_xH * a_xH)[..., None, None] * h_xHxNxP
                    + b_xN[..., None, :, None] * (dt_xH[..., None] * x_xHxP)[..., :, None, :])
        return h_xHxNxP, jnp.einsum("...hnp,...n->...hp", h_xHxNxP, c_xN)

    xs = tuple(jnp.moveaxis(t, axis, 0) for t in (x_xLxHxP, dt_xLxH, b_xLxN, c_xLxN))
    h0_xHxNxP = jnp.zeros((*lead, h, n, p), x_xLxHxP.dtype)
    _, y_Lx = jax.lax.scan(step, h0_xHxNxP, xs)   # [L, ..., H, P]
    return jnp.moveaxis(y_Lx, 0, axis)


@register
class Mamba2Mixer(TokenMixer):
    """u -> out-proj(RMSNorm(SSD(SiLU(conv([x | B | C])), dt) * SiLU(z))), directions summed."""

    config_cls = Mamba2Config
    # lra.check (E = 16, K = 32): 4 heads of 8, state 16, chunks of 32 (a real multi-chunk run).
    check_settings = {"ssd_head_dim": 8, "state_dim": 16, "chunk_size": 32}

    @classmethod
    def check_seq_len(cls, cfg: Mamba2Config, seq_len: int) -> None:
        if min(cfg.state_dim, cfg.expand, cfg.d_conv, cfg.chunk_size) < 1 or cfg.ssd_head_dim < 0 \
                or not 0 < cfg.a_init_min <= cfg.a_init_max \
                or not 0 < cfg.dt_min <= cfg.dt_max or cfg.dt_floor <= 0 or cfg.norm_eps <= 0:
            raise ValueError(f"mamba2 needs model.attention.state_dim, expand, d_conv, chunk_size "
                             f">= 1, ssd_head_dim >= 0 (0 = expand * the encoder's head dim), "
                             f"0 < a_init_min <= a_init_max, 0 < dt_min <= dt_max, dt_floor > 0 "
                             f"and norm_eps > 0 (got {cfg.state_dim}, {cfg.expand}, {cfg.d_conv}, "
                             f"{cfg.chunk_size}, {cfg.ssd_head_dim}, {cfg.a_init_min}, "
                             f"{cfg.a_init_max}, {cfg.dt_min}, {cfg.dt_max}, {cfg.dt_floor}, "
                             f"{cfg.norm_eps}); fix them for task.seq_len={seq_len}")

    @property
    def ssd_heads(self) -> tuple[int, int]:
        """(H, P): SSD heads and their channels, H P = expand * E."""
        k = self.cfg.expand * self.width
        p = self.cfg.ssd_head_dim or self.cfg.expand * self.head_dim
        return k // p, p

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg = self.cfg
        e, n, taps = self.width, cfg.state_dim, cfg.d_conv
        k = cfg.expand * e
        if cfg.ssd_head_dim and k % cfg.ssd_head_dim:
            raise ValueError(f"mamba2: model.attention.ssd_head_dim={cfg.ssd_head_dim} does not "
                             f"divide expand * emb_dim = {k}; use a divisor of {k}, or 0 for "
                             f"expand * the encoder's head dim")
        h, _ = self.ssd_heads
        c = 2 if cfg.bidirectional else 1
        # [z | x | B | C | dt per direction], the paper's order.
        self.in_proj = nnx.Linear(e, 2 * k + 2 * n + c * h, use_bias=False, rngs=rngs)
        self.out_proj = nnx.Linear(k, e, use_bias=False, rngs=rngs)
        # Depthwise conv over [x | B | C]: fan-in = W taps, U(+-1/sqrt(W)) for kernel and bias.
        bound = 1.0 / math.sqrt(taps)
        self.conv_kernel_CxWxX = nnx.Param(
            jax.random.uniform(rngs.params(), (c, taps, k + 2 * n), minval=-bound, maxval=bound))
        self.conv_bias_CxX = nnx.Param(
            jax.random.uniform(rngs.params(), (c, k + 2 * n), minval=-bound, maxval=bound))
        # dt_bias = softplus^-1(dt), dt ~ logU[dt_min, dt_max]: softplus(dt_bias) is that dt.
        log_dt_CxH = jax.random.uniform(rngs.params(), (c, h), minval=math.log(cfg.dt_min),
                                        maxval=math.log(cfg.dt_max))
        dt_CxH = jnp.maximum(jnp.exp(log_dt_CxH), cfg.dt_floor)
        self.dt_bias_CxH = SSMParam(dt_CxH + jnp.log(-jnp.expm1(-dt_CxH)))
        # A_h ~ U[1, 16], stored as A_log = log(-A).
        self.a_log_CxH = SSMParam(jnp.log(jax.random.uniform(
            rngs.params(), (c, h), minval=cfg.a_init_min, maxval=cfg.a_init_max)))
        # Skip D = 1 per head (the paper's code), exempt from weight decay at the base rate as
        # there (`D._no_weight_decay`) and as mamba.py's D.
        self.d_CxH = NoDecayParam(jnp.ones((c, h)))
        # Gated RMSNorm's scale over all K channels (ngroups = 1), init 1.
        self.norm_scale_K = nnx.Param(jnp.ones((k,)))

    def ssm(self, x_BxLxE: jax.Array, mask_BxL: jax.Array, form: str = "chunked"
            ) -> tuple[jax.Array, jax.Array]:
        """(y, z), [B, L, K] each: the SSM's y + D x, both directions summed, and the gate's z;
        `form` chunked (SSD's algorithm, what trains) or recurrent (the reference)."""
        cfg = self.cfg
        h, p = self.ssd_heads
        k, n = h * p, cfg.state_dim
        directions = self.d_CxH.shape[0]
        b, length, _ = x_BxLxE.shape
        zxbcdt_BxLx = self.in_proj(x_BxLxE)
        z_BxLxK = zxbcdt_BxLx[..., :k]
        # Zero at padding: the conv then reads padding as it reads the zeros before a start.
        xbc_BxLxX = jnp.where(mask_BxL[:, :, None], zxbcdt_BxLx[..., k:2 * k + 2 * n], 0.0)
        dt_BxLxCxH = zxbcdt_BxLx[..., 2 * k + 2 * n:].reshape(b, length, directions, h)
        # Direction 1 reads the flipped sequence (its leading padding holds the zero state).
        xbc_CxBxLxX = jnp.stack([xbc_BxLxX, xbc_BxLxX[:, ::-1]][:directions])
        real_CxBxL = jnp.stack([mask_BxL, mask_BxL[:, ::-1]][:directions])
        dt_CxBxLxH = jnp.stack([dt_BxLxCxH[:, :, 0], dt_BxLxCxH[:, ::-1, -1]][:directions])
        u_CxBxLxX = jax.nn.silu(causal_depthwise_conv(xbc_CxBxLxX, self.conv_kernel_CxWxX[...],
                                                      self.conv_bias_CxX[...]))
        x_CxBxLxHxP = u_CxBxLxX[..., :k].reshape(directions, b, length, h, p)
        b_CxBxLxN, c_CxBxLxN = u_CxBxLxX[..., k:k + n], u_CxBxLxX[..., k + n:]
        # dt = 0 at padded steps: exp(0 A) = 1 and dt B x = 0 there, so they hold the state.
        dt_CxBxLxH = jnp.where(real_CxBxL[..., None],
                               jax.nn.softplus(dt_CxBxLxH + self.dt_bias_CxH[...][:, None, None]),
                               0.0)
        a_Cx1xH = -jnp.exp(self.a_log_CxH[...])[:, None]
        if form == "chunked":
            y_CxBxLxHxP = ssd_chunked(x_CxBxLxHxP, dt_CxBxLxH, a_Cx1xH, b_CxBxLxN, c_CxBxLxN,
                                      min(cfg.chunk_size, length))
        elif form == "recurrent":
            y_CxBxLxHxP = ssd_recurrent(x_CxBxLxHxP, dt_CxBxLxH, a_Cx1xH, b_CxBxLxN, c_CxBxLxN)
        else:
            raise ValueError(f"mamba2: form={form!r}; use chunked or recurrent")
        y_CxBxLxHxP = y_CxBxLxHxP + self.d_CxH[...][:, None, None, :, None] * x_CxBxLxHxP
        y_CxBxLxK = y_CxBxLxHxP.reshape(directions, b, length, k)
        y_BxLxK = y_CxBxLxK[0] if directions == 1 else y_CxBxLxK[0] + y_CxBxLxK[1, :, ::-1]
        return y_BxLxK, z_BxLxK

    def mix(self, x_BxLxE: jax.Array, mask_BxL: jax.Array, form: str = "chunked") -> jax.Array:
        y_BxLxK, z_BxLxK = self.ssm(x_BxLxE, mask_BxL, form)
        # Gated RMSNorm (the paper's code's norm_before_gate=False): normalise y * SiLU(z).
        gated_BxLxK = y_BxLxK * jax.nn.silu(z_BxLxK)
        normed_BxLxK = gated_BxLxK * jax.lax.rsqrt(
            jnp.mean(gated_BxLxK ** 2, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return self.out_proj(normed_BxLxK * self.norm_scale_K[...])
