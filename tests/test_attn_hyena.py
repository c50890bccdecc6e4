"""Hyena (order 2) against direct O(L^2) convolutions written out in float64 numpy.

The whole-operator reference rebuilds everything from the module's fp32 parameters and the
paper's formulas (positional features, sine FFN, exponential window, causal short conv, the
order-2 recurrence) and runs each row on its real tokens only: a padded row is simply a
shorter sequence.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lra.models.attention.hyena  # noqa: F401  (registers the kind until it is a built-in)
from conftest import POS_TABLE, TINY_TRANSFORMER, assert_tiny_params, make_attention, np64
from lra.models.attention.base import SSMParam
from lra.models.attention.hyena import HyenaMixer, long_conv

B, L, H, D = 2, 64, 2, 8
E = H * D
LENGTHS = (L, L - 23)  # second row padded
MASK_BxL = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]
DIRECTIONS = pytest.mark.parametrize("bidirectional", [True, False],
                                     ids=["bidirectional", "causal"])


@functools.cache
def build(bidirectional: bool) -> HyenaMixer:
    return make_attention(HyenaMixer, L, heads=H, head_dim=D, bidirectional=bidirectional)


@nnx.jit
def mix(module, v_BxLxHxD, mask_BxL):
    return module(v_BxLxHxD, v_BxLxHxD, v_BxLxHxD, mask_BxL)


def run(module, x_BxLxE, mask_BxL=MASK_BxL) -> np.ndarray:
    b, length, _ = x_BxLxE.shape
    return np.asarray(mix(module, jnp.asarray(x_BxLxE).reshape(b, length, H, D), mask_BxL)
                      ).reshape(b, length, E)


def make_input(seed: int, length: int = L) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, length, E)).astype(np.float32)


def assert_close(got, want, rtol=1e-5):
    """Elementwise rtol, atol the same fraction of the reference's scale."""
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# --- references -------------------------------------------------------------------------------

def direct_conv(z_TxE: np.ndarray, h_CxTxE: np.ndarray, d_E: np.ndarray) -> np.ndarray:
    """y_t = sum_{s <= t} h_fwd[t - s] z_s (+ sum_{s >= t} h_bwd[s - t] z_s) + d z_t: the
    explicit O(T^2) sum, one output position at a time."""
    length = len(z_TxE)
    y_TxE = d_E * z_TxE
    for t in range(length):
        y_TxE[t] += np.einsum("se,se->e", h_CxTxE[0, t::-1], z_TxE[:t + 1])
        if len(h_CxTxE) == 2:
            y_TxE[t] += np.einsum("se,se->e", h_CxTxE[1, :length - t], z_TxE[t:])
    return y_TxE


def reference_filters(module: HyenaMixer, length: int) -> np.ndarray:
    """h [C, 2, T, E] from the paper: window(t) * FFN(PosEnc(t)), float64."""
    cfg, max_len = module.cfg, module.max_len
    lag = np.arange(length, dtype=np.float64)
    t = lag / (max_len - 1)
    bands = (cfg.emb_dim - 1) // 2
    freqs = np.linspace(1e-4, bands - 1, bands)
    angle = 2 * math.pi * np.outer(lag / max_len, freqs)
    features = np.concatenate([t[:, None], np.cos(angle), -np.sin(angle)], axis=1)
    w = np64(module.sine_freq_K[...])
    hidden = np.sin(w * (features @ np64(module.ffn_in_xK[...]) + np64(module.ffn_in_bias_K[...])))
    for i in range(2):
        hidden = np.sin(w * (hidden @ np64(module.ffn_hidden_2xKxK[...])[i]
                             + np64(module.ffn_hidden_bias_2xK[...])[i]))
    ffn_TxCx2xE = np.einsum("tk,kcoe->tcoe", hidden, np64(module.ffn_out_KxCx2xE[...]))
    # ExponentialModulation: alpha linear over channels from -ln(1e-2)/1.5 to -ln(1e-2)/0.3.
    alpha_E = np.linspace(-math.log(cfg.decay_target) / cfg.slow_decay,
                          -math.log(cfg.decay_target) / cfg.fast_decay, E)
    window_TxE = np.exp(-np.outer(t, alpha_E))
    return (ffn_TxCx2xE * window_TxE[:, None, None]).transpose(1, 2, 0, 3)


