"""DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length") and Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks: Improving
Mamba2 with Delta Rule"): linear attention whose D x D state per head is edited by the delta rule.

The recurrence, per head, with the state S_t [D, D] (rows = key channels, o_t = q_t S_t; the
papers' S_t is its transpose, o_t = S_t q_t) and u_t the value written at t:
    S'_t = alpha_t S_{t-1}                              (deltanet: alpha_t = 1)
    u_t  = beta_t (v_t - k_t S'_t)                      (the error of the state's recall of k_t)
    S_t  = S'_t + k_t^T u_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
DeltaNet's delta rule (its sec. 2.2) and Gated DeltaNet's gated delta rule (its "gated delta
rule" formulation, eq. 10 of arXiv 2412.06464), with
    q, k = L2Norm_h(SiLU(conv(x W_Q))), L2Norm_h(SiLU(conv(x W_K))),  v = SiLU(conv(x W_V))
    beta_t = sigmoid(x_t W_beta)  per head                       (W_beta: E -> H, no bias)
    alpha_t = exp(g_t),  g_t = -exp(A_log) softplus(x_t W_a + dt_bias)  per head  (gated only:
             Mamba-2's (A, dt) parameterisation; A ~ U[1, 16], dt ~ logU[dt_min, dt_max])
conv = a causal depthwise conv of conv_size (4) taps per channel, no bias (the papers' short conv).
Output: per-head RMSNorm of o, then (gated only) times SiLU(x W_G) (Gated DeltaNet's output gate),
then the encoder's W_O. DeltaNet's block: its "DeltaNet Transformer" section (SiLU + L2 norm on
q, k; short convs on q, k, v; output norm); Gated DeltaNet's: its block design (fig. 1), as in
the papers' code (fla's DeltaNet and GatedDeltaNet layers: their defaults are these).

Chunkwise form (what trains; DeltaNet sec. 3.1-3.2, the WY representation with the UT transform,
extended to the decay by Gated DeltaNet's chunkwise algorithm): N chunks of S positions, b_i the
cumulative log decay from the chunk's start to i (inclusive, <= 0), G[i, j] = e^(b_i - b_j) for
j <= i (else 0) and S_0 the state entering the chunk. Unrolling the recurrence inside the chunk,
    u_i = beta_i v_i - beta_i e^(b_i) k_i S_0 - sum_{j < i} beta_i (k_i . k_j) G[i, j] u_j,
so with A = strictly lower (beta_i (k_i . k_j) G[i, j]) and T = (I + A)^-1 (the UT transform,
`unit_lower_inverse`: doubling of inverted diagonal blocks, matmuls only),
    [U~ | W] = T [beta . V | beta e^b . K],   U = U~ - W S_0,
and  O = (e^b . Q) S_0 + (Q K^T . G) U,   S_next = e^(b_S) S_0 + (e^(b_S - b) . K)^T U.
Everything but the last two lines' S_0 terms is independent across chunks and computed for all
chunks at once; a lax.scan over the N chunks carries S (two S x D x D products a step). Every
exponent is <= 0. Cost per head O(L S (S + D) + L D^2) time (the L S^2: T, S^3 per chunk),
O(L S + L D^2 / S) memory; no L x L array.
`recurrent` runs the recurrence one position at a time (a lax.scan over L), the reference form.

Bidirectional (default; an encoder for classification): the causal pass plus the causal pass of
the reversed sequence, summed before the norm. The delta rule has no additive diagonal term to
count once (retnet.py's correction): token t's write also erases, so each direction's output
reads its own state after absorbing t and both are kept, as the summed directions of
bidirectional Mamba (mamba.py). Each direction has its own short conv (causal in its own time,
as bidirectional Mamba's); W_beta, W_a, A_log, dt_bias and the gate are shared.
Padding: the conv input is zeroed at padded positions and there beta = 0, k = v = 0 and g = 0, so
the state is held and nothing is written; the reversed pass starts from a zero state at the last
real token. Real outputs never depend on padding.

Departures from the papers, each a reparametrisation or an encoder's choice:
- beta, alpha and the output gate read v = x W_V + b_V, not x (a variant sees q, k, v only):
  v W spans x W' (+ a bias) whenever W_V is invertible (retnet.py's GLA does the same). The
  encoder's q, k, v projections have biases (the papers' have none).
- RMSNorm without the elementwise weight: a per-channel scale shared by the heads folds into W_O.
- No 1/sqrt(D) scale of q (fla's kernels apply one): the RMSNorm cancels a constant scale.
- value head dim = key head dim = D (Gated DeltaNet's code expands v by 2): the encoder's W_V is
  E -> E.
- A ~ U[1, 16], Mamba-2's A_init_range (fla's GatedDeltaNet draws U[0, 16], where A near 0 is a
  head that never decays).

Shape letters beyond base.py's table, used only in this module (as in mamba.py): W is the short
conv's window of taps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models.attention.base import (Attention, AttentionConfig, SSMParam, register,
                                       unblock_head_major)
from lra.models.attention.mamba import causal_depthwise_conv

# fla's epsilons: l2norm's (added to the sum of squares) and the layers' RMSNorm norm_eps.
L2_EPS = 1e-6
NORM_EPS = 1e-5
# Mamba-2's A_init_range: A = exp(A_log) ~ U[1, 16] per head.
A_INIT_RANGE = (1.0, 16.0)


@dataclasses.dataclass
class DeltaNetConfig(AttentionConfig):
    kind: str = "deltanet"
    # S: positions per chunk of the chunkwise form (64: fla's chunk kernels' BT).
    chunk_size: int = 64
    # Taps of the causal depthwise conv on q, k and v (the papers' short conv, size 4).
    conv_size: int = 4
    # Causal pass + the causal pass of the reversed sequence, summed; False = causal.
    bidirectional: bool = True

    def pattern(self, seq_len: int) -> dict:
        """patterns=L<n>: chunks of 16. The same function as the paper's 64 (the chunkwise form
        is exact); on this CPU the train step's layer costs 0.73-0.89x the chunk-64 one at L=64,
        128 and 256 (forward + backward, batch 32, 4 heads of 32, both variants)."""
        return {"chunk_size": 16}


@dataclasses.dataclass
class GatedDeltaNetConfig(DeltaNetConfig):
    kind: str = "gated_deltanet"
    # dt ~ logU[dt_min, dt_max], floored at dt_floor, sets dt_bias (Mamba-2's and Gated
    # DeltaNet's code's values).
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_floor: float = 1e-4


def l2_norm(x_xD: jax.Array) -> jax.Array:
    return x_xD * jax.lax.rsqrt(jnp.sum(x_xD ** 2, -1, keepdims=True) + L2_EPS)


def rms_norm(o_xD: jax.Array) -> jax.Array:
    return o_xD * jax.lax.rsqrt(jnp.mean(o_xD ** 2, -1, keepdims=True) + NORM_EPS)


@jax.custom_vjp
def unit_lower_inverse(a_xSxS: jax.Array) -> jax.Array:
    """(I + A)^-1 for strictly lower-triangular A, by doubling inverted diagonal blocks:
    inv(I + [[A1, 0], [A21, A2]]) = [[T1, 0], [-T2 A21 T1, T2]], T_i = inv(I + A_i): log2(S)
    levels of batched matmuls, O(S^3) per matrix, and a hand-written VJP (dA = -T^T dT T^T).
    Each level multiplies exact inverses of smaller blocks, as forward substitution does; the
    Neumann product (I - A)(I + A^2)(I + A^4)... instead sums terms that grow binomially when
    keys align (C(63, 31) ~ 1e18 at S = 64) and cancel in float32. Not jax's triangular_solve:
    on CPU it calls LAPACK's trsm through scipy's OpenBLAS, whose first calls took 2-10 s for
    work done in 17 ms warm on this busy 2-core machine, and a train step using it once stalled
    for minutes with every thread idle."""
    size = a_xSxS.shape[-1]
    padded = 1 << (size - 1).bit_length()  # zero rows / columns: the inverse's corner is kept
    lead = a_xSxS.shape[:-2]
    a_xPxP = jnp.pad(a_xSxS, [(0, 0)] * len(lead) + [(0, padded - size)] * 2)
    t_xNxSxS = jnp.ones(lead + (padded, 1, 1), a_xSxS.dtype)  # the 1 x 1 diagonal blocks
    half = 1
    while half < padded:  # log2(P) static levels: diagonal blocks of 2 * half from pairs
        n = padded // (2 * half)
        pairs_xIxJxIxJ = a_xPxP.reshape(lead + (n, 2 * half, n, 2 * half))
        a21_xNxSxS = jnp.moveaxis(jnp.diagonal(pairs_xIxJxIxJ, axis1=-4, axis2=-2), -1, -3)[
            ..., half:, :half]
        t1_xNxSxS, t2_xNxSxS = t_xNxSxS[..., 0::2, :, :], t_xNxSxS[..., 1::2, :, :]
        t21_xNxSxS = -(t2_xNxSxS @ a21_xNxSxS @ t1_xNxSxS)
        t_xNxSxS = jnp.concatenate([
            jnp.concatenate([t1_xNxSxS, jnp.zeros_like(t1_xNxSxS)], axis=-1),
            jnp.concatenate([t21_xNxSxS, t2_xNxSxS], axis=-1)], axis=-2)
        half *= 2
    return t_xNxSxS[..., 0, :size, :size]


def _unit_lower_inverse_fwd(a_xSxS):
    t_xSxS = unit_lower_inverse(a_xSxS)
    return t_xSxS, t_xSxS


def _unit_lower_inverse_bwd(t_xSxS, grad_xSxS):
    # dT = -T dA T, so dA = -T^T dT T^T, on A's strictly lower entries (the only ones it has).
    t_transposed_xSxS = jnp.swapaxes(t_xSxS, -1, -2)
    return (jnp.tril(-(t_transposed_xSxS @ grad_xSxS @ t_transposed_xSxS), -1),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def delta_rule_chunkwise(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                         beta_BxLxH: jax.Array, g_BxLxH: jax.Array | None,
                         chunk_size: int) -> jax.Array:
    """o_t = q_t S_t of the (gated) delta rule, chunk by chunk (the module docstring's form).
    `g` = log alpha <= 0, or None for no decay (deltanet). The sequence is padded to whole chunks
    with beta = k = v = g = 0, which hold the state."""
    length = q_BxLxHxD.shape[1]
    size = min(chunk_size, length)
    pad = (-length) % size

    def blocks(x_BxLx):  # [B, L, H, ...] -> [B, H, N, S, ...]
        x_BxPx = jnp.pad(x_BxLx, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxLx.ndim - 2))
        b, padded, h = x_BxPx.shape[:3]
        return jnp.moveaxis(x_BxPx.reshape(b, padded // size, size, h, *x_BxPx.shape[3:]), 3, 1)

    q_xNxSxD, k_xNxSxD, v_xNxSxD = (blocks(x) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD))
    beta_xNxS = blocks(beta_BxLxH)
    causal_SxS = np.tril(np.ones((size, size), bool))
    if g_BxLxH is None:
        decay_xNxSxS = jnp.asarray(causal_SxS, q_xNxSxD.dtype)
    else:
        b_xNxS = jnp.cumsum(blocks(g_BxLxH), axis=-1)
        gap_xNxSxS = b_xNxS[..., :, None] - b_xNxS[..., None, :]
        decay_xNxSxS = jnp.exp(jnp.where(causal_SxS, gap_xNxSxS, -jnp.inf))
    # The UT transform: T = (I + A)^-1, then [U~ | W] = T [beta . V | beta e^b . K].
    keys_xNxSxS = jnp.einsum("bhnid,bhnjd->bhnij", k_xNxSxD, k_xNxSxD)
    a_xNxSxS = jnp.tril(beta_xNxS[..., :, None] * keys_xNxSxS * decay_xNxSxS, -1)
    write_xNxS = beta_xNxS if g_BxLxH is None else beta_xNxS * jnp.exp(b_xNxS)
    # Two products with the per-column scales folded into T, not one over [beta V | write K] then
    # split: the concatenation and split were copies of the whole S x 2D blocks (train step at the
    # suite's copy256 shapes 861-900 -> 737-741 ms, interleaved; neutral at L=4096, batch 1).
    t_xNxSxS = unit_lower_inverse(a_xNxSxS)
    u_tilde_xNxSxD = jnp.einsum("bhnij,bhnjd->bhnid", t_xNxSxS * beta_xNxS[..., None, :], v_xNxSxD)
    w_xNxSxD = jnp.einsum("bhnij,bhnjd->bhnid", t_xNxSxS * write_xNxS[..., None, :], k_xNxSxD)
    scores_xNxSxS = jnp.einsum("bhnid,bhnjd->bhnij", q_xNxSxD, k_xNxSxD) * decay_xNxSxS
    if g_BxLxH is None:
        q_in_xNxSxD, k_out_xNxSxD = q_xNxSxD, k_xNxSxD
        fade_xN = jnp.ones(beta_xNxS.shape[:-1], q_xNxSxD.dtype)
    else:
        q_in_xNxSxD = q_xNxSxD * jnp.exp(b_xNxS)[..., None]
        k_out_xNxSxD = k_xNxSxD * jnp.exp(b_xNxS[..., -1:] - b_xNxS)[..., None]
        fade_xN = jnp.exp(b_xNxS[..., -1])

    def chunk(s_xDxD, inputs):
        u_tilde_xSxD, w_xSxD, k_out_xSxD, fade_x = inputs
        u_xSxD = u_tilde_xSxD - jnp.einsum("bhsd,bhde->bhse", w_xSxD, s_xDxD)
        s_next_xDxD = (fade_x[..., None, None] * s_xDxD
                       + jnp.einsum("bhsd,bhse->bhde", k_out_xSxD, u_xSxD))
        return s_next_xDxD, (s_xDxD, u_xSxD)

    b, h, _, _, d = q_xNxSxD.shape
    leading = lambda x: jnp.moveaxis(x, 2, 0)  # the scan runs over N
    _, (entering_NxBxHxDxD, u_NxBxHxSxD) = jax.lax.scan(
        chunk, jnp.zeros((b, h, d, d), q_xNxSxD.dtype),
        tuple(leading(x) for x in (u_tilde_xNxSxD, w_xNxSxD, k_out_xNxSxD, fade_xN)))
    entering_xNxDxD, u_xNxSxD = (jnp.moveaxis(x, 0, 2) for x in (entering_NxBxHxDxD,
                                                                 u_NxBxHxSxD))
    out_xNxSxD = (jnp.einsum("bhnsd,bhnde->bhnse", q_in_xNxSxD, entering_xNxDxD)
                  + jnp.einsum("bhnij,bhnjd->bhnid", scores_xNxSxS, u_xNxSxD))
    return unblock_head_major(out_xNxSxD)[:, :length]


def delta_rule_recurrent(q_BxLxHxD: jax.Array, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array,
                         beta_BxLxH: jax.Array, g_BxLxH: jax.Array | None) -> jax.Array:
    """The same outputs one position at a time (a lax.scan over L): the reference form,
    O(L D^2) per head in L sequential steps."""
    b, _, h, d = q_BxLxHxD.shape
    g_BxLxH = jnp.zeros_like(beta_BxLxH) if g_BxLxH is None else g_BxLxH

    def step(s_BxHxDxD, inputs):
        q_BxHxD, k_BxHxD, v_BxHxD, beta_BxH, g_BxH = inputs
        s_BxHxDxD = jnp.exp(g_BxH)[..., None, None] * s_BxHxDxD
        u_BxHxD = beta_BxH[..., None] * (v_BxHxD - jnp.einsum("bhd,bhde->bhe", k_BxHxD, s_BxHxDxD))
        s_BxHxDxD = s_BxHxDxD + k_BxHxD[..., :, None] * u_BxHxD[..., None, :]
        return s_BxHxDxD, jnp.einsum("bhd,bhde->bhe", q_BxHxD, s_BxHxDxD)

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, beta_BxLxH,
                                               g_BxLxH))
    _, out_LxBxHxD = jax.lax.scan(step, jnp.zeros((b, h, d, d), q_BxLxHxD.dtype), xs)
    return jnp.swapaxes(out_LxBxHxD, 0, 1)


class DeltaRuleAttention(Attention):
    """The shared part: short convs, feature maps, directions, padding, the two forms and the
    norm. Subclasses add the decay and the output gate."""

    check_settings = {"chunk_size": 32}  # lra.check: small-but-real (L = 128: 4 chunks)

    @classmethod
    def check_seq_len(cls, cfg: DeltaNetConfig, seq_len: int) -> None:
        if cfg.chunk_size < 1 or cfg.conv_size < 1:
            raise ValueError(f"{cfg.kind} needs model.attention.chunk_size >= 1 and conv_size >= 1 "
                             f"(got {cfg.chunk_size}, {cfg.conv_size}); 64 and 4 suit "
                             f"task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        e, taps = self.num_heads * self.head_dim, self.cfg.conv_size
        directions = 2 if self.cfg.bidirectional else 1
        # Depthwise conv on q | k | v, one per direction: fan-in = W taps, U(+-1/sqrt(W))
        # (PyTorch's Conv1d default, which fla's ShortConvolution keeps).
        bound = 1.0 / math.sqrt(taps)
        self.conv_kernel_CxWx3E = nnx.Param(jax.random.uniform(
            rngs.params(), (directions, taps, 3 * e), minval=-bound, maxval=bound))
        self.beta_proj = nnx.Linear(e, self.num_heads, use_bias=False, rngs=rngs)

    def gates(self, v_BxLxE: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """beta [B, L, H] and log alpha [B, L, H] (None: no decay), both 0 at padding."""
        beta_BxLxH = jax.nn.sigmoid(self.beta_proj(v_BxLxE))
        return jnp.where(mask_BxL[..., None], beta_BxLxH, 0.0), None

    def delta_rule(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, form: str = "chunkwise"):
        """o before the norm: the causal pass (+ the reversed one, summed); `form` chunkwise
        (what trains) or recurrent (the reference)."""
        b, length, h, d = q_BxLxHxD.shape
        v_BxLxE = v_BxLxHxD.reshape(b, length, h * d)
        beta_BxLxH, g_BxLxH = self.gates(v_BxLxE, mask_BxL)
        x_BxLx3E = jnp.concatenate([q_BxLxHxD.reshape(b, length, h * d),
                                    k_BxLxHxD.reshape(b, length, h * d), v_BxLxE], axis=-1)
        # Zero at padding: the conv reads padding as it reads the zeros before a start.
        x_BxLx3E = jnp.where(mask_BxL[..., None], x_BxLx3E, 0.0)
        directions = self.conv_kernel_CxWx3E.shape[0]
        # Direction 1 reads the flipped sequence, stacked on the batch axis after the conv.
        both = lambda x: jnp.stack([x, x[:, ::-1]][:directions])
        kernel_CxWx3E = self.conv_kernel_CxWx3E[...]
        x_CxBxLx3E = jax.nn.silu(causal_depthwise_conv(
            both(x_BxLx3E), kernel_CxWx3E, jnp.zeros((directions, 3 * h * d), kernel_CxWx3E.dtype)))
        flat = lambda x: x.reshape(directions * b, length, *x.shape[3:])
        q_xLxHxD, k_xLxHxD, v_xLxHxD = (flat(x.reshape(directions, b, length, h, d))
                                        for x in jnp.split(x_CxBxLx3E, 3, axis=-1))
        real_xLx1x1 = flat(both(mask_BxL))[:, :, None, None]
        q_xLxHxD = l2_norm(q_xLxHxD)
        k_xLxHxD = jnp.where(real_xLx1x1, l2_norm(k_xLxHxD), 0.0)
        v_xLxHxD = jnp.where(real_xLx1x1, v_xLxHxD, 0.0)
        beta_xLxH = flat(both(beta_BxLxH))
        g_xLxH = None if g_BxLxH is None else flat(both(g_BxLxH))
        if form == "chunkwise":
            o_xLxHxD = delta_rule_chunkwise(q_xLxHxD, k_xLxHxD, v_xLxHxD, beta_xLxH, g_xLxH,
                                            self.cfg.chunk_size)
        elif form == "recurrent":
            o_xLxHxD = delta_rule_recurrent(q_xLxHxD, k_xLxHxD, v_xLxHxD, beta_xLxH, g_xLxH)
        else:
            raise ValueError(f"form={form!r}; use chunkwise or recurrent")
        o_CxBxLxHxD = o_xLxHxD.reshape(directions, b, length, h, d)
        return o_CxBxLxHxD[0] if directions == 1 else o_CxBxLxHxD[0] + o_CxBxLxHxD[1, :, ::-1]

    def output(self, o_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array) -> jax.Array:
        """What the encoder's W_O receives: RMSNorm_h(o) (the gated variant: times its gate)."""
        return rms_norm(o_BxLxHxD)

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None):
        return self.output(self.delta_rule(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL), v_BxLxHxD)


