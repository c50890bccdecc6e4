"""The multi-piece softmax (`softmax_pieces`, `softmax_pieces_lse`) and its hand-written VJP:
values and gradients (every score piece, every value piece, the lse) equal autodiff of the plain
form it replaced, with and without dropout, with broadcast masks, broadcast leading axes and a
fully masked row; and the variants built on it (bigbird, sparse, longformer, sinkhorn, reformer)
equal masked dense softmax under their own `reference_mask` in values and q, k, v gradients, at
lengths that are not a multiple of their block size. In float64, so agreement means the same
arithmetic up to rounding, not a loose tolerance."""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_attention, rel_err
from lra.models.attention.softmax import (NEG_INF, ProbDropout, masked_softmax_attention,
                                          softmax_pieces, softmax_pieces_lse)

B, H, N, S, M, D = 2, 3, 4, 5, 6, 4
RATE = 0.25


def autodiff_pieces(scores, values, drop=None, allowed=None):
    """The former `softmax_pieces` forward, left to autodiff: (output, lse [.., 1])."""
    if allowed is not None:
        scores = [jnp.where(ok, s, NEG_INF) for s, ok in zip(scores, allowed)]
    row_max = jax.lax.stop_gradient(
        functools.reduce(jnp.maximum, [s.max(axis=-1, keepdims=True) for s in scores]))
    exps = [jnp.exp(s - row_max) for s in scores]
    total = functools.reduce(operator.add, [e.sum(axis=-1, keepdims=True) for e in exps])
    parts = [jnp.einsum(spec, e if drop is None else drop.piece(i).apply(e), v)
             for i, (e, (spec, v)) in enumerate(zip(exps, values))]
    return functools.reduce(operator.add, parts) / total, row_max + jnp.log(total)


def problem(seed: int = 0):
    """Three pieces in the callers' layouts: a per-block piece [B, H, N, S, S], shared columns
    with values broadcast over blocks [B, H, N, S, M], and one key whose scores broadcast over
    the batch ([1, H, N, S, 1], values [B, H, 1, D]); masks broadcast over heads (and queries),
    and row (b=1, n=0, query 2) masked in every piece."""
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((B, H, N, S, S)), rng.standard_normal((B, H, N, S, M)),
              rng.standard_normal((1, H, N, S, 1)))
    values = (rng.standard_normal((B, H, N, S, D)), rng.standard_normal((B, H, M, D)),
              rng.standard_normal((B, H, 1, D)))
    ok_own = rng.random((B, 1, N, S, S)) < 0.7
    ok_own[1, 0, 0, 2] = False
    ok_shared = rng.random((B, 1, N, 1, M)) < 0.6
    ok_shared[1, 0, 0] = False
    ok_one = np.ones((B, 1, N, 1, 1), bool)
    ok_one[1, 0, 0] = False
    cot_out = rng.standard_normal((B, H, N, S, D))
    cot_lse = rng.standard_normal((B, H, N, S, 1))
    return scores, values, (ok_own, ok_shared, ok_one), cot_out, cot_lse


SPECS = ("bhnqk,bhnkd->bhnqd", "bhnqs,bhsd->bhnqd", "bhnqo,bhod->bhnqd")


def value_and_grads(form, scores, values, drop, allowed, cot_out, cot_lse):
    def loss(scores, values):
        out, lse = form(list(scores), list(zip(SPECS, values)), drop, allowed)
        return jnp.sum(out * cot_out) + jnp.sum(lse * cot_lse), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        scores, values)
    return [out, lse, *grads[0], *grads[1]]


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("masking", ["allowed", "masked scores"])
def test_vjp_equals_autodiff_of_the_plain_form(dropout, masking):
    """Output, lse and the gradients of every score and value piece (leading axes summed back
    to the inputs' shapes), `allowed` passed or the scores masked by the caller."""
    scores, values, allowed, cot_out, cot_lse = problem()
    with jax.enable_x64(True):
        scores, values = (tuple(jnp.asarray(x) for x in xs) for xs in (scores, values))
        drop = ProbDropout(jnp.array([7, 11], jnp.uint32), RATE) if dropout else None
        if masking == "masked scores":
            scores = tuple(jnp.where(ok, s, NEG_INF) for s, ok in zip(scores, allowed))
            allowed = None
        args = (scores, values, drop, allowed, cot_out, cot_lse)
        got = value_and_grads(softmax_pieces_lse, *args)
        want = value_and_grads(autodiff_pieces, *args)
        plain = softmax_pieces(list(scores), list(zip(SPECS, values)), drop, allowed)
        undropped = value_and_grads(autodiff_pieces, scores, values, None, allowed, cot_out,
                                    cot_lse)[0]
    names = ["out", "lse", "dS0", "dS1", "dS2", "dV0", "dV1", "dV2"]
    for name, g, w, x in zip(names, got, want, (None, None, *scores, *values)):
        assert g.dtype == jnp.float64 and g.shape == w.shape, name
        if x is not None:
            assert g.shape == x.shape, name
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(plain, got[0], rtol=1e-12, atol=1e-15)  # eager vs jit
    # The fully masked row averages every key uniformly (today's behaviour) and, where the
    # masks are passed, sends no gradient into its scores.
    out, ds_own = np.asarray(got[0]), np.asarray(got[2])
    v_own, v_shared, v_one = (np.asarray(x) for x in values)
    uniform = (v_own[1, :, 0].sum(1) + v_shared[1].sum(1) + v_one[1, :, 0]) / (S + M + 1)
    if not dropout:
        np.testing.assert_allclose(out[1, :, 0, 2], uniform, rtol=1e-12)
    if masking == "allowed":
        assert np.all(ds_own[1, :, 0, 2] == 0.0)
    if dropout:  # the dropout really acted
        assert np.abs(np.asarray(undropped) - out).max() > 0.1


