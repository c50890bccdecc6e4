"""Softmax attention kernels shared by the variants, and attention-probability dropout.

Attention-probability dropout (``model.attention.dropout``, LRA's ``attention_dropout_rate``):
variants that form softmax probabilities (``prob_dropout = True``) drop each probability with
that rate during training (rows are not renormalised: inverted dropout, as in the usual
``dropout(softmax(S)) @ V``). Masks come from `ProbDropout`, a keyed hash of each probability's
index, so a custom backward regenerates them instead of storing them.

Shape letters: models/attention/base.py.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e9  # finite, so fully-masked rows stay NaN-free


def mix32(h: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser with full avalanche (xorshift-multiply, "lowbias32")."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def hash_bits(keys_2: jax.Array, index: jax.Array) -> jax.Array:
    """uint32 bits of a keyed counter-based hash: mix(mix(index + k0) ^ k1), keys uint32[2]."""
    return mix32(mix32(index + keys_2[0]) ^ keys_2[1])


def drop_threshold(rate: float) -> jax.Array:
    """Bits below this are dropped: P(drop) = rate (to 2^-32)."""
    return jnp.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))


class ProbDropout(NamedTuple):
    """One step's attention-probability dropout: hash keys uint32[2] and the rate (static)."""

    keys_2: jax.Array
    rate: float

    def keep_at(self, index: jax.Array, dtype=jnp.float32) -> jax.Array:
        """Inverted-dropout multipliers (0 or 1 / (1 - rate)) for probabilities at `index`."""
        keep = hash_bits(self.keys_2, index) >= drop_threshold(self.rate)
        return jnp.where(keep, jnp.asarray(1.0 / (1.0 - self.rate), dtype), jnp.asarray(0, dtype))

    @staticmethod
    def check_count(size: int) -> None:
        """The hash counts probabilities in uint32: refuse what would wrap around."""
        if size >= 2 ** 32:
            raise ValueError(f"attention dropout over {size} probabilities needs a 64-bit "
                             f"counter; lower the batch size or set model.attention.dropout=0")

    def keep(self, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        """Multipliers for an array of probabilities of `shape`, indexed row-major."""
        size = math.prod(shape)
        self.check_count(size)
        return self.keep_at(jax.lax.iota(jnp.uint32, size).reshape(shape), dtype)

    def apply(self, probs: jax.Array) -> jax.Array:
        return probs * self.keep(probs.shape, probs.dtype)

    def piece(self, i: int) -> "ProbDropout":
        """Independent masks for piece i of a softmax split over several arrays (band, global
        columns, ...): keys hashed with the piece number."""
        tag = jnp.uint32(2 * i + 0x9E37)
        return ProbDropout(hash_bits(self.keys_2, jnp.stack([tag, tag + 1])), self.rate)


# A piece's values: (einsum spec, values) for `jnp.einsum(spec, weights, values)`, the spec's
# values operand ending in its key axis then D (the backward contracts to [.., D, W]).
Values = tuple[str, jax.Array]


def softmax_pieces(scores: Sequence[jax.Array], values: Sequence[Values],
                   drop: ProbDropout | None = None,
                   allowed: Sequence[jax.Array] | None = None) -> jax.Array:
    """One softmax over the union of several score pieces, without concatenating them (the
    multi-piece softmax of bigbird, sparse, longformer and sinkhorn): `allowed` masks each piece
    (or the scores come masked), a shared row max (a constant of the gradient, as in
    jax.nn.softmax), each piece's exps times its values summed into one numerator, and one
    division by the joint row sum, after the value products (a divide over D, not every key).
    Dropout drops piece i's probabilities in the numerator only (`drop.piece(i)`; the sums stay
    undropped). The backward is hand-written (`_pieces_bwd`): the row reduction over [.., D]
    only, dV in the fast orientation, dropout masks regenerated, not stored; each piece's score
    cotangent goes back to its caller's q.k einsum."""
    return softmax_pieces_lse(scores, values, drop, allowed)[0]


def softmax_pieces_lse(scores: Sequence[jax.Array], values: Sequence[Values],
                       drop: ProbDropout | None = None,
                       allowed: Sequence[jax.Array] | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """`softmax_pieces` and the rows' log-partition lse = max + log(sum exp) [.., 1] (undropped),
    both differentiable: Reformer weights its hash rounds by it."""
    specs = tuple(spec for spec, _ in values)
    arrays = tuple(array for _, array in values)
    allowed = tuple(allowed) if allowed is not None else (None,) * len(specs)
    keys_2, rate = (_NO_KEYS, 0.0) if drop is None else (drop.keys_2, drop.rate)
    return _pieces(tuple(scores), allowed, arrays, keys_2, specs, rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _pieces(scores, allowed, values, keys_2, specs, rate):
    return _pieces_fwd(scores, allowed, values, keys_2, specs, rate)[0]


def _piece_keep(keys_2, rate, i, shape, dtype):
    """Piece i's dropout multipliers (`ProbDropout.piece`), or None at rate 0."""
    return None if rate == 0.0 else ProbDropout(keys_2, rate).piece(i).keep(shape, dtype)


def _pieces_fwd(scores, allowed, values, keys_2, specs, rate):
    # Empty arrays with each piece's score shape: the masks may broadcast the scores.
    shapes = tuple(jnp.zeros(s.shape[:-1] + (0,), s.dtype) for s in scores)
    scores = [s if ok is None else jnp.where(ok, s, NEG_INF) for s, ok in zip(scores, allowed)]
    row_max = functools.reduce(jnp.maximum, [s.max(axis=-1, keepdims=True) for s in scores])
    weights = [jnp.exp(s - row_max) for s in scores]
    sums = functools.reduce(operator.add, [w.sum(axis=-1, keepdims=True) for w in weights])
    parts = []
    for i, (spec, w, v) in enumerate(zip(specs, weights, values)):
        keep = _piece_keep(keys_2, rate, i, w.shape, w.dtype)
        parts.append(jnp.einsum(spec, w if keep is None else w * keep, v))
    out = functools.reduce(operator.add, parts) / sums
    lse = row_max + jnp.log(sums)
    return (out, lse), (weights, sums, values, out, allowed, keys_2, shapes)


def _backward_specs(spec: str) -> tuple[str, str]:
    """Einsum specs of a piece's backward from its forward `weights,values->out`: dP =
    `out,values->weights`, and dV^T = `out,weights->values'` with values' last two axes (key,
    D) swapped, i.e. contracted to [.., D, W] (XLA's faster CPU orientation, as in
    `_softmax_pv_grads`)."""
    inputs, out = spec.replace(" ", "").split("->")
    weights, values = inputs.split(",")
    values_t = values[:-2] + values[-1] + values[-2]
    return f"{out},{values}->{weights}", f"{out},{weights}->{values_t}"


def _pieces_bwd(specs, rate, residuals, cotangents):
    """`_softmax_pv_grads` per piece: with g = dO / l and delta = rowsum(g * O) (over D) less
    dlse / l (d lse / dS = P), dS_i = E_i * (K_i * g V_i^T - delta), masked where the piece's
    `allowed` is False (as the forward's where), and dV_i = (E_i * K_i)^T g."""
    weights, sums, values, out, allowed, keys_2, shapes = residuals
    dout, dlse = cotangents
    dout_over_sum = dout / sums
    delta = (dout_over_sum * out).sum(-1, keepdims=True) - dlse / sums
    dscores, dvalues = [], []
    for i, (spec, w, v, ok, shape) in enumerate(zip(specs, weights, values, allowed, shapes)):
        dprobs_spec, dvalues_spec = _backward_specs(spec)
        keep = _piece_keep(keys_2, rate, i, w.shape, w.dtype)
        dprobs = jnp.einsum(dprobs_spec, dout_over_sum, v)
        dropped = w
        if keep is not None:
            dprobs, dropped = dprobs * keep, w * keep
        ds = w * (dprobs - delta)
        if ok is not None:  # the forward's where: no gradient into masked scores
            ds = jnp.where(ok, ds, 0)
        dscores.append(_sum_to(ds, shape.shape[:-1] + w.shape[-1:]))
        dvalues.append(jnp.swapaxes(jnp.einsum(dvalues_spec, dout_over_sum, dropped), -1, -2))
    return tuple(dscores), tuple(None for _ in allowed), tuple(dvalues), None


_pieces.defvjp(_pieces_fwd, _pieces_bwd)


DROP_STREAM = 0x5D7A  # fold_in tag: the dropout keys never reuse a variant's own random stream


def masked_softmax_attention(q_BxLxHxD: jax.Array, k_BxMxHxD: jax.Array, v_BxMxHxD: jax.Array,
                             allowed_BxHxLxM: jax.Array, bias_BxHxLxM: jax.Array | None = None,
                             drop: ProbDropout | None = None) -> jax.Array:
    """The textbook reference: einsum scores, `jax.nn.softmax`, dropout on the probabilities,
    einsum with V, restricted to `allowed` (broadcastable to [B, H, L, M]) with an optional
    additive score bias. Tests compare every exact variant with it;
    `model.attention.impl=reference` trains with it."""
    scale = q_BxLxHxD.shape[-1] ** -0.5
    scores_BxHxLxM = jnp.einsum("blhd,bmhd->bhlm", q_BxLxHxD * scale, k_BxMxHxD)
    if bias_BxHxLxM is not None:
        scores_BxHxLxM = scores_BxHxLxM + bias_BxHxLxM
    scores_BxHxLxM = jnp.where(allowed_BxHxLxM, scores_BxHxLxM, NEG_INF)
    probs_BxHxLxM = jax.nn.softmax(scores_BxHxLxM, axis=-1)
    if drop is not None:
        probs_BxHxLxM = drop.apply(probs_BxHxLxM)
    return jnp.einsum("bhlm,bmhd->blhd", probs_BxHxLxM, v_BxMxHxD)


def heads_first(x_BxLxHxD: jax.Array) -> jax.Array:
    """[B, L, H, D] -> [B, H, L, D]: batch axes leading, so XLA's CPU dots need no copies."""
    return jnp.swapaxes(x_BxLxHxD, 1, 2)


def softmax_rows(scores_xW: jax.Array, allowed_xW: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """Unnormalised softmax weights exp(s - max) and their row sums [..., 1].

    The row max is a stop-gradient constant (softmax does not depend on it), so autodiff adds no
    pass for it; callers multiply the weights with V first and divide the [.., D] result by the
    sums, which is one pass over the score block fewer forwards and, backwards, turns the
    softmax VJP's row reduction over the block into one over [.., D] (rowsum(dO * O)).
    """
    if allowed_xW is not None:
        scores_xW = jnp.where(allowed_xW, scores_xW, NEG_INF)
    max_x1 = jax.lax.stop_gradient(scores_xW.max(-1, keepdims=True))
    weights_xW = jnp.exp(scores_xW - max_x1)
    return weights_xW, weights_xW.sum(-1, keepdims=True)


_NO_KEYS = np.zeros(2, np.uint32)


def softmax_pv(scores_xQxW: jax.Array, allowed_xQxW: jax.Array, v_xWxD: jax.Array,
               drop: ProbDropout | None = None) -> jax.Array:
    """softmax(scores over allowed keys) @ v for any leading batch axes (blocks, heads, ...),
    normalised after the product with V, with a hand-written VJP (`_softmax_pv_grads`); `drop`
    drops probabilities (index = row-major position in the broadcast [.., Q, W] weights). The
    scores' own gradient (their q, k einsum) is left to autodiff."""
    if drop is None:
        return _softmax_pv(scores_xQxW, allowed_xQxW, v_xWxD, _NO_KEYS, 0.0)
    return _softmax_pv(scores_xQxW, allowed_xQxW, v_xWxD, drop.keys_2, drop.rate)


def _keep(keys_2, rate, shape, dtype):
    """Dropout multipliers for `shape`, or None at rate 0 (shared by forward and backward)."""
    return None if rate == 0.0 else ProbDropout(keys_2, rate).keep(shape, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_pv(scores_xQxW, allowed_xQxW, v_xWxD, keys_2, rate):
    return _softmax_pv_fwd(scores_xQxW, allowed_xQxW, v_xWxD, keys_2, rate)[0]


def _softmax_pv_fwd(scores_xQxW, allowed_xQxW, v_xWxD, keys_2, rate):
    weights_xQxW, sums_xQx1 = softmax_rows(scores_xQxW, allowed_xQxW)
    keep_xQxW = _keep(keys_2, rate, weights_xQxW.shape, weights_xQxW.dtype)
    dropped_xQxW = weights_xQxW if keep_xQxW is None else weights_xQxW * keep_xQxW
    out_xQxD = jnp.einsum("...qw,...wd->...qd", dropped_xQxW, v_xWxD) / sums_xQx1
    # An empty array with the scores' leading shape: the mask may have broadcast them.
    shape_xQx0 = jnp.zeros(scores_xQxW.shape[:-1] + (0,), scores_xQxW.dtype)
    return out_xQxD, (weights_xQxW, sums_xQx1, v_xWxD, out_xQxD, shape_xQx0, keys_2)


def _softmax_pv_grads(weights_xQxW, sums_xQx1, v_xWxD, out_xQxD, dout_xQxD, keep_xQxW=None):
    """Cotangents of the scores and of V for out = ((E * K) @ V) / l, E = exp(S - max),
    l = rowsum E, K the dropout multipliers (None = no dropout): with P = E / l,
    dS = P * (K * dO V^T - rowsum(dO * O)) and dV = (P * K)^T dO, the latter computed as
    [D, Q] x [Q, W] (XLA's CPU dot runs that orientation ~2x faster than contracting the
    block's leading axis directly). rowsum(dO * O) = rowsum(dP * P) holds with dropout too."""
    dout_over_sum_xQxD = dout_xQxD / sums_xQx1
    delta_xQx1 = (dout_over_sum_xQxD * out_xQxD).sum(-1, keepdims=True)
    dprobs_xQxW = jnp.einsum("...qd,...wd->...qw", dout_over_sum_xQxD, v_xWxD)
    if keep_xQxW is not None:
        dprobs_xQxW = dprobs_xQxW * keep_xQxW
        weights_dropped_xQxW = weights_xQxW * keep_xQxW
    else:
        weights_dropped_xQxW = weights_xQxW
    dscores_xQxW = weights_xQxW * (dprobs_xQxW - delta_xQx1)
    dv_xDxW = jnp.einsum("...qd,...qw->...dw", dout_over_sum_xQxD, weights_dropped_xQxW)
    return dscores_xQxW, jnp.swapaxes(dv_xDxW, -1, -2)


def _softmax_pv_bwd(rate, residuals, dout_xQxD):
    weights_xQxW, sums_xQx1, v_xWxD, out_xQxD, shape_xQx0, keys_2 = residuals
    keep_xQxW = _keep(keys_2, rate, weights_xQxW.shape, weights_xQxW.dtype)
    dscores_xQxW, dv_xWxD = _softmax_pv_grads(weights_xQxW, sums_xQx1, v_xWxD, out_xQxD,
                                              dout_xQxD, keep_xQxW)
    # Leading axes may have broadcast (random synthesizer logits are shared by the batch):
    # each cotangent is summed back to its input's shape.
    return (_sum_to(dscores_xQxW, shape_xQx0.shape[:-1] + weights_xQxW.shape[-1:]), None,
            _sum_to(dv_xWxD, v_xWxD.shape), None)


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum `x` over the axes that broadcasting added or expanded, back to `shape`."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


_softmax_pv.defvjp(_softmax_pv_fwd, _softmax_pv_bwd)


def softmax_attention(q_BxLxHxD: jax.Array, k_BxMxHxD: jax.Array, v_BxMxHxD: jax.Array,
                      key_mask_BxM: jax.Array, bias_HxLxM: jax.Array | None = None,
                      drop: ProbDropout | None = None) -> jax.Array:
    """Exact dense softmax attention in its fastest explicit XLA form (equal to
    `masked_softmax_attention` with a key mask, dropout masks included): heads-first layout, the
    1/sqrt(D) scale on q, normalisation after the product with V, and a hand-written VJP
    (`_dense_core`)."""
    scale = q_BxLxHxD.shape[-1] ** -0.5
    has_bias = bias_HxLxM is not None
    bias_HxLxM = bias_HxLxM if has_bias else jnp.zeros((), q_BxLxHxD.dtype)
    keys_2, rate = (_NO_KEYS, 0.0) if drop is None else (drop.keys_2, drop.rate)
    out_BxHxLxD = _dense_core(heads_first(q_BxLxHxD * scale), heads_first(k_BxMxHxD),
                              heads_first(v_BxMxHxD), key_mask_BxM, bias_HxLxM, keys_2,
                              has_bias, rate)
    return heads_first(out_BxHxLxD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _dense_core(q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, key_mask_BxM, bias_HxLxM, keys_2, has_bias,
                rate):
    return _dense_core_fwd(q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, key_mask_BxM, bias_HxLxM, keys_2,
                           has_bias, rate)[0]


def _dense_core_fwd(q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, key_mask_BxM, bias_HxLxM, keys_2, has_bias,
                    rate):
    scores_BxHxLxM = jnp.einsum("bhld,bhmd->bhlm", q_BxHxLxD, k_BxHxMxD)
    if has_bias:
        scores_BxHxLxM = scores_BxHxLxM + bias_HxLxM[None]
    weights_BxHxLxM, sums_BxHxLx1 = softmax_rows(scores_BxHxLxM, key_mask_BxM[:, None, None, :])
    keep_BxHxLxM = _keep(keys_2, rate, weights_BxHxLxM.shape, weights_BxHxLxM.dtype)
    dropped_BxHxLxM = weights_BxHxLxM if keep_BxHxLxM is None else weights_BxHxLxM * keep_BxHxLxM
    out_BxHxLxD = jnp.einsum("bhlm,bhmd->bhld", dropped_BxHxLxM, v_BxHxMxD) / sums_BxHxLx1
    return out_BxHxLxD, (q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, weights_BxHxLxM, sums_BxHxLx1,
                         out_BxHxLxD, bias_HxLxM, keys_2)


def _dense_core_bwd(has_bias, rate, residuals, dout_BxHxLxD):
    """FlashAttention's backward on the saved weights (`_softmax_pv_grads`; dropout masks are
    regenerated from their keys, not stored), then dQ = dS K and dK = dS^T Q, the latter again
    as [D, L] x [L, M] (the faster CPU orientation)."""
    (q_BxHxLxD, k_BxHxMxD, v_BxHxMxD, weights_BxHxLxM, sums_BxHxLx1, out_BxHxLxD, bias,
     keys_2) = residuals
    keep_BxHxLxM = _keep(keys_2, rate, weights_BxHxLxM.shape, weights_BxHxLxM.dtype)
    dscores_BxHxLxM, dv_BxHxMxD = _softmax_pv_grads(weights_BxHxLxM, sums_BxHxLx1, v_BxHxMxD,
                                                    out_BxHxLxD, dout_BxHxLxD, keep_BxHxLxM)
    dq_BxHxLxD = jnp.einsum("bhlm,bhmd->bhld", dscores_BxHxLxM, k_BxHxMxD)
    dk_BxHxDxM = jnp.einsum("bhld,bhlm->bhdm", q_BxHxLxD, dscores_BxHxLxM)
    # The mask has no cotangent; the score bias (a positional one) is a constant: zero.
    return (dq_BxHxLxD, jnp.swapaxes(dk_BxHxDxM, -1, -2), dv_BxHxMxD, None, jnp.zeros_like(bias),
            None)


_dense_core.defvjp(_dense_core_fwd, _dense_core_bwd)
