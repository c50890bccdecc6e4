"""Sparse Transformer fixed-pattern specific checks: auto block size, per-row key sets, cost."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.attention.base import masked_softmax_attention
from models.attention.sparse import SparseAttention, SparseConfig, resolve_block_size


def build(length: int, heads: int = 1, head_dim: int = 8, **kwargs) -> SparseAttention:
    return SparseAttention(SparseConfig(**kwargs), num_heads=heads, head_dim=head_dim,
                           max_len=length, rngs=nnx.Rngs(0))


def probe_pattern(module: SparseAttention, length: int, mask_1xL: jax.Array) -> np.ndarray:
    """The module's attention matrix: q = 0 gives uniform weights and v = identity reads them."""
    q_1xLx1xL = jnp.zeros((1, length, 1, length))
    v_1xLx1xL = jnp.eye(length)[None, :, None, :]
    out_1xLx1xL = jax.jit(lambda q, v, m: module(q, q, v, m))(q_1xLx1xL, v_1xLx1xL, mask_1xL)
    return np.asarray(out_1xLx1xL)[0, :, 0, :]


def expected_pattern(length: int, block: int, summary: int) -> np.ndarray:
    """Independent statement of the fixed pattern: same block, or a summary slot of any block."""
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    return (i // block == j // block) | (j % block >= block - summary)


@pytest.mark.parametrize("length, block", [(16, 16), (64, 16), (1000, 32), (1024, 32),
                                           (1025, 64), (4096, 64)])
def test_auto_block_size_is_power_of_two_near_sqrt(length, block):
    got = resolve_block_size(SparseConfig(), length)
    assert got == block
    assert got > SparseConfig().summary and got & (got - 1) == 0
    if block > 16:  # above the summary floor it is the smallest power of two >= sqrt(L)
        assert got >= math.sqrt(length) > got // 2


@pytest.mark.parametrize("length", [64, 60])
def test_module_pattern_and_key_counts(length):
    block, summary = 16, 4
    module = build(length, head_dim=length, block_size=block, summary=summary)
    probs_LxL = probe_pattern(module, length, jnp.ones((1, length), bool))
    want_LxL = expected_pattern(length, block, summary)
    np.testing.assert_array_equal(probs_LxL > 0, want_LxL)
    # Every allowed key carries the same weight, so none is counted twice (A1 and A2 overlap).
    np.testing.assert_allclose(probs_LxL[want_LxL], np.repeat(1 / want_LxL.sum(1),
                                                              want_LxL.sum(1)), rtol=1e-6)
    counts_L = want_LxL.sum(1)
    if length == 64:  # l keys of the own block + c summaries of each other block
        assert (counts_L == block + (length // block - 1) * summary).all()
    else:  # last block (48..59) is partial and has no summary slots (60..63 do not exist)
        assert (counts_L == 24).all()


def test_padded_keys_get_no_weight():
    length, real = 64, 41
    module = build(length, head_dim=length, block_size=16, summary=4)
    mask_1xL = jnp.arange(length)[None] < real
    probs_LxL = probe_pattern(module, length, mask_1xL)
    assert (probs_LxL[:real, real:] == 0).all()
    want_LxL = expected_pattern(length, 16, 4)[:real, :real]
    np.testing.assert_array_equal(probs_LxL[:real, :real] > 0, want_LxL)


@pytest.mark.parametrize("length, kwargs", [(100, {"block_size": 16}), (77, {"summary": 2})])
def test_equals_masked_dense_at_ragged_lengths(length, kwargs):
    module = build(length, heads=2, **kwargs)
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (2, length, 2, 8)) for key in (kq, kk, kv))
    mask = jnp.arange(length)[None] < jnp.array([[length], [length - 13]])
    out = jax.jit(lambda *a: module(*a))(q, k, v, mask)
    ref = jax.jit(lambda q, k, v, m: masked_softmax_attention(
        q, k, v, module.reference_mask(q, k, m)))(q, k, v, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-5,
                               atol=1e-5)


def test_largest_intermediate_is_l_plus_summaries_per_query():
    length = 1024
    module = build(length)
    block = resolve_block_size(module.cfg, length)
    x = jnp.zeros((1, length, 1, 8))
    mask = jnp.ones((1, length), bool)
    jaxpr = jax.make_jaxpr(lambda q: jnp.sum(module(q, q, q, mask)))(x).jaxpr
    biggest = max(int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars)
    # Scores: each query sees its own block plus c summaries of each of the L / l blocks.
    assert biggest <= length * (block + length // block * module.cfg.summary)
    assert biggest < length * length // 3


def test_check_seq_len_messages():
    with pytest.raises(ValueError, match="block_size"):
        SparseAttention.check_seq_len(SparseConfig(block_size=8, summary=8), 256)
    with pytest.raises(ValueError, match="summary"):
        SparseAttention.check_seq_len(SparseConfig(summary=0), 256)
    SparseAttention.check_seq_len(SparseConfig(), 32)  # auto block size never collides
