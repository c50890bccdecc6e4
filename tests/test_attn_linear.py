"""Linear Transformer attention: the O(L) factorisation equals the explicit L x L kernel form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from conftest import TINY_TRANSFORMER, assert_tiny_params, make_attention, rel_err

B, L, H, D = 2, 64, 2, 8


def make_inputs(seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, (B, L, H, D)) for key in (kq, kk, kv))
    mask_BxL = jnp.arange(L)[None, :] < jnp.array([L, L - 21])[:, None]
    return q, k, v, mask_BxL


def explicit_kernel_attention(q, k, v, mask_BxL, eps):
    """Test-only: A_ij = phi(q_i).phi(k_j) over real keys, rows normalised, in float64."""
    phi = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))  # elu(x) + 1
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    kernel_BxHxLxL = np.einsum("blhd,bmhd->bhlm", phi(q), phi(k))
    kernel_BxHxLxL = kernel_BxHxLxL * np.asarray(mask_BxL)[:, None, None, :]
    numer_BxLxHxD = np.einsum("bhlm,bmhd->blhd", kernel_BxHxLxL, v)
    denom_BxLxH = np.transpose(kernel_BxHxLxL.sum(-1), (0, 2, 1))
    return numer_BxLxHxD / (denom_BxLxH[..., None] + eps)


def test_equals_explicit_kernel_form():
    q, k, v, mask = make_inputs()
    module = make_attention("linear", L, heads=H, head_dim=D)
    out = np.asarray(module(q, k, v, mask))
    ref = explicit_kernel_attention(q, k, v, mask, module.cfg.eps)
    real = np.asarray(mask)
    assert rel_err(out[real], ref[real]) <= 1e-5


def test_all_padding_sequence_is_finite_zero():
    q, k, v, _ = make_inputs(1)
    mask = jnp.zeros((B, L), bool)
    module = make_attention("linear", L, heads=H, head_dim=D)
    out = np.asarray(module(q, k, v, mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_tiny_param_count_is_pinned():
    assert_tiny_params("linear", TINY_TRANSFORMER)
