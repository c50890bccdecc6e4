"""H-Transformer-1D: equals the dense hierarchical matrix it stands for (float64 reference built
from the definition), covers every pair once, is dense softmax at two blocks, ignores padding,
has right gradients and grows linearly."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lra.models.attention.h_transformer  # noqa: F401 - the module under test
from conftest import (TINY_TRANSFORMER, assert_tiny_params, attention_matrix, dense_reference,
                      make_attention, rel_err)
from lra import check

B, H, D = 2, 2, 8
build = functools.partial(make_attention, "h_transformer", heads=H, head_dim=D)


@nnx.jit
def run(module, q, k, v, mask):
    return module(q, k, v, mask)


def make_inputs(length: int, pad: int, seed: int = 0):
    """q, k, v [B, L, H, D] float32 and a mask whose second row has `pad` padded positions."""
    q, k, v = np.random.default_rng(seed).standard_normal((3, B, length, H, D)).astype(np.float32)
    mask = np.arange(length)[None, :] < np.array([length, length - pad])[:, None]
    return q, k, v, mask


def covering_level(length: int, block: int) -> np.ndarray:
    """int[L, L]: the level that holds pair (i, j), the finest l whose blocks of block * 2^l
    tokens put i and j in the same or adjacent blocks."""
    pos = np.arange(length)
    level_LxL = np.full((length, length), -1)
    level = 0
    while (level_LxL < 0).any():
        blocks = pos // (block * 2 ** level)
        near = np.abs(blocks[:, None] - blocks[None, :]) <= 1
        level_LxL = np.where((level_LxL < 0) & near, level, level_LxL)
        level += 1
    return level_LxL


def hierarchical_reference(q, k, v, mask, block: int) -> np.ndarray:
    """The dense L x L H-matrix attention in float64: pair (i, j) at level l gets the score of
    the masked means of q and k over the 2^l-token groups holding i and j, exp'd once per real
    fine key (so the coarse entry counts with the multiplicity of its real keys), then a row
    softmax over all L keys."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    keep = np.asarray(mask, np.float64)
    length = q.shape[1]
    level_LxL = covering_level(length, block)
    scores = np.zeros((B, H, length, length))
    for level in range(level_LxL.max() + 1):
        group_L = np.arange(length) // 2 ** level
        onehot_LxG = (group_L[:, None] == np.arange(group_L.max() + 1)[None]).astype(np.float64)
        counts = np.maximum(keep @ onehot_LxG, 1.0)[:, :, None, None]
        q_mean, k_mean = (np.einsum("blhd,lg,bl->bghd", x, onehot_LxG, keep) / counts
                          for x in (q, k))
        level_scores = np.einsum("blhd,bmhd->bhlm", q_mean[:, group_L], k_mean[:, group_L])
        scores = np.where(level_LxL == level, level_scores / np.sqrt(D), scores)
    scores = np.where(keep[:, None, None, :] > 0, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhlm,bmhd->blhd", weights / weights.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("length,block,pad", [(64, 8, 0), (64, 8, 13), (128, 16, 37),
                                              (128, 8, 37), (100, 8, 23)])
def test_equals_hierarchical_matrix_reference(length, block, pad):
    q, k, v, mask = make_inputs(length, pad, seed=length + block)
    want = hierarchical_reference(q, k, v, mask, block)
    got = np.asarray(run(build(length, block_size=block), q, k, v, mask))
    assert rel_err(got[mask], want[mask]) <= 1e-5
    # The hierarchy is real here: pairs of level 2 or more exist and the output is not dense.
    assert covering_level(length, block).max() >= 2
    dense = dense_reference(q, k, v, mask[:, None, None, :])
    assert rel_err(dense[mask], want[mask]) > 1e-2


