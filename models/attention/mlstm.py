"""mLSTM, the matrix-memory cell of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term
Memory", Section 2.3; the parallel and stabilised forms of its appendix; the paper's code
NX-AI/xlstm, blocks/mlstm), as an attention variant on the encoder's q, k, v.

The cell, per head, k scaled by 1/sqrt(D) (the paper's k_t = W_k x_t / sqrt(d)):
    C_t = f_t C_{t-1} + i_t k_t v_t^T          (the paper's v_t k_t^T, stored transposed)
    n_t = f_t n_{t-1} + i_t k_t
    h~_t = q_t C_t / max(|q_t . n_t|, 1)
    i_t = exp(i~_t),  f_t = sigmoid(f~_t) (forget_gate=sigmoid, the default) or exp(f~_t),
    i~_t = [q_t | k_t | v_t] w_i + b_i,  f~_t = [q_t | k_t | v_t] w_f + b_f   (one per head)
The gates read the concatenated q, k (before its scaling), v of all heads, as the paper's
code's cell does (the paper writes w^T x_t; q, k, v are linear maps of x). Init as that
code: w_i = w_f = 0, b_i ~ N(0, 0.1^2), b_f = linspace(3, 6) over heads (f = sigmoid(b_f) in
0.95..0.998; with forget_gate=exp, b_f = log sigmoid(linspace(3, 6)), the same gates). b_f is
an SSMParam (no weight decay: it sets each head's memory length, as hawk.py's Lambda).

Stabiliser (the paper's): m_t = max(log f_t + m_{t-1}, i~_t), m_0 = 0, states kept as
C'_t = C_t e^(-m_t), n'_t = n_t e^(-m_t), and
    h~_t = q_t C'_t / max(|q_t . n'_t|, e^(-m_t)).
That is h~_t exactly for *any* m (numerator and both sides of the max scale by e^(-m)), so each
form picks its own m with every exponent <= 0, and m carries no gradient (stop_gradient: the
output does not depend on it). No eps is added to the denominator (the paper's code adds 1e-6,
which would make h~ depend on m): the max with e^(-m) already keeps it positive; only the
smallest normal float floors it, for m > 87 where e^(-m) underflows.

Forms. `chunkwise` (what trains): N chunks of S positions; b_i = cumulative log f from the
chunk's start to position i inclusive; (C', n', m) the state entering the chunk:
    log D_ij = b_i - b_j + i~_j   (j <= i in the chunk),   s_i = max(m + b_i, max_j log D_ij)
    h~_i = [sum_j (q_i . k_j) e^(log D_ij - s_i) v_j + e^(m + b_i - s_i) q_i C']
           / max(|same with 1 for v_j and n' for C'|, e^(-s_i))
    leaving: m* = max(m + b_S, max_j (i~_j + b_S - b_j)),
             C'* = e^(m + b_S - m*) C' + sum_j e^(i~_j + b_S - b_j - m*) k_j v_j^T   (n' alike)
s_i is the recurrent m_i. The states come from a lax.scan over the N chunks (the max
stabiliser makes a chunk's map depend on the incoming m); the pairs inside a chunk are one
S x S matmul. Per head O(L S D + L D^2) time, O(L S + L D^2 / S) memory, no L x L array.
`recurrent` (the reference): the paper's stabilised step in a lax.scan over L. `parallel`
(tests only, O(L^2)): the L x L gate matrix log D with its row maximum as m.

Bidirectional (the default; an encoder for classification): one cell whose memory at t holds
every token, C_t = C->_t + C<-_t - i_t k_t v_t^T (n alike; the token itself once), C<- the
causal cell of the reversed sequence with the same gates (token j reaches i > j through
f_{j+1..i}, i < j through f_{i..j-1}), and one normaliser max(|q_t . n_t|, 1) over both
directions: the parallel form with a two-sided gate matrix. Both passes run as one causal
pass, the reversed sequence stacked on the batch axis; each returns its numerator,
denominator and m, brought to max(m->, m<-) before they are added.
Padding: i~ = -inf (i = 0) and log f = 0 (state held) at padded positions, k and v zeroed
there: padding adds nothing to any state, in either direction.

Output: per-head GroupNorm of h~ (the paper's code's cell norm; non-affine as retnet.py's, a
per-channel scale would fold into W_O) times swish(v W_G), the mLSTM block's output gate
swish(z) (which replaces the cell equations' o_t = sigmoid(W_o x_t + b_o)) with z read from v
as retnet.py argues, then the encoder's W_O. Why an Attention and
not the paper's whole block as a TokenMixer (mamba.py's choice): the harness compares mixers
inside one pre-LN block with its MLP; the block's factor-2 up-projection and gated
down-projection are xLSTM's replacement for that MLP, and its conv and learnable skip are
token-local paths beside the cell. Taking the cell on the shared q, k, v projections keeps
mlstm, retnet and gla different in their recurrence only. Left out: those block parts, and the
paper's block-diagonal q, k, v projections (the encoder's are dense).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lra.models.attention.base import (Attention, AttentionConfig, SSMParam, blocks_head_major,
                                       check_choice, pad_to_blocks, register,
                                       unblock_head_major)
from lra.models.attention.retnet import group_norm

FORGET_GATES = ("sigmoid", "exp")
FORMS = ("chunkwise", "recurrent", "parallel")


@dataclasses.dataclass
class MLSTMConfig(AttentionConfig):
    kind: str = "mlstm"
    # S: positions per chunk of the chunkwise form (64: the paper's code's chunkwise default).
    chunk_size: int = 64
    # Causal + anti-causal memory, the token itself once, one normaliser; False = causal, as the
    # paper's language model.
    bidirectional: bool = True
    # f = sigmoid(f~) (the paper's code's mLSTM) or exp(f~) (the paper's other choice).
    forget_gate: str = "sigmoid"
    # b_f = linspace(min, max) over heads (the paper's code: 3, 6); b_i ~ N(0, std^2) (0.1).
    forget_bias_min: float = 3.0
    forget_bias_max: float = 6.0
    input_bias_std: float = 0.1


# ------------------------------------------------------------------------ the cell's forms
# Each causal form maps q, k (scaled), v [B, L, H, D] and the gates i~, log f [B, L, H] (padding
# already applied) to the stabilised numerator [B, L, H, D], denominator [B, L, H] and m.


def readout(num_xD: jax.Array, den_x: jax.Array, m_x: jax.Array) -> jax.Array:
    """h~ = num / max(|den|, e^(-m)), floored at the smallest normal float."""
    floor = jnp.finfo(num_xD.dtype).tiny
    return num_xD / jnp.maximum(jnp.maximum(jnp.abs(den_x), jnp.exp(-m_x)), floor)[..., None]


def finite_or_zero(m: jax.Array) -> jax.Array:
    """A stabiliser without gradient; 0 where every term was -inf (all padding)."""
    m = jax.lax.stop_gradient(m)
    return jnp.where(jnp.isfinite(m), m, 0.0)


def causal_recurrent(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, ig_BxLxH, lf_BxLxH):
    """The paper's stabilised step, one position at a time (a lax.scan over L)."""
    b, _, h, d = q_BxLxHxD.shape

    def step(carry, inputs):
        c_BxHxDxD, n_BxHxD, m_BxH = carry
        q_BxHxD, k_BxHxD, v_BxHxD, ig_BxH, lf_BxH = inputs
        m_new_BxH = jax.lax.stop_gradient(jnp.maximum(lf_BxH + m_BxH, ig_BxH))
        forget_BxH = jnp.exp(lf_BxH + m_BxH - m_new_BxH)
        write_BxH = jnp.exp(ig_BxH - m_new_BxH)
        c_BxHxDxD = (forget_BxH[..., None, None] * c_BxHxDxD
                     + write_BxH[..., None, None] * k_BxHxD[..., :, None] * v_BxHxD[..., None, :])
        n_BxHxD = forget_BxH[..., None] * n_BxHxD + write_BxH[..., None] * k_BxHxD
        num_BxHxD = jnp.einsum("bhd,bhde->bhe", q_BxHxD, c_BxHxDxD)
        den_BxH = jnp.einsum("bhd,bhd->bh", q_BxHxD, n_BxHxD)
        return (c_BxHxDxD, n_BxHxD, m_new_BxH), (num_BxHxD, den_BxH, m_new_BxH)

    dtype = q_BxLxHxD.dtype
    carry = (jnp.zeros((b, h, d, d), dtype), jnp.zeros((b, h, d), dtype), jnp.zeros((b, h), dtype))
    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, ig_BxLxH, lf_BxLxH))
    _, outs = jax.lax.scan(step, carry, xs)
    return tuple(jnp.swapaxes(x, 0, 1) for x in outs)