def test_backward_specs_contract_to_d_then_keys():
    from lra.models.attention.softmax import _backward_specs

    assert _backward_specs("bhnqk,bhnkd->bhnqd") == ("bhnqd,bhnkd->bhnqk", "bhnqd,bhnqk->bhndk")
    assert _backward_specs("bhnqs,bhsd->bhnqd") == ("bhnqd,bhsd->bhnqs", "bhnqd,bhnqs->bhds")


def test_dropout_masks_are_regenerated_not_stored():
    """The backward's residuals hold no dropout multipliers: with dropout, the saved arrays are
    those of the undropped run (masks are hashed again from the two keys)."""
    scores, values, allowed, cot_out, _ = problem(1)
    drop = ProbDropout(jnp.array([3, 5], jnp.uint32), RATE)

    def residual_sizes(drop):
        f = lambda s, v: softmax_pieces(list(s), list(zip(SPECS, v)), drop, allowed)  # noqa: E731
        scores32, values32 = (tuple(jnp.asarray(x, jnp.float32) for x in xs)
                              for xs in (scores, values))
        _, pull = jax.vjp(f, scores32, values32)
        return sorted(int(np.prod(x.shape)) for x in jax.tree.leaves(pull)
                      if hasattr(x, "shape") and x.ndim > 0)

    assert residual_sizes(drop) == residual_sizes(None)


# ------------------------------------------------------------- the variants on masked dense

# (kind, config fields, length, tolerance): reformer's duplicate counts enter as log of a
# float32 count, so its scores carry float32 rounding (~1e-9 relative) even in float64.
VARIANTS = [
    ("bigbird", {"block_size": 16, "num_rand_blocks": 2}, 100, 1e-10),
    ("sparse", {"block_size": 16, "summary": 4}, 100, 1e-10),
    ("sparse", {"block_size": 16, "summary": 4, "global_first": True, "causal": True}, 90, 1e-10),
    ("longformer", {"window": 16, "num_global": 2}, 100, 1e-10),
    ("sinkhorn", {"block_size": 16, "hard": True}, 100, 1e-10),
    ("reformer", {"chunk_size": 16, "n_hashes": 2}, 100, 1e-7),
]


@pytest.mark.parametrize("kind,fields,length,tol", VARIANTS,
                         ids=[f"{k}-{i}" for i, (k, *_) in enumerate(VARIANTS)])
def test_variant_gradients_equal_masked_dense(kind, fields, length, tol):
    """Values and q, k, v gradients equal those of `masked_softmax_attention` under the
    variant's `reference_mask` (keys: `reference_keys` for shared-QK reformer), at real rows,
    one batch row padded. Sinkhorn's hard sort adds a straight-through path from k into the
    sort network that the fixed mask lacks: there only q and v are compared (as for reformer,
    whose keys are its queries)."""
    module = make_attention(kind, length, heads=2, head_dim=8, **fields)
    rng = np.random.default_rng(length)
    with jax.enable_x64(True):
        q, k, v, cot = (jnp.asarray(rng.standard_normal((2, length, 2, 8))) for _ in range(4))
        mask = jnp.arange(length)[None] < jnp.array([[length], [length - 21]])
        cot = cot * mask[:, :, None, None]
        if module.shared_qk:
            k = q
        allowed = module.reference_mask(q, k, mask)

        def variant(q, k, v):
            return module(q, q if module.shared_qk else k, v, mask)

        def reference(q, k, v):
            keys = module.reference_keys(q, q) if module.shared_qk else k
            return masked_softmax_attention(q, keys, v, allowed)

        def value_and_grad(f):
            loss = lambda q, k, v: (jnp.sum(f(q, k, v) * cot), f(q, k, v))  # noqa: E731
            (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
            return out, grads

        out, grads = value_and_grad(variant)
        want, want_grads = value_and_grad(reference)
    real = np.asarray(mask)
    assert np.asarray(out).dtype == np.float64
    assert rel_err(np.asarray(out)[real], np.asarray(want)[real]) <= tol
    names = "qv" if kind == "sinkhorn" or module.shared_qk else "qkv"  # shared-QK: k unused
    for name, g, w in zip("qkv", grads, want_grads):
        if name in names:
            assert rel_err(g, w) <= tol, name
