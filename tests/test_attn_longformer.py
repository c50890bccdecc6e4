"""Longformer-specific checks: band width, global rows/columns, ragged lengths, cost."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lra.models.attention.base import masked_softmax_attention
from lra.models.attention.longformer import LongformerAttention, LongformerConfig


def build(length: int, heads: int = 1, head_dim: int = 8, **kwargs) -> LongformerAttention:
    return LongformerAttention(LongformerConfig(**kwargs), num_heads=heads, head_dim=head_dim,
                               max_len=length, rngs=nnx.Rngs(0))


def probe_pattern(module: LongformerAttention, length: int, mask_1xL: jax.Array) -> np.ndarray:
    """The module's attention matrix: q = 0 gives uniform weights and v = identity reads them."""
    q_1xLx1xL = jnp.zeros((1, length, 1, length))
    v_1xLx1xL = jnp.eye(length)[None, :, None, :]
    out_1xLx1xL = jax.jit(lambda q, v, m: module(q, q, v, m))(q_1xLx1xL, v_1xLx1xL, mask_1xL)
    return np.asarray(out_1xLx1xL)[0, :, 0, :]


def expected_pattern(length: int, window: int, num_global: int) -> np.ndarray:
    """Independent statement of the pattern: |i-j| <= window//2, or i or j global."""
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    return (np.abs(i - j) <= window // 2) | (i < num_global) | (j < num_global)


@pytest.mark.parametrize("length, real, window, num_global", [(64, 64, 8, 2), (60, 45, 10, 7),
                                                              (48, 48, 7, 0), (40, 33, 64, 1)])
def test_module_pattern_band_globals_and_padding(length, real, window, num_global):
    module = build(length, head_dim=length, window=window, num_global=num_global)
    probs_LxL = probe_pattern(module, length, jnp.arange(length)[None] < real)
    assert (probs_LxL[:real, real:] == 0).all()  # padded keys get no weight
    probs_RxR = probs_LxL[:real, :real]
    want_RxR = expected_pattern(real, window, num_global)
    np.testing.assert_array_equal(probs_RxR > 0, want_RxR)
    # Uniform weights over the allowed set: a global key inside the band is counted once.
    counts_R = want_RxR.sum(1)
    np.testing.assert_allclose(probs_RxR[want_RxR], np.repeat(1 / counts_R, counts_R),
                               rtol=1e-6)
    # Global rows see every real key; every row sees the global columns.
    assert (probs_RxR[:num_global] > 0).all() and (probs_RxR[:, :num_global] > 0).all()
    # A row far from both ends and from the globals sees 2 * (window//2) + 1 band keys + globals.
    mid = real // 2
    if mid - window // 2 > num_global and mid + window // 2 < real:
        assert counts_R[mid] == 2 * (window // 2) + 1 + num_global


def test_global_rows_are_full_attention():
    length, real = 96, 70
    module = build(length, heads=2, window=8, num_global=3)
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (1, length, 2, 8)) for key in (kq, kk, kv))
    mask = jnp.arange(length)[None] < real
    out = jax.jit(lambda *a: module(*a))(q, k, v, mask)
    full = masked_softmax_attention(q, k, v, mask[:, None, None, :])
    np.testing.assert_allclose(np.asarray(out)[:, :3], np.asarray(full)[:, :3], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("length, window, num_global", [(100, 10, 3), (64, 6, 9)])
def test_equals_masked_dense_at_ragged_lengths(length, window, num_global):
    module = build(length, heads=2, window=window, num_global=num_global)
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(key, (2, length, 2, 8)) for key in (kq, kk, kv))
    mask = jnp.arange(length)[None] < jnp.array([[length], [length - 11]])
    out = jax.jit(lambda *a: module(*a))(q, k, v, mask)
    ref = jax.jit(lambda q, k, v, m: masked_softmax_attention(
        q, k, v, module.reference_mask(q, k, m)))(q, k, v, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-5,
                               atol=1e-5)


def test_largest_intermediate_is_linear_in_length():
    length, window, num_global = 1024, 64, 2
    module = build(length, window=window, num_global=num_global)
    x = jnp.zeros((1, length, 1, 8))
    mask = jnp.ones((1, length), bool)
    jaxpr = jax.make_jaxpr(lambda q: jnp.sum(module(q, q, q, mask)))(x).jaxpr
    biggest = max(int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars)
    # Band scores: each query scores 3 blocks of window//2 keys (plus a few global columns).
    assert biggest <= length * (3 * (window // 2) + num_global)


def test_check_seq_len_messages():
    with pytest.raises(ValueError, match="num_global"):
        LongformerAttention.check_seq_len(LongformerConfig(num_global=16), 16)
    with pytest.raises(ValueError, match="window"):
        LongformerAttention.check_seq_len(LongformerConfig(window=1), 256)
    LongformerAttention.check_seq_len(LongformerConfig(), 128)  # window wider than L is fine
