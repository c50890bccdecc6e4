"""DeltaNet and Gated DeltaNet (models/attention/deltanet.py): the chunkwise kernel agrees with a
float64 step-by-step loop of the (gated) delta rule in values, and with the float64 lax.scan
recurrence in gradients; the whole module agrees with a float64 numpy pipeline of the papers'
equations (short conv, SiLU, L2 norm, beta, alpha, the loop, RMSNorm, gate). References see the
real tokens of a row only (a padded row is a shorter sequence), so padding is checked on the way.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lra.models.attention.deltanet  # noqa: F401 - registers deltanet and gated_deltanet
from conftest import (POS_TABLE, TINY_TRANSFORMER, assert_tiny_params, make_attention, np64,
                      rel_err, silu, softplus)
from lra.models.attention.base import SSMParam
from lra.models.attention.deltanet import A_INIT_RANGE, delta_rule_chunkwise, delta_rule_recurrent

B, L, H, D = 2, 80, 2, 8        # L = 2.5 chunks of 32
E = H * D
CHUNK = 32
LENGTHS = (L, L - 29)           # second row padded
MASK_BxL = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]
KINDS = ("deltanet", "gated_deltanet")


@functools.cache
def build(kind: str, bidirectional: bool = True):
    """One module per (kind, direction) for the whole file: every build costs XLA compiles."""
    return make_attention(kind, L, heads=H, head_dim=D, bidirectional=bidirectional,
                          chunk_size=CHUNK)


@functools.cache
def module_grad(kind: str, bidirectional: bool, form: str):
    """jit(value_and_grad) of sum(out * weight) w.r.t. (params, q, k, v), with (out, o before the
    norm) as aux; params are an argument, so edited copies reuse the compile."""
    graphdef, params, rest = nnx.split(build(kind, bidirectional), nnx.Param, ...)

    def loss(params, q, k, v, mask, weight):
        module = nnx.merge(graphdef, params, rest)
        o = module.delta_rule(q, k, v, mask, form=form)
        out = module.output(o, v)
        return jnp.sum(out * weight), (out, o)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)), params


def inputs(seed: int):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, L, H, D)).astype(np.float32) for _ in range(3))
    weight = rng.standard_normal((B, L, H, D)) * MASK_BxL[:, :, None, None]
    return q, k, v, weight.astype(np.float32)


def to64(tree):
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), tree)


# --- float64 references ----------------------------------------------------------------------

def delta_loop(q, k, v, beta, g) -> np.ndarray:
    """One row [T, H, D] (beta, g [T, H]) step by step: S <- alpha S; u = beta (v - k S);
    S <- S + k^T u; o = q S."""
    s_HxDxD, out = np.zeros((q.shape[1], q.shape[2], v.shape[2])), []
    for q_t, k_t, v_t, beta_t, g_t in zip(q, k, v, beta, g):
        s_HxDxD = np.exp(g_t)[:, None, None] * s_HxDxD
        u_HxD = beta_t[:, None] * (v_t - np.einsum("hd,hde->he", k_t, s_HxDxD))
        s_HxDxD = s_HxDxD + k_t[:, :, None] * u_HxD[:, None, :]
        out.append(np.einsum("hd,hde->he", q_t, s_HxDxD))
    return np.stack(out)


def reference(module, q, k, v, directions: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The module on one row's real tokens [T, H, D] in float64: (output, o before the norm);
    `directions` = 1 leaves a bidirectional module's reversed pass out."""
    t = len(q)
    v_TxE = np64(v).reshape(t, E)
    beta = 1.0 / (1.0 + np.exp(-(v_TxE @ np64(module.beta_proj.kernel[...]))))
    g = np.zeros_like(beta)
    if hasattr(module, "a_log_H"):
        g = -np.exp(np64(module.a_log_H[...])) * softplus(
            v_TxE @ np64(module.decay_proj.kernel[...]) + np64(module.dt_bias_H[...]))
    x_Tx3E = np.concatenate([np64(q).reshape(t, E), np64(k).reshape(t, E), v_TxE], -1)
    kernel_CxWx3E = np64(module.conv_kernel_CxWx3E[...])
    taps = kernel_CxWx3E.shape[1]
    o = np.zeros((t, H, D))
    for c, order in enumerate([slice(None), slice(None, None, -1)][:min(
            directions, len(kernel_CxWx3E))]):
        padded = np.concatenate([np.zeros((taps - 1, 3 * E)), x_Tx3E[order]])
        conv_Tx3E = sum(kernel_CxWx3E[c, j] * padded[j:j + t] for j in range(taps))
        q_c, k_c, v_c = (x.reshape(t, H, D) for x in np.split(silu(conv_Tx3E), 3, axis=-1))
        q_c, k_c = (x / np.sqrt((x ** 2).sum(-1, keepdims=True) + 1e-6) for x in (q_c, k_c))
        o += delta_loop(q_c, k_c, v_c, beta[order], g[order])[order]
    out = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + 1e-5)
    if hasattr(module, "gate"):
        out = out * silu(v_TxE @ np64(module.gate.kernel[...])).reshape(t, H, D)
    return out, o