@register
class DeltaNet(DeltaRuleAttention):
    """The delta rule with a learned per-head write strength beta, short convs, RMSNorm."""

    config_cls = DeltaNetConfig


@register
class GatedDeltaNet(DeltaRuleAttention):
    """The gated delta rule: DeltaNet with Mamba-2's per-head decay alpha and an output gate."""

    config_cls = GatedDeltaNetConfig

    @classmethod
    def check_seq_len(cls, cfg: GatedDeltaNetConfig, seq_len: int) -> None:
        super().check_seq_len(cfg, seq_len)
        if not 0 < cfg.dt_min <= cfg.dt_max or cfg.dt_floor <= 0:
            raise ValueError(f"gated_deltanet needs model.attention 0 < dt_min <= dt_max and "
                             f"dt_floor > 0 (got {cfg.dt_min}, {cfg.dt_max}, {cfg.dt_floor}); "
                             f"1e-3, 1e-1, 1e-4 suit task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        super().init_variables(rngs)
        cfg, e, h = self.cfg, self.num_heads * self.head_dim, self.num_heads
        self.decay_proj = nnx.Linear(e, h, use_bias=False, rngs=rngs)
        self.gate = nnx.Linear(e, e, use_bias=False, rngs=rngs)
        # Mamba-2's recurrence parameters (SSMParam: train.ssm_lr, no weight decay, as the
        # papers' code exempts them from decay): A = exp(A_log) ~ U[1, 16], and
        # dt_bias = softplus^-1(dt), dt ~ logU[dt_min, dt_max] floored at dt_floor.
        a_H = jax.random.uniform(rngs.params(), (h,), minval=A_INIT_RANGE[0],
                                 maxval=A_INIT_RANGE[1])
        self.a_log_H = SSMParam(jnp.log(a_H))
        log_dt_H = jax.random.uniform(rngs.params(), (h,), minval=math.log(cfg.dt_min),
                                      maxval=math.log(cfg.dt_max))
        dt_H = jnp.maximum(jnp.exp(log_dt_H), cfg.dt_floor)
        self.dt_bias_H = SSMParam(dt_H + jnp.log(-jnp.expm1(-dt_H)))

    def gates(self, v_BxLxE, mask_BxL):
        beta_BxLxH, _ = super().gates(v_BxLxE, mask_BxL)
        g_BxLxH = -jnp.exp(self.a_log_H[...]) * jax.nn.softplus(self.decay_proj(v_BxLxE)
                                                               + self.dt_bias_H[...])
        return beta_BxLxH, jnp.where(mask_BxL[..., None], g_BxLxH, 0.0)

    def output(self, o_BxLxHxD, v_BxLxHxD):
        b, length, h, d = v_BxLxHxD.shape
        gate_BxLxE = jax.nn.silu(self.gate(v_BxLxHxD.reshape(b, length, h * d)))
        return rms_norm(o_BxLxHxD) * gate_BxLxE.reshape(b, length, h, d)
