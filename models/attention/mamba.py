"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

The Mamba block as a token mixer (the encoder's pre-LN block and MLP around it), inner width
K = expand * E, SSM state N per inner channel:
    [x | z] = x W_in                                   (E -> 2K, no bias)
    u = SiLU(causal depthwise conv_W(x) + b_conv)      (W = d_conv taps)
    dt = softplus(u W_dt_in W_dt + dt_bias),  B = u W_B,  C = u W_C    (input-dependent; R = dt rank)
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   y_t = C_t . h_t + D u_t   (per channel, A diagonal)
    out = (y * SiLU(z)) W_out                          (K -> E, no bias)
A = -exp(A_log) with S4D-Real init A_n = -(n + 1); dt_bias = softplus^-1(dt), dt ~ logU[dt_min,
dt_max] (the paper's Section 3.6 / its code's defaults). Discretisation: zero-order hold for A,
Abar = exp(dt A), and the paper's simplified Euler step Bbar u = dt B u for B (its code's choice,
close to ZOH's (exp(dt A) - 1) / A * B for small dt A).

The recurrence runs chunk by chunk, as the paper's fused kernel does in on-chip memory: a
`lax.scan` over L / T chunks carries h [B, K, N]; inside a chunk the T steps run unrolled and emit
y_t = C_t . h_t directly, so the states h [B, L, K, N] are never materialised, and the chunk is
`jax.checkpoint`ed, so the backward pass stores only the L / T carries and recomputes a chunk's
states. O(B L K N) time, O(B L K + B K N L / T) memory, no L x L array. (A whole-sequence
`jax.lax.associative_scan`, the other portable form, materialises h and was 4.5x slower for the
train step's scan on this CPU at L = 64, 1K and 4K: `tests/test_attn_mamba.py` checks this loop
against a float64 step-by-step recurrence.)

Bidirectional (the default, as Vision Mamba's Bidirectional Mamba, Zhu et al. 2024, since Mamba
itself is causal): the in-projection, gate z and out-projection are shared; each direction has
its own conv, x -> (dt, B, C) projections, dt_bias, A_log and D; the backward one runs on the
reversed sequence and the two y are summed before the gate. Padded steps get dt = 0, so (Abar,
Bbar u) = (1, 0): they hold the state, and the conv input is zero there: with end padding the
backward direction starts from a zero state at the last real token, and padding never reaches a
real output.

Shape letters beyond base.py's table, used only in this module: N is the SSM state (the paper's
letter, as S4D's and LRU's parameters name it), R the dt rank; W is the conv's window of taps;
T the steps of one scan chunk and Z the number of chunks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import (AttentionConfig, NoDecayParam, SSMParam, TokenMixer,
                                       register)


@dataclasses.dataclass
class MambaConfig(AttentionConfig):
    kind: str = "mamba"
    # N: state size per inner channel (the paper's d_state = 16).
    state_dim: int = 16
    # K = expand * E inner channels (the paper's expansion factor E = 2).
    expand: int = 2
    # Taps of the causal depthwise conv before the SSM (the paper's code, d_conv = 4).
    d_conv: int = 4
    # R: rank of the dt projection; 0 = ceil(E / 16) (the paper's code, dt_rank="auto").
    dt_rank: int = 0
    # dt ~ logU[dt_min, dt_max], floored at dt_floor, sets dt_bias (the paper's code's defaults).
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_floor: float = 1e-4
    # Forward + backward selective scans summed (Vision Mamba's Bidirectional Mamba); False = causal.
    bidirectional: bool = True
    # T: steps per chunk of the scan (unrolled, recomputed in the backward pass); the sequence is
    # padded to a multiple of T with steps that hold the state. 8-16 was fastest on CPU.
    chunk_size: int = 8


@jax.custom_vjp
def causal_depthwise_conv(x_CxBxLxK: jax.Array, kernel_CxWxK: jax.Array,
                          bias_CxK: jax.Array) -> jax.Array:
    """out[t] = bias + sum_j kernel[j] * x[t - (W - 1) + j], zeros before the start.

    A hand-written backward: autodiff's kernel gradient (per tap, sum over B and L of the
    cotangent times a shifted input) let XLA's CPU fusion recompute the cotangent's producers
    inside each reduction; at L = 4096 and 768 channels it took 268 ms where the input gradient
    took 41, the largest cost of a deltanet layer's step. Here the cotangent arrives computed."""
    taps, length = kernel_CxWxK.shape[1], x_CxBxLxK.shape[2]
    padded_CxBxPxK = jnp.pad(x_CxBxLxK, ((0, 0), (0, 0), (taps - 1, 0), (0, 0)))
    out_CxBxLxK = bias_CxK[:, None, None, :]
    for j in range(taps):  # W (default 4) static taps, not a loop over L
        out_CxBxLxK = out_CxBxLxK + (kernel_CxWxK[:, j][:, None, None, :]
                                     * padded_CxBxPxK[:, :, j:j + length])
    return out_CxBxLxK


