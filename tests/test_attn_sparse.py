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


def expected_pattern(length: int, block: int, summary: int, real: int | None = None
                     ) -> np.ndarray:
    """Independent statement of the fixed pattern over the first `real` positions: same block,
    or a summary slot: one of the last `summary` real positions of its block."""
    real = length if real is None else real
    is_summary = np.zeros(length, bool)
    for start in range(0, real, block):
        end = min(start + block, real)
        is_summary[max(start, end - summary):end] = True
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    return (i // block == j // block) | is_summary[None, :]


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
    else:  # last block (48..59) is partial: its summaries are its last real slots, 56..59
        assert (counts_L == np.where(np.arange(length) < 48, 16 + 3 * 4, 12 + 3 * 4)).all()


def test_padded_keys_get_no_weight():
    length, real = 64, 41
    module = build(length, head_dim=length, block_size=16, summary=4)
    mask_1xL = jnp.arange(length)[None] < real
    probs_LxL = probe_pattern(module, length, mask_1xL)
    assert (probs_LxL[:real, real:] == 0).all()
    want_LxL = expected_pattern(length, 16, 4, real)[:real, :real]
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


def test_last_partly_padded_block_is_summarised():
    """Real length 1000 of 1024 (blocks of 32, summaries of 8): the last real block, 992..999,
    has no real token in slots 1016..1023. Its own last 8 real tokens summarise it, so the first
    query (a CLS token) sees them; before, they reached nothing outside their block."""
    length, real = 1024, 1000
    module = build(length, head_dim=4)
    mask = jnp.arange(length)[None] < real
    q = jax.random.normal(jax.random.key(0), (1, length, 1, 4))
    v = jax.random.normal(jax.random.key(1), (1, length, 1, 4))
    apply = jax.jit(lambda q, v: module(q, q, v, mask))
    changed = v.at[:, 992:1000].add(1.0)
    delta = np.abs(np.asarray(apply(q, changed) - apply(q, v)))[0, 0]
    assert delta.max() > 1e-3
    probs_LxL = probe_pattern(module, length, mask)
    np.testing.assert_array_equal(probs_LxL[:real, :real] > 0,
                                  expected_pattern(length, 32, 8, real)[:real, :real])