def reference_rows(module, q, k, v) -> np.ndarray:
    """`reference`'s outputs at the real positions of every row, concatenated."""
    return np.concatenate([reference(module, q[row, :n], k[row, :n], v[row, :n])[0]
                           for row, n in enumerate(LENGTHS)])


# --- the kernel: chunkwise == step-by-step, values and gradients -------------------------------

def test_kernel_equals_float64_loop_in_values_and_gradients():
    """Raw inputs with a decay (DeltaNet's no-decay path: the module tests below): unit keys,
    beta in (0, 1), head 0's log-decays ~ -0.1 a step, head 1's ~ -4, summing far below
    float32's exp range over a chunk; L = 2.5 chunks, row 2 padded with beta = k = v = g = 0."""
    rng = np.random.default_rng(1)
    q, v = (rng.standard_normal((B, L, H, D)) for _ in range(2))
    k = rng.standard_normal((B, L, H, D))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = rng.uniform(0.0, 1.0, (B, L, H))
    g = -rng.exponential(1.0, (B, L, H)) * np.array([0.1, 4.0])
    pad = ~MASK_BxL
    k[pad], v[pad], beta[pad], g[pad] = 0.0, 0.0, 0.0, 0.0
    weight = rng.standard_normal((B, L, H, D)) * MASK_BxL[:, :, None, None]
    args = (q, k, v, beta, g)

    def loss(form, q, k, v, beta, g):
        out = (delta_rule_chunkwise(q, k, v, beta, g, CHUNK) if form == "chunkwise"
               else delta_rule_recurrent(q, k, v, beta, g))
        return jnp.sum(out * weight.astype(out.dtype)), out

    grad = lambda form: jax.jit(jax.value_and_grad(functools.partial(loss, form),
                                                   (0, 1, 2, 3, 4), has_aux=True))
    (_, out), grads = grad("chunkwise")(*(jnp.asarray(x, jnp.float32) for x in args))
    with jax.enable_x64(True):
        (_, out64), grads64 = grad("recurrent")(*(jnp.asarray(x) for x in args))
        out64, grads64 = np.asarray(out64), [np.asarray(x) for x in grads64]
    assert out64.dtype == np.float64
    for row, n in enumerate(LENGTHS):
        want = delta_loop(q[row, :n], k[row, :n], v[row, :n], beta[row, :n], g[row, :n])
        assert rel_err(out[row, :n], want) <= 1e-5   # ~3e-7 measured
        assert rel_err(out64[row, :n], want) <= 1e-12
    assert g[0, :CHUNK].sum(0).min() < -100.0  # the case the strong decays are about occurs
    for name, got, want in zip(("q", "k", "v", "beta", "g"), grads, grads64):
        assert rel_err(got, want) <= 1e-5, name      # ~3e-7 measured
        assert np.isfinite(np.asarray(got)).all()