def _conv_fwd(x_CxBxLxK, kernel_CxWxK, bias_CxK):
    return causal_depthwise_conv(x_CxBxLxK, kernel_CxWxK, bias_CxK), (x_CxBxLxK, kernel_CxWxK)


def _conv_bwd(residuals, grad_CxBxLxK):
    x_CxBxLxK, kernel_CxWxK = residuals
    taps, length = kernel_CxWxK.shape[1], x_CxBxLxK.shape[2]
    padded_CxBxPxK = jnp.pad(x_CxBxLxK, ((0, 0), (0, 0), (taps - 1, 0), (0, 0)))
    # x[s] feeds out[s + W - 1 - j] through tap j: the cotangent read W - 1 - j ahead.
    ahead_CxBxPxK = jnp.pad(grad_CxBxLxK, ((0, 0), (0, 0), (0, taps - 1), (0, 0)))
    grad_x_CxBxLxK = sum(kernel_CxWxK[:, j][:, None, None, :]
                         * ahead_CxBxPxK[:, :, taps - 1 - j:taps - 1 - j + length]
                         for j in range(taps))
    grad_kernel_CxWxK = jnp.stack([jnp.sum(grad_CxBxLxK * padded_CxBxPxK[:, :, j:j + length],
                                           axis=(1, 2)) for j in range(taps)], axis=1)
    return grad_x_CxBxLxK, grad_kernel_CxWxK, jnp.sum(grad_CxBxLxK, axis=(1, 2))


causal_depthwise_conv.defvjp(_conv_fwd, _conv_bwd)


