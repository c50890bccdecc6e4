"""Hawk (models/attention/hawk.py): the chunked and associative RG-LRU scans and the step-by-step
lax.scan against a float64 loop of the paper's equations, in values and in gradients.

The reference runs a plain Python loop over the real tokens of each row only (a padded row is
simply a shorter sequence), from the module's own fp32 parameters, and computes a_t = a^(c r_t)
with a = sigmoid(Lambda) directly (the module works in log space). Its gradients are central
finite differences in float64 along random directions, one set per parameter array.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lra.models.attention.hawk  # noqa: F401 - the module under test
from conftest import POS_TABLE, TINY_TRANSFORMER, assert_tiny_params, make_attention, mixer_vjp
from lra.check import largest_intermediate, max_two_long_axes
from lra.models.attention.base import SSMParam
from lra.models.attention.hawk import HawkMixer, rnn_width

B, L, H, D = 2, 45, 2, 8          # odd L: 5 whole chunks of 8 and a part
E = H * D
LENGTHS = (L, 28)                 # second row padded; its last real token inside a chunk
MASK_BxL = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]
# Every form in the bidirectional module; the causal one runs the default only (the forms share
# no code that depends on the direction count: the scans act on a [C, B, L, K] stack).
FORMS = {True: ("chunked", "associative", "recurrent"), False: ("chunked",)}


@functools.cache
def build(bidirectional: bool):
    """One module per direction setting for the whole file: every build costs XLA compiles."""
    return make_attention(HawkMixer, L, heads=H, head_dim=D, bidirectional=bidirectional)


def make_input(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, L, E)).astype(np.float32)


@functools.partial(nnx.jit, static_argnames="form")
def forward_and_grads(module, x_BxLxE, weight_BxLxE, mask_BxL, form):
    """(out, d/dparams, d/dx) of sum(weight * out) over real positions (conftest.mixer_vjp)."""
    return mixer_vjp(module, x_BxLxE, weight_BxLxE, mask_BxL, form)


@functools.cache
def outputs(bidirectional: bool, form: str):
    """The module's out, parameter and input gradients on the file's fixed inputs."""
    out, g_params, g_x = forward_and_grads(build(bidirectional), make_input(0), make_input(1),
                                           MASK_BxL, form)
    return np.asarray(out), {name: np.asarray(g) for name, g in g_params.items()}, np.asarray(g_x)


def run(module, x_BxLxE, mask_BxL=MASK_BxL) -> np.ndarray:
    """The default (chunked) form's output."""
    return np.asarray(forward_and_grads(module, x_BxLxE, x_BxLxE, mask_BxL, "chunked")[0])


# --- float64 reference -------------------------------------------------------------------------

def params64(module) -> dict[str, np.ndarray]:
    """'in_proj.kernel', 'lambda_CxK', ... -> float64 copies of the module's parameters."""
    _, params, _ = nnx.split(module, nnx.Param, ...)
    return {".".join(map(str, path)): np.asarray(v.get_value(), np.float64)
            for path, v in nnx.to_flat_state(params)}


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def gelu_tanh(z):
    return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))


def loop_direction(p, c: int, x_TxK: np.ndarray, const: float) -> np.ndarray:
    """Direction c, one token at a time: u_t = b + sum_j w_j x_{t-W+1+j},
    r_t = sigmoid(W_a u_t + b_a), i_t = sigmoid(W_x u_t + b_x), a_t = sigmoid(Lambda)^(c r_t),
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t)."""
    kernel_WxK, conv_bias_K = p["conv_kernel_CxWxK"][c], p["conv_bias_CxK"][c]
    w_a, w_x = p["gate_a_CxHxJxJ"][c], p["gate_x_CxHxJxJ"][c]
    b_a, b_x = p["gate_a_bias_CxHxJ"][c].ravel(), p["gate_x_bias_CxHxJ"][c].ravel()
    base_K = sigmoid(p["lambda_CxK"][c])
    taps, k = kernel_WxK.shape
    h_K, out = np.zeros(k), []
    for t in range(len(x_TxK)):
        u_K = conv_bias_K.copy()
        for j in range(taps):
            if t - taps + 1 + j >= 0:
                u_K += kernel_WxK[j] * x_TxK[t - taps + 1 + j]
        u_HxJ = u_K.reshape(w_a.shape[0], -1)
        r_K = sigmoid(np.einsum("hi,hij->hj", u_HxJ, w_a).ravel() + b_a)
        i_K = sigmoid(np.einsum("hi,hij->hj", u_HxJ, w_x).ravel() + b_x)
        a_K = base_K ** (const * r_K)
        h_K = a_K * h_K + np.sqrt(1.0 - a_K ** 2) * (i_K * u_K)
        out.append(h_K)
    return np.stack(out)


