"""Mamba: the chunked-scan mixer against a step-by-step float64 loop of the paper's equations.

The reference runs a plain Python loop over the real tokens of each row only (a padded row is
simply a shorter sequence), from the module's own fp32 parameters.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lra.models.attention.mamba  # noqa: F401 - registers "mamba" until it is a built-in
from conftest import (POS_TABLE, TINY_TRANSFORMER, assert_tiny_params, make_attention, np64, silu,
                      softplus)
from lra import check, models
from lra.models.attention.mamba import MambaConfig, MambaMixer
from lra.models.config import ModelConfig
from lra.train.steps import param_groups

# The recurrent baselines' shapes and inputs: two rows of 96, the second padded by 29.
from test_attn_recurrent import B, D, E, H, L, LENGTHS, MASK_BxL, make_input  # noqa: E402


@functools.cache
def build(bidirectional: bool, chunk_size: int = 8):
    """One module per setting for the whole file: every build costs XLA compiles."""
    return make_attention(MambaMixer, L, heads=H, head_dim=D, bidirectional=bidirectional,
                          chunk_size=chunk_size)


@nnx.jit
def mix(module, v_BxLxHxD, mask_BxL):
    return module(v_BxLxHxD, v_BxLxHxD, v_BxLxHxD, mask_BxL)


def run(module, v_BxLxHxD, mask_BxL=MASK_BxL) -> np.ndarray:
    b, length = mask_BxL.shape
    return np.asarray(mix(module, v_BxLxHxD, mask_BxL)).reshape(b, length, E)


def loop_direction(module, c: int, x_TxK: np.ndarray) -> np.ndarray:
    """Direction c of the paper's selective SSM, one token at a time, in float64:
    u_t = SiLU(b + sum_j w_j x_{t-W+1+j}),  dt_t = softplus(u_t W_dt_in W_dt + dt_bias),
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,  y_t = C_t . h_t + D u_t."""
    kernel_WxK = np64(module.conv_kernel_CxWxK[...])[c]
    conv_bias_K = np64(module.conv_bias_CxK[...])[c]
    x_dt, x_b, x_c = (np64(p[...])[c] for p in (module.x_dt_CxKxR, module.x_b_CxKxN,
                                                module.x_c_CxKxN))
    dt_proj, dt_bias = np64(module.dt_proj_CxRxK[...])[c], np64(module.dt_bias_CxK[...])[c]
    a_KxN = -np.exp(np64(module.a_log_CxKxN[...])[c])
    d_K = np64(module.d_CxK[...])[c]
    taps = kernel_WxK.shape[0]
    h_KxN, out = np.zeros_like(a_KxN), []
    for t in range(len(x_TxK)):
        conv = conv_bias_K.copy()
        for j in range(taps):
            if t - taps + 1 + j >= 0:
                conv += kernel_WxK[j] * x_TxK[t - taps + 1 + j]
        u_K = silu(conv)
        dt_K = softplus(u_K @ x_dt @ dt_proj + dt_bias)
        b_N, c_N = u_K @ x_b, u_K @ x_c
        h_KxN = np.exp(dt_K[:, None] * a_KxN) * h_KxN + (dt_K * u_K)[:, None] * b_N[None, :]
        out.append(h_KxN @ c_N + d_K * u_K)
    return np.stack(out)


def reference(module, v_BxLxHxD: np.ndarray, bidirectional: bool) -> np.ndarray:
    """The whole mixer per row over its real tokens: in-proj, both directions summed, gate, out."""
    w_in, w_out = np64(module.in_proj.kernel[...]), np64(module.out_proj.kernel[...])
    k = w_out.shape[0]
    x_BxLxE = np64(v_BxLxHxD).reshape(B, L, E)
    want = np.zeros(x_BxLxE.shape)
    for row, n in enumerate(LENGTHS):
        xz_TxK2 = x_BxLxE[row, :n] @ w_in
        x_TxK, z_TxK = xz_TxK2[:, :k], xz_TxK2[:, k:]
        y_TxK = loop_direction(module, 0, x_TxK)
        if bidirectional:
            y_TxK = y_TxK + loop_direction(module, 1, x_TxK[::-1])[::-1]
        want[row, :n] = (y_TxK * silu(z_TxK)) @ w_out
    return want


def max_rel_err(got_BxLxE, want_BxLxE) -> float:
    """Largest |got - want| at real positions, relative to the output's scale."""
    real = MASK_BxL
    return float(np.abs(got_BxLxE[real] - want_BxLxE[real]).max() / np.abs(want_BxLxE[real]).max())