@register
class MambaMixer(TokenMixer):
    """x -> out-proj(selective SSM(SiLU(conv(x-branch))) * SiLU(z)), both directions summed."""

    config_cls = MambaConfig

    @classmethod
    def check_seq_len(cls, cfg: MambaConfig, seq_len: int) -> None:
        if min(cfg.state_dim, cfg.expand, cfg.d_conv, cfg.chunk_size) < 1 or cfg.dt_rank < 0 \
                or not 0 < cfg.dt_min <= cfg.dt_max or cfg.dt_floor <= 0:
            raise ValueError(f"mamba needs model.attention.state_dim, expand, d_conv, chunk_size "
                             f">= 1, dt_rank >= 0 (0 = auto), 0 < dt_min <= dt_max and dt_floor > 0 "
                             f"(got {cfg.state_dim}, {cfg.expand}, {cfg.d_conv}, "
                             f"{cfg.chunk_size}, {cfg.dt_rank}, "
                             f"{cfg.dt_min}, {cfg.dt_max}, {cfg.dt_floor}); fix them for "
                             f"task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg = self.cfg
        e, n, taps = self.width, cfg.state_dim, cfg.d_conv
        k = cfg.expand * e
        r = cfg.dt_rank or math.ceil(e / 16)
        c = 2 if cfg.bidirectional else 1
        self.in_proj = nnx.Linear(e, 2 * k, use_bias=False, rngs=rngs)
        self.out_proj = nnx.Linear(k, e, use_bias=False, rngs=rngs)
        # Depthwise conv: fan-in = W taps, U(+-1/sqrt(W)) for kernel and bias (PyTorch's Conv1d
        # default, which the paper's code keeps).
        bound = 1.0 / math.sqrt(taps)
        self.conv_kernel_CxWxK = nnx.Param(
            jax.random.uniform(rngs.params(), (c, taps, k), minval=-bound, maxval=bound))
        self.conv_bias_CxK = nnx.Param(
            jax.random.uniform(rngs.params(), (c, k), minval=-bound, maxval=bound))
        # x -> (dt low-rank, B, C): one bias-free K -> R + 2N projection per direction, kept as
        # its three parts; fan-in K.
        lecun = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.x_dt_CxKxR = nnx.Param(lecun(rngs.params(), (c, k, r)))
        self.x_b_CxKxN = nnx.Param(lecun(rngs.params(), (c, k, n)))
        self.x_c_CxKxN = nnx.Param(lecun(rngs.params(), (c, k, n)))
        # dt projection R -> K: U(+-R^-1/2) (the paper's code, dt_init="random", dt_scale=1).
        self.dt_proj_CxRxK = nnx.Param(jax.random.uniform(
            rngs.params(), (c, r, k), minval=-r ** -0.5, maxval=r ** -0.5))
        # dt_bias = softplus^-1(dt), dt ~ logU[dt_min, dt_max]: softplus(dt_bias) is that dt.
        log_dt_CxK = jax.random.uniform(rngs.params(), (c, k), minval=math.log(cfg.dt_min),
                                        maxval=math.log(cfg.dt_max))
        dt_CxK = jnp.maximum(jnp.exp(log_dt_CxK), cfg.dt_floor)
        self.dt_bias_CxK = SSMParam(dt_CxK + jnp.log(-jnp.expm1(-dt_CxK)))
        # S4D-Real: A_n = -(n + 1) for every channel, stored as A_log = log(n + 1).
        self.a_log_CxKxN = SSMParam(
            jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32)), (c, k, n)))
        # Skip D = 1. The paper's code (mamba_simple.py) sets `D._no_weight_decay = True` and gives
        # D no learning rate of its own: NoDecayParam, the base rate without decay (weight decay
        # would pull the skip towards D = 0). A_log is exempt there too, at the base rate; here it
        # is an SSMParam with the S4-style train.ssm_lr, like dt_bias.
        self.d_CxK = NoDecayParam(jnp.ones((c, k)))

    def selective_scan(self, u_CxBxLxK: jax.Array, real_CxBxL: jax.Array) -> jax.Array:
        """y = C . h + D u per direction, h the selective-SSM states of u (padded steps hold h)."""
        dt_low_CxBxLxR = jnp.einsum("cblk,ckr->cblr", u_CxBxLxK, self.x_dt_CxKxR[...])
        b_CxBxLxN = jnp.einsum("cblk,ckn->cbln", u_CxBxLxK, self.x_b_CxKxN[...])
        c_CxBxLxN = jnp.einsum("cblk,ckn->cbln", u_CxBxLxK, self.x_c_CxKxN[...])
        dt_CxBxLxK = jax.nn.softplus(jnp.einsum("cblr,crk->cblk", dt_low_CxBxLxR,
                                                self.dt_proj_CxRxK[...])
                                     + self.dt_bias_CxK[...][:, None, None])
        # dt = 0 at padded steps: Abar = exp(0 A) = 1 and dt B u = 0 there, so they hold the state.
        dt_CxBxLxK = jnp.where(real_CxBxL[..., None], dt_CxBxLxK, 0.0)
        a_CxKxN = -jnp.exp(self.a_log_CxKxN[...])
        steps, length = self.cfg.chunk_size, u_CxBxLxK.shape[2]
        chunks = -(-length // steps)

        def chunked(x_CxBxLx_):  # -> [L / T, C, B, T, ...], padded with dt = 0 (state held)
            x_CxBxLx_ = jnp.pad(x_CxBxLx_, [(0, 0), (0, 0), (0, chunks * steps - length)]
                                + [(0, 0)] * (x_CxBxLx_.ndim - 3))
            return jnp.moveaxis(x_CxBxLx_.reshape(*x_CxBxLx_.shape[:2], chunks, steps,
                                                  *x_CxBxLx_.shape[3:]), 2, 0)

        def chunk(h_CxBxKxN, xs):
            dt_CxBxTxK, u_CxBxTxK, b_CxBxTxN, c_CxBxTxN = xs
            ys = []
            for t in range(steps):  # T (default 8) unrolled steps, not a loop over L
                abar_CxBxKxN = jnp.exp(dt_CxBxTxK[:, :, t, :, None] * a_CxKxN[:, None])
                bu_CxBxKxN = ((dt_CxBxTxK[:, :, t] * u_CxBxTxK[:, :, t])[..., None]
                              * b_CxBxTxN[:, :, t, None, :])
                h_CxBxKxN = abar_CxBxKxN * h_CxBxKxN + bu_CxBxKxN
                ys.append(jnp.einsum("cbkn,cbn->cbk", h_CxBxKxN, c_CxBxTxN[:, :, t]))
            return h_CxBxKxN, jnp.stack(ys, axis=2)

        c, b, _, k = u_CxBxLxK.shape
        h0_CxBxKxN = jnp.zeros((c, b, k, a_CxKxN.shape[-1]), u_CxBxLxK.dtype)
        _, y_ZxCxBxTxK = jax.lax.scan(jax.checkpoint(chunk), h0_CxBxKxN, tuple(
            chunked(x) for x in (dt_CxBxLxK, u_CxBxLxK, b_CxBxLxN, c_CxBxLxN)))
        y_CxBxLxK = jnp.moveaxis(y_ZxCxBxTxK, 0, 2).reshape(c, b, chunks * steps, k)[:, :, :length]
        return y_CxBxLxK + self.d_CxK[...][:, None, None] * u_CxBxLxK

    def mix(self, x_BxLxE, mask_BxL):
        x_BxLxK, z_BxLxK = jnp.split(self.in_proj(x_BxLxE), 2, axis=-1)
        # Zero at padding: the conv then reads padding as it reads the zeros before a start.
        x_BxLxK = jnp.where(mask_BxL[:, :, None], x_BxLxK, 0.0)
        directions = self.d_CxK.shape[0]
        # Direction 1 reads the flipped sequence (its leading padding holds the zero state).
        x_CxBxLxK = jnp.stack([x_BxLxK, x_BxLxK[:, ::-1]][:directions])
        real_CxBxL = jnp.stack([mask_BxL, mask_BxL[:, ::-1]][:directions])
        u_CxBxLxK = jax.nn.silu(causal_depthwise_conv(x_CxBxLxK, self.conv_kernel_CxWxK[...],
                                                      self.conv_bias_CxK[...]))
        y_CxBxLxK = self.selective_scan(u_CxBxLxK, real_CxBxL)
        y_BxLxK = y_CxBxLxK[0] if directions == 1 else y_CxBxLxK[0] + y_CxBxLxK[1, :, ::-1]
        return self.out_proj(y_BxLxK * jax.nn.silu(z_BxLxK))
