"""Mamba-2 (models/attention/mamba2.py): SSD's chunked form that trains, the lax.scan recurrent
form and a float64 numpy loop of the paper's recurrence agree, in values and in gradients.

The reference sees the real tokens of a row only (a padded row is simply a shorter sequence) and
runs from the module's own fp32 parameters: projections and the conv vectorised, the SSM one step
at a time. Its gradients are central differences in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lra.models.attention.mamba2  # noqa: F401 - the module under test
from conftest import (POS_TABLE, TINY_TRANSFORMER, assert_tiny_params, make_attention, np64,
                      rel_err, silu)
from lra.models.attention.mamba2 import Mamba2Mixer
from lra.train.steps import param_groups

B, L, HEADS, D = 2, 80, 2, 8     # L = 2.5 chunks of 32
E = HEADS * D                    # K = 32: 4 SSD heads of P = 8, state N = 16
LENGTHS = (L, L - 29)            # second row padded; its 51 real tokens end inside chunk 2
MASK_BxL = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]
SETTINGS = dict(ssd_head_dim=8, state_dim=16, chunk_size=32)
NAMES = {"in_proj": "w_in", "out_proj": "w_out", "conv_kernel_CxWxX": "kernel",
         "conv_bias_CxX": "conv_bias", "dt_bias_CxH": "dt_bias", "a_log_CxH": "a_log",
         "d_CxH": "d", "norm_scale_K": "scale"}


@functools.cache
def build(bidirectional: bool):
    """One module per direction setting for the whole file: every build costs XLA compiles."""
    return make_attention(Mamba2Mixer, L, heads=HEADS, head_dim=D, bidirectional=bidirectional,
                          **SETTINGS)


@functools.partial(nnx.jit, static_argnames="form")
def forward(module, x_BxLxE, mask_BxL, form="chunked"):
    y_BxLxK, _ = module.ssm(x_BxLxE, mask_BxL, form)
    return y_BxLxK, module.mix(x_BxLxE, mask_BxL, form)


@functools.cache
def grad_fn(bidirectional: bool, form: str):
    """jit(d/d(params, x) sum(out * weights) over real positions), for `build(bidirectional)`'s
    graph (any parameter values)."""
    graphdef, _, rest = nnx.split(build(bidirectional), nnx.Param, ...)

    def loss(params, x_BxLxE, weights_BxLxE):
        out = nnx.merge(graphdef, params, rest).mix(x_BxLxE, jnp.asarray(MASK_BxL), form)
        return jnp.sum(jnp.where(MASK_BxL[:, :, None], out * weights_BxLxE, 0.0))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def make_input(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, L, E)).astype(np.float32)


def params64(module) -> dict:
    """The module's parameters in float64, by the reference's names."""
    return {NAMES[path[0]]: np64(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


# --- the float64 reference ---------------------------------------------------------------------

def loop_direction(p: dict, c: int, xbc_TxX: np.ndarray, dt_TxH: np.ndarray, heads: int,
                   state: int) -> np.ndarray:
    """Direction c over one row's tokens: u = SiLU(conv([x | B | C])), dt = softplus(dt + bias),
    then h_t = exp(dt_t A) h_{t-1} + B_t (dt_t x_t)^T, y_t = h_t^T C_t + D x_t step by step."""
    taps, length = p["kernel"].shape[1], len(xbc_TxX)
    padded = np.concatenate([np.zeros((taps - 1, xbc_TxX.shape[1])), xbc_TxX])
    u_TxX = silu(p["conv_bias"][c] + sum(p["kernel"][c, j] * padded[j:j + length]
                                         for j in range(taps)))
    k = u_TxX.shape[1] - 2 * state
    x_TxHxP = u_TxX[:, :k].reshape(length, heads, -1)
    b_TxN, c_TxN = u_TxX[:, k:k + state], u_TxX[:, k + state:]
    dt_TxH = np.logaddexp(0.0, dt_TxH + p["dt_bias"][c])
    a_H = -np.exp(p["a_log"][c])
    h_HxNxP, out = np.zeros((heads, state, x_TxHxP.shape[2])), []
    for t in range(length):
        h_HxNxP = (np.exp(dt_TxH[t] * a_H)[:, None, None] * h_HxNxP
                   + b_TxN[t][None, :, None] * (dt_TxH[t][:, None] * x_TxHxP[t])[:, None, :])
        out.append(np.einsum("hnp,n->hp", h_HxNxP, c_TxN[t]) + p["d"][c][:, None] * x_TxHxP[t])
    return np.stack(out).reshape(length, k)


def reference(p: dict, x_BxLxE: np.ndarray, bidirectional: bool, heads: int = 4,
              state: int = 16, lengths=LENGTHS) -> tuple[np.ndarray, np.ndarray]:
    """(y, out) per row over its real tokens: in-projection, the directions summed, RMSNorm of
    y * SiLU(z) times its scale, out-projection; zeros at padded positions."""
    k = p["w_out"].shape[0]
    y_BxLxK, out_BxLxE = np.zeros(x_BxLxE.shape[:2] + (k,)), np.zeros(x_BxLxE.shape)
    for row, n in enumerate(lengths):
        proj = np64(x_BxLxE[row, :n]) @ p["w_in"]
        z_TxK, xbc_TxX, dt_TxCxH = (proj[:, :k], proj[:, k:2 * k + 2 * state],
                                    proj[:, 2 * k + 2 * state:].reshape(n, -1, heads))
        y_TxK = loop_direction(p, 0, xbc_TxX, dt_TxCxH[:, 0], heads, state)
        if bidirectional:
            y_TxK += loop_direction(p, 1, xbc_TxX[::-1], dt_TxCxH[::-1, 1], heads, state)[::-1]
        gated_TxK = y_TxK * silu(z_TxK)
        normed_TxK = gated_TxK / np.sqrt((gated_TxK ** 2).mean(-1, keepdims=True) + 1e-5)
        y_BxLxK[row, :n], out_BxLxE[row, :n] = y_TxK, (normed_TxK * p["scale"]) @ p["w_out"]
    return y_BxLxK, out_BxLxE


def max_rel_err(got, want) -> float:
    """Largest |got - want| at real positions, relative to the largest |want| there."""
    got, want = np.asarray(got)[MASK_BxL], np.asarray(want)[MASK_BxL]
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
def test_chunked_and_recurrent_equal_float64_loop(bidirectional):
    """y (before the gate) and the output, both forms, at L = 2.5 chunks with a padded row."""
    module = build(bidirectional)
    x = make_input(0)
    want_y, want_out = reference(params64(module), x, bidirectional)
    for form in ("chunked", "recurrent"):
        y, out = forward(module, x, MASK_BxL, form)
        assert np.isfinite(np.asarray(out)).all()
        assert max_rel_err(y, want_y) <= 1e-5, form
        assert max_rel_err(out, want_out) <= 1e-5, form
        for row, n in enumerate(LENGTHS):
            assert rel_err(np.asarray(y)[row, :n], want_y[row, :n]) <= 1e-5
    if bidirectional:  # a planted bug the comparison must reject: the backward scan left out
        assert max_rel_err(forward(module, x, MASK_BxL)[0],
                           reference(params64(module), x, False)[0]) > 1e-2


def test_strong_decay_stays_exact():
    """dt A down to -96 per step sums to -3000 over a chunk of 32, far outside float32's exp
    range: a form that multiplied exp(b_i) by exp(-b_j) would overflow; this one exponentiates
    only numbers <= 0. Half the heads decay hard, half barely."""
    module = nnx.clone(build(True))
    module.dt_bias_CxH[...] = jnp.asarray(np.array([[6.0, -6.0, 4.0, -3.0]] * 2, np.float32))
    module.a_log_CxH[...] = jnp.log(jnp.full((2, 4), 16.0))
    x = make_input(1)
    p = params64(module)
    assert (np.log1p(np.exp(p["dt_bias"])) * 16.0).max() * SETTINGS["chunk_size"] > 3000.0
    want_y, want_out = reference(p, x, True)
    y, out = forward(module, x, MASK_BxL)
    assert max_rel_err(y, want_y) <= 1e-5 and max_rel_err(out, want_out) <= 1e-5
    g_params, g_x = grad_fn(True, "chunked")(nnx.state(module, nnx.Param), x, np.ones_like(x))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves((g_params, g_x)))


# --- gradients ---------------------------------------------------------------------------------

def central_difference(p: dict, x: np.ndarray, weights: np.ndarray, bidirectional: bool,
                       name: str | None, direction: np.ndarray, eps: float = 1e-5) -> float:
    """d/ds sum(out * weights) at (p, x) + s * direction on `name` (None: on x), float64."""
    def f(s):
        q = dict(p)
        if name is None:
            return np.sum(reference(q, x + s * direction, bidirectional)[1] * weights)
        q[name] = p[name] + s * direction
        return np.sum(reference(q, x, bidirectional)[1] * weights)
    return (f(eps) - f(-eps)) / (2 * eps)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_gradients_equal_float64_loop(bidirectional):
    """The chunked form's gradients == float64 central differences of the numpy loop:
    elementwise for A_log, dt_bias, D and the norm scale, along a random direction for the
    projections, the conv and the input; padded positions get no gradient."""
    module = build(bidirectional)
    x = make_input(2)
    weights = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    g_params, g_x = grad_fn(bidirectional, "chunked")(nnx.state(module, nnx.Param), x, weights)
    got = {NAMES[path[0]]: np64(g.get_value()) for path, g in nnx.to_flat_state(g_params)}
    got[None] = np64(g_x)
    for name, g in got.items():
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name  # every parameter used
    assert np.abs(got[None][~MASK_BxL]).max() == 0.0  # real outputs read no padding
    p, rng = params64(module), np.random.default_rng(6)
    for name in ("a_log", "dt_bias", "d", "scale"):
        fd = np.zeros_like(p[name])
        for index in np.ndindex(fd.shape):
            unit = np.zeros_like(fd)
            unit[index] = 1.0
            fd[index] = central_difference(p, x, weights, bidirectional, name, unit)
        assert rel_err(got[name], fd) <= 1e-5, name
    for name in ("w_in", "kernel", "conv_bias", "w_out", None):
        # Relative to the sum of the terms' sizes: a random direction's terms partly cancel.
        direction = rng.standard_normal(got[name].shape)
        terms = got[name] * direction
        fd = central_difference(p, x, weights, bidirectional, name, direction)
        assert abs(terms.sum() - fd) <= 1e-6 * np.abs(terms).sum(), name


# --- padding, direction, init, cost ------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
def test_padding_invariance_and_direction(bidirectional):
    """Noise at padded positions moves no real output (that a padded row equals its tokens run
    alone, the reference shows above); causal: token 40 moves outputs >= 40 only,
    bidirectional: earlier ones too."""
    module = build(bidirectional)
    x = make_input(3)
    out = np.asarray(forward(module, x, MASK_BxL)[1])
    noise = 50.0 * np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    noisy = np.asarray(forward(module, np.where(MASK_BxL[:, :, None], x, noise), MASK_BxL)[1])
    assert np.abs(noisy - out)[MASK_BxL].max() <= 1e-6 * np.abs(out).max()
    moved = np.abs(np.asarray(forward(module, x + 3.0 * (np.arange(L) == 40)[None, :, None],
                                      MASK_BxL)[1]) - out)
    assert moved[0, 40:].max() > 1e-3
    if bidirectional:
        assert moved[0, :40].max() > 1e-4
    else:
        assert moved[0, :40].max() == 0.0


def test_init_heads_and_parameter_count():
    module = build(True)
    cfg = module.cfg
    p = params64(module)
    assert module.ssd_heads == (4, 8)
    # A_h = -exp(A_log) ~ U[1, 16]: within the range and spread over it.
    a = np.exp(p["a_log"])
    assert a.min() >= cfg.a_init_min * (1 - 1e-6) and a.max() <= cfg.a_init_max * (1 + 1e-6)
    assert a.max() - a.min() > 5.0
    # softplus(dt_bias) is a log-uniform dt in [dt_min, dt_max].
    dt = np.logaddexp(0.0, p["dt_bias"])
    assert dt.min() >= cfg.dt_min * (1 - 1e-5) and dt.max() <= cfg.dt_max * (1 + 1e-5)
    assert np.log(dt).max() - np.log(dt).min() > 1.0
    np.testing.assert_array_equal(p["d"], 1.0)
    np.testing.assert_array_equal(p["scale"], 1.0)
    groups = {path[0]: label for path, label in nnx.to_flat_state(
        param_groups(nnx.state(module, nnx.Param)))}
    assert {k for k, label in groups.items() if label == "ssm"} == {"dt_bias_CxH", "a_log_CxH"}
    # Defaults at E = 32: K = 64, one head of P = 64, N = 64, both directions. Per layer:
    # E (2K + 2N + C H) + C (W + 1)(K + 2N) + 3 C H + K + K E = 8256 + 1920 + 6 + 64 + 2048.
    # (Shapes only: nnx.eval_shape allocates and compiles nothing.)
    paper = nnx.eval_shape(lambda: make_attention("mamba2", 64, heads=2, head_dim=16))
    assert paper.ssd_heads == (1, 64)
    count = sum(int(np.prod(v.get_value().shape))
                for _, v in nnx.to_flat_state(nnx.state(paper, nnx.Param)))
    assert count == 32 * (2 * 64 + 2 * 64 + 2) + 2 * 5 * (64 + 128) + 3 * 2 + 64 + 64 * 32 == 12294
    # ssd_head_dim = 0: P = expand * the encoder's head dim, H = the encoder's num_heads.
    assert nnx.eval_shape(lambda: make_attention("mamba2", 64, heads=4, head_dim=8,
                                                 ssd_head_dim=0)).ssd_heads == (4, 16)
    with pytest.raises(ValueError, match="ssd_head_dim=64 does not divide"):
        make_attention("mamba2", 64, heads=3, head_dim=8)
    with pytest.raises(ValueError, match="mamba2 needs"):
        make_attention("mamba2", 64, dt_min=0.2, dt_max=0.1)


def test_tiny_param_count_is_pinned():
    # mamba2 (K = 2E = 64, one head of P = 64, N = 64, 4 taps, 2 directions C): in E x (2K + 2N +
    # CH), per direction conv (W + 1)(K + 2N), A_log, dt_bias, D per head; norm scale K; out K x
    # E.
    assert_tiny_params("mamba2", TINY_TRANSFORMER - 4 * (32 * 32 + 32)
                                 + 32 * (2 * 64 + 2 * 64 + 2) + 2 * 5 * (64 + 128) + 3 * 2 + 64
                                 + 64 * 32 - POS_TABLE, positions=False)
