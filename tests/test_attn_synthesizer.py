"""Synthesizer: dense/random (x factorized) shapes, padding, input dependence and rank."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_tiny_params, make_attention, rel_err
from lra.models.attention.base import Buffer
from lra.models.attention.synthesizer import SynthesizerAttention, split_length
from lra.models.posenc import AlibiBias

B, H, D = 2, 2, 8
MAX_LEN, LENGTH = 64, 48  # calls shorter than max_len slice the synthesised logits
VARIANTS = [("dense", False), ("dense", True), ("random", False), ("random", True)]


def build(mode: str, factorized: bool, **kwargs) -> SynthesizerAttention:
    return make_attention("synthesizer", MAX_LEN, heads=H, head_dim=D, mode=mode,
                          factorized=factorized, **kwargs)


@nnx.jit
def run(module: SynthesizerAttention, q, k, v, mask):
    return module(q, k, v, mask)


def make_inputs(seed: int = 0):
    q, k, v = np.random.default_rng(seed).standard_normal((3, B, LENGTH, H, D), np.float32)
    mask = np.arange(LENGTH)[None, :] < np.array([LENGTH, LENGTH - 17])[:, None]
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)


@pytest.mark.parametrize("mode,factorized", VARIANTS)
def test_shape_and_padding_invariance(mode, factorized):
    module = build(mode, factorized)
    q, k, v, mask = make_inputs()
    out = np.asarray(run(module, q, k, v, mask))
    assert out.shape == (B, LENGTH, H, D) and np.isfinite(out).all()
    pad = ~mask[:, :, None, None]
    q2, k2, v2 = (jnp.where(pad, 50.0, x) for x in (q, k, v))
    out2 = np.asarray(run(module, q2, k2, v2, mask))
    real = np.asarray(mask)
    np.testing.assert_allclose(out2[real], out[real], rtol=1e-5, atol=1e-6)
    # With v = 1 at real and 0 at padded tokens, out = attention mass on real keys = 1.
    ones_on_real = jnp.broadcast_to(jnp.where(pad, 0.0, 1.0), v.shape)
    mass = np.asarray(run(module, q, k, ones_on_real, mask))
    np.testing.assert_allclose(mass[real], 1.0, rtol=1e-5)


@pytest.mark.parametrize("factorized", [False, True])
def test_random_mode_ignores_query_and_key_contents(factorized):
    module = build("random", factorized)
    q, k, v, mask = make_inputs()
    q2, k2, _, _ = make_inputs(seed=1)
    np.testing.assert_array_equal(np.asarray(run(module, q, k, v, mask)),
                                  np.asarray(run(module, q2, k2, v, mask)))


@pytest.mark.parametrize("factorized", [False, True])
def test_dense_mode_uses_queries_not_keys(factorized):
    module = build("dense", factorized)
    q, k, v, mask = make_inputs()
    q2, k2, _, _ = make_inputs(seed=1)
    base = np.asarray(run(module, q, k, v, mask))
    np.testing.assert_array_equal(base, np.asarray(run(module, q, k2, v, mask)))
    assert not np.allclose(base, np.asarray(run(module, q2, k, v, mask)))


def test_factorized_random_logits_have_rank_factor_k():
    module = build("random", True, factor_k=5)
    q, _, _, _ = make_inputs()
    logits = np.asarray(module.synthetic_logits(q), np.float64)
    assert logits.shape == (H, 1, LENGTH, LENGTH)
    for h in range(H):
        assert np.linalg.matrix_rank(logits[h, 0], tol=1e-6) == 5
    full = np.asarray(build("random", False).synthetic_logits(q))[0, 0]
    assert np.linalg.matrix_rank(full) == LENGTH  # the unfactorized matrix is full rank


def test_factorized_dense_logits_are_outer_products():
    module = build("dense", True)
    a, b = split_length(MAX_LEN)
    assert (a, b) == (8, 8)
    q, _, _, _ = make_inputs()
    # Full max_len logits (before slicing to L): each query row reshaped to [b, a] is rank 1.
    q_full = jnp.concatenate([q, q[:, :MAX_LEN - LENGTH]], axis=1)
    logits = np.asarray(module.synthetic_logits(q_full), np.float64)
    rows = logits.reshape(-1, b, a)
    singular = np.linalg.svd(rows, compute_uv=False)
    assert np.all(singular[:, 1] <= 1e-5 * singular[:, 0])


def test_fixed_random_is_a_buffer_and_not_trained():
    fixed = build("random", False, trainable=False)
    learned = build("random", False)
    assert not jax.tree.leaves(nnx.state(fixed, nnx.Param))
    assert [x.shape for x in jax.tree.leaves(nnx.state(fixed, Buffer))] == [
        (H, MAX_LEN, MAX_LEN)]
    assert [x.shape for x in jax.tree.leaves(nnx.state(learned, nnx.Param))] == [
        (H, MAX_LEN, MAX_LEN)]


def plus_dot_reference_np(module: SynthesizerAttention, q, k, v, mask, slopes_H=None):
    """softmax over real keys of (synthetic logits + q.k / sqrt(D) [+ ALiBi]), times V, float64."""
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.asarray(module.synthetic_logits(q), np.float64)  # [H, B or 1, L, L]
    logits = logits + np.einsum("bihd,bjhd->hbij", q64, k64) / np.sqrt(q64.shape[-1])
    if slopes_H is not None:
        pos = np.arange(q64.shape[1])
        distance = np.abs(pos[:, None] - pos[None, :])
        logits = logits - np.asarray(slopes_H, np.float64)[:, None, None, None] * distance
    logits = np.where(np.asarray(mask)[None, :, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    return np.einsum("hbij,bjhd->bihd", probs, v64)


@pytest.mark.parametrize("mode,factorized", VARIANTS)
def test_plus_dot_equals_explicit_reference(mode, factorized):
    module = build(mode, factorized, plus_dot=True)
    assert module.reads_queries and module.reads_keys
    q, k, v, mask = make_inputs()
    out = np.asarray(run(module, q, k, v, mask))
    ref = plus_dot_reference_np(module, q, k, v, mask)
    real = np.asarray(mask)
    assert rel_err(out[real], ref[real]) <= 1e-5


def test_plus_dot_with_alibi_equals_explicit_reference():
    module = build("random", False, plus_dot=True)
    q, k, v, mask = make_inputs()
    slopes_H = (0.5, 0.25)
    out = np.asarray(module(q, k, v, mask, bias=AlibiBias(slopes_H)))
    ref = plus_dot_reference_np(module, q, k, v, mask, slopes_H)
    real = np.asarray(mask)
    assert rel_err(out[real], ref[real]) <= 1e-5


@pytest.mark.parametrize("mode", ["dense", "random"])
def test_plus_dot_reads_keys_and_default_does_not(mode):
    q, k, v, mask = make_inputs()
    _, k2, _, _ = make_inputs(seed=1)
    plain = build(mode, False)
    assert not plain.reads_keys and plain.reads_queries == (mode == "dense")
    np.testing.assert_array_equal(np.asarray(run(plain, q, k, v, mask)),
                                  np.asarray(run(plain, q, k2, v, mask)))
    mixed = build(mode, False, plus_dot=True)
    assert not np.allclose(np.asarray(run(mixed, q, k, v, mask)),
                           np.asarray(run(mixed, q, k2, v, mask)))


def test_tiny_param_count_is_pinned():
    # no key projection: its logits never read k
    assert_tiny_params("synthesizer", 46250 - (32 * 32 + 32))
