"""Performer FAVOR+: equals its explicit kernel form, converges to softmax as m grows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_TRANSFORMER, assert_tiny_params, dense_reference, make_attention, rel_err
from lra.models.attention.performer import (
    PerformerAttention,
    PerformerConfig,
    gaussian_orthogonal_matrix,
    gaussian_orthogonal_matrix_np,
)

B, H = 2, 2


def build(head_dim: int, length: int, seed: int = 0, **kwargs) -> PerformerAttention:
    return make_attention("performer", length, heads=H, head_dim=head_dim, rngs_seed=seed,
                          **kwargs)


def make_inputs(length: int, head_dim: int, seed: int = 0, scale: float = 1.0):
    # numpy draws: no per-shape XLA compiles, which dominate this file's run time on CPU.
    q, k, v = np.random.default_rng(seed).standard_normal((3, B, length, H, head_dim),
                                                         dtype=np.float32)
    return jnp.asarray(q * scale), jnp.asarray(k * scale), jnp.asarray(v)


@nnx.jit
def run(module: PerformerAttention, q, k, v, mask, rng):
    return module(q, k, v, mask, rng=rng)


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_equals_explicit_kernel_form(eps):
    """phi(Q) phi(K)^T over real keys, row-normalised, phi from the paper's formula in float64:
    phi(x) = (exp(w.x - |x|^2/2 - stab) + eps) / sqrt(m), stab = per-row max (queries) or
    per-(batch, head) max over real keys (keys). With eps = 0 the stabilisers cancel; a large
    eps checks that the linear-time path applies the additive constant exactly."""
    length, dim = 64, 8
    module = build(dim, length, num_features=32, eps=eps)
    q, k, v = make_inputs(length, dim)
    mask = jnp.arange(length)[None, :] < jnp.array([length, length - 19])[:, None]
    out = np.asarray(run(module, q, k, v, mask, None))

    w = np.asarray(module.proj_KxD[...], np.float64)
    m = w.shape[0]
    keep = np.asarray(mask)[:, :, None, None]  # [B, L, 1, 1]

    def log_phi(x):
        x = np.asarray(x, np.float64) * dim ** -0.25
        return x @ w.T - 0.5 * np.sum(x ** 2, -1, keepdims=True)  # [B, L, H, m]

    lq, lk = log_phi(q), log_phi(k)
    stab_q = lq.max(-1, keepdims=True)
    stab_k = np.where(keep, lk, -np.inf).max(axis=(1, 3), keepdims=True)
    phi_q = (np.exp(lq - stab_q) + eps) / np.sqrt(m)
    phi_k = np.where(keep, (np.exp(np.minimum(lk - stab_k, 0.0)) + eps) / np.sqrt(m), 0.0)
    kernel_BxHxLxL = np.einsum("blhm,bnhm->bhln", phi_q, phi_k)
    probs = kernel_BxHxLxL / kernel_BxHxLxL.sum(-1, keepdims=True)
    ref = np.einsum("bhln,bnhd->blhd", probs, np.asarray(v, np.float64))
    real = np.asarray(mask)
    assert rel_err(out[real], ref[real]) <= 1e-5


def test_error_to_softmax_decreases_with_num_features():
    length, dim = 64, 16
    mask = jnp.ones((B, length), bool)
    mean_errors = []
    for num_features in (16, 256, 2048):
        errors = []
        for seed in range(3):
            module = build(dim, length, seed=seed, num_features=num_features)
            q, k, v = make_inputs(length, dim, seed=100 + seed, scale=0.5)
            out = np.asarray(run(module, q, k, v, mask, None))
            errors.append(rel_err(out, dense_reference(q, k, v)))
        mean_errors.append(np.mean(errors))
    # Monte-Carlo error ~ 1/sqrt(m): strictly decreasing, small at m=2048 (~0.055 measured),
    # and well over 3x smaller than at m=16 (sqrt(128) ~ 11 in theory; ~7 measured).
    assert mean_errors[0] > mean_errors[1] > mean_errors[2], mean_errors
    assert mean_errors[2] < 0.1, mean_errors
    assert mean_errors[0] > 3 * mean_errors[2], mean_errors


def test_projection_rows_orthogonal_within_blocks_with_chi_norms():
    dim, rows = 8, 20  # two full blocks and a partial one
    for w in (gaussian_orthogonal_matrix(jax.random.key(3), rows, dim),  # redraw path
              gaussian_orthogonal_matrix_np(3, rows, dim)):  # fixed-buffer path
        w = np.asarray(w, np.float64)
        assert w.shape == (rows, dim)
        for start in range(0, rows, dim):
            block = w[start:start + dim]
            gram = block @ block.T
            np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-5)
        norms = np.linalg.norm(w, axis=1)
        assert np.all(norms > 0) and not np.allclose(norms, norms[0])  # chi norms, not fixed


def test_projection_rows_are_standard_gaussian_marginally():
    # Each row is N(0, I_D) marginally: E[w w^T] = I over many draws (chi norm x Haar rows).
    dim = 4
    w = gaussian_orthogonal_matrix_np(11, 40000, dim).astype(np.float64)
    np.testing.assert_allclose(w.T @ w / w.shape[0], np.eye(dim), atol=0.03)


def test_redraw_uses_rng_only_when_enabled():
    length, dim = 32, 8
    redraw = build(dim, length, num_features=20, redraw=True)
    fixed = build(dim, length, num_features=20, redraw=False)
    rng, other = jax.random.key(7), jax.random.key(8)
    # The fixed module ignores rng; the redrawing one draws per rng, deterministically.
    np.testing.assert_array_equal(np.asarray(fixed.projection(rng)),
                                  np.asarray(fixed.proj_KxD[...]))
    drawn = np.asarray(redraw.projection(rng))
    np.testing.assert_array_equal(np.asarray(redraw.projection(rng)), drawn)
    assert not np.allclose(np.asarray(redraw.projection(other)), drawn)
    assert not np.allclose(np.asarray(redraw.proj_KxD[...]), drawn)
    # And the output follows the draw: training step (rng) differs from evaluation (None).
    q, k, v = make_inputs(length, dim)
    mask = jnp.ones((B, length), bool)
    # (eager: the draw's ops are already compiled above; jit would recompile the PRNG)
    assert not np.allclose(np.asarray(redraw(q, k, v, mask, rng=rng)),
                           np.asarray(redraw(q, k, v, mask)))


def test_large_inputs_stay_finite():
    length, dim = 32, 8
    q, k, v = make_inputs(length, dim, scale=30.0)  # exp(w.x) alone would overflow float32
    mask = jnp.arange(length)[None, :] < jnp.array([length, 5])[:, None]
    module = build(dim, length, num_features=16)
    loss = lambda q, k: jnp.sum(module(q, k, v, mask))
    out, grads = jax.jit(jax.value_and_grad(loss, (0, 1)))(q, k)
    assert np.isfinite(np.asarray(out)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_gram_schmidt_q_is_the_sign_fixed_qr_and_calls_no_lapack():
    from lra.models.attention.performer import gram_schmidt_q

    a = np.random.default_rng(0).standard_normal((3, 64, 64))
    q, r = np.linalg.qr(a)
    expected = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    got = np.asarray(gram_schmidt_q(jnp.asarray(a, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    np.testing.assert_allclose(np.swapaxes(got, 1, 2) @ got, np.broadcast_to(np.eye(64), got.shape),
                               atol=1e-5)
    # The per-step redraw stays clear of jaxlib's CPU LAPACK custom calls (they deadlock XLA's
    # intra-op pool when two run at once, see gram_schmidt_q).
    hlo = jax.jit(lambda key: gaussian_orthogonal_matrix(key, 256, 64)).lower(
        jax.random.key(0)).as_text()
    assert "lapack" not in hlo.lower() and "custom_call" not in hlo


def relu_reference_np(q, k, v, mask, kernel_eps: float) -> np.ndarray:
    """Explicit O(L^2) generalized attention in float64: A_ij = phi(q_i).phi(k_j) over real keys
    j, phi(x) = relu(x) + kernel_eps, row-normalised, times V."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    phi_q, phi_k = np.maximum(q, 0.0) + kernel_eps, np.maximum(k, 0.0) + kernel_eps
    kernel_BxHxLxL = np.einsum("blhd,bnhd->bhln", phi_q, phi_k)
    kernel_BxHxLxL = kernel_BxHxLxL * np.asarray(mask)[:, None, None, :]
    probs = kernel_BxHxLxL / kernel_BxHxLxL.sum(-1, keepdims=True)
    return np.einsum("bhln,bnhd->blhd", probs, v)