def reference_mixer(module: HyenaMixer, x_BxLxE: np.ndarray) -> np.ndarray:
    """Projections, causal 3-tap short conv, z = x2 * (h2 * (x1 * (h1 * v))), out Linear."""
    w_in, b_in = np64(module.in_proj.kernel[...]), np64(module.in_proj.bias[...])
    taps, tap_bias = np64(module.short_kernel_3x3E[...]), np64(module.short_bias_3E[...])
    w_out, b_out = np64(module.out.kernel[...]), np64(module.out.bias[...])
    d_2xE = np64(module.d_2xE[...])
    want = np.zeros(x_BxLxE.shape)
    for row, n in enumerate(LENGTHS):
        h_Cx2xTxE = reference_filters(module, n)
        u_Tx3E = np64(x_BxLxE[row, :n]) @ w_in + b_in
        conv_Tx3E = np.tile(tap_bias, (n, 1))
        for t in range(n):
            for j in range(3):
                if t - j >= 0:
                    conv_Tx3E[t] += taps[j] * u_Tx3E[t - j]
        v, x1, x2 = np.split(conv_Tx3E, 3, axis=1)
        z = x1 * direct_conv(v, h_Cx2xTxE[:, 0], d_2xE[0])
        z = x2 * direct_conv(z, h_Cx2xTxE[:, 1], d_2xE[1])
        want[row, :n] = z @ w_out + b_out
    return want


# --- tests ------------------------------------------------------------------------------------

@DIRECTIONS
def test_fft_conv_equals_direct_conv(bidirectional):
    rng = np.random.default_rng(0)
    directions = 2 if bidirectional else 1
    z_BxLxE = rng.standard_normal((B, L, E)).astype(np.float32)
    # No decay: every lag up to L - 1 counts, so a circular wrap-around would show.
    h_CxLxE = rng.standard_normal((directions, L, E)).astype(np.float32)
    d_E = rng.standard_normal(E).astype(np.float32)
    got = np.asarray(jax.jit(long_conv)(z_BxLxE, h_CxLxE, d_E))
    for row in range(B):
        want = direct_conv(np64(z_BxLxE[row]), np64(h_CxLxE), np64(d_E))
        assert_close(got[row], want)


@DIRECTIONS
def test_operator_equals_direct_implementation(bidirectional):
    module = build(bidirectional)
    x = make_input(1)
    got = run(module, x)
    want = reference_mixer(module, x)
    assert got.shape == (B, L, E) and np.isfinite(got).all()
    for row, n in enumerate(LENGTHS):
        assert_close(got[row, :n], want[row, :n])


@DIRECTIONS
def test_padding_invariance_and_no_shift(bidirectional):
    module = build(bidirectional)
    x = make_input(2)
    got = run(module, x)
    noisy = np.where(MASK_BxL[:, :, None], x, 50.0 * make_input(3))
    real = MASK_BxL
    np.testing.assert_array_equal(run(module, noisy)[real], got[real])
    # The padded row equals the same row cut to its real tokens: padding at the end does not
    # shift the backward direction's lags.
    n = LENGTHS[1]
    cut = run(module, x[:, :n], np.ones((B, n), bool))
    assert_close(cut[1], got[1, :n])


@DIRECTIONS
def test_direction_of_dependence(bidirectional):
    module = build(bidirectional)
    x = make_input(4)
    moved = np.abs(run(module, x + 3.0 * (np.arange(L) == 40)[None, :, None]) - run(module, x))
    scale = np.abs(run(module, x)).max()
    assert moved[:, 40:].max() > 1e-2 * scale
    if bidirectional:
        assert moved[:, :40].max() > 1e-3 * scale   # looks ahead
    else:
        assert moved[:, :40].max() < 1e-6 * scale   # causal: earlier outputs untouched