# --- the module: chunkwise == float64 reference, values and gradients -------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_module_equals_float64_reference(kind, bidirectional):
    """Chunkwise (fp32) == the numpy pipeline (fp64) in values. Bidirectional: its gradients
    w.r.t. q, k, v and every parameter (the convs of both directions, beta's, the decay's, the
    gate's) == those of the recurrent form in float64 (the causal pass's own gradients: the
    kernel test above); real outputs read nothing at padded positions."""
    module = build(kind, bidirectional)
    q, k, v, weight = inputs(0)
    fn, params = module_grad(kind, bidirectional, "chunkwise")
    (_, (out, o)), grads = fn(params, q, k, v, MASK_BxL, weight)
    for row, n in enumerate(LENGTHS):
        want_out, want_o = reference(module, q[row, :n], k[row, :n], v[row, :n])
        assert rel_err(out[row, :n], want_out) <= 1e-5   # ~3e-7 measured
        assert rel_err(o[row, :n], want_o) <= 1e-5
    for g_x in grads[1:]:  # q, k, v at padded positions: no gradient at all
        assert np.abs(np.asarray(g_x)[~MASK_BxL]).max() == 0.0
    if not bidirectional:
        return
    causal_only, _ = reference(module, q[0], k[0], v[0], directions=1)
    assert rel_err(out[0], causal_only) > 1e-2  # a planted bug: the reversed pass left out
    fn64, _ = module_grad(kind, bidirectional, "recurrent")
    with jax.enable_x64(True):
        (_, (out64, _)), grads64 = fn64(to64(params), *to64((q, k, v)), MASK_BxL, to64(weight))
        grads64 = jax.tree.map(np.asarray, grads64)
    assert rel_err(np.asarray(out64)[MASK_BxL], reference_rows(module, q, k, v)) <= 1e-9
    leaves, leaves64 = jax.tree.leaves(grads), jax.tree.leaves(grads64)
    assert len(leaves) == len(jax.tree.leaves(params)) + 3
    for got, want in zip(leaves, leaves64):
        assert np.abs(want).max() > 0 and rel_err(got, want) <= 1e-5  # 2e-7..2e-6 measured


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_padding_and_direction_of_information_flow(kind, bidirectional):
    """Noise at padded positions moves no real output; a change at token 60 moves outputs >= 60
    only when causal, and output 0 too when bidirectional."""
    q, k, v, weight = inputs(2)
    fn, params = module_grad(kind, bidirectional, "chunkwise")
    run = lambda q, k, v: np.asarray(fn(params, q, k, v, MASK_BxL, weight)[0][1][0])
    out = run(q, k, v)
    pad = ~MASK_BxL[:, :, None, None]
    noise = [50.0 * np.random.default_rng(3 + i).standard_normal(q.shape).astype(np.float32)
             for i in range(3)]
    noisy = run(*(np.where(pad, z, x) for z, x in zip(noise, (q, k, v))))
    assert np.abs(noisy - out)[MASK_BxL].max() <= 1e-6
    moved = np.abs(run(q, k, v + 3.0 * (np.arange(L) == 60)[:, None, None]) - out)
    assert moved[0, 60:].max() > 1e-3
    if bidirectional:
        assert moved[0, :60].max() > 1e-4
    else:
        assert moved[0, :60].max() <= 1e-7


def test_gated_without_decay_equals_deltanet():
    """alpha = 1 (A = exp(A_log) = 0) with DeltaNet's convs and W_beta: the gated delta rule is
    DeltaNet's delta rule (o before the norm; the output gate is the gated block's own)."""
    q, k, v, weight = inputs(5)
    plain, gated = build("deltanet"), nnx.clone(build("gated_deltanet"))
    gated.conv_kernel_CxWx3E[...] = plain.conv_kernel_CxWx3E[...]
    gated.beta_proj.kernel[...] = plain.beta_proj.kernel[...]
    fn, params = module_grad("deltanet", True, "chunkwise")
    fn_gated, _ = module_grad("gated_deltanet", True, "chunkwise")
    want = np.asarray(fn(params, q, k, v, MASK_BxL, weight)[0][1][1])[MASK_BxL]
    decayed = np.asarray(fn_gated(nnx.split(gated, nnx.Param, ...)[1], q, k, v, MASK_BxL,
                                  weight)[0][1][1])[MASK_BxL]
    gated.a_log_H[...] = np.full(H, -np.inf, np.float32)  # the same dtype: no recompile
    held = np.asarray(fn_gated(nnx.split(gated, nnx.Param, ...)[1], q, k, v, MASK_BxL,
                               weight)[0][1][1])[MASK_BxL]
    assert rel_err(held, want) <= 1e-6
    assert rel_err(decayed, want) > 1e-2  # the decay at its init does matter


