"""Local-attention-specific tests: exact block-band pattern at several settings, key counts."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_TRANSFORMER, assert_tiny_params, dense_reference, make_attention, rel_err

H, D = 2, 8


@pytest.mark.parametrize("length,block_size,w", [(100, 16, 1), (90, 8, 0), (64, 8, 2)])
def test_output_equals_dense_under_band_pattern(length, block_size, w):
    module = make_attention("local", length, block_size=block_size, num_neighbours=w)
    rng = np.random.default_rng(length)
    q, k, v = (rng.standard_normal((2, length, H, D)).astype(np.float32) for _ in range(3))
    mask = np.arange(length)[None, :] < np.array([length, length - 11])[:, None]
    # Pattern from the definition: query i sees key j iff their blocks are <= w apart.
    blocks = np.arange(length) // block_size
    allowed = (np.abs(blocks[:, None] - blocks[None, :]) <= w)[None, None] & mask[:, None, None]
    np.testing.assert_array_equal(
        np.broadcast_to(np.asarray(module.reference_mask(q, k, mask)), allowed.shape), allowed)
    graphdef, state = nnx.split(module)
    got = np.asarray(jax.jit(lambda *a: nnx.merge(graphdef, state)(*a))(q, k, v, mask))[mask]
    want = dense_reference(q, k, v, allowed)[mask]
    assert rel_err(got, want) <= 1e-5


def test_per_row_key_counts():
    bs, w, nb = 8, 1, 6
    x = np.zeros((1, nb * bs, H, D), np.float32)
    module = make_attention("local", nb * bs, block_size=bs, num_neighbours=w)
    allowed = module.reference_mask(x, x, np.ones((1, nb * bs), bool))
    counts_L = np.asarray(allowed)[0, 0].sum(-1)
    row_block = np.arange(nb * bs) // bs
    assert (counts_L[(row_block > 0) & (row_block < nb - 1)] == 3 * bs).all()
    assert (counts_L[(row_block == 0) | (row_block == nb - 1)] == 2 * bs).all()


def test_tiny_param_count_is_pinned():
    assert_tiny_params("local", TINY_TRANSFORMER)
