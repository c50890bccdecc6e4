"""Based (models/attention/based.py): the chunked Taylor linear attention and the lax.scan
recurrence against a float64 loop of the paper's equation, in values and gradients.

The references never form features: step t weighs every key j <= t by the scalar kernel
1 + s + s^2/2, s = q_t . k_j / sqrt(F), and divides by the weights' sum (+ eps), over the real
tokens of a row only (a padded row is a shorter sequence). The module's reference adds the short
conv, both directions and W_out in numpy from the module's own parameters; its gradients are
float64 central differences along random directions, one set per parameter array and the input.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lra.models.attention.based  # noqa: F401 - the module under test
from conftest import (POS_TABLE, TINY_TRANSFORMER, assert_tiny_params, directional_errors,
                      make_attention, mixer_vjp, rel_err)
from lra.check import largest_intermediate, max_two_long_axes
from lra.models.attention.based import (BasedMixer, taylor_attention_chunked,
                                        taylor_attention_recurrent, taylor_features)

B, L, H, D = 2, 80, 2, 8          # L = 2.5 chunks of 32
E, F = H * D, 16                  # F: the paper's d' (the default feature_dim)
CHUNK, EPS = 32, 1e-12
LENGTHS = (L, 51)                 # second row padded; its last real token inside chunk 1
MASK_BxL = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]


@functools.cache
def build(bidirectional: bool):
    """One module per direction setting for the whole file: every build costs XLA compiles."""
    return make_attention(BasedMixer, L, heads=H, head_dim=D, bidirectional=bidirectional,
                          chunk_size=CHUNK)


def make_input(seed: int, scale: float = 2.0) -> np.ndarray:
    """x [B, L, E]; scale 2 puts s = q.k / sqrt(F) at ~ +-1, where s^2 / 2 matters."""
    return (scale * np.random.default_rng(seed).standard_normal((B, L, E))).astype(np.float32)


@functools.partial(nnx.jit, static_argnames="form")
def forward_and_grads(module, x_BxLxE, weight_BxLxE, mask_BxL, form):
    """(out, d/dparams, d/dx) of sum(weight * out) over real positions (conftest.mixer_vjp)."""
    return mixer_vjp(module, x_BxLxE, weight_BxLxE, mask_BxL, form)


@functools.cache
def outputs(bidirectional: bool, form: str = "chunked"):
    out, g_params, g_x = forward_and_grads(build(bidirectional), make_input(0), make_input(1),
                                           MASK_BxL, form)
    return np.asarray(out), {name: np.asarray(g) for name, g in g_params.items()}, np.asarray(g_x)


def run(module, x_BxLxE, mask_BxL=MASK_BxL) -> np.ndarray:
    return np.asarray(forward_and_grads(module, x_BxLxE, x_BxLxE, mask_BxL, "chunked")[0])


# --- float64 references ------------------------------------------------------------------------

def taylor_loop(q_TxHxF, k_TxHxF, v_TxHxD, eps: float = EPS) -> np.ndarray:
    """o_t = sum_{j<=t} w_tj v_j / (sum_{j<=t} w_tj + eps), w = 1 + s + s^2/2, s = q.k/sqrt(F)."""
    out = []
    for t in range(len(q_TxHxF)):
        s_JxH = np.einsum("hf,jhf->jh", q_TxHxF[t], k_TxHxF[:t + 1]) / math.sqrt(q_TxHxF.shape[-1])
        w_JxH = 1.0 + s_JxH + 0.5 * s_JxH ** 2
        out.append(np.einsum("jh,jhd->hd", w_JxH, v_TxHxD[:t + 1]) / (w_JxH.sum(0)[:, None] + eps))
    return np.stack(out)


def params64(module) -> dict[str, np.ndarray]:
    _, params, _ = nnx.split(module, nnx.Param, ...)
    return {".".join(map(str, path)): np.asarray(v.get_value(), np.float64)
            for path, v in nnx.to_flat_state(params)}


def reference(p, x_BxLxE: np.ndarray, directions: int) -> np.ndarray:
    """The block per row over its real tokens: x W_in, per direction conv_W and the loop on the
    (reversed) row, the directions summed, W_out; zeros at padded positions."""
    kernel_CxWxU = p["conv_kernel_CxWxU"]
    taps = kernel_CxWxU.shape[1]
    want = np.zeros(x_BxLxE.shape)
    for row, n in enumerate(LENGTHS):
        u_TxU = np.asarray(x_BxLxE[row, :n], np.float64) @ p["in_proj.kernel"]
        o_TxHxD = np.zeros((n, H, D))
        for c, order in enumerate([slice(None), slice(None, None, -1)][:directions]):
            padded = np.concatenate([np.zeros((taps - 1, u_TxU.shape[1])), u_TxU[order]])
            conv_TxU = sum(kernel_CxWxU[c, j] * padded[j:j + n] for j in range(taps))
            q, k = (conv_TxU[:, i * H * F:(i + 1) * H * F].reshape(n, H, F) for i in (0, 1))
            v = conv_TxU[:, 2 * H * F:].reshape(n, H, D)
            o_TxHxD += taylor_loop(q, k, v)[order]
        want[row, :n] = o_TxHxD.reshape(n, E) @ p["out_proj.kernel"]
    return want


def max_rel_err(got_BxLxE, want_BxLxE) -> float:
    return float(np.abs(got_BxLxE[MASK_BxL] - want_BxLxE[MASK_BxL]).max()
                 / np.abs(want_BxLxE[MASK_BxL]).max())


# --- the kernel: chunked == recurrent == the float64 loop ----------------------------------------

def test_kernel_equals_float64_loop_in_values_and_gradients():
    """Raw q, k, v with s ~ N(0, 1.4^2) (its range covers the kernel's minimum at s = -1); L = 2.5
    chunks and chunks of 7 (11 and a part), row 2 padded with garbage at padded keys. Values ==
    the loop; gradients (q, k, v) == those of the float64 lax.scan recurrence elementwise."""
    rng = np.random.default_rng(1)
    q, k = (1.2 * rng.standard_normal((B, L, H, F)) for _ in range(2))
    v = rng.standard_normal((B, L, H, D))
    weight = rng.standard_normal((B, L, H, D)) * MASK_BxL[:, :, None, None]

    def loss(form, chunk, q, k, v):
        out = (taylor_attention_chunked(q, k, v, MASK_BxL, chunk, EPS) if form == "chunked"
               else taylor_attention_recurrent(q, k, v, MASK_BxL, EPS))
        return jnp.sum(out * weight.astype(out.dtype)), out

    grad = lambda form, chunk=0: jax.jit(jax.value_and_grad(
        functools.partial(loss, form, chunk), (0, 1, 2), has_aux=True))
    with jax.enable_x64(True):
        (_, out64), grads64 = grad("recurrent")(*(jnp.asarray(x) for x in (q, k, v)))
        out64, grads64 = np.asarray(out64), [np.asarray(g) for g in grads64]
    assert out64.dtype == np.float64
    for chunk in (CHUNK, 7):
        (_, out), grads = grad("chunked", chunk)(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
        for row, n in enumerate(LENGTHS):
            want = taylor_loop(q[row, :n], k[row, :n], v[row, :n])
            assert rel_err(np.asarray(out)[row, :n], want) <= 1e-6, chunk   # 2e-7..3e-7 measured
            assert rel_err(out64[row, :n], want) <= 1e-12
        for name, got, want in zip("qkv", grads, grads64):
            assert rel_err(got, want) <= 1e-5, (chunk, name)               # 2e-7..3e-7 measured
            assert np.abs(np.asarray(got)[~MASK_BxL]).max() == 0.0  # padded q, k, v: no gradient
    s = np.einsum("lhf,lhf->lh", q[0], k[0]) / math.sqrt(F)
    assert s.min() < -2.0 and s.max() > 2.0


# --- the module: chunked == float64 reference, values and gradients -------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
def test_module_equals_float64_loop(bidirectional):
    """Both forms equal the numpy pipeline at real positions (L = 2.5 chunks; row 2 padded)."""
    p, x = params64(build(bidirectional)), make_input(0)
    want = reference(p, x, 1 + bidirectional)
    for form in ("chunked", "recurrent") if bidirectional else ("chunked",):
        got = outputs(bidirectional, form)[0]
        assert got.shape == (B, L, E) and np.isfinite(got).all()
        assert max_rel_err(got, want) <= 1e-5, form                         # 2e-7..8e-7 measured
    if bidirectional:  # a planted bug the comparison must reject: the reversed pass left out
        assert max_rel_err(outputs(True)[0], reference(p, x, 1)) > 1e-2


@pytest.mark.parametrize("bidirectional", [True, False])
def test_gradients_equal_float64_finite_differences(bidirectional):
    """Per parameter array and the input: the fp32 gradient along 3 random unit directions equals
    the float64 central difference of the numpy pipeline; padded inputs get no gradient; and
    (bidirectional) the recurrent form's gradients equal the chunked form's elementwise."""
    p, x, weight = params64(build(bidirectional)), make_input(0), make_input(1)
    directions = 1 + bidirectional
    objective = lambda p, x: float(np.sum(np.where(MASK_BxL[:, :, None], weight, 0.0)
                                          * reference(p, x, directions)))
    _, g_params, g_x = outputs(bidirectional)
    g_all = {**{name: np.asarray(g, np.float64) for name, g in g_params.items()},
             "x": np.asarray(g_x, np.float64)}
    assert set(g_all) == set(p) | {"x"}
    for name, (err, ad, fd) in directional_errors(objective, p, x, g_all, MASK_BxL).items():
        assert err <= 1e-5, (name, err, ad, fd)                              # 1e-7..6e-7 measured
    assert np.abs(g_x[~MASK_BxL]).max() == 0.0
    if bidirectional:
        _, other, other_x = outputs(True, "recurrent")
        for name, g in g_params.items():
            assert rel_err(other[name], g) <= 1e-5, name  # ~5e-7 measured
        assert rel_err(other_x, g_x) <= 1e-5


# --- padding and direction ----------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
def test_padding_invariance_and_truncation(bidirectional):
    """Noise at padded positions moves no real output, and a padded row equals its real tokens
    run alone, unpadded (the reversed pass starts from an empty state at the last real token)."""
    module = build(bidirectional)
    x = make_input(4)
    got = run(module, x)
    noise = 50.0 * np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    noisy = run(module, np.where(MASK_BxL[:, :, None], x, noise))
    assert np.abs(noisy - got)[MASK_BxL].max() <= 1e-6
    n = LENGTHS[1]
    alone = run(module, x[1:, :n], np.ones((1, n), bool))[0]
    assert rel_err(got[1, :n], alone) <= 1e-6


@pytest.mark.parametrize("bidirectional", [True, False])
def test_direction_of_information_flow(bidirectional):
    """Causal: token 40 moves outputs >= 40 only (chunk 1 and 2), never an earlier one;
    bidirectional: the earlier ones too."""
    module = build(bidirectional)
    x = make_input(6)
    moved = np.abs(run(module, x + 3.0 * (np.arange(L) == 40)[None, :, None]) - run(module, x))
    assert moved[0, 40:].max() > 1e-3 and moved[0, 70:].max() > 1e-4
    if bidirectional:
        assert moved[0, :32].max() > 1e-4
    else:
        assert moved[0, :40].max() == 0.0


# --- the feature map, the normaliser, init, parameters, settings ----------------------------------

def test_feature_map_is_the_second_order_taylor_kernel():
    """phi has 1 + F + F^2 = 273 features at F = 16 and phi(q) . phi(k) = 1 + s + s^2/2 with
    s = q.k / sqrt(F) (Based's TaylorExp); the kernel is >= 1/2 (its minimum, at s = -1) and
    matches exp(s) to the third-order remainder."""
    rng = np.random.default_rng(7)
    q, k = rng.standard_normal((2, 500, F))
    phi_q, phi_k = (np.asarray(taylor_features(jnp.asarray(x, jnp.float32)), np.float64)
                    for x in (q, k))
    assert phi_q.shape == (500, 273)
    s = np.sum(q * k, -1) / math.sqrt(F)
    kernel = np.sum(phi_q * phi_k, -1)
    np.testing.assert_allclose(kernel, 1 + s + s ** 2 / 2, rtol=1e-5, atol=1e-5)
    assert kernel.min() >= 0.5 - 1e-5 and abs(s).max() > 2.0
    small = abs(s) < 0.3
    assert (abs(kernel - np.exp(s))[small] <= abs(s[small]) ** 3 / 6 * np.exp(0.3) + 1e-5).all()


def test_weights_are_a_distribution():
    """Every real key gets a positive weight and they sum to 1: values constant over time pass
    through unchanged (both forms), whatever q and k."""
    rng = np.random.default_rng(8)
    q, k = (jnp.asarray(2.0 * rng.standard_normal((B, L, H, F)), jnp.float32) for _ in range(2))
    v = jnp.broadcast_to(jnp.asarray(rng.standard_normal((1, 1, H, D)), jnp.float32), (B, L, H, D))
    chunked = jax.jit(lambda q, k, v: taylor_attention_chunked(q, k, v, MASK_BxL, CHUNK, EPS))
    recurrent = jax.jit(lambda q, k, v: taylor_attention_recurrent(q, k, v, MASK_BxL, EPS))
    for out in (chunked(q, k, v), recurrent(q, k, v)):
        np.testing.assert_allclose(np.asarray(out)[MASK_BxL], np.asarray(v)[MASK_BxL],
                                   rtol=2e-6, atol=2e-6)


def test_init_follows_based():
    """No biases (Based's projections and ShortConvolution); the depthwise conv U(+-1/sqrt(W))
    (PyTorch Conv1d's default, which ShortConvolution keeps), one per direction."""
    module = build(True)
    p = params64(module)
    assert set(p) == {"in_proj.kernel", "out_proj.kernel", "conv_kernel_CxWxU"}
    taps = module.cfg.conv_size
    conv = p["conv_kernel_CxWxU"]
    assert conv.shape == (2, taps, 2 * H * F + E) and taps == 3
    assert np.abs(conv).max() <= 1 / math.sqrt(taps) and conv.std() > 0.8 / math.sqrt(3 * taps)
    assert not np.allclose(conv[0], conv[1])  # each direction its own conv


@pytest.mark.parametrize("bidirectional, count", [
    # E x (2 H F + E) (W_q | W_k | W_v) + E x E (W_out) + C x W x (2 H F + E) (the convs)
    (True, 32 * 96 + 32 * 32 + 2 * 3 * 96),
    (False, 32 * 96 + 32 * 32 + 3 * 96),
])
def test_parameter_count_at_e32_h2(bidirectional, count):
    module = nnx.eval_shape(lambda: make_attention(BasedMixer, 64, heads=2, head_dim=16,
                                                   bidirectional=bidirectional))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))) == count


@pytest.mark.parametrize("field", ["feature_dim", "chunk_size", "conv_size", "eps"])
def test_invalid_settings_fail_at_build(field):
    with pytest.raises(ValueError, match="based needs model.attention.feature_dim") as err:
        make_attention(BasedMixer, L, **{field: -1})
    assert "\n" not in str(err.value) and "suit task.seq_len=80" in str(err.value)


def test_unknown_form_fails():
    with pytest.raises(ValueError, match="form='parallel'; use chunked or recurrent"):
        build(True).mix(jnp.zeros((1, 8, E)), jnp.ones((1, 8), bool), "parallel")


def test_memory_grows_linearly():
    """No L x L intermediate in fwd+bwd, and the largest one grows like L (traced, not run)."""
    sizes = []
    for length in (256, 1024):
        module = make_attention(BasedMixer, length, heads=H, head_dim=D)
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        x = jnp.zeros((B, length, H, D))
        mask = jnp.ones((B, length), bool)
        loss = lambda x, p: jnp.sum(nnx.merge(graphdef, p, rest)(x, x, x, mask) ** 2)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, params).jaxpr
        assert max_two_long_axes(jaxpr, length) is None
        sizes.append(largest_intermediate(jaxpr))
    assert np.log(sizes[1] / sizes[0]) / np.log(4) <= 1.02


def test_tiny_param_count_is_pinned():
    # based (E = 32, H = 2, feature dim F = 16, 3 taps, 2 directions): [W_q|W_k|W_v] E x (2HF + E)
    # and W_out E x E, no biases; per direction a conv of 3 x (2HF + E).
    assert_tiny_params("based", TINY_TRANSFORMER - 4 * (32 * 32 + 32) + 32 * (2 * 2 * 16 + 32)
                                + 32 * 32 + 2 * 3 * (2 * 2 * 16 + 32)
                                - POS_TABLE, positions=False)