def causal_chunkwise(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, ig_BxLxH, lf_BxLxH, chunk_size: int):
    """Chunks of S: S x S gate matrices inside, (C', n', m) carried across by a lax.scan."""
    b, length, h, d = q_BxLxHxD.shape
    size = min(chunk_size, length)
    # Padding the tail to whole chunks: i~ = -inf, log f = 0 there (after every real position,
    # so it changes nothing the outputs read).
    real_BxL = jnp.ones((b, length), bool)
    real_BxP, q, k, v, ig, lf = pad_to_blocks(size, real_BxL, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD,
                                               ig_BxLxH[..., None], lf_BxLxH[..., None])
    ig = jnp.where(real_BxP[:, :, None, None], ig, -jnp.inf)
    q_BxHxNxSxD, k_BxHxNxSxD, v_BxHxNxSxD = (blocks_head_major(x, size) for x in (q, k, v))
    ig_BxHxNxS = blocks_head_major(ig, size)[..., 0]
    b_BxHxNxS = jnp.cumsum(blocks_head_major(lf, size)[..., 0], axis=-1)
    g_BxHxN = b_BxHxNxS[..., -1]

    # What each chunk writes into the state it leaves, stabilised by its own maximum.
    write_BxHxNxS = ig_BxHxNxS + g_BxHxN[..., None] - b_BxHxNxS
    m_write_BxHxN = finite_or_zero(write_BxHxNxS.max(-1))
    weight_BxHxNxS = jnp.exp(write_BxHxNxS - m_write_BxHxN[..., None])
    kw_BxHxNxSxD = k_BxHxNxSxD * weight_BxHxNxS[..., None]
    kv_BxHxNxDxD = jnp.einsum("bhnsd,bhnse->bhnde", kw_BxHxNxSxD, v_BxHxNxSxD)
    ksum_BxHxNxD = kw_BxHxNxSxD.sum(-2)

    def chunk(carry, xs):
        c_BxHxDxD, n_BxHxD, m_BxH = carry
        kv_BxHxDxD, ksum_BxHxD, g_BxH, m_write_BxH = xs
        m_new_BxH = jax.lax.stop_gradient(jnp.maximum(m_BxH + g_BxH, m_write_BxH))
        keep_BxH = jnp.exp(m_BxH + g_BxH - m_new_BxH)
        add_BxH = jnp.exp(m_write_BxH - m_new_BxH)
        c_new = keep_BxH[..., None, None] * c_BxHxDxD + add_BxH[..., None, None] * kv_BxHxDxD
        n_new = keep_BxH[..., None] * n_BxHxD + add_BxH[..., None] * ksum_BxHxD
        return (c_new, n_new, m_new_BxH), carry  # emits the state entering the chunk

    dtype = q.dtype
    init = (jnp.zeros((b, h, d, d), dtype), jnp.zeros((b, h, d), dtype), jnp.zeros((b, h), dtype))
    per_chunk = (kv_BxHxNxDxD, ksum_BxHxNxD, g_BxHxN, m_write_BxHxN)
    _, entering = jax.lax.scan(chunk, init, tuple(jnp.moveaxis(x, 2, 0) for x in per_chunk))
    c_BxHxNxDxD, n_BxHxNxD, m_BxHxN = (jnp.moveaxis(x, 0, 2) for x in entering)

    # Inside the chunk: log D_ij = b_i - b_j + i~_j for j <= i; each row stabilised by s_i.
    causal_SxS = jnp.tril(jnp.ones((size, size), bool))
    log_d_BxHxNxSxS = jnp.where(causal_SxS, b_BxHxNxS[..., :, None] - b_BxHxNxS[..., None, :]
                                + ig_BxHxNxS[..., None, :], -jnp.inf)
    carried_BxHxNxS = m_BxHxN[..., None] + b_BxHxNxS
    s_BxHxNxS = jax.lax.stop_gradient(jnp.maximum(carried_BxHxNxS, log_d_BxHxNxSxS.max(-1)))
    scores_BxHxNxSxS = (jnp.einsum("bhnid,bhnjd->bhnij", q_BxHxNxSxD, k_BxHxNxSxD)
                        * jnp.exp(log_d_BxHxNxSxS - s_BxHxNxS[..., None]))
    q_in_BxHxNxSxD = q_BxHxNxSxD * jnp.exp(carried_BxHxNxS - s_BxHxNxS)[..., None]
    num_BxHxNxSxD = (jnp.einsum("bhnij,bhnjd->bhnid", scores_BxHxNxSxS, v_BxHxNxSxD)
                     + jnp.einsum("bhnsd,bhnde->bhnse", q_in_BxHxNxSxD, c_BxHxNxDxD))
    den_BxHxNxS = (scores_BxHxNxSxS.sum(-1)
                   + jnp.einsum("bhnsd,bhnd->bhns", q_in_BxHxNxSxD, n_BxHxNxD))
    num_BxLxHxD = unblock_head_major(num_BxHxNxSxD)[:, :length]
    den_BxLxH, s_BxLxH = (unblock_head_major(x[..., None])[:, :length, :, 0]
                          for x in (den_BxHxNxS, s_BxHxNxS))
    return num_BxLxHxD, den_BxLxH, s_BxLxH


