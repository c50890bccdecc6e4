"""Local-attention-specific tests: exact block-band pattern at several settings, key counts."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from lra.models.attention.local import LocalAttention, LocalConfig

H, D = 2, 8


def build(block_size: int, num_neighbours: int, max_len: int) -> LocalAttention:
    cfg = LocalConfig(block_size=block_size, num_neighbours=num_neighbours)
    return LocalAttention(cfg, num_heads=H, head_dim=D, max_len=max_len, rngs=nnx.Rngs(0))


def dense_reference(q, k, v, allowed_BxHxLxL: np.ndarray) -> np.ndarray:
    """Masked dense softmax attention in float64 numpy."""
    scores = np.einsum("blhd,bmhd->bhlm", q, k).astype(np.float64) / np.sqrt(q.shape[-1])
    scores = np.where(allowed_BxHxLxL, scores, -1e9)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhlm,bmhd->blhd", probs, v)


@pytest.mark.parametrize("length,block_size,w", [(100, 16, 1), (90, 8, 0), (64, 8, 2)])
def test_output_equals_dense_under_band_pattern(length, block_size, w):
    module = build(block_size, w, length)
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
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5


def test_per_row_key_counts():
    bs, w, nb = 8, 1, 6
    x = np.zeros((1, nb * bs, H, D), np.float32)
    allowed = build(bs, w, nb * bs).reference_mask(x, x, np.ones((1, nb * bs), bool))
    counts_L = np.asarray(allowed)[0, 0].sum(-1)
    row_block = np.arange(nb * bs) // bs
    assert (counts_L[(row_block > 0) & (row_block < nb - 1)] == 3 * bs).all()
    assert (counts_L[(row_block == 0) | (row_block == nb - 1)] == 2 * bs).all()


def test_check_seq_len():
    LocalAttention.check_seq_len(LocalConfig(), 7)  # any length works: padding is masked
    with pytest.raises(ValueError, match="model.attention.block_size"):
        LocalAttention.check_seq_len(LocalConfig(block_size=0), 128)