@pytest.mark.parametrize("bidirectional,chunk_size", [(True, 8), (False, 8), (True, 5), (False, 1)])
def test_chunked_scan_equals_sequential_loop(bidirectional, chunk_size):
    """Chunks of 8 divide L = 96; chunks of 5 pad the last one (and row 2's 67 real tokens end
    inside a chunk); chunks of 1 are the plain step-by-step scan."""
    module = build(bidirectional, chunk_size)
    v = make_input(0)
    got = run(module, v)
    want = reference(module, v, bidirectional)
    assert got.shape == (B, L, E) and np.isfinite(got).all()
    assert max_rel_err(got, want) <= 1e-5
    for row, n in enumerate(LENGTHS):  # elementwise too, atol the same fraction of the scale
        np.testing.assert_allclose(got[row, :n], want[row, :n], rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())
    if bidirectional:  # a planted bug the comparison must reject: the backward scan left out
        assert max_rel_err(got, reference(module, v, False)) > 1e-2


@pytest.mark.parametrize("bidirectional", [True, False])
def test_direction_of_information_flow(bidirectional):
    """Causal: token 40 moves outputs >= 40 only; bidirectional: the ones before it too."""
    module = build(bidirectional)
    v = make_input(1)
    moved = np.abs(run(module, v + 3.0 * (np.arange(L) == 40)[None, :, None, None]) - run(module, v))
    assert moved[0, 40:].max() > 1e-3
    if bidirectional:
        assert moved[0, :40].max() > 1e-4
    else:
        assert moved[0, :40].max() == 0.0


@pytest.mark.parametrize("bidirectional", [True, False])
def test_padding_invariance_and_truncation(bidirectional):
    """Noise at padded positions moves no real output, and a padded row equals the same tokens
    run alone, unpadded (the backward scan starts at the last real token)."""
    module = build(bidirectional)
    v = make_input(2)
    got = run(module, v)
    noise = 50.0 * np.random.default_rng(3).standard_normal(v.shape).astype(np.float32)
    noisy = np.where(MASK_BxL[:, :, None, None], v, noise)
    np.testing.assert_allclose(run(module, noisy)[MASK_BxL], got[MASK_BxL], rtol=1e-6, atol=1e-6)
    n = LENGTHS[1]
    alone = run(module, v[1:, :n], np.ones((1, n), bool))[0]
    np.testing.assert_allclose(got[1, :n], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())


def test_init_follows_the_paper():
    module = build(True)
    cfg = module.cfg
    k, n, r = cfg.expand * E, cfg.state_dim, math.ceil(E / 16)
    assert module.x_dt_CxKxR.shape == (2, k, r) and module.dt_proj_CxRxK.shape == (2, r, k)
    assert module.conv_kernel_CxWxK.shape == (2, cfg.d_conv, k)
    # S4D-Real: A_n = -(n + 1) in every channel and direction.
    a = -np.exp(np.asarray(module.a_log_CxKxN[...]))
    np.testing.assert_allclose(a, np.broadcast_to(-np.arange(1, n + 1), a.shape), rtol=1e-6)
    # softplus(dt_bias) is a log-uniform dt in [dt_min, dt_max], spread over the range.
    dt = softplus(np64(module.dt_bias_CxK[...]))
    assert dt.min() >= cfg.dt_min * (1 - 1e-5) and dt.max() <= cfg.dt_max * (1 + 1e-5)
    assert np.log(dt).std() > 0.8  # uniform on [log 1e-3, log 1e-1] has std 1.33
    np.testing.assert_array_equal(np.asarray(module.d_CxK[...]), 1.0)
    with pytest.raises(ValueError, match="mamba needs"):
        make_attention(MambaMixer, L, heads=H, head_dim=D, dt_min=0.2, dt_max=0.1)


def flat(state) -> dict:
    """path -> plain value (array or label) of an nnx.State."""
    return {path: v.get_value() if isinstance(v, nnx.Variable) else v
            for path, v in nnx.to_flat_state(state)}