def test_every_pair_is_counted_once():
    # q = k = 0: every entry is exp(0) = 1 at every level, so the weights are uniform over the
    # real keys only if the levels partition the matrix (a gap gives 0, an overlap 2).
    length, pad = 100, 9
    mask = jnp.arange(length)[None, :] < length - pad
    weights = attention_matrix(build(length, heads=1, head_dim=length, block_size=8), length, mask)
    uniform = np.where(np.arange(length) < length - pad, 1.0 / (length - pad), 0.0)
    np.testing.assert_allclose(weights[:length - pad], np.tile(uniform, (length - pad, 1)),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pad", [0, 11])
def test_two_blocks_equals_dense_softmax(pad):
    # block = L / 2: level 0 (own block + neighbour) is already every pair, all exact.
    length = 64
    q, k, v, mask = make_inputs(length, pad, seed=3)
    got = np.asarray(run(build(length, block_size=length // 2), q, k, v, mask))
    want = dense_reference(q, k, v, mask[:, None, None, :])
    assert rel_err(got[mask], want[mask]) <= 1e-5


def test_padding_is_invisible():
    # Changing padded q, k, v changes nothing, and a padded sequence gives the same outputs as
    # the same tokens unpadded (coarse means and counts see the real tokens only).
    length, real = 128, 91
    q, k, v, mask = make_inputs(length, length - real, seed=5)
    module = build(length, block_size=8)
    out = np.asarray(run(module, q, k, v, mask))
    noise = np.random.default_rng(9).standard_normal((3, B, length, H, D)).astype(np.float32) * 5
    pad_BxLx1x1 = ~mask[:, :, None, None]
    q2, k2, v2 = (np.where(pad_BxLx1x1, n, x) for n, x in zip(noise, (q, k, v)))
    out2 = np.asarray(run(module, q2, k2, v2, mask))
    np.testing.assert_allclose(out2[mask], out[mask], rtol=1e-5, atol=1e-6)
    short = np.asarray(run(build(real, block_size=8), q[1:, :real], k[1:, :real], v[1:, :real],
                           np.ones((1, real), bool)))
    np.testing.assert_allclose(short[0], out[1, :real], rtol=1e-5, atol=1e-6)


def test_gradients_match_finite_differences():
    # float64, padded, three levels; the stop-gradient row max must not bias the gradient.
    length, pad = 32, 5
    with jax.enable_x64(True):
        q, k, v, mask = make_inputs(length, pad, seed=7)
        q, k, v = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
        module = build(length, block_size=4)
        rng = np.random.default_rng(1)
        cotangent = jnp.asarray(rng.standard_normal(q.shape) * mask[..., None, None])
        directions = [jnp.asarray(rng.standard_normal(q.shape)) for _ in range(3)]

        @jax.jit
        def loss(q, k, v):
            return jnp.sum(module(q, k, v, mask) * cotangent)

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)
        assert all(float(jnp.abs(g).sum()) > 0 for g in grads)
        for g in grads:  # padded inputs get no gradient
            assert float(jnp.abs(g[1, length - pad:]).max()) == 0.0
        eps = 1e-6
        plus = loss(*(x + eps * d for x, d in zip((q, k, v), directions)))
        minus = loss(*(x - eps * d for x, d in zip((q, k, v), directions)))
        numeric = float(plus - minus) / (2 * eps)
        analytic = float(sum(jnp.sum(g * d) for g, d in zip(grads, directions)))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))


def test_float32_gradient_finite_with_padding():
    # Rows and coarse blocks that see only padding (NEG_INF scores) must not produce NaNs.
    length = 64
    q, k, v, mask = make_inputs(length, 37)
    module = build(length, block_size=8)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(module(*a, mask) ** 2), argnums=(0, 1, 2)))(
        q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize("length", [256, 1024])
def test_memory_linear_in_length(length):
    # The largest fwd + bwd intermediate is level 0's [B, H, N, S, 3S] scores, 3 * Nr entries
    # per query: exactly linear in L (coarser levels are smaller), never two axes of size L.
    module = build(length)
    jaxpr = check._grad_jaxpr(module, length)
    assert check.largest_intermediate(jaxpr) == B * H * length * 3 * module.cfg.block_size
    assert check.max_two_long_axes(jaxpr, length) is None


@pytest.mark.parametrize("block", [0, 7])
def test_block_size_must_be_even(block):
    with pytest.raises(ValueError, match="block_size"):
        build(64, block_size=block)


def test_tiny_param_count_is_pinned():
    # no parameters of its own
    assert_tiny_params("h_transformer", TINY_TRANSFORMER)
