"""Longformer-specific checks: band width, global rows/columns, ragged lengths, cost."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (TINY_TRANSFORMER, assert_equals_reference_mask, assert_tiny_params,
                      attention_matrix, make_attention, random_qkv)
from lra.models.attention.softmax import masked_softmax_attention

build = functools.partial(make_attention, "longformer", heads=1)


def expected_pattern(length: int, window: int, num_global: int) -> np.ndarray:
    """Independent statement of the pattern: |i-j| <= window//2, or i or j global."""
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    return (np.abs(i - j) <= window // 2) | (i < num_global) | (j < num_global)


@pytest.mark.parametrize("length, real, window, num_global", [(64, 64, 8, 2), (60, 45, 10, 7),
                                                              (48, 48, 7, 0), (40, 33, 64, 1)])
def test_module_pattern_band_globals_and_padding(length, real, window, num_global):
    module = build(length, head_dim=length, window=window, num_global=num_global)
    probs_LxL = attention_matrix(module, length, jnp.arange(length)[None] < real)
    assert (probs_LxL[:real, real:] == 0).all()  # padded keys get no weight
    real_probs_LxL = probs_LxL[:real, :real]
    want_LxL = expected_pattern(real, window, num_global)
    np.testing.assert_array_equal(real_probs_LxL > 0, want_LxL)
    # Uniform weights over the allowed set: a global key inside the band is counted once.
    counts_L = want_LxL.sum(1)
    np.testing.assert_allclose(real_probs_LxL[want_LxL], np.repeat(1 / counts_L, counts_L),
                               rtol=1e-6)
    # Global rows see every real key; every row sees the global columns.
    assert (real_probs_LxL[:num_global] > 0).all() and (real_probs_LxL[:, :num_global] > 0).all()
    # A row far from both ends and from the globals sees 2 * (window//2) + 1 band keys + globals.
    mid = real // 2
    if mid - window // 2 > num_global and mid + window // 2 < real:
        assert counts_L[mid] == 2 * (window // 2) + 1 + num_global


def test_global_rows_are_full_attention():
    length, real = 96, 70
    module = build(length, heads=2, window=8, num_global=3)
    q, k, v = random_qkv(length, batch=1, seed=1)
    mask = jnp.arange(length)[None] < real
    out = jax.jit(lambda *a: module(*a))(q, k, v, mask)
    full = masked_softmax_attention(q, k, v, mask[:, None, None, :])
    np.testing.assert_allclose(np.asarray(out)[:, :3], np.asarray(full)[:, :3], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("length, window, num_global", [(100, 10, 3), (64, 6, 9)])
def test_equals_masked_dense_at_ragged_lengths(length, window, num_global):
    module = build(length, heads=2, window=window, num_global=num_global)
    q, k, v = random_qkv(length, seed=2)
    mask = jnp.arange(length)[None] < jnp.array([[length], [length - 11]])
    assert_equals_reference_mask(module, q, k, v, mask)


def test_largest_intermediate_is_linear_in_length():
    length, window, num_global = 1024, 64, 2
    module = build(length, window=window, num_global=num_global)
    x = jnp.zeros((1, length, 1, 8))
    mask = jnp.ones((1, length), bool)
    jaxpr = jax.make_jaxpr(lambda q: jnp.sum(module(q, q, q, mask)))(x).jaxpr
    biggest = max(int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars)
    # Band scores: each query scores 3 blocks of window//2 keys (plus a few global columns).
    assert biggest <= length * (3 * (window // 2) + num_global)


def test_tiny_param_count_is_pinned():
    assert_tiny_params("longformer", TINY_TRANSFORMER)