@pytest.mark.parametrize("kernel_eps", [1e-3, 0.5])
def test_relu_kernel_equals_explicit_form_values_and_grads(kernel_eps):
    length, dim = 48, 8
    # redraw and num_features are unused by the deterministic relu map: rng changes nothing.
    module = build(dim, length, kernel="relu", kernel_eps=kernel_eps, num_features=3)
    q, k, v = make_inputs(length, dim)
    mask = jnp.arange(length)[None, :] < jnp.array([length, length - 13])[:, None]
    real = np.asarray(mask)
    out = np.asarray(run(module, q, k, v, mask, jax.random.key(0)))
    np.testing.assert_array_equal(out, np.asarray(run(module, q, k, v, mask, None)))
    ref = relu_reference_np(q, k, v, mask, kernel_eps)
    assert rel_err(out[real], ref[real]) <= 1e-5  # ~2e-7 measured

    # Gradients of a loss over real query rows, against the same explicit form in float64 jax.
    weight = np.random.default_rng(5).standard_normal(out.shape) * real[:, :, None, None]

    def loss_module(q, k, v):
        return jnp.sum(module(q, k, v, mask) * weight)

    def loss_ref(q, k, v):
        phi_q, phi_k = jax.nn.relu(q) + kernel_eps, jax.nn.relu(k) + kernel_eps
        kernel = jnp.einsum("blhd,bnhd->bhln", phi_q, phi_k) * mask[:, None, None, :]
        probs = kernel / kernel.sum(-1, keepdims=True)
        return jnp.sum(jnp.einsum("bhln,bnhd->blhd", probs, v) * weight)

    grads = jax.jit(jax.grad(loss_module, (0, 1, 2)))(q, k, v)
    with jax.enable_x64(True):
        grads_ref = jax.grad(loss_ref, (0, 1, 2))(
            *(jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)))
        grads_ref = [np.asarray(g) for g in grads_ref]
    for g, g_ref in zip(grads, grads_ref):
        g = np.asarray(g, np.float64)
        assert np.linalg.norm(g - g_ref) <= 1e-5 * np.linalg.norm(g_ref)  # ~2e-7 measured
    # Padded keys and values get no gradient: they are excluded.
    pad = ~real
    assert not np.asarray(grads[1])[pad].any() and not np.asarray(grads[2])[pad].any()


def test_relu_kernel_builds_no_projection():
    module = build(8, 16, kernel="relu")
    assert not hasattr(module, "proj_KxD") and module.projection(jax.random.key(0)) is None
    assert not jax.tree.leaves(nnx.state(module))


def test_kernel_defaults_to_softmax():  # an unknown kernel: test_attention.CONFIG_CASES
    cfg = PerformerConfig()
    assert cfg.kernel == "softmax" and cfg.kernel_eps == 1e-3
    assert build(8, 16).proj_KxD[...].shape == (cfg.num_features, 8)


def test_tiny_param_count_is_pinned():
    assert_tiny_params("performer", TINY_TRANSFORMER)