def test_ssm_group_holds_a_log_and_dt_bias():
    """lra.train.steps.param_groups puts exactly A_log and dt_bias in the "ssm" group (train.ssm_lr,
    no weight decay) and D in "no_decay" (the base rate, no weight decay: the reference's
    D._no_weight_decay); the dt projection, B, C, conv and projections stay "default"."""
    spec = type("Spec", (), dict(vocab_size=20, num_classes=3, seq_len=64, kind="classify",
                                 default_pool="mean"))()
    cfg = ModelConfig(emb_dim=E, num_heads=H, num_layers=1, mlp_dim=16, attention=MambaConfig())
    _, params, _ = nnx.split(models.build(cfg, spec), nnx.Param, ...)
    labels = {path[-1] if path[-1] != "kernel" else path[-2]: label
              for path, label in flat(param_groups(params)).items() if "attn" in path}
    assert labels == {"a_log_CxKxN": "ssm", "dt_bias_CxK": "ssm", "dt_proj_CxRxK": "default",
                      "x_dt_CxKxR": "default", "x_b_CxKxN": "default", "x_c_CxKxN": "default",
                      "d_CxK": "no_decay", "conv_kernel_CxWxK": "default",
                      "conv_bias_CxK": "default", "in_proj": "default", "out_proj": "default"}


def test_gradients_finite_and_padding_gets_none():
    module = build(True)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    real = jnp.asarray(MASK_BxL)

    @jax.jit
    def grads(params, v):
        def loss(params, v):
            out = nnx.merge(graphdef, params, rest)(v, v, v, real)
            return jnp.sum(jnp.where(real[:, :, None, None], out, 0.0) ** 2)
        return jax.grad(loss, argnums=(0, 1))(params, v)

    g_params, g_v = grads(params, jnp.asarray(make_input(4)))
    leaves = flat(g_params)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves.values())
    assert all(np.abs(np.asarray(g)).max() > 0 for g in leaves.values())  # every parameter used
    g_v = np.asarray(g_v)
    assert np.isfinite(g_v).all() and np.abs(g_v[MASK_BxL]).max() > 0
    assert np.abs(g_v[~MASK_BxL]).max() == 0.0  # real outputs do not read padding


def test_cost_linear_in_length():
    """No L x L intermediate at L=1024; the largest fwd+bwd intermediate grows like L^1."""
    ok, detail = check.check_no_length_squared("mamba")
    assert ok, detail
    ok, detail = check.check_growth("mamba")
    exponent = float(re.match(r"L\^([0-9.]+)", detail).group(1))
    assert ok and 0.9 <= exponent <= 1.05, detail


def test_the_short_convs_hand_written_backward_equals_autodiff():
    """causal_depthwise_conv (mamba, mamba2, hawk, deltanet, based) has a custom VJP (XLA's
    fusion made autodiff's kernel gradient 6x slower than the input's): it must equal autodiff of
    the same sums, for x, kernel and bias, at a length the taps overhang."""
    from lra.models.attention.mamba import causal_depthwise_conv

    def plain(x, kernel, bias):
        taps, length = kernel.shape[1], x.shape[2]
        padded = jnp.pad(x, ((0, 0), (0, 0), (taps - 1, 0), (0, 0)))
        return bias[:, None, None, :] + sum(kernel[:, j][:, None, None, :] * padded[:, :, j:j + length]
                                            for j in range(taps))

    keys = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(keys[0], (2, 3, 7, 5))
    kernel, bias = jax.random.normal(keys[1], (2, 4, 5)), jax.random.normal(keys[2], (2, 5))
    weight = jax.random.normal(keys[3], (2, 3, 7, 5))
    loss = lambda f: lambda *a: jnp.sum(weight * jnp.tanh(f(*a)))
    np.testing.assert_allclose(causal_depthwise_conv(x, kernel, bias), plain(x, kernel, bias),
                               rtol=1e-6, atol=1e-6)
    for got, want in zip(jax.grad(loss(causal_depthwise_conv), argnums=(0, 1, 2))(x, kernel, bias),
                         jax.grad(loss(plain), argnums=(0, 1, 2))(x, kernel, bias)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tiny_param_count_is_pinned():
    # mamba (K = 2E = 64, N = 16, dt rank 2, 4 taps, 2 directions): in 32x128, out 64x32 (no
    # biases), per direction A_log, B, C KxN each, conv 4xK + K, D, dt bias K each, dt in Kx2 +
    # out 2xK.
    assert_tiny_params("mamba", TINY_TRANSFORMER - 4 * (32 * 32 + 32) + 32 * 128 + 64 * 32
                                + 2 * (3 * 64 * 16 + 4 * 64 + 64 + 64 + 64 + 64 * 2 + 2 * 64)
                                - POS_TABLE, positions=False)