def parallel(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, ig_BxLxH, lf_BxLxH,
             bidirectional: bool) -> jax.Array:
    """h~ from the L x L gate matrix (tests only): log D_ij = i~_j + sum of log f from j + 1 to i
    (j <= i), or from i to j - 1 (j > i, bidirectional); m_i its row maximum."""
    length = q_BxLxHxD.shape[1]
    b_BxHxL = jnp.cumsum(jnp.swapaxes(lf_BxLxH, 1, 2), axis=-1)
    before_BxHxL = b_BxHxL - jnp.swapaxes(lf_BxLxH, 1, 2)  # sum up to i - 1
    forward_BxHxLxL = b_BxHxL[..., :, None] - b_BxHxL[..., None, :]
    backward_BxHxLxL = before_BxHxL[..., None, :] - before_BxHxL[..., :, None]
    lower_LxL = jnp.tril(jnp.ones((length, length), bool))
    gaps_BxHxLxL = jnp.where(lower_LxL, forward_BxHxLxL,
                             backward_BxHxLxL if bidirectional else -jnp.inf)
    log_d_BxHxLxL = gaps_BxHxLxL + jnp.swapaxes(ig_BxLxH, 1, 2)[..., None, :]
    m_BxHxL = finite_or_zero(log_d_BxHxLxL.max(-1))
    scores_BxHxLxL = (jnp.einsum("blhd,bmhd->bhlm", q_BxLxHxD, k_BxLxHxD)
                      * jnp.exp(log_d_BxHxLxL - m_BxHxL[..., None]))
    num_BxLxHxD = jnp.einsum("bhlm,bmhd->blhd", scores_BxHxLxL, v_BxLxHxD)
    return readout(num_BxLxHxD, jnp.swapaxes(scores_BxHxLxL.sum(-1), 1, 2),
                   jnp.swapaxes(m_BxHxL, 1, 2))


