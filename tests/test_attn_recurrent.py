"""Recurrent / state-space mixers (lstm, s4d, lru) against step-by-step loops of the same math.

Each reference runs a plain Python loop over the real tokens of each row only (a padded row is
simply a shorter sequence), in float64 from the module's own fp32 parameters.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import POS_TABLE, TINY_TRANSFORMER, assert_tiny_params, make_attention, np64
from lra.models.attention.lru import LRUMixer
from lra.models.attention.lstm import LSTMMixer
from lra.models.attention.s4d import S4DMixer

B, L, H, D = 2, 96, 2, 8
E = H * D
LENGTHS = (L, L - 29)  # second row padded
MASK_BxL = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]


def make_input(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, L, H, D)).astype(np.float32)


@functools.cache
def build(cls, bidirectional: bool):
    """One module per (kind, direction) for the whole file: every build costs XLA compiles."""
    return make_attention(cls, L, heads=H, head_dim=D, bidirectional=bidirectional)


@nnx.jit
def mix(module, v_BxLxHxD, mask_BxL):
    return module(v_BxLxHxD, v_BxLxHxD, v_BxLxHxD, mask_BxL)


def run(module, v_BxLxHxD) -> np.ndarray:
    return np.asarray(mix(module, v_BxLxHxD, MASK_BxL)).reshape(B, L, E)


def assert_real_close(got_BxLxE, want_BxLxE, rtol):
    """Elementwise rtol at real positions, atol the same fraction of the output's scale."""
    for row, n in enumerate(LENGTHS):
        got, want = got_BxLxE[row, :n], want_BxLxE[row, :n]
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def as_complex(x_Nx2) -> np.ndarray:
    """[..., 2] (re, im) parameter -> complex128."""
    return np64(x_Nx2[..., 0]) + 1j * np64(x_Nx2[..., 1])


def reference(loop, u_BxLxE: np.ndarray, bidirectional: bool, skip_E: np.ndarray) -> np.ndarray:
    """Per row: loop(u, 0) forward over the real tokens (+ loop(reversed u, 1) reversed) + D u."""
    want = np.zeros(u_BxLxE.shape, np.float64)
    for row, n in enumerate(LENGTHS):
        u_TxE = np64(u_BxLxE[row, :n])
        y_TxE = loop(u_TxE, 0)
        if bidirectional:
            y_TxE = y_TxE + loop(u_TxE[::-1], 1)[::-1]
        want[row, :n] = y_TxE + skip_E * u_TxE
    return want


# --- LSTM -------------------------------------------------------------------------------------

