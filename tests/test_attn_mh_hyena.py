"""Multi-head Hyena (models/attention/mh_hyena.py) against direct convolution sums written out in
float64 numpy, in values and in gradients.

The reference rebuilds everything from the module's fp32 parameters and MAD's equations (tiled
in-projection, causal 3-tap short conv, PosEnc -> sine FFN -> exponential window filters, and per
head y_t = q_t^T (sum_s f[t - s] k_s v_s^T + d k_t v_t^T)), one output position at a time, and
runs each row on its real tokens only: a padded row is simply a shorter sequence. Its gradients
are central finite differences in float64 along random directions, per parameter array.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lra.models.attention.mh_hyena  # noqa: F401  (registers the kind until it is a built-in)
from conftest import (POS_TABLE, TINY_TRANSFORMER, assert_tiny_params, directional_errors,
                      make_attention, mixer_vjp, np64)
from lra.check import largest_intermediate, max_two_long_axes
from lra.models.attention.base import SSMParam
from lra.models.attention.mh_hyena import MHHyenaMixer

B, L, H, D = 2, 45, 2, 8          # L not a power of two: the FFT runs at length 90
E = H * D
LENGTHS = (L, 29)                 # second row padded
MASK_BxL = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]
DIRECTIONS = pytest.mark.parametrize("bidirectional", [True, False],
                                     ids=["bidirectional", "causal"])


@functools.cache
def build(bidirectional: bool) -> MHHyenaMixer:
    """One module per direction setting for the whole file: every build costs XLA compiles."""
    return make_attention(MHHyenaMixer, L, heads=H, head_dim=D, bidirectional=bidirectional)


def make_input(seed: int, length: int = L) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, length, E)).astype(np.float32)


@nnx.jit
def forward_and_grads(module, x_BxLxE, weight_BxLxE, mask_BxL):
    """(out, d/dparams, d/dx) of sum(weight * out) over real positions (conftest.mixer_vjp)."""
    return mixer_vjp(module, x_BxLxE, weight_BxLxE, mask_BxL)


@functools.cache
def outputs(bidirectional: bool):
    out, g_params, g_x = forward_and_grads(build(bidirectional), make_input(0), make_input(1),
                                           MASK_BxL)
    return np.asarray(out), {name: np.asarray(g) for name, g in g_params.items()}, np.asarray(g_x)


def run(module, x_BxLxE, mask_BxL=MASK_BxL) -> np.ndarray:
    return np.asarray(forward_and_grads(module, x_BxLxE, x_BxLxE, mask_BxL)[0])


# --- float64 reference -------------------------------------------------------------------------

def params64(module) -> dict[str, np.ndarray]:
    _, params, _ = nnx.split(module, nnx.Param, ...)
    return {".".join(map(str, path)): np64(v.get_value()) for path, v in nnx.to_flat_state(params)}


def reference_filters(p, n: int, max_len: int = L, emb_dim: int = 3) -> np.ndarray:
    """f [C, T, H]: window(t) * FFN(PosEnc(t)) at lags 0..n-1 (MAD's HyenaFilter), float64."""
    lag = np.arange(n, dtype=np.float64)
    t = lag / (max_len - 1)
    bands = (emb_dim - 1) // 2
    angle = 2 * math.pi * np.outer(lag / max_len, np.linspace(1e-4, bands - 1, bands))
    features = np.concatenate([t[:, None], np.cos(angle), -np.sin(angle)], axis=1)
    w = p["sine_freq_K"]
    hidden = np.sin(w * (features @ p["ffn_in_xK"] + p["ffn_in_bias_K"]))
    for i in range(2):
        hidden = np.sin(w * (hidden @ p["ffn_hidden_2xKxK"][i] + p["ffn_hidden_bias_2xK"][i]))
    ffn_TxCxH = np.einsum("tk,kch->tch", hidden, p["ffn_out_KxCxH"])
    # ExponentialModulation: alpha linear over the heads from -ln(1e-2)/1.5 to -ln(1e-2)/0.3.
    alpha_H = np.linspace(math.log(100) / 1.5, math.log(100) / 0.3, ffn_TxCxH.shape[2])
    return (ffn_TxCxH * np.exp(-np.outer(t, alpha_H))[:, None]).transpose(1, 0, 2)


def reference(p, x_BxLxE: np.ndarray, bidirectional: bool, groups: int = 4) -> np.ndarray:
    """The whole mixer per row over its real tokens; zeros at padded positions."""
    taps, tap_bias = p["short_kernel_3x3E"], p["short_bias_3E"]
    want = np.zeros(x_BxLxE.shape)
    for row, n in enumerate(LENGTHS):
        f_CxTxH = reference_filters(p, n)
        u_Tx3E = np.tile(np64(x_BxLxE[row, :n]) @ p["in_proj.kernel"] + p["in_proj.bias"],
                         (1, groups))
        conv_Tx3E = np.tile(tap_bias, (n, 1))
        for t in range(n):
            for j in range(3):
                if t - j >= 0:
                    conv_Tx3E[t] += taps[j] * u_Tx3E[t - j]
        q, v, k = (z.reshape(n, H, D) for z in np.split(conv_Tx3E, 3, axis=1))
        y_TxHxD = np.zeros((n, H, D))
        for t in range(n):
            s_HxDxD = p["d_H"][:, None, None] * np.einsum("hi,hj->hij", k[t], v[t])
            s_HxDxD += np.einsum("sh,shi,shj->hij", f_CxTxH[0, t::-1], k[:t + 1], v[:t + 1])
            if bidirectional:
                s_HxDxD += np.einsum("sh,shi,shj->hij", f_CxTxH[1, :n - t], k[t:], v[t:])
            y_TxHxD[t] = np.einsum("hi,hij->hj", q[t], s_HxDxD)
        want[row, :n] = y_TxHxD.reshape(n, E) @ p["out.kernel"] + p["out.bias"]
    return want


def max_rel_err(got_BxLxE, want_BxLxE) -> float:
    """Largest |got - want| at real positions, relative to the output's scale."""
    return float(np.abs(got_BxLxE[MASK_BxL] - want_BxLxE[MASK_BxL]).max()
                 / np.abs(want_BxLxE[MASK_BxL]).max())


# --- values and gradients ----------------------------------------------------------------------

@DIRECTIONS
def test_values_equal_float64_direct_sums(bidirectional):
    p, x = params64(build(bidirectional)), make_input(0)
    got = outputs(bidirectional)[0]
    want = reference(p, x, bidirectional)
    assert got.shape == (B, L, E) and np.isfinite(got).all()
    assert max_rel_err(got, want) <= 2e-6
    if bidirectional:  # a planted bug the comparison must reject: the backward filter left out
        assert max_rel_err(got, reference(p, x, False)) > 1e-2


@DIRECTIONS
def test_gradients_equal_float64_finite_differences(bidirectional):
    """Per parameter array (and the input): the fp32 gradient along 3 random unit directions
    equals the float64 central difference of the direct sums; padded inputs get none."""
    p, x, weight = params64(build(bidirectional)), make_input(0), make_input(1)
    objective = lambda p, x: float(np.sum(np.where(MASK_BxL[:, :, None], weight, 0.0)
                                          * reference(p, x, bidirectional)))
    _, g_params, g_x = outputs(bidirectional)
    g_all = {**{name: np64(g) for name, g in g_params.items()}, "x": np64(g_x)}
    assert set(g_all) == set(p) | {"x"}
    for name, (err, ad, fd) in directional_errors(objective, p, x, g_all, MASK_BxL).items():
        assert err <= 1e-5, (name, err, ad, fd)
    assert np.abs(g_x[~MASK_BxL]).max() == 0.0


# --- padding and direction ---------------------------------------------------------------------

@DIRECTIONS
def test_padding_invariance_and_no_shift(bidirectional):
    """Noise at padded positions moves no real output, and a padded row equals the same tokens
    run alone: padding at the end does not shift the backward filter's lags."""
    module = build(bidirectional)
    x = make_input(4)
    got = run(module, x)
    noisy = np.where(MASK_BxL[:, :, None], x, 50.0 * make_input(5))
    np.testing.assert_array_equal(run(module, noisy)[MASK_BxL], got[MASK_BxL])
    n = LENGTHS[1]
    alone = run(module, x[:, :n], np.ones((B, n), bool))[1]
    np.testing.assert_allclose(got[1, :n], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())


@DIRECTIONS
def test_direction_of_dependence(bidirectional):
    """Causal: token 20 moves outputs >= 20 only; bidirectional: the ones before it too."""
    module = build(bidirectional)
    x = make_input(6)
    base = run(module, x)
    moved = np.abs(run(module, x + 3.0 * (np.arange(L) == 20)[None, :, None]) - base)
    scale = np.abs(base).max()
    assert moved[:, 20:].max() > 1e-2 * scale
    if bidirectional:
        assert moved[:, :20].max() > 1e-3 * scale
    else:  # the FFT's rounding alone
        assert moved[:, :20].max() < 1e-6 * scale


# --- init, parameters, settings ----------------------------------------------------------------

def test_filters_decay_per_head_and_init():
    """Filters equal the reference; with the FFN position-blind each head's |f| decays at its own
    rate alpha_h, spread from 1% at 1.5 L to 1% at 0.3 L (ExponentialModulation); the skip d_h
    is N(0, 1) (MAD's torch.randn), the sine frequencies 1; the filter in the "ssm" group."""
    module = make_attention(MHHyenaMixer, L, heads=32, head_dim=1)
    f_Cx1xLxH = np.asarray(module.filters(L))
    want = reference_filters(params64(module), L)
    np.testing.assert_allclose(f_Cx1xLxH[:, 0], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    module.ffn_in_xK[...] = jnp.zeros_like(module.ffn_in_xK[...])
    flat_CxLxH = np.abs(np64(module.filters(L))[:, 0])
    assert (np.diff(flat_CxLxH, axis=1) < 0).all()
    rate_CxH = -np.log(flat_CxLxH[:, -1] / flat_CxLxH[:, 0])  # over t = 0 .. 1
    alpha_H = np.linspace(math.log(100) / 1.5, math.log(100) / 0.3, 32)
    np.testing.assert_allclose(rate_CxH, np.broadcast_to(alpha_H, rate_CxH.shape), rtol=1e-4)
    d_H = np.asarray(module.d_H[...])
    assert abs(d_H.mean()) < 0.6 and 0.6 < d_H.std() < 1.4
    assert (np.asarray(module.sine_freq_K[...]) == 1.0).all()
    _, params, _ = nnx.split(module, nnx.Param, ...)
    ssm = {".".join(map(str, p)) for p, v in nnx.to_flat_state(params) if isinstance(v, SSMParam)}
    assert ssm == {"ffn_in_xK", "ffn_in_bias_K", "ffn_hidden_2xKxK", "ffn_hidden_bias_2xK",
                   "ffn_out_KxCxH", "sine_freq_K"}


def test_projections_are_tiled_groups():
    """q | v | k are the 3E/G projected channels repeated G = 4 times (MAD's proj_groups): with
    the short conv made the identity, channel c of the three is projection c mod 3E/G."""
    module = make_attention(MHHyenaMixer, L, heads=H, head_dim=D)
    module.short_kernel_3x3E[...] = jnp.zeros((3, 3 * E)).at[0].set(1.0)
    module.short_bias_3E[...] = jnp.zeros(3 * E)
    x = make_input(7)
    proj_BxLxP = np.asarray(module.in_proj(jnp.asarray(x)))
    assert proj_BxLxP.shape[-1] == 3 * E // 4
    q, v, k = (np.asarray(z).reshape(B, L, E) for z in module.projections(x, MASK_BxL))
    for part, z in enumerate((q, v, k)):
        channels = (part * E + np.arange(E)) % (3 * E // 4)
        np.testing.assert_array_equal(z[MASK_BxL], proj_BxLxP[..., channels][MASK_BxL])
        assert not z[~MASK_BxL].any()


def parameter_count(e: int, h: int, directions: int, k: int = 2, emb: int = 3,
                    groups: int = 4) -> int:
    """in-proj E -> 3E/G, short conv 3 taps + bias on 3E, filter FFN (emb -> K, 2 x K -> K,
    K -> C H without bias, K frequencies), skips d (H), out-proj E -> E."""
    p = 3 * e // groups
    ffn = emb * k + k + 2 * (k * k + k) + k * directions * h + k
    return (e * p + p) + 4 * 3 * e + ffn + h + (e * e + e)


@DIRECTIONS
def test_parameter_count(bidirectional):
    count = sum(v.size for v in params64(build(bidirectional)).values())
    assert count == parameter_count(E, H, 1 + bidirectional)
    wide = nnx.eval_shape(lambda: make_attention(MHHyenaMixer, 16, heads=2, head_dim=16,
                                                 bidirectional=bidirectional))
    count = sum(v.size for v in jax.tree.leaves(nnx.state(wide, nnx.Param)))
    assert count == (2264 if bidirectional else 2260)  # E = 32, H = 2 (the tiny preset's)


def test_invalid_settings_fail_at_build_in_one_line():
    with pytest.raises(ValueError, match="odd emb_dim >= 3") as err:
        make_attention(MHHyenaMixer, L, emb_dim=4)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="proj_groups=5 must divide 3 x the width 16; use") as err:
        make_attention(MHHyenaMixer, L, heads=H, head_dim=D, proj_groups=5)
    assert "\n" not in str(err.value)


def test_memory_grows_linearly():
    """No L x L intermediate in fwd+bwd, and the largest one grows like L (traced, not run)."""
    sizes = []
    for length in (256, 1024):
        module = make_attention(MHHyenaMixer, length, heads=H, head_dim=D)
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        x, mask = jnp.zeros((B, length, H, D)), jnp.ones((B, length), bool)
        loss = lambda x, p: jnp.sum(nnx.merge(graphdef, p, rest)(x, x, x, mask) ** 2)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, params).jaxpr
        assert max_two_long_axes(jaxpr, length) is None
        sizes.append(largest_intermediate(jaxpr))
    assert np.log(sizes[1] / sizes[0]) / np.log(4) <= 1.02


def test_tiny_param_count_is_pinned():
    # mh_hyena (E = 32, H = 2, K = 2 filter width, 3 positional features, 4 tied projection
    # groups, 2 directions C): in E x 3E/4 + 3E/4, short conv 3 x 3E + 3E, FFN 3K + K + 2(K^2 + K)
    # + K C H + sine freq K, skip d per head H, out E x E + E.
    assert_tiny_params("mh_hyena", TINY_TRANSFORMER - 4 * (32 * 32 + 32) + (32 * 24 + 24)
                                   + (3 * 96 + 96) + (3 * 2 + 2 + 2 * (4 + 2) + 2 * 2 * 2 + 2)
                                   + 2 + (32 * 32 + 32) - POS_TABLE, positions=False)
