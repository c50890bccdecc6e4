"""mLSTM (models/attention/mlstm.py): the chunkwise form that trains, the recurrent lax.scan and
the quadratic parallel form against a float64 numpy loop of the paper's unstabilised cell
(C_t = f_t C_{t-1} + i_t k_t v_t^T, n_t alike, h~_t = q_t C_t / max(|q_t . n_t|, 1)), in values
and in gradients (central differences of that loop). The reference sees the real tokens of a
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
from lra.models.attention import mlstm  # the module under test (a built-in)
from lra.models.attention.base import SSMParam

B, L, H, D = 2, 80, 2, 8        # L = 2.5 chunks of 32
E = H * D
CHUNK = 32
LENGTHS = (L, L - 29)           # second row padded
MASK_BxL = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]


def make(bidirectional: bool = True, length: int = L, **fields):
    return make_attention("mlstm", length, heads=H, head_dim=D, bidirectional=bidirectional,
                          chunk_size=CHUNK, **fields)


@functools.cache
def build(bidirectional: bool = True):
    """One module per direction setting for the whole file (every build costs XLA compiles), its
    gate weights drawn so that i and f vary with the input (they start at 0) and forget biases
    low enough that the memory visibly decays over a chunk."""
    module = make(bidirectional)
    rng = np.random.default_rng(11)
    module.igate_3ExH[...] = jnp.asarray(0.2 * rng.standard_normal((3 * E, H)), jnp.float32)
    module.fgate_3ExH[...] = jnp.asarray(0.2 * rng.standard_normal((3 * E, H)), jnp.float32)
    module.fgate_bias_H[...] = jnp.asarray([0.5, 2.5], jnp.float32)
    return module


def inputs(seed: int):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, L, H, D)).astype(np.float32) for _ in range(3))


@functools.cache
def module_fn(bidirectional: bool):
    """(params, f): f(params, q, k, v, w) = (the module's output, the gradient of sum(w . output)
    with respect to params, q, k, v), one compile per direction for every module test."""
    graphdef, params, rest = nnx.split(build(bidirectional), nnx.Param, ...)

    def outputs_and_grads(params, q, k, v, w):
        call = lambda params, q, k, v: nnx.merge(graphdef, params, rest)(q, k, v, MASK_BxL)
        out, pull = jax.vjp(call, params, q, k, v)
        return out, pull(w)

    return params, jax.jit(outputs_and_grads)


@functools.partial(jax.jit, static_argnames=("form", "bidirectional"))
def raw_cell(q, k, v, ig, lf, mask, form, bidirectional):
    return mlstm.cell(q, k, v, ig, lf, mask, form=form, bidirectional=bidirectional,
                      chunk_size=CHUNK)


# --- float64 references, one row's real tokens [T, H, D] at a time -----------------------------

def gates64(p: dict, q, k, v):
    """i~ and log f [T, H]: [q | k | v] w + b, log sigmoid for the forget gate."""
    x_Tx3E = np.concatenate([np64(x).reshape(len(x), E) for x in (q, k, v)], axis=-1)
    ig = x_Tx3E @ p["igate_3ExH"] + p["igate_bias_H"]
    return ig, -np.logaddexp(0.0, -(x_Tx3E @ p["fgate_3ExH"] + p["fgate_bias_H"]))


def loop64(q, k, v, ig, lf):
    """The unstabilised cell one token at a time: numerators q_t C_t and denominators q_t . n_t."""
    c_HxDxD, n_HxD, nums, dens = np.zeros((H, D, D)), np.zeros((H, D)), [], []
    for q_t, k_t, v_t, i_t, lf_t in zip(q, k, v, np.exp(ig), lf):
        f_t = np.exp(lf_t)
        c_HxDxD = (f_t[:, None, None] * c_HxDxD
                   + i_t[:, None, None] * k_t[:, :, None] * v_t[:, None, :])
        n_HxD = f_t[:, None] * n_HxD + i_t[:, None] * k_t
        nums.append(np.einsum("hd,hde->he", q_t, c_HxDxD))
        dens.append(np.einsum("hd,hd->h", q_t, n_HxD))
    return np.stack(nums), np.stack(dens)


def cell64(q, k, v, ig, lf, bidirectional: bool) -> np.ndarray:
    """h~ [T, H, D] from k already scaled; bidirectional: both loops, the token itself once."""
    q, k, v, ig, lf = map(np64, (q, k, v, ig, lf))
    num, den = loop64(q, k, v, ig, lf)
    if bidirectional:
        num_b, den_b = loop64(*(x[::-1] for x in (q, k, v, ig, lf)))
        own = np.exp(ig) * np.sum(q * k, -1)
        num, den = num + num_b[::-1] - own[..., None] * v, den + den_b[::-1] - own
    return num / np.maximum(np.abs(den), 1.0)[..., None]


def output64(p: dict, q, k, v, bidirectional: bool) -> np.ndarray:
    """The module: GroupNorm per head (no affine) of h~ times swish(v W_G)."""
    h = cell64(q, np64(k) / np.sqrt(D), v, *gates64(p, q, k, v), bidirectional)
    centred = h - h.mean(-1, keepdims=True)
    y = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6)
    logits_TxE = np64(v).reshape(-1, E) @ p["gate.kernel"]
    return y * (logits_TxE / (1.0 + np.exp(-logits_TxE))).reshape(-1, H, D)


def flat64(state) -> dict:
    """An nnx State of parameters (or their gradients) as {"gate.kernel": float64 array}."""
    return {".".join(map(str, path)): np64(var.get_value())
            for path, var in nnx.to_flat_state(state)}


def params64(module) -> dict:
    return flat64(nnx.split(module, nnx.Param)[1])


# --- the forms agree ---------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
def test_forms_equal_float64_recurrence(bidirectional):
    """chunkwise == recurrent == parallel == the float64 loop on the module's own gates, per
    row's real tokens; the whole module == the loop's gates, norm and gate; and the direction:
    the causal cell never looks ahead, the bidirectional one does."""
    module = build(bidirectional)
    q, k, v = inputs(0)
    ig, lf = (np.asarray(x) for x in module.gate_preactivations(q, k, v))
    k_scaled = k / np.float32(np.sqrt(D))
    got = {form: np.asarray(raw_cell(q, k_scaled, v, ig, lf, MASK_BxL, form, bidirectional))
           for form in mlstm.FORMS}
    params, outputs_and_grads = module_fn(bidirectional)
    out = np.asarray(outputs_and_grads(params, q, k, v, np.zeros_like(v))[0])
    for row, n in enumerate(LENGTHS):
        want = cell64(*(x[row, :n] for x in (q, k_scaled, v, ig, lf)), bidirectional)
        for form in mlstm.FORMS:
            assert rel_err(got[form][row, :n], want) <= 1e-5, form
        assert rel_err(out[row, :n], output64(params64(module), q[row, :n], k[row, :n],
                                              v[row, :n], bidirectional)) <= 1e-5
    later = v + 3.0 * (np.arange(L) == 60)[:, None, None].astype(np.float32)
    moved = np.asarray(raw_cell(q, k_scaled, later, ig, lf, MASK_BxL, "chunkwise",
                                bidirectional)) - got["chunkwise"]
    if bidirectional:  # the anti-causal memory looks ahead: token 60 moves output 0
        assert np.abs(moved[0, 0]).max() > 1e-6
    else:
        assert np.abs(moved[:, :60]).max() == 0.0 and np.abs(moved[0, 60]).max() > 1e-6


# Parameter groups of the gradient check: each is one random direction.
GROUPS = (("q",), ("k",), ("v",), ("igate_3ExH", "igate_bias_H"), ("fgate_3ExH", "fgate_bias_H"),
          ("gate.kernel",))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_gradients_equal_float64_differences(bidirectional):
    """d(sum w . out)/d(q, k, v, each gate's parameters) of the chunkwise module, along a random
    direction per group, equals central differences of the float64 loop (eps = 1e-6)."""
    params, outputs_and_grads = module_fn(bidirectional)
    q, k, v = inputs(1)
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((B, L, H, D)) * MASK_BxL[:, :, None, None]).astype(np.float32)
    g_params, g_q, g_k, g_v = outputs_and_grads(params, q, k, v, w)[1]
    grads = {"q": g_q, "k": g_k, "v": g_v, **flat64(g_params)}
    values = {"q": np64(q), "k": np64(k), "v": np64(v), **params64(build(bidirectional))}
    dirs = {name: rng.standard_normal(a.shape) for name, a in values.items()}

    def loss64(eps: float, group: tuple[str, ...]) -> float:
        x = {name: a + eps * dirs[name] if name in group else a for name, a in values.items()}
        return sum(np.sum(np64(w[row, :n]) * output64(x, x["q"][row, :n], x["k"][row, :n],
                                                       x["v"][row, :n], bidirectional))
                   for row, n in enumerate(LENGTHS))

    analytic = np.array([sum(np.sum(np64(grads[name]) * dirs[name]) for name in group)
                         for group in GROUPS])
    numeric = np.array([(loss64(1e-6, group) - loss64(-1e-6, group)) / 2e-6 for group in GROUPS])
    # float32 gradients: 8e-6 at worst here (the recurrent form's differ from these by 1e-5).
    assert np.all(np.abs(analytic - numeric) <= 2e-5 * np.abs(numeric)), (analytic, numeric)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_extreme_gates_stay_finite_and_exact(bidirectional):
    """i~ and f~ of +-30 at random (i = e^(+-30), f = sigmoid(+-30); and exp forget gates
    f = e^(-30) or e^(+1), a memory that grows) in every form, and a module whose gate
    pre-activations spread over about +-50: the stabilised forms stay finite and agree with the
    float64 loop (which needs no stabiliser), gradients stay finite. The forms get q, k >= 0,
    so q . n sums positive terms and every position can be held to 1e-5 on its own: with mixed
    signs a position whose q . n cancels (|q . n| << sum |terms|) is ill-conditioned in float32
    whatever the form (1e-4 seen, in the recurrent form too)."""
    q, k, v = inputs(3)
    q, k = np.abs(q), np.abs(k)
    rng = np.random.default_rng(4)
    ig = np.where(rng.random((B, L, H)) < 0.5, -30.0, 30.0).astype(np.float32)
    f_pre = np.where(rng.random((B, L, H)) < 0.5, -30.0, 30.0).astype(np.float32)
    log_forgets = (np.asarray(jax.nn.log_sigmoid(f_pre)),                    # sigmoid gates
                   np.where(rng.random((B, L, H)) < 0.2, -30.0, 1.0).astype(np.float32))  # exp
    k_scaled = k / np.float32(np.sqrt(D))
    for lf in log_forgets:
        for form in mlstm.FORMS:
            got = np.asarray(raw_cell(q, k_scaled, v, ig, lf, MASK_BxL, form, bidirectional))
            assert np.isfinite(got).all(), form
            for row, n in enumerate(LENGTHS):
                want = cell64(*(x[row, :n] for x in (q, k_scaled, v, ig, lf)), bidirectional)
                # Each position's output on its own, whatever its size.
                err_TxH = np.linalg.norm(got[row, :n] - want, axis=-1)
                assert np.all(err_TxH <= 1e-5 * np.linalg.norm(want, axis=-1)), form

    params, outputs_and_grads = module_fn(bidirectional)
    scale = 10.0 / np.sqrt(3 * E)  # pre-activations: +-30 per head, spread by N(0, 10^2)
    extreme = jax.tree.map(lambda a: a, params)
    for name, bias in (("igate", [30.0, -30.0]), ("fgate", [-30.0, 30.0])):
        extreme[f"{name}_3ExH"][...] = jnp.asarray(scale * rng.standard_normal((3 * E, H)),
                                                   jnp.float32)
        extreme[f"{name}_bias_H"][...] = jnp.asarray(bias, jnp.float32)
    w = rng.standard_normal((B, L, H, D)).astype(np.float32) * MASK_BxL[:, :, None, None]
    out, grads = outputs_and_grads(extreme, q, k, v, w)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves((out, grads)))
    for row, n in enumerate(LENGTHS):
        want = output64(flat64(extreme), q[row, :n], k[row, :n], v[row, :n], bidirectional)
        assert rel_err(np.asarray(out)[row, :n], want) <= 1e-5


# --- padding, memory, init, settings ----------------------------------------------------------

def test_padding_changes_nothing_at_real_positions():
    """Noise at padded positions (q, k, v x 50) leaves every real output and every gradient at a
    real position as it was: padded positions get i = 0 and f = 1. (The padded row equals its
    real tokens run alone: the reference of the tests above is that shorter sequence.)"""
    params, outputs_and_grads = module_fn(True)
    q, k, v = inputs(5)
    w = (np.random.default_rng(6).standard_normal(q.shape)
         * MASK_BxL[..., None, None]).astype(np.float32)
    out, grads = outputs_and_grads(params, q, k, v, w)
    pad = ~MASK_BxL[:, :, None, None]
    noise = [50.0 * np.random.default_rng(7 + i).standard_normal(q.shape).astype(np.float32)
             for i in range(3)]
    noisy, noisy_grads = outputs_and_grads(
        params, *(np.where(pad, z, x) for z, x in zip(noise, (q, k, v))), w)
    assert np.isfinite(np.asarray(noisy)).all()
    assert np.abs(np.asarray(noisy) - np.asarray(out))[MASK_BxL].max() <= 1e-6
    for g, g_noisy in zip(grads[1:], noisy_grads[1:]):
        assert np.abs(np.asarray(g_noisy) - np.asarray(g))[MASK_BxL].max() <= 1e-6
        assert np.abs(np.asarray(g_noisy))[~MASK_BxL].max() == 0.0


def test_init_follows_the_paper_code():
    """Gate weights 0, b_f = linspace(3, 6) over heads (an SSMParam: no weight decay), b_i small:
    at init every position gets f = sigmoid(b_f), whatever its input; exp forget gates start at
    the same f. Parameters at E = 32, H = 2: 2 (3 E H + H) gates + E^2 output gate = 1412."""
    e, h = 32, 2
    module = make_attention("mlstm", 64, heads=h, head_dim=e // h)
    np.testing.assert_allclose(module.fgate_bias_H[...], [3.0, 6.0], rtol=1e-6)
    assert isinstance(module.fgate_bias_H, SSMParam)
    assert not isinstance(module.igate_bias_H, SSMParam)
    assert not np.any(module.igate_3ExH[...]) and not np.any(module.fgate_3ExH[...])
    bias = np.asarray(module.igate_bias_H[...])
    assert np.all(np.abs(bias) < 0.5) and np.any(bias != 0)
    x = np.random.default_rng(7).standard_normal((1, 5, h, e // h)).astype(np.float32)
    ig, lf = module.gate_preactivations(x, 2 * x, -x)
    np.testing.assert_allclose(np.exp(lf), np.broadcast_to(1 / (1 + np.exp([-3.0, -6.0])),
                                                           (1, 5, h)), rtol=1e-6)
    np.testing.assert_allclose(ig, np.broadcast_to(bias, (1, 5, h)), rtol=1e-6)
    exp_gates = make_attention("mlstm", 64, heads=h, head_dim=e // h, forget_gate="exp")
    np.testing.assert_allclose(np.exp(exp_gates.gate_preactivations(x, x, x)[1]), np.exp(lf),
                               rtol=1e-6)
    count = sum(np.size(a) for a in jax.tree.leaves(nnx.state(module, nnx.Param)))
    assert count == 2 * (3 * e * h + h) + e * e == 1412


def test_invalid_settings_fail_at_build():
    with pytest.raises(ValueError, match="chunk_size"):
        make_attention("mlstm", L, chunk_size=0)
    with pytest.raises(ValueError, match="forget_gate"):
        make_attention("mlstm", L, forget_gate="tanh")


def test_tiny_param_count_is_pinned():
    # + per direction-shared gates, input and forget: [q|k|v] (3E) -> H each, with biases; + the
    # swish gate's W_G (E x E, no bias).
    assert_tiny_params("mlstm", TINY_TRANSFORMER + 2 * (3 * 32 * 2 + 2) + 32 * 32
                                - POS_TABLE, positions=False)
