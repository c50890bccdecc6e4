"""BigBird-specific tests: the random block draw, the exact ITC pattern, per-row key counts."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import dense_reference, make_attention, rel_err

H, D = 3, 8


def build(block_size: int, num_rand_blocks: int, max_len: int, seed: int | None = 0,
          rngs_seed: int = 0):
    return make_attention("bigbird", max_len, heads=H, head_dim=D, rngs_seed=rngs_seed,
                          block_size=block_size, num_rand_blocks=num_rand_blocks, seed=seed)


def forward(module):
    """The module's forward under one jit (one compile; eager op-by-op is slower on CPU)."""
    graphdef, state = nnx.split(module)
    jitted = jax.jit(lambda *a: nnx.merge(graphdef, state)(*a))
    return lambda *a: np.asarray(jitted(*a))


def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def expected_block_pattern(index_HxTxA: np.ndarray, nb: int) -> np.ndarray:
    """bool[H, nb, nb] written directly from the paper's definition (loops; test-only)."""
    allowed = np.zeros((index_HxTxA.shape[0], nb, nb), bool)
    allowed[:, [0, nb - 1], :] = True  # global query blocks see everything
    allowed[:, :, [0, nb - 1]] = True  # every query block sees the global key blocks
    for i in range(1, nb - 1):
        allowed[:, i, i - 1:i + 2] = True
        for h in range(index_HxTxA.shape[0]):
            allowed[h, i, index_HxTxA[h, i - 1]] = True
    return allowed


@pytest.mark.parametrize("nb,r", [(8, 3), (12, 2), (6, 1), (30, 3)])
def test_random_blocks_avoid_window_and_globals(nb, r):
    module = build(block_size=4, num_rand_blocks=r, max_len=4 * 30)
    index_HxTxA = np.asarray(module.random_blocks(nb))
    assert index_HxTxA.shape == (H, nb - 2, r)
    for h in range(H):
        for i in range(1, nb - 1):
            picked = set(index_HxTxA[h, i - 1].tolist())
            assert len(picked) == r, "random blocks repeat within a row"
            assert picked.isdisjoint({0, nb - 1, i - 1, i, i + 1}), (h, i, picked)
            assert all(1 <= j <= nb - 2 for j in picked)
    if nb >= 12:  # the draw differs between heads (per-head randomness)
        assert not all(np.array_equal(index_HxTxA[0], index_HxTxA[h]) for h in range(1, H))


def test_random_pattern_is_fixed_and_seeded():
    a = np.asarray(build(4, 3, 64, seed=5).random_blocks(16))
    b = np.asarray(build(4, 3, 64, seed=5, rngs_seed=1).random_blocks(16))
    c = np.asarray(build(4, 3, 64, seed=6).random_blocks(16))
    np.testing.assert_array_equal(a, b)  # an int seed fixes the pattern
    assert not np.array_equal(a, c)
    # seed=None draws from rngs.params(): different layers (rng states) get different patterns
    d = np.asarray(build(4, 3, 64, seed=None, rngs_seed=0).random_blocks(16))
    e = np.asarray(build(4, 3, 64, seed=None, rngs_seed=1).random_blocks(16))
    assert not np.array_equal(d, e)


@pytest.mark.parametrize("length,max_len,block_size,r", [
    (100, 100, 8, 3),    # not a block multiple: padded to 104 = 13 blocks
    (150, 256, 16, 1),   # call length shorter than max_len (10 of 16 blocks)
    (40, 40, 8, 0),      # block multiple, no random blocks: window + global only
])
def test_output_equals_dense_under_paper_pattern(length, max_len, block_size, r):
    module = build(block_size, r, max_len)
    q, k, v = (normal(length + i, (2, length, H, D)) for i in range(3))
    mask = np.arange(length)[None, :] < np.array([length, length - 13])[:, None]
    nb = -(-length // block_size)
    blocks = expected_block_pattern(np.asarray(module.random_blocks(nb)), nb)
    tokens = blocks.repeat(block_size, 1).repeat(block_size, 2)[:, :length, :length]
    allowed = tokens[None] & mask[:, None, None, :]
    np.testing.assert_array_equal(np.asarray(module.reference_mask(q, k, mask)), allowed)
    want = dense_reference(q, k, v, allowed)[mask]
    got = forward(module)(q, k, v, mask)[mask]
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("block_size,r,nb", [(16, 3, 10), (8, 2, 16)])
def test_per_row_key_counts(block_size, r, nb):
    length = nb * block_size
    module = build(block_size, r, length)
    x = np.zeros((1, length, H, D), np.float32)
    counts_HxL = np.asarray(module.reference_mask(x, x, np.ones((1, length), bool))[0].sum(-1))
    row_block = np.arange(length) // block_size
    middle = (row_block >= 2) & (row_block <= nb - 3)
    assert (counts_HxL[:, middle] == (3 + 2 + r) * block_size).all()
    # Rows 1 and nb-2: their window already contains a global block (counted once).
    edge = (row_block == 1) | (row_block == nb - 2)
    assert (counts_HxL[:, edge] == (4 + r) * block_size).all()
    glob = (row_block == 0) | (row_block == nb - 1)
    assert (counts_HxL[:, glob] == length).all()


def test_output_ignores_keys_outside_pattern():
    """Perturbing a value block outside a row's pattern leaves that row's output unchanged."""
    bs, r, nb = 8, 2, 12
    module = build(bs, r, nb * bs)
    q, k, v = (normal(i, (1, nb * bs, H, D)) for i in range(3))
    mask = np.ones((1, nb * bs), bool)
    run = forward(module)
    blocks = np.asarray(module.block_pattern(nb))
    i = 5
    outside = [j for j in range(nb) if not blocks[0, i, j]]
    inside = [j for j in range(nb) if blocks[0, i, j]]
    base = run(q, k, v, mask)[0, i * bs:(i + 1) * bs, 0]
    for j, changes in [(outside[0], False), (inside[-2], True)]:
        v2 = v.copy()
        v2[:, j * bs:(j + 1) * bs, 0] += 3.0
        out = run(q, k, v2, mask)[0, i * bs:(i + 1) * bs, 0]
        assert (not np.allclose(out, base, atol=1e-6)) == changes, (j, changes)
