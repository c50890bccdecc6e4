"""Sparse Sinkhorn attention: balancing, hard permutation, soft-mode reference, padding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import assert_tiny_params, make_attention, masked_softmax, rel_err
from lra.models.attention.sinkhorn import SinkhornAttention, greedy_permutation, sinkhorn_log

H, D, BLOCK, LENGTH = 2, 8, 16, 64


@functools.lru_cache(maxsize=None)
def make(hard: bool = False, gumbel: bool = False, **fields) -> SinkhornAttention:
    return make_attention("sinkhorn", LENGTH, heads=H, head_dim=D, block_size=BLOCK, hard=hard,
                          gumbel=gumbel, **fields)


def data(real: tuple[int, int], seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, (2, LENGTH, H, D)) for key in (kq, kk, kv))
    mask = jnp.arange(LENGTH)[None, :] < jnp.array(real)[:, None]
    return q, k, v, mask


@functools.lru_cache(maxsize=None)
def forward(hard: bool):
    module = make(hard)
    return jax.jit(lambda q, k, v, mask: module(q, k, v, mask))


def blocks(k, mask):
    b, n = k.shape[0], LENGTH // BLOCK
    key_mask = mask.reshape(b, n, BLOCK)
    return jnp.where(key_mask[..., None, None], k.reshape(b, n, BLOCK, H, D), 0.0), key_mask


def test_sinkhorn_balancing_makes_rows_and_columns_sum_to_one():
    logits = jax.random.normal(jax.random.key(1), (2, H, 8, 8)) * 3.0
    p = np.exp(np.asarray(sinkhorn_log(logits, iters=50, temperature=0.75)))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-4)
    p0 = np.exp(np.asarray(sinkhorn_log(logits, iters=0, temperature=0.75)))
    assert np.abs(p0.sum(-1) - 1).max() > 0.5  # unnormalised before balancing
    # The module's P at its default 5 iterations: columns exact (last step), rows close.
    _, k, _, mask = data((64, 37))
    k, mask = blocks(k, mask)
    p_mod, hard = make().sort_matrix(k, mask)
    assert hard is None
    np.testing.assert_allclose(np.asarray(p_mod).sum(-2), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(p_mod).sum(-1), 1.0, atol=0.05)


def test_greedy_permutation_is_a_permutation_and_recovers_a_planted_one():
    noise = jax.random.normal(jax.random.key(2), (2, H, 8, 8))
    perm = np.asarray(greedy_permutation(noise))
    assert set(np.unique(perm)) <= {0.0, 1.0}
    np.testing.assert_array_equal(perm.sum(-1), 1.0)
    np.testing.assert_array_equal(perm.sum(-2), 1.0)
    planted = np.random.default_rng(0).permutation(8)
    logits = 6.0 * jax.nn.one_hot(planted, 8) + 0.5 * noise
    found = np.asarray(greedy_permutation(sinkhorn_log(logits, 5, 0.75))).argmax(-1)
    np.testing.assert_array_equal(found, np.broadcast_to(planted, found.shape))


def test_hard_mode_is_a_nontrivial_permutation_with_straight_through_gradients():
    module = make(hard=True)
    q, k, v, mask = data((64, 37))
    kb, key_mask = blocks(k, mask)
    p, hard = module.sort_matrix(kb, key_mask)
    np.testing.assert_array_equal(np.asarray(p), np.asarray(hard))  # forward value is one-hot
    targets = np.asarray(hard).argmax(-1)
    assert (np.sort(targets, -1) == np.arange(LENGTH // BLOCK)).all()
    assert (targets != np.arange(LENGTH // BLOCK)).any(), "identity would test nothing"
    graphdef, state = nnx.split(module)

    def loss(params):
        m = nnx.merge(graphdef, params)
        return jnp.sum(m(q, k, v, mask) ** 2)

    grads = jax.jit(jax.grad(loss))(state)
    assert float(jnp.abs(grads["sort_w1"][...]).sum()) > 0  # sorter learns through P


def numpy_reference(module: SinkhornAttention, q, k, v, mask) -> np.ndarray:
    """Soft Sinkhorn attention written out block by block from the paper's equations."""
    q, k, v, mask = (np.asarray(x, np.float64) for x in (q, k, v, mask))
    b, n = q.shape[0], LENGTH // BLOCK
    km = mask.reshape(b, n, BLOCK)
    kb = k.reshape(b, n, BLOCK, H, D) * km[..., None, None]
    vb = v.reshape(b, n, BLOCK, H, D) * km[..., None, None]
    summary = kb.sum(2) / np.maximum(km.sum(2), 1)[..., None, None]
    w1, b1, w2, b2 = (np.asarray(x[...], np.float64) for x in
                      (module.sort_w1, module.sort_b1, module.sort_w2, module.sort_b2))
    hidden = np.maximum(np.einsum("bnhd,hde->bnhe", summary, w1) + b1, 0)
    logits = np.maximum(np.einsum("bnhe,hem->bnhm", hidden, w2[..., :n]) + b2[:, :n], 0)
    log_p = logits.transpose(0, 2, 1, 3) / module.cfg.temperature
    for _ in range(module.cfg.sinkhorn_iters):
        for axis in (-1, -2):
            top = log_p.max(axis, keepdims=True)
            log_p = log_p - top - np.log(np.exp(log_p - top).sum(axis, keepdims=True))
    p = np.exp(log_p)
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(H):
            for i in range(n):
                sk = np.einsum("j,jsd->sd", p[bi, h, i], kb[bi, :, :, h])
                sv = np.einsum("j,jsd->sd", p[bi, h, i], vb[bi, :, :, h])
                keys = np.concatenate([kb[bi, i, :, h], sk])
                vals = np.concatenate([vb[bi, i, :, h], sv])
                ok = np.concatenate([km[bi, i] > 0, p[bi, h, i] @ km[bi] > 0])
                rows = slice(i * BLOCK, (i + 1) * BLOCK)
                scores = q[bi, rows, h] @ keys.T / np.sqrt(D)
                out[bi, rows, h] = masked_softmax(scores, ok[None]) @ vals
    return out