def test_filter_window_decays():
    module = make_attention(HyenaMixer, L, heads=H, head_dim=D)
    h_Cx2xLxE = np.asarray(module.filters(L))
    np.testing.assert_allclose(h_Cx2xLxE, reference_filters(module, L), rtol=1e-4,
                               atol=1e-5 * np.abs(h_Cx2xLxE).max())
    # At init, averaged over channels, |h| falls quarter by quarter, > 10x from first to last.
    quarters_Cx2x4 = np.abs(h_Cx2xLxE).reshape(2, 2, 4, L // 4, E).mean(axis=(3, 4))
    assert (np.diff(quarters_Cx2x4, axis=-1) < 0).all()
    assert (quarters_Cx2x4[..., -1] < 0.1 * quarters_Cx2x4[..., 0]).all()
    # With the FFN made position-blind (input weights 0), every channel's |h| decays strictly,
    # at its own rate alpha_e spread from slow (1% at 1.5 L) to fast (1% at 0.3 L).
    module.ffn_in_xK[...] = jnp.zeros_like(module.ffn_in_xK[...])
    flat_Cx2xLxE = np.abs(np64(module.filters(L)))
    assert (np.diff(flat_Cx2xLxE, axis=2) < 0).all()
    rate_Cx2xE = -np.log(flat_Cx2xLxE[:, :, -1] / flat_Cx2xLxE[:, :, 0])  # over t = 0 .. 1
    alpha_E = np.linspace(math.log(100) / 1.5, math.log(100) / 0.3, E)
    np.testing.assert_allclose(rate_Cx2xE, np.broadcast_to(alpha_E, rate_Cx2xE.shape), rtol=1e-4)


def test_gradients_finite_and_filter_in_ssm_group():
    module = build(True)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    x_BxLxHxD = jnp.asarray(make_input(5)).reshape(B, L, H, D)

    def loss(params, x):
        out = nnx.merge(graphdef, params, rest)(x, x, x, MASK_BxL)
        return jnp.sum(jnp.where(MASK_BxL[:, :, None, None], out, 0.0) ** 2)

    grads, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x_BxLxHxD)
    flat = {".".join(map(str, path)): np.asarray(g.get_value())
            for path, g in nnx.to_flat_state(grads)}
    assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in flat.values()), flat.keys()
    assert np.isfinite(np.asarray(dx)).all() and np.abs(np.asarray(dx)[1, LENGTHS[1]:]).max() == 0
    # The implicit filter trains as the reference's filter group (lr 1e-3, no decay).
    ssm = {".".join(map(str, p)) for p, v in nnx.to_flat_state(params) if isinstance(v, SSMParam)}
    assert ssm == {"ffn_in_xK", "ffn_in_bias_K", "ffn_hidden_2xKxK", "ffn_hidden_bias_2xK",
                   "ffn_out_KxCx2xE", "sine_freq_K"}


def test_bad_config_is_a_one_line_error():
    with pytest.raises(ValueError, match="odd emb_dim >= 3"):
        make_attention(HyenaMixer, L, heads=H, head_dim=D, emb_dim=4)


def test_tiny_param_count_is_pinned():
    # hyena (E = 32, filter FFN K = 64, 5 positional features, 2 filters x 2 directions): in
    # 32x96+96, short conv 3x96+96, FFN 5x64+64 + 2 x (64x64+64) + 64x(2x2x32), sine freq 64, skip
    # d 2x32, out 32x32+32.
    assert_tiny_params("hyena", TINY_TRANSFORMER - 4 * (32 * 32 + 32) + (32 * 96 + 96)
                                + (3 * 96 + 96) + (5 * 64 + 64) + 2 * (64 * 64 + 64)
                                + 64 * 2 * 2 * 32 + 64 + 2 * 32 + (32 * 32 + 32)
                                - POS_TABLE, positions=False)