def cell(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, ig_BxLxH, lf_BxLxH, mask_BxL, *,
         form: str = "chunkwise", bidirectional: bool = True, chunk_size: int = 64) -> jax.Array:
    """h~ [B, L, H, D] of the mLSTM cell from q, k (already scaled by 1/sqrt(D)), v and the gate
    pre-activation i~ and log f; padding as the module docstring says."""
    keep_BxLx1 = mask_BxL[:, :, None]
    ig_BxLxH = jnp.where(keep_BxLx1, ig_BxLxH, -jnp.inf)
    lf_BxLxH = jnp.where(keep_BxLx1, lf_BxLxH, 0.0)
    k_BxLxHxD = jnp.where(keep_BxLx1[..., None], k_BxLxHxD, 0.0)
    v_BxLxHxD = jnp.where(keep_BxLx1[..., None], v_BxLxHxD, 0.0)
    if form == "parallel":
        return parallel(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, ig_BxLxH, lf_BxLxH, bidirectional)
    if form == "chunkwise":
        run = lambda *xs: causal_chunkwise(*xs, chunk_size)
    elif form == "recurrent":
        run = causal_recurrent
    else:
        raise ValueError(f"form={form!r}; use one of {', '.join(FORMS)}")
    xs = (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, ig_BxLxH, lf_BxLxH)
    if not bidirectional:
        return readout(*run(*xs))
    b = q_BxLxHxD.shape[0]
    both = lambda x: jnp.concatenate([x, x[:, ::-1]], axis=0)
    num_2BxLxHxD, den_2BxLxH, m_2BxLxH = run(*map(both, xs))
    num_f, num_b = num_2BxLxHxD[:b], num_2BxLxHxD[b:, ::-1]
    den_f, den_b = den_2BxLxH[:b], den_2BxLxH[b:, ::-1]
    m_f, m_b = m_2BxLxH[:b], m_2BxLxH[b:, ::-1]
    # One memory over both directions at the common stabiliser m; the token itself once
    # (its weight e^(i~_t - m) <= 1: both passes' m are >= i~_t).
    m_BxLxH = jnp.maximum(m_f, m_b)
    forward_BxLxH, backward_BxLxH = jnp.exp(m_f - m_BxLxH), jnp.exp(m_b - m_BxLxH)
    self_BxLxH = jnp.exp(ig_BxLxH - m_BxLxH) * jnp.einsum("blhd,blhd->blh", q_BxLxHxD, k_BxLxHxD)
    num_BxLxHxD = (forward_BxLxH[..., None] * num_f + backward_BxLxH[..., None] * num_b
                   - self_BxLxH[..., None] * v_BxLxHxD)
    den_BxLxH = forward_BxLxH * den_f + backward_BxLxH * den_b - self_BxLxH
    return readout(num_BxLxHxD, den_BxLxH, m_BxLxH)


