"""RetNet retention and GLA (models/attention/retnet.py): the chunkwise form that trains, the
recurrent form (a lax.scan) and float64 numpy references (RetNet's parallel form
O = (Q K^T . D) V; GLA's recurrence step by step) agree. Each reference sees the real tokens of a
row only (a padded row is a shorter sequence), so padding is checked on the way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import POS_TABLE, TINY_TRANSFORMER, assert_tiny_params, make_attention, np64, rel_err
import lra.models.attention.retnet  # noqa: F401 - registers retnet and gla
from lra.check import largest_intermediate, max_two_long_axes
from lra.models.attention.retnet import log_gammas

B, L, H, D = 2, 80, 3, 8        # L = 2.5 chunks of 32
E = H * D
LENGTHS = (L, L - 29)           # second row padded
MASK_BxL = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]
SETTINGS = {"retnet": dict(chunk_size=32), "gla": dict(chunk_size=32, sub_chunk=8)}


def make(kind: str, bidirectional: bool = True, length: int = L):
    return make_attention(kind, length, heads=H, head_dim=D, bidirectional=bidirectional,
                          **SETTINGS[kind])


@functools.cache
def build(kind: str, bidirectional: bool = True):
    """One module per (kind, direction) for the whole file: every build costs XLA compiles."""
    return make(kind, bidirectional)


def inputs(seed: int):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, L, H, D)).astype(np.float32) for _ in range(3))


@functools.partial(nnx.jit, static_argnames="form")
def retain(module, q, k, v, mask, form):
    return module.retain(q, k, v, mask, form=form)


@nnx.jit
def forward(module, q, k, v, mask):
    return module(q, k, v, mask)


# --- float64 references, one row's real tokens [T, H, D] at a time -----------------------------

def retention_parallel(q, k, v, bidirectional: bool) -> np.ndarray:
    """(Q K^T / sqrt(D) . D) V per head, D[n, m] = gamma_h^(n-m) (n >= m; bidirectional:
    gamma_h^|n-m|, the diagonal once)."""
    gamma_Hx1x1 = (1.0 - 2.0 ** (-5.0 - np.arange(H)))[:, None, None]
    gap_TxT = np.arange(len(q))[:, None] - np.arange(len(q))[None, :]
    decay_HxTxT = gamma_Hx1x1 ** np.abs(gap_TxT)
    if not bidirectional:
        decay_HxTxT = np.where(gap_TxT >= 0, decay_HxTxT, 0.0)
    scores_HxTxT = np.einsum("thd,shd->hts", np64(q), np64(k) / np.sqrt(D)) * decay_HxTxT
    return np.einsum("hts,shd->thd", scores_HxTxT, np64(v))


def gla_log_alpha(module, v_TxHxD) -> np.ndarray:
    """log alpha = log sigmoid(v W_1 W_2 + b) / tau, [T, H, D] in float64."""
    logits_TxE = (np64(v_TxHxD).reshape(-1, E) @ np64(module.decay_down.kernel[...])
                  @ np64(module.decay_up.kernel[...]) + np64(module.decay_up.bias[...]))
    return (-np.logaddexp(0.0, -logits_TxE) / module.cfg.gate_temperature).reshape(-1, H, D)


def gla_loop(q, k, alpha, v) -> np.ndarray:
    """S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t, per head, one step at a time."""
    s_HxDxD, out = np.zeros((H, D, D)), []
    for q_t, k_t, a_t, v_t in zip(q, k, alpha, v):
        s_HxDxD = a_t[:, :, None] * s_HxDxD + k_t[:, :, None] * v_t[:, None, :]
        out.append(np.einsum("hd,hde->he", q_t, s_HxDxD))
    return np.stack(out)


def gla_recurrent(module, q, k, v, bidirectional: bool) -> np.ndarray:
    """The causal loop (+ the loop over the reversed tokens, reversed back, the diagonal once)."""
    q, k, v = np64(q), np64(k) / np.sqrt(D), np64(v)
    alpha = np.exp(gla_log_alpha(module, v))
    out = gla_loop(q, k, alpha, v)
    if bidirectional:
        out += gla_loop(q[::-1], k[::-1], alpha[::-1], v[::-1])[::-1]
        out -= np.sum(q * k, -1, keepdims=True) * v
    return out


def norm_and_gate(module, o_TxHxD, v_TxHxD) -> np.ndarray:
    """GroupNorm per head (no affine) times swish(v W_G + b)."""
    centred = o_TxHxD - o_TxHxD.mean(-1, keepdims=True)
    y = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6)
    logits_TxE = np64(v_TxHxD).reshape(-1, E) @ np64(module.gate.kernel[...])
    if module.gate.bias is not None:
        logits_TxE = logits_TxE + np64(module.gate.bias[...])
    return y * (logits_TxE / (1.0 + np.exp(-logits_TxE))).reshape(-1, H, D)


def reference(kind, module, q, k, v, bidirectional):
    if kind == "retnet":
        return retention_parallel(q, k, v, bidirectional)
    return gla_recurrent(module, q, k, v, bidirectional)


# --- the forms agree ---------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("kind", ["retnet", "gla"])
def test_chunkwise_and_recurrent_equal_float64_reference(kind, bidirectional):
    """retnet: chunkwise == lax.scan recurrent == the parallel form; gla: chunkwise == lax.scan
    recurrent == the step loop; and the whole module == the reference's norm and gate."""
    module = build(kind, bidirectional)
    q, k, v = inputs(0)
    chunk = np.asarray(retain(module, q, k, v, MASK_BxL, "chunkwise"))
    recur = np.asarray(retain(module, q, k, v, MASK_BxL, "recurrent"))
    out = np.asarray(forward(module, q, k, v, MASK_BxL))
    for row, n in enumerate(LENGTHS):
        want = reference(kind, module, q[row, :n], k[row, :n], v[row, :n], bidirectional)
        assert rel_err(chunk[row, :n], want) <= 1e-5
        assert rel_err(recur[row, :n], want) <= 1e-5
        assert rel_err(chunk[row, :n], recur[row, :n]) <= 1e-5
        assert rel_err(out[row, :n], norm_and_gate(module, want, v[row, :n])) <= 1e-5
    if bidirectional:  # the anti-causal pass looks ahead: token 60 moves output 0
        moved = np.asarray(retain(module, q, k, v + 3.0 * (np.arange(L) == 60)[:, None, None],
                                  MASK_BxL, "chunkwise")) - chunk
        assert np.abs(moved[0, 0]).max() > 1e-6