# --- init, parameters, cost, config --------------------------------------------------------

def test_init_follows_mamba2_and_gates_stay_in_range():
    module = build("gated_deltanet")
    cfg = module.cfg
    a = np.exp(np64(module.a_log_H[...]))
    dt = softplus(np64(module.dt_bias_H[...]))
    assert a.shape == dt.shape == (H,)
    assert (A_INIT_RANGE[0] <= a).all() and (a <= A_INIT_RANGE[1]).all()
    assert (dt >= cfg.dt_min * (1 - 1e-5)).all() and (dt <= cfg.dt_max * (1 + 1e-5)).all()
    assert isinstance(module.a_log_H, SSMParam) and isinstance(module.dt_bias_H, SSMParam)
    # At init and a zero input, alpha = exp(-A dt) lies in [exp(-16 * 0.1), exp(-1e-3)];
    # on data it stays in (0, 1], and beta in (0, 1).
    alpha_zero = np.exp(-a * dt)
    assert (alpha_zero >= math.exp(-A_INIT_RANGE[1] * cfg.dt_max) - 1e-6).all()
    assert (alpha_zero <= math.exp(-A_INIT_RANGE[0] * cfg.dt_min) + 1e-6).all()
    v_BxLxE = jnp.asarray(3.0 * inputs(6)[2].reshape(B, L, E))
    beta, g = (np.asarray(x) for x in module.gates(v_BxLxE, jnp.asarray(MASK_BxL)))
    real = MASK_BxL
    assert (g[real] < 0).all() and np.isfinite(g).all()
    assert (beta[real] > 0).all() and (beta[real] < 1).all()
    assert (g[~real] == 0).all() and (beta[~real] == 0).all()  # padding holds the state
    bound = 1 / math.sqrt(cfg.conv_size)
    assert np.abs(np.asarray(module.conv_kernel_CxWx3E[...])).max() <= bound


@pytest.mark.parametrize("kind, bidirectional, count", [
    # 2 directions x 4 taps x 3E (convs) + E x H (W_beta)
    ("deltanet", True, 2 * 4 * 3 * 32 + 32 * 2),
    ("deltanet", False, 4 * 3 * 32 + 32 * 2),
    # + E x H (W_a) + H (A_log) + H (dt_bias) + E x E (the output gate W_G)
    ("gated_deltanet", True, 2 * 4 * 3 * 32 + 2 * 32 * 2 + 2 * 2 + 32 * 32),
])
def test_parameter_count_at_e32_h2(kind, bidirectional, count):
    module = make_attention(kind, 64, heads=2, head_dim=16, bidirectional=bidirectional)
    sizes = [x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))]
    assert sum(sizes) == count


def test_invalid_settings_fail_at_build():
    with pytest.raises(ValueError, match="deltanet needs model.attention.chunk_size"):
        make_attention("deltanet", L, chunk_size=0)
    with pytest.raises(ValueError, match="conv_size"):
        make_attention("gated_deltanet", L, conv_size=0)
    with pytest.raises(ValueError, match="dt_min <= dt_max"):
        make_attention("gated_deltanet", L, dt_min=0.2, dt_max=0.1)


def test_deltanet_tiny_param_count_is_pinned():
    # per direction a 4-tap depthwise conv (no bias) on q, k and v (4 x 3E), beta's E x H (read
    # from v)
    assert_tiny_params("deltanet", TINY_TRANSFORMER + 2 * 4 * 3 * 32 + 32 * 2
                                   - POS_TABLE, positions=False)


def test_gated_deltanet_tiny_param_count_is_pinned():
    # deltanet's + alpha's E x H, A_log and dt_bias per head, output gate E x E
    assert_tiny_params("gated_deltanet", TINY_TRANSFORMER + 2 * 4 * 3 * 32 + 2 * 32 * 2 + 2 * 2
                                         + 32 * 32 - POS_TABLE, positions=False)