def test_soft_mode_matches_blockwise_reference_and_ignores_padding():
    q, k, v, mask = data((64, 37), seed=4)
    out = np.asarray(forward(False)(q, k, v, mask))
    want = numpy_reference(make(), q, k, v, mask)
    real = np.asarray(mask)
    assert rel_err(out[real], want[real]) <= 1e-5
    pad = ~mask[:, :, None, None]
    noisy = [jnp.where(pad, 9.0 * jax.random.normal(jax.random.key(20 + i), q.shape), x)
             for i, x in enumerate((q, k, v))]
    out2 = np.asarray(forward(False)(*noisy, mask))
    np.testing.assert_allclose(out2[real], out[real], rtol=1e-5, atol=1e-6)
    assert np.isfinite(out2).all()


def test_gumbel_noise_only_with_rng():
    module, plain = make(gumbel=True), make()
    _, k, _, mask = data((64, 37))
    kb, key_mask = blocks(k, mask)
    p_eval, _ = module.sort_matrix(kb, key_mask)
    np.testing.assert_array_equal(np.asarray(p_eval), np.asarray(plain.sort_matrix(kb, key_mask)[0]))
    p1, _ = module.sort_matrix(kb, key_mask, jax.random.key(1))
    p2, _ = module.sort_matrix(kb, key_mask, jax.random.key(2))
    assert np.abs(np.asarray(p1) - np.asarray(p2)).max() > 1e-3


def test_softmax_sort_normalises_rows_only():
    # LRA code's sort: softmax over each row of the sort logits; not balanced over columns.
    module = make(sort="softmax", temperature=1.0)
    _, k, _, mask = data((64, 37))
    kb, key_mask = blocks(k, mask)
    p, _ = module.sort_matrix(kb, key_mask)
    p = np.asarray(p)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    assert np.abs(p.sum(-2) - 1.0).max() > 1e-2  # columns are not balanced
    balanced = np.asarray(make().sort_matrix(kb, key_mask)[0])
    assert np.abs(balanced.sum(-2) - 1.0).max() < np.abs(p.sum(-2) - 1.0).max()


def test_tiny_param_count_is_pinned():
    assert_tiny_params("sinkhorn", 29114)