def test_retnet_decays_follow_the_formula():
    np.testing.assert_allclose(np.exp(log_gammas(4)), [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128,
                                                       1 - 1 / 256], rtol=1e-14)
    # In the module: one key/value at position 0 (k = e_0 after its 1/sqrt(D) scale, v = e_0)
    # and q = e_0 everywhere read out gamma_h^n at position n, across chunk boundaries.
    module = build("retnet", False)
    unit_BxLxHxD = np.zeros((B, L, H, D), np.float32)
    unit_BxLxHxD[..., 0] = 1.0
    first = (np.arange(L) == 0)[None, :, None, None]
    out = np.asarray(retain(module, unit_BxLxHxD, unit_BxLxHxD * first * np.sqrt(D),
                            unit_BxLxHxD * first, np.ones((B, L), bool), "chunkwise"))
    gamma_H = 1.0 - 2.0 ** (-5.0 - np.arange(H))
    np.testing.assert_allclose(out[0, :, :, 0], gamma_H[None, :] ** np.arange(L)[:, None],
                               rtol=1e-5)


def test_gla_strong_decay_stays_exact():
    """Gates with log alpha down to -5 per step sum to far below -88 over a chunk: a form that
    divided by e^(b_j) would overflow float32; this one only exponentiates numbers <= 0."""
    module = make("gla")
    bias_E = np.random.default_rng(7).uniform(-80.0, 4.0, E).astype(np.float32)
    module.decay_up.bias[...] = jnp.asarray(bias_E)
    q, k, v = inputs(1)
    log_alpha = gla_log_alpha(module, v[0])
    assert log_alpha[:32].sum(0).min() < -100.0  # the case the test is about does occur
    chunk = np.asarray(retain(module, q, k, v, MASK_BxL, "chunkwise"))
    for row, n in enumerate(LENGTHS):
        want = gla_recurrent(module, q[row, :n], k[row, :n], v[row, :n], True)
        assert rel_err(chunk[row, :n], want) <= 1e-5
    grads = jax.jit(jax.grad(lambda v: jnp.sum(module.retain(q, k, v, MASK_BxL) ** 2)))(v)
    assert np.isfinite(np.asarray(grads)).all()