def reference(p, x_BxLxE: np.ndarray, bidirectional: bool, const: float = 8.0) -> np.ndarray:
    """The whole block per row over its real tokens: in-proj, both directions summed, GeLU gate,
    out-proj; zeros at padded positions."""
    k = p["out_proj.kernel"].shape[0]
    want = np.zeros(x_BxLxE.shape)
    for row, n in enumerate(LENGTHS):
        xz_TxK2 = np.asarray(x_BxLxE[row, :n], np.float64) @ p["in_proj.kernel"] + p["in_proj.bias"]
        x_TxK, gate_TxK = xz_TxK2[:, :k], xz_TxK2[:, k:]
        h_TxK = loop_direction(p, 0, x_TxK, const)
        if bidirectional:
            h_TxK = h_TxK + loop_direction(p, 1, x_TxK[::-1], const)[::-1]
        want[row, :n] = (h_TxK * gelu_tanh(gate_TxK)) @ p["out_proj.kernel"] + p["out_proj.bias"]
    return want


def max_rel_err(got_BxLxE, want_BxLxE) -> float:
    """Largest |got - want| at real positions, relative to the output's scale."""
    return float(np.abs(got_BxLxE[MASK_BxL] - want_BxLxE[MASK_BxL]).max()
                 / np.abs(want_BxLxE[MASK_BxL]).max())


# --- values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
def test_every_form_equals_float64_loop(bidirectional):
    """chunked (5 chunks and a part; row 2 ends inside chunk 4), associative and the lax.scan
    recurrence equal the step loop at real positions."""
    p, x = params64(build(bidirectional)), make_input(0)
    want = reference(p, x, bidirectional)
    for form in FORMS[bidirectional]:
        got = outputs(bidirectional, form)[0]
        assert got.shape == (B, L, E) and np.isfinite(got).all()
        assert max_rel_err(got, want) <= 1e-5, form
    if bidirectional:  # a planted bug the comparison must reject: the backward pass left out
        assert max_rel_err(outputs(True, "chunked")[0], reference(p, x, False)) > 1e-2


# --- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
def test_gradients_equal_float64_finite_differences(bidirectional):
    """Per parameter array (and the input): the fp32 gradient along 3 random unit directions
    equals the float64 central difference of the step loop; padded inputs get none; and
    (bidirectional) the three forms' gradients agree elementwise."""
    p, x, weight = params64(build(bidirectional)), make_input(0), make_input(1)
    objective = lambda p, x: float(np.sum(np.where(MASK_BxL[:, :, None], weight, 0.0)
                                          * reference(p, x, bidirectional)))
    _, g_params, g_x = outputs(bidirectional, "chunked")
    g_all = {**{name: np.asarray(g, np.float64) for name, g in g_params.items()},
             "x": np.asarray(g_x, np.float64)}
    assert set(g_all) == set(p) | {"x"}
    rng, eps = np.random.default_rng(3), 1e-6
    for name, g in g_all.items():
        base = np.asarray(x, np.float64) if name == "x" else p[name]
        if name == "x":  # padded inputs move nothing: probe only the real ones
            g = np.where(MASK_BxL[:, :, None], g, 0.0)
        fd, ad = [], []
        for _ in range(3):
            v = rng.standard_normal(base.shape)
            if name == "x":
                v = np.where(MASK_BxL[:, :, None], v, 0.0)
            v /= np.linalg.norm(v)
            moved = [(p, base + s * v) if name == "x" else ({**p, name: base + s * v}, x)
                     for s in (eps, -eps)]  # (params, x) with `name` moved by +-eps v
            fd.append((objective(*moved[0]) - objective(*moved[1])) / (2 * eps))
            ad.append(float(np.sum(g * v)))
        err = np.abs(np.subtract(ad, fd)).max() / np.abs(fd).max()
        assert err <= 1e-5, (name, err, ad, fd)
    assert np.abs(g_x[~MASK_BxL]).max() == 0.0
    for form in FORMS[bidirectional][1:]:
        _, other, other_x = outputs(bidirectional, form)
        for name, g in g_params.items():
            np.testing.assert_allclose(other[name], g, rtol=1e-5, atol=1e-5 * np.abs(g).max(),
                                       err_msg=name)
        np.testing.assert_allclose(other_x, g_x, rtol=1e-5, atol=1e-5 * np.abs(g_x).max())


