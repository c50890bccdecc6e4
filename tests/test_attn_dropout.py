"""Attention-probability dropout (`model.attention.dropout`): every variant that forms softmax
probabilities drops them (not its output), unbiased, off at evaluation; custom VJPs agree with
autodiff of the textbook form under the same masks; the others refuse the option."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lra.check import build, inputs
from lra.models import attention
from lra.models.attention.flash import flash_attention
from lra.models.attention.softmax import (NEG_INF, ProbDropout, masked_softmax_attention,
                                          softmax_attention, softmax_pv)

KINDS = sorted(attention.REGISTRY)
DROPPING = [k for k in KINDS if attention.get(k).prob_dropout]
RATE = 0.25


def test_the_variants_that_form_probabilities_all_drop_them():
    # Kernel (linear, performer), decayed linear attention (retnet, gla), Nystrom's product of
    # three softmaxes and a pseudo-inverse, and the mixers form no attention probabilities;
    # h_transformer's hierarchical softmax and nsa's three branches do, but dropout on them is
    # not implemented yet (their modules refuse the option). Every other kind must implement it.
    assert set(KINDS) - set(DROPPING) == {"linear", "performer", "nystrom", "fnet", "lstm",
                                          "s4d", "lru", "retnet", "gla", "mamba", "hyena",
                                          "mamba2", "mlstm", "hawk", "deltanet",
                                          "gated_deltanet", "rwkv7", "based", "mh_hyena",
                                          "h_transformer", "nsa"}


@pytest.mark.parametrize("kind", sorted(set(KINDS) - set(DROPPING)))
def test_kinds_without_probabilities_refuse_the_option(kind):
    with pytest.raises(ValueError, match="forms no attention probabilities.*dropout=0"):
        build(kind, 64, dropout=0.1)


def test_rate_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        build("dense", 64, dropout=1.0)


def _call(module, q, k, v, mask, rng=None):
    return module(q, q if module.shared_qk else k, v, mask, rng=rng)


@pytest.mark.parametrize("kind", DROPPING)
def test_dropout_acts_on_probabilities_unbiased_and_only_in_training(kind):
    length = 128
    module = build(kind, length, dropout=RATE)
    plain = build(kind, length)  # same seed: same parameters, rate 0
    q, k, _, mask = inputs(length)
    real = np.asarray(mask)[:, :, None, None]
    ones = jnp.ones_like(q)
    rng = jax.random.key(3)

    # Evaluation (no rng) ignores the rate.
    np.testing.assert_array_equal(_call(module, q, k, ones, mask), _call(plain, q, k, ones, mask))
    # With V = 1 every output row is sum_j P_ij K_ij (times a row constant for linformer's
    # projected values): constant over D. Output dropout would differ element by element.
    out = np.asarray(_call(module, q, k, ones, mask, rng)) * real
    assert np.ptp(out, axis=-1).max() < 1e-4, "dropout must act on the probabilities"
    reference = np.asarray(_call(plain, q, k, ones, mask, rng)) * real
    changed = np.abs(out - reference)[..., 0] > 1e-3
    assert changed.sum() > 0.5 * np.asarray(mask).sum() * module.num_heads

    # Inverted dropout is unbiased: the mean over many masks approaches the rate-0 output.
    v = inputs(length, seed=1)[2]
    draws = jax.jit(jax.vmap(lambda r: _call(module, q, k, v, mask, r)))(
        jax.random.split(jax.random.key(7), 256))
    mean = np.asarray(draws.mean(0)) * real
    target = np.asarray(_call(plain, q, k, v, mask, rng)) * real
    single = np.abs(np.asarray(draws[0]) * real - target).mean()
    assert np.abs(mean - target).mean() < 0.15 * single  # ~1/sqrt(256) of one draw's error


def _problems(seed=0, b=2, length=64, h=2, d=8):
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(x, (b, length, h, d)) for x in ks[:3])
    mask = jnp.arange(length)[None, :] < jnp.array([[length], [length - 14]])
    drop = ProbDropout(jax.random.bits(ks[3], (2,), jnp.uint32), RATE)
    cot = jax.random.normal(ks[4], q.shape) * mask[:, :, None, None]
    return q, k, v, mask, drop, cot


def _grads(f, q, k, v, cot):
    return jax.grad(lambda q, k, v: (f(q, k, v) * cot).sum(), argnums=(0, 1, 2))(q, k, v)


def test_dense_explicit_and_flash_match_the_reference_under_the_same_masks():
    q, k, v, mask, drop, cot = _problems()
    forms = {
        "reference": lambda q, k, v: masked_softmax_attention(q, k, v, mask[:, None, None, :],
                                                              None, drop),
        "explicit": lambda q, k, v: softmax_attention(q, k, v, mask, None, drop),
        "flash": lambda q, k, v: flash_attention(q, k, v, mask, None, 16, drop),
    }
    real = mask[:, :, None, None]
    want = forms["reference"](q, k, v)
    want_grads = _grads(forms["reference"], q, k, v, cot)
    undropped = masked_softmax_attention(q, k, v, mask[:, None, None, :])
    assert float(jnp.abs((want - undropped) * real).max()) > 0.1
    for name in ("explicit", "flash"):
        np.testing.assert_allclose(forms[name](q, k, v) * real, want * real, atol=1e-5,
                                   err_msg=name)
        for got, ref in zip(_grads(forms[name], q, k, v, cot), want_grads):
            np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=name)


def test_softmax_pv_vjp_matches_autodiff_under_dropout():
    # Broadcast leading axes (random-synthesizer logits shared by the batch) included.
    ks = jax.random.split(jax.random.key(1), 4)
    scores = jax.random.normal(ks[0], (3, 1, 16, 24))
    allowed = jax.random.bernoulli(ks[1], 0.8, (1, 2, 1, 24)).at[..., 0].set(True)
    v = jax.random.normal(ks[2], (3, 2, 24, 8))
    cot = jax.random.normal(ks[3], (3, 2, 16, 8))
    drop = ProbDropout(jnp.array([12345, 678], jnp.uint32), RATE)

    def textbook(s, v):
        probs = jax.nn.softmax(jnp.where(allowed, s, NEG_INF), axis=-1)
        return drop.apply(jnp.broadcast_to(probs, (3, 2, 16, 24))) @ v

    def fast(s, v):
        return softmax_pv(s, allowed, v, drop)

    np.testing.assert_allclose(fast(scores, v), textbook(scores, v), atol=1e-5)
    got = jax.grad(lambda s, v: (fast(s, v) * cot).sum(), argnums=(0, 1))(scores, v)
    want = jax.grad(lambda s, v: (textbook(s, v) * cot).sum(), argnums=(0, 1))(scores, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_dropout_keys_differ_per_step_and_piece():
    drop = ProbDropout(jnp.array([1, 2], jnp.uint32), 0.5)
    a, b = drop.keep((4096,)), drop.piece(0).keep((4096,))
    c = ProbDropout(jnp.array([1, 3], jnp.uint32), 0.5).keep((4096,))
    assert 0.45 < float((a > 0).mean()) < 0.55
    assert 0.4 < float(((a > 0) == (b > 0)).mean()) < 0.6
    assert 0.4 < float(((a > 0) == (c > 0)).mean()) < 0.6
