"""Sparse Transformer fixed-pattern specific checks: auto block size, per-row key sets, cost, and
the LRA code's options (`causal`, a global first token `global_first`)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (TINY_TRANSFORMER, assert_equals_reference_mask, assert_tiny_params,
                      attention_matrix, make_attention, random_qkv)
from lra.check import check_growth, growth_exponent, max_two_long_axes
from lra.models.attention.softmax import masked_softmax_attention
from lra.models.attention.sparse import SparseAttention, SparseConfig, resolve_block_size
from lra.models.posenc import AlibiBias

build = functools.partial(make_attention, "sparse", heads=1)


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


@pytest.mark.parametrize("length, block", [(16, 9), (64, 9), (100, 10), (256, 16), (500, 23),
                                           (512, 23), (1000, 32), (1024, 32), (1025, 33),
                                           (2048, 46), (4096, 64), (16384, 128)])
def test_auto_block_size_follows_sqrt_length(length, block):
    """l = ceil(sqrt(L)) above the summary floor (c + 1 = 9): per-query keys l + c L / l stay
    O(sqrt L) at every L, not only at even powers of two."""
    got = resolve_block_size(SparseConfig(), length)
    assert got == block
    assert got > SparseConfig().summary
    if block > 9:  # above the floor: the smallest whole number >= sqrt(L)
        assert got - 1 < math.sqrt(length) <= got


def test_growth_between_512_and_1024_within_declared_limit():
    """The largest fwd+bwd intermediate at the automatic block grows like L^1.5 from 512 to 1024
    (l 23 -> 32). A power-of-two block kept l = 32 at both lengths: L^2.00, over the limit."""
    cls = SparseAttention
    assert cls.growth_settings == {"block_size": 0} and cls.growth_limit == 1.6
    exponent, sizes = growth_exponent("sparse", (512, 1024), **cls.growth_settings)
    assert 1.35 <= exponent <= cls.growth_limit, (exponent, sizes)
    ok, detail = check_growth("sparse")  # the class's own lengths, 256 -> 1024
    assert ok, detail


@pytest.mark.parametrize("length", [64, 60])
def test_module_pattern_and_key_counts(length):
    block, summary = 16, 4
    module = build(length, head_dim=length, block_size=block, summary=summary)
    probs_LxL = attention_matrix(module, length, jnp.ones((1, length), bool))
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
    probs_LxL = attention_matrix(module, length, mask_1xL)
    assert (probs_LxL[:real, real:] == 0).all()
    want_LxL = expected_pattern(length, 16, 4, real)[:real, :real]
    np.testing.assert_array_equal(probs_LxL[:real, :real] > 0, want_LxL)


@pytest.mark.parametrize("length, kwargs", [(100, {"block_size": 16}), (77, {"summary": 2})])
def test_equals_masked_dense_at_ragged_lengths(length, kwargs):
    module = build(length, heads=2, **kwargs)
    q, k, v = random_qkv(length, seed=3)
    mask = jnp.arange(length)[None] < jnp.array([[length], [length - 13]])
    assert_equals_reference_mask(module, q, k, v, mask)


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
    probs_LxL = attention_matrix(module, length, mask)
    np.testing.assert_array_equal(probs_LxL[:real, :real] > 0,
                                  expected_pattern(length, 32, 8, real)[:real, :real])


OPTIONS = [{"causal": True}, {"global_first": True}, {"causal": True, "global_first": True}]


def second_row_mask(length: int, real: int, hole: tuple[int, int] | None) -> jax.Array:
    """[2, L]: a full row, and a row of `real` tokens with padding at positions hole[0]..hole[1]-1
    too (None: end padding only)."""
    pos_L = jnp.arange(length)
    padded_L = pos_L < real
    if hole is not None:
        padded_L = padded_L & ~((pos_L >= hole[0]) & (pos_L < hole[1]))
    return jnp.stack([jnp.ones(length, bool), padded_L])


@pytest.mark.parametrize("options", OPTIONS, ids=["causal", "global_first", "both"])
@pytest.mark.parametrize("use_alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("length, real, hole", [
    (100, 87, None),    # ragged: the padded row's last real block is partial
    (20, 3, None),      # padded row has 3 real tokens: key 0 is one of block 0's summaries
    (100, 93, (3, 16)),  # block 0 keeps 3 real tokens, so key 0 is a summary seen by later blocks
])
def test_options_equal_masked_dense_values_and_gradients(options, use_alibi, length, real, hole):
    heads, block, summary = 2, 16, 4
    module = build(length, heads=heads, block_size=block, summary=summary, **options)
    q, k, v = random_qkv(length, heads=heads)
    mask = second_row_mask(length, real, hole)
    bias = AlibiBias.for_heads(heads) if use_alibi else None
    pos_L = jnp.arange(length)
    bias_1xHxLxL = bias(pos_L[:, None] - pos_L[None, :])[None] if use_alibi else None
    weights = jax.random.normal(jax.random.key(7), q.shape) * mask[:, :, None, None]

    def ours(q, k, v):
        return module(q, k, v, mask, bias=bias)

    def reference(q, k, v):
        return masked_softmax_attention(q, k, v, module.reference_mask(q, k, mask), bias_1xHxLxL)

    real_BxL = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(jax.jit(ours)(q, k, v))[real_BxL],
                               np.asarray(jax.jit(reference)(q, k, v))[real_BxL],
                               rtol=1e-5, atol=1e-5)
    grads = [jax.jit(jax.grad(lambda *x, fn=fn: jnp.sum(fn(*x) * weights), (0, 1, 2)))(q, k, v)
             for fn in (ours, reference)]
    for name, got, want in zip("qkv", *grads):
        np.testing.assert_allclose(np.asarray(got)[real_BxL], np.asarray(want)[real_BxL],
                                   rtol=1e-5, atol=1e-5, err_msg=f"d/d{name}")


@pytest.mark.parametrize("options", OPTIONS, ids=["causal", "global_first", "both"])
@pytest.mark.parametrize("length, real, hole", [(64, 64, None), (60, 41, None), (20, 3, None),
                                               (64, 60, (3, 16))])
def test_options_pattern_counts_each_key_once(options, length, real, hole):
    """Uniform weights (q = 0) over the allowed keys: the module's pattern is the reference
    mask's, and every allowed key carries 1 / count, so key 0 (a global column that may also be
    an A1 or A2 key) is never counted twice."""
    module = build(length, head_dim=length, block_size=16, summary=4, **options)
    mask_1xL = second_row_mask(length, real, hole)[1:]
    real_L = np.asarray(mask_1xL)[0]
    probs_LxL = attention_matrix(module, length, mask_1xL)[real_L]
    x = jnp.zeros((1, length, 1, 1))
    want_LxL = np.asarray(module.reference_mask(x, x, mask_1xL))[0, 0, real_L]
    np.testing.assert_array_equal(probs_LxL > 0, want_LxL)
    counts_L = want_LxL.sum(1)
    np.testing.assert_allclose(probs_LxL[want_LxL], np.repeat(1 / counts_L, counts_L), rtol=1e-6)
    if options.get("causal") and not options.get("global_first"):
        assert not np.triu(want_LxL[:, real_L], 1).any()
    if options.get("global_first"):
        assert want_LxL[:, 0].all() and want_LxL[0, real_L].all()


def test_reference_mask_defaults_unchanged_and_options_compose():
    length, real = 60, 41
    mask_1xL = jnp.arange(length)[None] < real
    x = jnp.zeros((1, length, 1, 1))
    plain = np.asarray(build(length, block_size=16, summary=4).reference_mask(x, x, mask_1xL))
    np.testing.assert_array_equal(plain[0, 0], expected_pattern(length, 16, 4, real)
                                  & np.asarray(mask_1xL)[0][None, :])
    causal = np.asarray(build(length, block_size=16, summary=4, causal=True)
                        .reference_mask(x, x, mask_1xL))
    np.testing.assert_array_equal(causal, plain & np.tril(np.ones((length, length), bool)))
    both = np.asarray(build(length, block_size=16, summary=4, causal=True, global_first=True)
                      .reference_mask(x, x, mask_1xL))
    first = np.zeros((length, length), bool)
    first[0, :], first[:, 0] = True, True
    np.testing.assert_array_equal(both, (causal | first) & np.asarray(mask_1xL)[0][None, :])


@pytest.mark.parametrize("global_first", [False, True])
def test_causal_output_ignores_later_keys_and_values(global_first):
    length, real = 100, 90
    module = build(length, heads=2, block_size=16, summary=4, causal=True,
                   global_first=global_first)
    q, k, v = random_qkv(length, batch=1)
    mask = jnp.arange(length)[None] < real
    apply = jax.jit(lambda k, v: module(q, k, v, mask))
    base = np.asarray(apply(k, v))[0]
    noise_k, noise_v = random_qkv(length, batch=1, seed=5)[1:]
    # Row 0 is global with global_first (it sees every key, causal or not).
    first_causal_row = 1 if global_first else 0
    for i in [0, 3, 15, 16, 31, 47, 63, 80, 88]:
        later = (jnp.arange(length) > i)[None, :, None, None]
        changed = np.asarray(apply(jnp.where(later, k + 3 * noise_k, k),
                                   jnp.where(later, v + 3 * noise_v, v)))[0]
        rows = slice(first_causal_row, i + 1)
        np.testing.assert_allclose(changed[rows], base[rows], rtol=1e-6, atol=1e-6,
                                   err_msg=f"rows <= {i} saw a later key")
        if i < real - 1:  # the next row does see the change (it sees itself)
            assert np.abs(changed[i + 1] - base[i + 1]).max() > 1e-3
        if global_first and i > 0:  # the global row sees everything
            assert np.abs(changed[0] - base[0]).max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_global_first_row_zero_sees_everything_and_passes_it_on(causal):
    """The last real token reaches output row 0 in one layer (query 0 sees every key), and every
    real row in two (every query sees key 0). Without global_first and causal, neither holds."""
    length, real = 100, 90
    last = real - 1  # in block 5 (80..95); with c = 4, 86..89 are its summaries
    q, k, v = random_qkv(length, batch=1)
    mask = jnp.arange(length)[None] < real

    def delta(global_first: bool, position: int) -> tuple[np.ndarray, np.ndarray]:
        module = build(length, heads=2, block_size=16, summary=4, causal=causal,
                       global_first=global_first)

        @jax.jit
        def two_layers(v):
            out1 = module(q, k, v, mask)
            return out1, module(out1, out1, out1, mask)

        changed_v = v.at[:, position].add(3.0)
        (a1, a2), (b1, b2) = two_layers(v), two_layers(changed_v)
        return (np.abs(np.asarray(b1 - a1))[0, :real].max((-1, -2)),
                np.abs(np.asarray(b2 - a2))[0, :real].max((-1, -2)))

    one_layer, two_layer = delta(True, last)
    assert one_layer[0] > 1e-3, "row 0 must see the last real token"
    assert (two_layer > 1e-4).all(), "row 0's change must reach every row through key 0"
    # A non-summary token in a middle block (40 of 32..47) reaches row 0 only through globality.
    one_layer_mid, _ = delta(True, 40)
    assert one_layer_mid[0] > 1e-3
    plain_one, plain_two = delta(False, 40)
    assert plain_one[0] == 0
    if causal:
        # Without the global token nothing flows backwards in a causal layer.
        assert (plain_two[:40] == 0).all()


@pytest.mark.parametrize("options", OPTIONS, ids=["causal", "global_first", "both"])
def test_options_build_no_length_squared_array(options):
    length = 1024
    module = build(length, heads=2, **options)
    q, k, v = random_qkv(length, batch=1)
    mask = jnp.arange(length)[None] < 1000
    bias = AlibiBias.for_heads(2)

    def loss(q, k, v):
        return jnp.sum(module(q, k, v, mask, bias=bias))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    found = max_two_long_axes(jaxpr, length)
    assert found is None, f"sparse {options} builds an L x L array of shape {found}"


def test_tiny_param_count_is_pinned():
    assert_tiny_params("sparse", TINY_TRANSFORMER)