# --- padding and direction ----------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
def test_padding_invariance_and_truncation(bidirectional):
    """Noise at padded positions moves no real output, and (bidirectional) a padded row equals
    the same tokens run alone, unpadded: the backward recurrence starts at the last real token."""
    module = build(bidirectional)
    x = make_input(4)
    got = run(module, x)
    noise = 50.0 * np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    noisy = run(module, np.where(MASK_BxL[:, :, None], x, noise))
    assert np.abs(noisy - got)[MASK_BxL].max() <= 1e-6
    if not bidirectional:  # causal outputs never read later positions (next test)
        return
    n = LENGTHS[1]
    alone = run(module, x[1:, :n], np.ones((1, n), bool))[0]
    np.testing.assert_allclose(got[1, :n], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())


@nnx.jit
def rg_lru_states(module, u_CxBxLxK, real_CxBxL):
    return module.rg_lru(u_CxBxLxK, real_CxBxL)


def test_padded_steps_hold_the_state():
    """(a_t, b_t) = (1, 0) at a padded step, wherever it is: across an interior gap of padding
    the RG-LRU state stays exactly what the last real step left, then moves on."""
    module = build(True)
    u_CxBxLxK = np.random.default_rng(7).standard_normal((2, B, L, 22)).astype(np.float32)
    real_CxBxL = np.ones((2, B, L), bool)
    real_CxBxL[:, 0, 10:15] = False
    h = np.asarray(rg_lru_states(module, u_CxBxLxK, real_CxBxL))
    np.testing.assert_array_equal(h[:, 0, 10:15], np.repeat(h[:, 0, 9:10], 5, axis=1))
    assert np.abs(h[:, 0, 15] - h[:, 0, 14]).min() > 0.0


@pytest.mark.parametrize("bidirectional", [True, False])
def test_direction_of_information_flow(bidirectional):
    """Causal: token 20 moves outputs >= 20 only; bidirectional: the ones before it too."""
    module = build(bidirectional)
    x = make_input(6)
    moved = np.abs(run(module, x + 3.0 * (np.arange(L) == 20)[None, :, None]) - run(module, x))
    assert moved[0, 20:].max() > 1e-4
    if bidirectional:
        assert moved[0, :20].max() > 1e-5
    else:
        assert moved[0, :20].max() == 0.0


# --- init, parameters, settings -----------------------------------------------------------------