# --- padding, gradients, growth ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["retnet", "gla"])
def test_padding_changes_nothing_at_real_positions(kind):
    """Noise at padded positions leaves real outputs as they were, and the padded row equals the
    same tokens run alone (the anti-causal pass starts at the last real token)."""
    module = build(kind)
    q, k, v = inputs(2)
    out = np.asarray(forward(module, q, k, v, MASK_BxL))
    pad = ~MASK_BxL[:, :, None, None]
    noise = [50.0 * np.random.default_rng(3 + i).standard_normal(q.shape).astype(np.float32)
             for i in range(3)]
    noisy = np.asarray(forward(module, *(np.where(pad, z, x) for z, x in zip(noise, (q, k, v))),
                               MASK_BxL))
    assert np.abs(noisy - out)[MASK_BxL].max() <= 1e-6
    n = LENGTHS[1]
    alone = np.asarray(forward(module, q[1:, :n], k[1:, :n], v[1:, :n], np.ones((1, n), bool)))
    assert rel_err(out[1, :n], alone[0]) <= 1e-5


@pytest.mark.parametrize("kind", ["retnet", "gla"])
def test_gradients_finite_and_reach_every_parameter(kind):
    module = build(kind)
    q, k, v = inputs(4)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(q, k, v, params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(q, k, v, MASK_BxL) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, params)
    for g in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


@pytest.mark.parametrize("kind", ["retnet", "gla"])
def test_memory_grows_linearly(kind):
    """The largest fwd+bwd intermediate grows like L (traced, not run), no L x L array."""
    sizes = []
    for length in (256, 1024):
        module = make(kind, length=length)
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        x = jnp.zeros((B, length, H, D))
        mask = jnp.ones((B, length), bool)
        loss = lambda x, p: jnp.sum(nnx.merge(graphdef, p, rest)(x, x, x, mask) ** 2)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, params).jaxpr
        assert max_two_long_axes(jaxpr, length) is None
        sizes.append(largest_intermediate(jaxpr))
    assert np.log(sizes[1] / sizes[0]) / np.log(4) <= 1.02


def test_invalid_settings_fail_at_build():
    with pytest.raises(ValueError, match="sub_chunk"):
        make_attention("gla", L, chunk_size=30, sub_chunk=8)
    with pytest.raises(ValueError, match="chunk_size"):
        make_attention("retnet", L, chunk_size=0)


def test_retnet_tiny_param_count_is_pinned():
    # + the swish gate's W_G (32x32, no bias)
    assert_tiny_params("retnet", TINY_TRANSFORMER + 32 * 32 - POS_TABLE, positions=False)


def test_gla_tiny_param_count_is_pinned():
    # + its biased gate and the rank-16 decay gate (32x16, 16x32 + 32)
    assert_tiny_params("gla", TINY_TRANSFORMER + (32 * 32 + 32) + 32 * 16 + (16 * 32 + 32)
                              - POS_TABLE, positions=False)
