"""Hawk (De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention for
Efficient Language Models"): the recurrent block, with its RG-LRU, as a token mixer.

The paper's recurrent block (its Section 2.3, Figure 2c), RNN width K = D_RNN:
    x_BxLxK = x W_in + b_in,   gate_BxLxK = GeLU(x W_gate + b_gate)        (E -> K each)
    u = causal depthwise conv_W(x_BxLxK) + b_conv                           (W = 4 taps)
    h = RG-LRU(u),   out = (h * gate) W_out + b_out                         (K -> E)
and its RG-LRU (Section 2.4, eqs. 1-4), per channel, the gate weights block-diagonal with one
J x J block per head (K = H J, the paper's code's BlockDiagonalLinear):
    r_t = sigmoid(W_a u_t + b_a),   i_t = sigmoid(W_x u_t + b_x)
    log a_t = -c r_t softplus(-Lambda)          (a_t = a^(c r_t), a = sigmoid(Lambda), c = 8)
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t),   h_{-1} = 0.
Defaults as the paper: 4 conv taps, c = 8, K = 4/3 E (Section 3's RNN width for Hawk and
Griffin, rounded up to a whole number of channels per head), Lambda drawn so that a^c is
uniform on [0.9, 0.999] (Section 2.4), gate weights LeCun normal (fan-in J), gate biases 0.
From the paper's code (google-deepmind/recurrentgemma): conv kernel N(0, 0.01 / W), conv bias
0, GeLU's tanh form, projections with biases, and sqrt's derivative bounded by 1000 (it stays
finite when a_t -> 1).

Deviations, and why: (1) the paper's code draws a (not a^c) with a^2 uniform on
[0.9^2, 0.999^2], so a^c starts in [0.43, 0.992]; this module follows the paper's text (a^c in
[0.9, 0.999]: longer memories at the start, as LRA asks). (2) The code skips the sqrt(1 - a^2)
factor at a sequence's first token; this module applies eq. 4 at every step, as the paper
writes it. (3) The code's gate init divides by the whole width K, not the block's fan-in J.
(4) Bidirectional (the default; Hawk is causal) as Vision Mamba's scheme in mamba.py: the
projections are shared, each direction has its own conv, gates and Lambda, the backward one
runs on the reversed sequence, and the two h are summed before the gate.

The linear recurrence h_t = a_t h_{t-1} + b_t runs as mamba.py's does: a `lax.scan` over L / T
chunks carrying h [C, B, K], T steps unrolled in a chunk, the chunk `jax.checkpoint`ed. O(L K)
time and memory, no L x L array. On this CPU (the mixer's fwd+bwd at B = 16, L = 1024, E = 128,
H = 4, K = 172, both directions) it took 0.96-1.0 s against 1.7-2.6 s for one
`jax.lax.associative_scan` of lru.py's `linear_recurrence_op` and 1.15 s for a plain per-step
`lax.scan`, and it compiles 2-4x faster; `scan=associative` keeps the O(log L)-depth form
for accelerators. `form="recurrent"` runs the recurrence one `lax.scan` step per position, the
reference the tests hold both parallel forms to.

Padding: x_BxLxK is zeroed at padded positions (the conv reads them as the zeros before a
start) and a padded step has (a_t, b_t) = (1, 0), so it holds the state: with end padding the
backward direction starts from a zero state at the last real token, and padding never reaches
a real output.

Shape letters beyond base.py's table, used only in this module: K is the RNN width D_RNN, J the
channels of one head's gate block (K = H J), W the conv's taps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import (AttentionConfig, SSMParam, TokenMixer, check_choice,
                                       register)
from lra.models.attention.lru import linear_recurrence_op
from lra.models.attention.mamba import causal_depthwise_conv

# The paper's code bounds d sqrt(x) / dx by this (it keeps bfloat16 training finite).
MAX_SQRT_GRADIENT = 1000.0


@dataclasses.dataclass
class HawkConfig(AttentionConfig):
    kind: str = "hawk"
    # K = D_RNN = expand * E, rounded up to a multiple of the heads (Section 3: 4/3).
    expand: float = 4 / 3
    # Taps of the causal depthwise conv before the RG-LRU (the paper's temporal filter of 4).
    d_conv: int = 4
    # a_t = a^(c r_t) (the paper's constant c = 8).
    c: float = 8.0
    # a^c ~ U[a_min, a_max] at init (the paper's 0.9 and 0.999).
    a_min: float = 0.9
    a_max: float = 0.999
    # Forward + backward recurrences summed before the gate (mamba.py's scheme); False = causal.
    bidirectional: bool = True
    # The recurrence's parallel form: chunked (mamba.py's chunked lax.scan, fastest for the
    # train step on CPU) or associative (jax.lax.associative_scan, O(log L) depth).
    scan: str = "chunked"
    # T: steps per chunk of the chunked scan (unrolled, recomputed in the backward pass).
    chunk_size: int = 8


@jax.custom_vjp
def sqrt_bounded_grad(x: jax.Array) -> jax.Array:
    """sqrt(x) with its derivative clipped at MAX_SQRT_GRADIENT (the paper's code)."""
    return jnp.sqrt(x)


def _sqrt_fwd(x):
    return jnp.sqrt(x), x


def _sqrt_bwd(x, g):
    return (0.5 * g / jnp.sqrt(jnp.maximum(x, 0.25 / MAX_SQRT_GRADIENT ** 2)),)


sqrt_bounded_grad.defvjp(_sqrt_fwd, _sqrt_bwd)


def linear_scan(a_CxBxLxK: jax.Array, b_CxBxLxK: jax.Array, form: str = "chunked",
                chunk_size: int = 8) -> jax.Array:
    """h_t = a_t h_{t-1} + b_t from h_{-1} = 0, along axis 2, in one of three forms:
    "chunked": a `lax.scan` over L / T chunks, T = chunk_size steps unrolled in each, the chunk
    `jax.checkpoint`ed (mamba.py's loop; padded to whole chunks with (a, b) = (1, 0));
    "associative": `jax.lax.associative_scan` of lru.py's `linear_recurrence_op`;
    "recurrent": one `lax.scan` step per position, the reference."""
    c, b, length, k = b_CxBxLxK.shape
    if form == "associative":
        _, h_CxBxLxK = jax.lax.associative_scan(linear_recurrence_op, (a_CxBxLxK, b_CxBxLxK),
                                                axis=2)
        return h_CxBxLxK
    if form == "recurrent":
        def step(h_CxBxK, ab):
            h_CxBxK = ab[0] * h_CxBxK + ab[1]
            return h_CxBxK, h_CxBxK

        _, h_LxCxBxK = jax.lax.scan(step, jnp.zeros((c, b, k), b_CxBxLxK.dtype),
                                    (jnp.moveaxis(a_CxBxLxK, 2, 0), jnp.moveaxis(b_CxBxLxK, 2, 0)))
        return jnp.moveaxis(h_LxCxBxK, 0, 2)
    if form != "chunked":
        raise ValueError(f"form={form!r}; use chunked, associative or recurrent")
    steps, chunks = chunk_size, -(-length // chunk_size)
    pad = [(0, 0), (0, 0), (0, chunks * steps - length), (0, 0)]
    # -> [L / T, C, B, T, K]; the padded steps hold the state.
    a_ZxCxBxTxK, b_ZxCxBxTxK = (
        jnp.moveaxis(jnp.pad(x, pad, constant_values=fill).reshape(c, b, chunks, steps, k), 2, 0)
        for x, fill in ((a_CxBxLxK, 1.0), (b_CxBxLxK, 0.0)))

    def chunk(h_CxBxK, xs):
        a_CxBxTxK, b_CxBxTxK = xs
        hs = []
        for t in range(steps):  # T (default 8) unrolled steps, not a loop over L
            h_CxBxK = a_CxBxTxK[:, :, t] * h_CxBxK + b_CxBxTxK[:, :, t]
            hs.append(h_CxBxK)
        return h_CxBxK, jnp.stack(hs, axis=2)

    _, h_ZxCxBxTxK = jax.lax.scan(jax.checkpoint(chunk), jnp.zeros((c, b, k), b_CxBxLxK.dtype),
                                  (a_ZxCxBxTxK, b_ZxCxBxTxK))
    return jnp.moveaxis(h_ZxCxBxTxK, 0, 2).reshape(c, b, chunks * steps, k)[:, :, :length]


def rnn_width(cfg: HawkConfig, num_heads: int, head_dim: int) -> int:
    """K = H ceil(expand * E / H): the paper's D_RNN, a whole number J of channels per head."""
    return num_heads * math.ceil(cfg.expand * head_dim - 1e-9)


@register
class HawkMixer(TokenMixer):
    """x -> out-proj(RG-LRU(conv(x-branch)) * GeLU(gate-branch)), both directions summed."""

    config_cls = HawkConfig
    # lra.check: small-but-real (L = 128 is 16 chunks; its padded row ends inside one).
    check_settings = {"chunk_size": 8}

    @classmethod
    def check_seq_len(cls, cfg: HawkConfig, seq_len: int) -> None:
        check_choice(cfg, "scan", ("chunked", "associative"))
        if cfg.expand <= 0 or min(cfg.d_conv, cfg.chunk_size) < 1 or cfg.c <= 0 \
                or not 0.0 < cfg.a_min <= cfg.a_max < 1.0:
            raise ValueError(f"hawk needs model.attention.expand > 0, d_conv >= 1, "
                             f"chunk_size >= 1, c > 0 and 0 < a_min <= a_max < 1 (got "
                             f"{cfg.expand}, {cfg.d_conv}, {cfg.chunk_size}, {cfg.c}, {cfg.a_min}, "
                             f"{cfg.a_max}); fix them for task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg = self.cfg
        e, h, taps = self.width, self.num_heads, cfg.d_conv
        k = rnn_width(cfg, h, self.head_dim)
        j = k // h
        c = 2 if cfg.bidirectional else 1
        # [x | gate] = x W_in: the two branches' E -> K layers as one (LeCun normal, bias 0).
        self.in_proj = nnx.Linear(e, 2 * k, rngs=rngs)
        self.out_proj = nnx.Linear(k, e, rngs=rngs)
        # Depthwise conv, per direction: N(0, 0.01 / W) taps and zero bias (the paper's code).
        self.conv_kernel_CxWxK = nnx.Param(
            jax.random.normal(rngs.params(), (c, taps, k)) * math.sqrt(0.01 / taps))
        self.conv_bias_CxK = nnx.Param(jnp.zeros((c, k)))
        # Recurrence gate W_a and input gate W_x: one J x J block per head and direction, LeCun
        # normal over the block's fan-in J, biases 0.
        lecun = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0, 1))
        self.gate_a_CxHxJxJ = nnx.Param(lecun(rngs.params(), (c, h, j, j)))
        self.gate_x_CxHxJxJ = nnx.Param(lecun(rngs.params(), (c, h, j, j)))
        self.gate_a_bias_CxHxJ = nnx.Param(jnp.zeros((c, h, j)))
        self.gate_x_bias_CxHxJ = nnx.Param(jnp.zeros((c, h, j)))
        # a = sigmoid(Lambda) with a^c ~ U[a_min, a_max]: Lambda = logit(a), from log a.
        power_CxK = jax.random.uniform(rngs.params(), (c, k), minval=cfg.a_min, maxval=cfg.a_max)
        log_a_CxK = jnp.log(power_CxK) / cfg.c
        self.lambda_CxK = SSMParam(log_a_CxK - jnp.log(-jnp.expm1(log_a_CxK)))

    def rg_lru(self, u_CxBxLxK: jax.Array, real_CxBxL: jax.Array,
               form: str | None = None) -> jax.Array:
        """h [C, B, L, K], the RG-LRU states of u per direction (padded steps hold h); `form`:
        `linear_scan`'s, model.attention.scan when None."""
        c, b, length, k = u_CxBxLxK.shape
        u_CxBxLxHxJ = u_CxBxLxK.reshape(c, b, length, self.num_heads, -1)

        def gate(w_CxHxJxJ, bias_CxHxJ):
            logits = jnp.einsum("cblhi,chij->cblhj", u_CxBxLxHxJ, w_CxHxJxJ[...])
            return jax.nn.sigmoid(logits + bias_CxHxJ[...][:, None, None]).reshape(c, b, length, k)

        r_CxBxLxK = gate(self.gate_a_CxHxJxJ, self.gate_a_bias_CxHxJ)
        i_CxBxLxK = gate(self.gate_x_CxHxJxJ, self.gate_x_bias_CxHxJ)
        # log a_t = c r_t log sigmoid(Lambda) = -c r_t softplus(-Lambda) < 0 (Appendix A).
        log_a_CxBxLxK = (-self.cfg.c * r_CxBxLxK
                         * jax.nn.softplus(-self.lambda_CxK[...])[:, None, None])
        # sqrt(1 - a_t^2) = sqrt(-expm1(2 log a_t)): accurate when a_t is close to 1.
        b_CxBxLxK = sqrt_bounded_grad(-jnp.expm1(2.0 * log_a_CxBxLxK)) * i_CxBxLxK * u_CxBxLxK
        # Padded steps: (a, b) = (1, 0) hold the state. Masked after the sqrt, so its input
        # stays > 0 there and no infinite derivative meets a zero.
        real_CxBxLx1 = real_CxBxL[..., None]
        a_CxBxLxK = jnp.where(real_CxBxLx1, jnp.exp(log_a_CxBxLxK), 1.0)
        b_CxBxLxK = jnp.where(real_CxBxLx1, b_CxBxLxK, 0.0)
        return linear_scan(a_CxBxLxK, b_CxBxLxK, form or self.cfg.scan, self.cfg.chunk_size)

    def mix(self, x_BxLxE, mask_BxL, form: str | None = None):
        """The block; `form` overrides model.attention.scan (tests: "recurrent")."""
        x_BxLxK, gate_BxLxK = jnp.split(self.in_proj(x_BxLxE), 2, axis=-1)
        # Zero at padding: the conv then reads padding as it reads the zeros before a start.
        x_BxLxK = jnp.where(mask_BxL[:, :, None], x_BxLxK, 0.0)
        directions = self.lambda_CxK.shape[0]
        # Direction 1 reads the flipped sequence (its leading padding holds the zero state).
        x_CxBxLxK = jnp.stack([x_BxLxK, x_BxLxK[:, ::-1]][:directions])
        real_CxBxL = jnp.stack([mask_BxL, mask_BxL[:, ::-1]][:directions])
        u_CxBxLxK = causal_depthwise_conv(x_CxBxLxK, self.conv_kernel_CxWxK[...],
                                          self.conv_bias_CxK[...])
        h_CxBxLxK = self.rg_lru(u_CxBxLxK, real_CxBxL, form)
        h_BxLxK = h_CxBxLxK[0] if directions == 1 else h_CxBxLxK[0] + h_CxBxLxK[1, :, ::-1]
        return self.out_proj(h_BxLxK * jax.nn.gelu(gate_BxLxK))