def test_init_follows_the_paper():
    """a^c = sigmoid(Lambda)^c uniform on [0.9, 0.999] (Section 2.4), in every channel and
    direction; conv N(0, 0.01 / W); zero biases; Lambda in the "ssm" optimizer group."""
    module = build(True)
    cfg, k, j = module.cfg, 22, 11  # K = H ceil(4/3 D) = 2 * 11: 44 values of a
    assert rnn_width(cfg, H, D) == k and module.lambda_CxK.shape == (2, k)
    power = np.sort((1.0 / (1.0 + np.exp(-np.asarray(module.lambda_CxK[...], np.float64))))
                    ** cfg.c, axis=None)
    assert power.min() >= cfg.a_min - 1e-6 and power.max() <= cfg.a_max + 1e-6
    uniform_cdf = (power - cfg.a_min) / (cfg.a_max - cfg.a_min)
    ks = np.abs(uniform_cdf - np.arange(1, power.size + 1) / power.size).max()
    assert ks < 1.63 / math.sqrt(power.size)  # Kolmogorov-Smirnov at the 1% level
    assert isinstance(module.lambda_CxK, SSMParam)
    conv = np.asarray(module.conv_kernel_CxWxK[...])
    assert conv.shape == (2, cfg.d_conv, k) and 0.04 < conv.std() < 0.06  # sqrt(0.01 / 4)
    for gate in (module.gate_a_CxHxJxJ, module.gate_x_CxHxJxJ):  # LeCun normal, fan-in J
        gate = np.asarray(gate[...])
        assert gate.shape == (2, H, j, j) and abs(gate.std() * math.sqrt(j) - 1.0) < 0.15
    for bias in (module.conv_bias_CxK, module.gate_a_bias_CxHxJ, module.gate_x_bias_CxHxJ,
                 module.in_proj.bias, module.out_proj.bias):
        assert not np.asarray(bias[...]).any()


def parameter_count(e: int, h: int, k: int, directions: int, taps: int = 4) -> int:
    """in-proj E -> 2K, out-proj K -> E (with biases), and per direction: conv W K + K, two
    block-diagonal gates H J^2 + K each, Lambda K."""
    j = k // h
    return (e * 2 * k + 2 * k) + (k * e + e) + directions * (taps * k + k + 2 * (h * j * j + k) + k)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_parameter_count(bidirectional):
    module = build(bidirectional)
    count = sum(v.size for v in params64(module).values())
    assert count == parameter_count(E, H, rnn_width(module.cfg, H, D), 1 + bidirectional)
    # The tiny preset's dims (E = 32, H = 2): K = 2 * ceil(4/3 * 16) = 44.
    wide = nnx.eval_shape(lambda: make_attention(HawkMixer, 16, heads=2, head_dim=16,
                                                 bidirectional=bidirectional))
    count = sum(v.size for v in jax.tree.leaves(nnx.state(wide, nnx.Param)))
    assert count == (8920 if bidirectional else 6632)


def test_invalid_settings_fail_at_build():
    with pytest.raises(ValueError, match="hawk needs"):
        make_attention(HawkMixer, L, a_min=0.99, a_max=0.9)
    with pytest.raises(ValueError, match="hawk needs"):
        make_attention(HawkMixer, L, chunk_size=0)
    with pytest.raises(ValueError, match="scan='pallas'; use one of chunked, associative"):
        make_attention(HawkMixer, L, scan="pallas")


def grad_jaxpr(module, length: int):
    """The jaxpr of d/d(x, params) sum(out^2) on an unpadded batch (traced, not run)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    x = jnp.zeros((B, length, H, D))
    mask = jnp.ones((B, length), bool)
    loss = lambda x, p: jnp.sum(nnx.merge(graphdef, p, rest)(x, x, x, mask) ** 2)
    return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, params).jaxpr


@pytest.mark.parametrize("scan", ["chunked", "associative"])
def test_memory_grows_linearly(scan):
    """No L x L intermediate in fwd+bwd, and the largest one grows like L (traced, not run)."""
    sizes = []
    for length in (256, 1024):
        jaxpr = grad_jaxpr(make_attention(HawkMixer, length, heads=H, head_dim=D, scan=scan),
                           length)
        assert max_two_long_axes(jaxpr, length) is None
        sizes.append(largest_intermediate(jaxpr))
    assert np.log(sizes[1] / sizes[0]) / np.log(4) <= 1.02


def test_tiny_param_count_is_pinned():
    # hawk (K = 44, H = 2 heads of J = 22, 4 taps, 2 directions): in E x 2K + 2K, out K x E + E,
    # per direction conv 4K + K, block-diagonal gates a and x 2 (H J^2 + K), Lambda K.
    assert_tiny_params("hawk", TINY_TRANSFORMER - 4 * (32 * 32 + 32) + (2 * 32 * 44 + 2 * 44)
                               + (44 * 32 + 32)
                               + 2 * (4 * 44 + 44 + 2 * (2 * 22 * 22 + 44) + 44)
                               - POS_TABLE, positions=False)