# ------------------------------------------------------------------------ the module


@register
class MLSTM(Attention):
    """The mLSTM cell on the encoder's q, k, v: exponential input and sigmoid forget gates per
    head from [q | k | v], max-stabilised, GroupNorm of h~ times swish(v W_G)."""

    config_cls = MLSTMConfig
    check_settings: ClassVar[dict] = {"chunk_size": 32}  # lra.check: small-but-real

    @classmethod
    def check_seq_len(cls, cfg: MLSTMConfig, seq_len: int) -> None:
        check_choice(cfg, "forget_gate", FORGET_GATES)
        if cfg.chunk_size < 1 or cfg.forget_bias_min > cfg.forget_bias_max \
                or cfg.input_bias_std < 0:
            raise ValueError(f"mlstm needs model.attention.chunk_size >= 1, forget_bias_min <= "
                             f"forget_bias_max and input_bias_std >= 0 (got {cfg.chunk_size}, "
                             f"{cfg.forget_bias_min}, {cfg.forget_bias_max}, "
                             f"{cfg.input_bias_std}); chunk_size=64 suits task.seq_len={seq_len}")

    def init_variables(self, rngs: nnx.Rngs) -> None:
        cfg, h = self.cfg, self.num_heads
        e = h * self.head_dim
        # Gates from [q | k | v] (3E -> H each), weights 0 (the paper's code).
        self.igate_3ExH = nnx.Param(jnp.zeros((3 * e, h)))
        self.fgate_3ExH = nnx.Param(jnp.zeros((3 * e, h)))
        self.igate_bias_H = nnx.Param(cfg.input_bias_std * jax.random.normal(rngs.params(), (h,)))
        forget_H = jnp.linspace(cfg.forget_bias_min, cfg.forget_bias_max, h)
        if cfg.forget_gate == "exp":  # the same f = sigmoid(linspace) at the start
            forget_H = jax.nn.log_sigmoid(forget_H)
        # The forget bias sets each head's memory length: an SSMParam (no weight decay, which
        # would pull f towards sigmoid(0) = 1/2, i.e. shorten every memory; hawk.py's Lambda).
        self.fgate_bias_H = SSMParam(forget_H)
        self.gate = nnx.Linear(e, e, use_bias=False, rngs=rngs)

    def gate_preactivations(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD):
        """i~ and log f [B, L, H] from the unscaled q, k, v of each position."""
        b, length, h, d = q_BxLxHxD.shape
        x_BxLx3E = jnp.concatenate([x.reshape(b, length, h * d)
                                    for x in (q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)], axis=-1)
        ig_BxLxH = x_BxLx3E @ self.igate_3ExH[...] + self.igate_bias_H[...]
        f_BxLxH = x_BxLx3E @ self.fgate_3ExH[...] + self.fgate_bias_H[...]
        lf_BxLxH = jax.nn.log_sigmoid(f_BxLxH) if self.cfg.forget_gate == "sigmoid" else f_BxLxH
        return ig_BxLxH, lf_BxLxH

    def retain(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, form: str = "chunkwise"):
        """h~ before the norm; `form` chunkwise (what trains), recurrent or parallel (tests)."""
        ig_BxLxH, lf_BxLxH = self.gate_preactivations(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD)
        return cell(q_BxLxHxD, k_BxLxHxD / math.sqrt(self.head_dim), v_BxLxHxD, ig_BxLxH,
                    lf_BxLxH, mask_BxL, form=form, bidirectional=self.cfg.bidirectional,
                    chunk_size=self.cfg.chunk_size)

    def __call__(self, q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL, *, rng=None):
        b, length, h, d = v_BxLxHxD.shape
        y_BxLxHxD = group_norm(self.retain(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxL))
        gate_BxLxE = jax.nn.swish(self.gate(v_BxLxHxD.reshape(b, length, h * d)))
        return gate_BxLxE.reshape(b, length, h, d) * y_BxLxHxD