def loop_lstm(module, direction: int, x_TxE: np.ndarray) -> np.ndarray:
    """Textbook LSTM, one step at a time: gates = [x_t, h_{t-1}] @ [W_x; W_h] + b."""
    w_x = np64(module.w_x_CxEx4K[...])[direction]
    w_h = np64(module.w_h_CxKx4K[...])[direction]
    bias = np64(module.bias_Cx4K[...])[direction]
    k = w_h.shape[0]
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
    h, c, out = np.zeros(k), np.zeros(k), []
    for x_t in x_TxE:
        gates = np.concatenate([x_t, h]) @ np.concatenate([w_x, w_h]) + bias
        i, f, g, o = gates[:k], gates[k:2 * k], gates[2 * k:3 * k], gates[3 * k:]
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        out.append(h)
    return np.stack(out)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_lstm_scan_equals_python_loop(bidirectional):
    module = build(LSTMMixer, bidirectional)
    v = make_input(0)
    got = run(module, v)
    # Concatenation, not a sum: direction 1 (backward) fills the second half of the features.
    lift = [np.eye(E // 2, E, 0), np.eye(E // 2, E, E // 2)] if bidirectional else [np.eye(E)]
    loop = lambda u_TxE, i: loop_lstm(module, i, u_TxE) @ lift[i]
    want = reference(loop, v.reshape(B, L, E), bidirectional, skip_E=np.zeros(E))
    assert got.shape == (B, L, E) and np.isfinite(got).all()
    assert_real_close(got, want, rtol=1e-5)
    if bidirectional:  # the backward half looks ahead: token 4 moves output 0, the forward half not
        moved = np.abs(run(module, v + 3.0 * (np.arange(L) == 4)[None, :, None, None])[0, 0]
                       - got[0, 0])
        assert moved[E // 2:].max() > 1e-4 and moved[:E // 2].max() == 0.0


def test_lstm_init_forget_bias_and_orthogonal_recurrence():
    module = build(LSTMMixer, True)
    k = E // 2
    assert module.hidden == k and module.w_x_CxEx4K.shape == (2, E, 4 * k)
    bias = np.asarray(module.bias_Cx4K[...])
    np.testing.assert_array_equal(bias[:, k:2 * k], 1.0)
    np.testing.assert_array_equal(np.delete(bias, np.s_[k:2 * k], axis=1), 0.0)
    for w_h_Kx4K in np.asarray(module.w_h_CxKx4K[...]):  # orthonormal rows per direction
        np.testing.assert_allclose(w_h_Kx4K @ w_h_Kx4K.T, np.eye(k), atol=1e-5)
    with pytest.raises(ValueError, match="even model.emb_dim"):
        make_attention(LSTMMixer, L, heads=1, head_dim=7)


# --- S4D --------------------------------------------------------------------------------------

def s4d_parameters(module):
    """(Abar [E,N], Bbar [E,N], C [dirs,E,N], D [E]) in complex128, straight from the paper."""
    dt = np.exp(np64(module.log_dt_E[...]))
    a = -np.exp(np64(module.log_a_real_ExN[...])) + 1j * np64(module.a_imag_ExN[...])
    abar = np.exp(dt[:, None] * a)
    bbar = (abar - 1.0) / a * 1.0  # ZOH with B = 1
    return abar, bbar, as_complex(module.c_CxExNx2[...]), np64(module.d_E[...])


def loop_ssm(abar, bbar, c, u_TxE) -> np.ndarray:
    """x_k = Abar x_{k-1} + Bbar u_k, y_k = 2 Re(C x_k), per channel, one step at a time."""
    x = np.zeros_like(abar)
    out = []
    for u_t in u_TxE:
        x = abar * x + bbar * u_t[:, None]
        out.append(2.0 * (c * x).sum(-1).real)
    return np.stack(out)


@nnx.jit
def s4d_outputs(module, u_BxLxE, mask_BxL):
    return module.ssm(u_BxLxE, mask_BxL), module.kernels(L)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_s4d_fft_conv_equals_recurrence(bidirectional):
    module = build(S4DMixer, bidirectional)
    v = make_input(1)
    u = v.reshape(B, L, E)
    got, _ = s4d_outputs(module, u, MASK_BxL)
    abar, bbar, c, d = s4d_parameters(module)
    want = reference(lambda u_TxE, i: loop_ssm(abar, bbar, c[i], u_TxE), u, bidirectional, d)
    assert_real_close(np.asarray(got), want, rtol=1e-4)
    # The full mixer is GELU then the output Linear on exactly that.
    gelu = np.asarray(jax.nn.gelu(jnp.asarray(want, jnp.float32)))
    post = gelu @ np.asarray(module.out.kernel[...]) + np.asarray(module.out.bias[...])
    assert_real_close(run(module, v), post, rtol=1e-4)


def test_s4d_kernel_matches_closed_form_and_init():
    module = build(S4DMixer, True)
    n = module.cfg.state_dim // 2
    np.testing.assert_allclose(np.asarray(module.a_imag_ExN[...])[3], math.pi * np.arange(n),
                               rtol=1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(module.log_a_real_ExN[...])), 0.5, rtol=1e-6)
    log_dt = np.asarray(module.log_dt_E[...])
    assert (log_dt >= math.log(1e-3)).all() and (log_dt <= math.log(1e-1)).all()
    assert log_dt.std() > 0.3  # spread over the range, not one value
    abar, bbar, c, _ = s4d_parameters(module)
    # K[l] = 2 Re(sum_n C_n (exp(dt A_n) - 1) / A_n B_n exp(dt A_n l)), by powers of Abar.
    want = 2.0 * np.einsum("cen,enl->cel", c * bbar, abar[:, :, None] ** np.arange(L)).real
    _, got = s4d_outputs(module, make_input(1).reshape(B, L, E), MASK_BxL)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# --- LRU --------------------------------------------------------------------------------------

def lru_parameters(module):
    """(lambda [N], gamma * B [N, E], C [dirs, E, N], D [E]) in complex128 / float64."""
    lam = np.exp(-np.exp(np64(module.nu_log_N[...])) + 1j * np.exp(np64(module.theta_log_N[...])))
    b_in = np.exp(np64(module.gamma_log_N[...]))[:, None] * as_complex(module.b_NxEx2[...])
    return lam, b_in, as_complex(module.c_CxExNx2[...]), np64(module.d_E[...])


def loop_lru(lam, b_in, c, u_TxE) -> np.ndarray:
    """x_k = lambda x_{k-1} + gamma B u_k (gamma folded into b_in), y_k = Re(C x_k)."""
    x = np.zeros_like(lam)
    out = []
    for u_t in u_TxE:
        x = lam * x + b_in @ u_t
        out.append((c @ x).real)
    return np.stack(out)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_lru_associative_scan_equals_loop(bidirectional):
    module = build(LRUMixer, bidirectional)
    v = make_input(2)
    lam, b_in, c, d = lru_parameters(module)
    loop = lambda u_TxE, i: loop_lru(lam, b_in, c[i], u_TxE)
    want = reference(loop, v.reshape(B, L, E), bidirectional, d)
    assert_real_close(run(module, v), want, rtol=1e-5)


@nnx.jit
def lru_states_both_ways(module, u_BxLxE):
    """(associative, sequential lax.scan) states, forward then backward, from the same inputs."""
    bu_BxLxN = module.inputs(u_BxLxE)
    lam_N = module.lam()

    def step(x_BxN, bu_BxN):
        x_BxN = lam_N * x_BxN + bu_BxN
        return x_BxN, x_BxN

    assoc = [module.states(bu_BxLxN), module.states(bu_BxLxN[:, ::-1])[:, ::-1]]
    seq = []
    for reverse in (False, True):
        _, x_LxBxN = jax.lax.scan(step, jnp.zeros_like(bu_BxLxN[:, 0]),
                                  bu_BxLxN.transpose(1, 0, 2), reverse=reverse)
        seq.append(x_LxBxN.transpose(1, 0, 2))
    return assoc, seq


def test_lru_associative_scan_equals_sequential_lax_scan():
    """In fp32 both ways: the associative scan agrees with a sequential jax.lax.scan."""
    assoc, seq = lru_states_both_ways(build(LRUMixer, True), make_input(3).reshape(B, L, E))
    for got, want in zip(assoc, seq):
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # Forward state 0 holds only token 0; backward state 0 holds the whole sequence.
    assert np.abs(np.asarray(assoc[0])[:, 0] - np.asarray(assoc[1])[:, 0]).max() > 1e-3


def test_lru_ring_init_and_normalisation():
    module = build(LRUMixer, True)
    cfg = module.cfg
    lam, _, _, _ = lru_parameters(module)
    radius, phase = np.abs(lam), np.exp(np.asarray(module.theta_log_N[...]))
    assert (radius >= cfg.r_min - 1e-6).all() and (radius <= cfg.r_max + 1e-6).all()
    assert (phase >= 0).all() and (phase <= cfg.max_phase).all()
    assert radius.std() > 0.01 and phase.std() > 0.5  # spread over the ring, not one point
    gamma = np.exp(np.asarray(module.gamma_log_N[...]))
    np.testing.assert_allclose(gamma, np.sqrt(1.0 - radius ** 2), rtol=1e-3)


def test_lstm_tiny_param_count_is_pinned():
    # A mixer replaces the 4 projections (fnet's count) with its own weights; E = 32, 1 layer. 2
    # directions x (W_x 32x64 + W_h 16x64 + bias 64), hidden 16 each.
    assert_tiny_params("lstm", TINY_TRANSFORMER - 4 * (32 * 32 + 32)
                               + 2 * (32 * 64 + 16 * 64 + 64) - POS_TABLE, positions=False)


def test_s4d_tiny_param_count_is_pinned():
    # A mixer replaces the 4 projections (fnet's count) with its own weights; E = 32, 1 layer. N/2
    # = 32; log_dt 32 + A re, im 2x32x32 + C 2 dirs x32x32 x (re, im) + D 32 + Linear 32x32+32.
    assert_tiny_params("s4d", TINY_TRANSFORMER - 4 * (32 * 32 + 32) + 32 + 2 * 32 * 32
                              + 2 * 32 * 32 * 2 + 32 + 32 * 32 + 32
                              - POS_TABLE, positions=False)


def test_lru_tiny_param_count_is_pinned():
    # A mixer replaces the 4 projections (fnet's count) with its own weights; E = 32, 1 layer. N =
    # 128; nu, theta, gamma 3x128 + B 128x32 x (re, im) + C 2 dirs x32x128 x (re, im) + D 32.
    assert_tiny_params("lru", TINY_TRANSFORMER - 4 * (32 * 32 + 32) + 3 * 128 + 128 * 32 * 2
                              + 2 * 32 * 128 * 2 + 32 - POS_TABLE, positions=False)
