"""RWKV-7 (models/attention/rwkv7.py): the chunkwise DPLR kernel agrees with a float64 step-by-step
loop in values and with the float64 lax.scan recurrence in gradients, at the decay's floor and at
chunk sizes 16 and 128; the whole mixer agrees with a float64 numpy pipeline of the paper's
equations written in the paper's own convention (state [D_v, D_k], S_t = S_{t-1}(diag(w) -
kh^T (a kh)) + v^T kt, o = S r), so the transposition to rows is checked on the way. References
see the real tokens of a row only (a padded row is a shorter sequence).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lra.models.attention.rwkv7  # noqa: F401 - registers rwkv7
from conftest import POS_TABLE, TINY_TRANSFORMER, assert_tiny_params, make_attention, np64, rel_err
from lra.models.attention.base import SSMParam
from lra.models.attention.rwkv7 import (DECAY_FLOOR, RWKV7Mixer, depth_inits, lora_rank,
                                        wkv7_chunkwise, wkv7_recurrent)

B, L, H, D = 2, 40, 2, 8        # L = 2.5 chunks of 16
E = H * D
CHUNK = 16
LENGTHS = (L, L - 13)           # second row padded; its last real token inside chunk 2
MASK_BxL = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@functools.cache
def build(bidirectional: bool = True):
    """One module per direction setting for the whole file (every build costs compiles); random
    W_o and LoRA first factors, so that every parameter reaches the output."""
    return make_attention(RWKV7Mixer, L, heads=H, head_dim=D, bidirectional=bidirectional,
                          chunk_size=CHUNK, zero_init=False)


@functools.cache
def module_grad(bidirectional: bool, form: str):
    """jit(value_and_grad) of sum(out * weight) w.r.t. (params, x), out as aux; params are an
    argument, so edited copies reuse the compile."""
    graphdef, params, rest = nnx.split(build(bidirectional), nnx.Param, ...)

    def loss(params, x, mask, weight):
        out = nnx.merge(graphdef, params, rest).mix(x, mask, form)
        return jnp.sum(out * weight), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), params


def inputs(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    weight = rng.standard_normal((B, L, E)) * MASK_BxL[:, :, None]
    return x, weight.astype(np.float32)


def to64(tree):
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), tree)


def params64(module) -> dict[str, np.ndarray]:
    _, params, _ = nnx.split(module, nnx.Param, ...)
    return {".".join(map(str, path)): np64(v.get_value()) for path, v in nnx.to_flat_state(params)}


# --- float64 references ----------------------------------------------------------------------

def dplr_loop(r, g, k, v, alpha, beta) -> np.ndarray:
    """One row [T, H, D] in rows convention: S <- diag(e^g) S + beta^T (alpha S) + k^T v; o = r S."""
    s_HxDxD, out = np.zeros((r.shape[1], r.shape[2], v.shape[2])), []
    for r_t, g_t, k_t, v_t, alpha_t, beta_t in zip(r, g, k, v, alpha, beta):
        erased_HxD = np.einsum("hd,hde->he", alpha_t, s_HxDxD)
        s_HxDxD = (np.exp(g_t)[:, :, None] * s_HxDxD + beta_t[:, :, None] * erased_HxD[:, None, :]
                   + k_t[:, :, None] * v_t[:, None, :])
        out.append(np.einsum("hd,hde->he", r_t, s_HxDxD))
    return np.stack(out)


def reference(p: dict, x_TxE: np.ndarray, directions: int = 2) -> np.ndarray:
    """The mixer on one row's real tokens in float64, the paper's equations and convention."""
    t = len(x_TxE)
    x = np64(x_TxE)
    previous = np.concatenate([np.zeros((1, E)), x[:-1]])
    x_r, x_w, x_k, x_v, x_a, x_g = (x + (previous - x) * mu for mu in p["mix_6xE"])
    r, k, v = x_r @ p["rkv_3xExE"][0], x_k @ p["rkv_3xExE"][1], x_v @ p["rkv_3xExE"][2]
    d = p["w0_E"] + np.tanh(x_w @ p["w1_ExK"]) @ p["w2_KxE"]
    w = np.exp(-math.exp(-0.5) * sigmoid(d))
    a = sigmoid(p["a0_E"] + x_a @ p["a1_ExK"] @ p["a2_KxE"])
    g = sigmoid(x_g @ p["g1_ExK"]) @ p["g2_KxE"]
    heads = lambda z: z.reshape(t, H, D)
    kappa = heads(k * p["k_k_E"])
    kh = kappa / np.maximum(np.linalg.norm(kappa, axis=-1, keepdims=True), 1e-12)
    kt = heads(k * (1.0 + (a - 1.0) * p["k_a_E"]))
    r, v, w, a = heads(r), heads(v), heads(w), heads(a)
    o = np.zeros((t, H, D))
    for order in [slice(None), slice(None, None, -1)][:directions]:
        s_HxVxK = np.zeros((H, D, D))  # the paper's state: value rows, key columns
        o_dir = []
        for i in range(t)[order]:
            transition_HxKxK = (w[i][:, None, :] * np.eye(D)
                                - kh[i][:, :, None] * (a[i] * kh[i])[:, None, :])
            s_HxVxK = s_HxVxK @ transition_HxKxK + v[i][:, :, None] * kt[i][:, None, :]
            o_dir.append(np.einsum("hvk,hk->hv", s_HxVxK, r[i]))
        o += np.stack(o_dir)[order]
    mean = o.mean(-1, keepdims=True)
    var = ((o - mean) ** 2).mean(-1, keepdims=True)
    normed = ((o - mean) / np.sqrt(var + D * 1e-5)).reshape(t, E) * p["norm_scale_E"] \
        + p["norm_bias_E"]
    bonus = ((r * kt * p["r_k_HxD"]).sum(-1, keepdims=True) * v).reshape(t, E)
    return (g * (normed + bonus)) @ p["out_ExE"]


# --- the kernel: chunkwise == step-by-step, values and gradients -------------------------------

@pytest.mark.parametrize("chunk, length", [(16, 40), (128, 300)])
def test_kernel_equals_float64_loop_at_the_decay_floor(chunk, length):
    """Unit removal keys, a in (0, 1), head 0 at the floor log w = -e^-0.5 every step (the chunk
    factorisation's e^(0.607 S) at its largest: e^9.7 at 16, e^77.6 at 128), head 1 random in the
    range; L = 2.5 chunks, row 2 padded with log w = k = v = alpha = beta = 0."""
    rng = np.random.default_rng(1)
    shape = (B, length, H, D)
    mask = np.arange(length)[None, :] < np.array([length, length - 29])[:, None]
    r, k, v = (rng.standard_normal(shape) for _ in range(3))
    kh = rng.standard_normal(shape)
    kh /= np.linalg.norm(kh, axis=-1, keepdims=True)
    a = rng.uniform(0.0, 1.0, shape)
    g = -DECAY_FLOOR * rng.uniform(0.0, 1.0, shape)
    g[:, :, 0] = -DECAY_FLOOR
    alpha, beta = -kh, a * kh
    for x in (g, k, v, alpha, beta):
        x[~mask] = 0.0
    weight = rng.standard_normal(shape) * mask[:, :, None, None]
    args = (r, g, k, v, alpha, beta)

    def loss(form, *args):
        out = wkv7_chunkwise(*args, chunk) if form == "chunkwise" else wkv7_recurrent(*args)
        return jnp.sum(out * weight.astype(out.dtype)), out

    grad = lambda form: jax.jit(jax.value_and_grad(functools.partial(loss, form),
                                                   tuple(range(6)), has_aux=True))
    (_, out), grads = grad("chunkwise")(*(jnp.asarray(x, jnp.float32) for x in args))
    with jax.enable_x64(True):
        (_, out64), grads64 = grad("recurrent")(*(jnp.asarray(x) for x in args))
        out64, grads64 = np.asarray(out64), [np.asarray(x) for x in grads64]
    assert out64.dtype == np.float64
    for row, n in enumerate(mask.sum(1)):
        want = dplr_loop(*(x[row, :n] for x in args))
        assert rel_err(out[row, :n], want) <= 1e-5   # 2e-7 (16), 8e-7 (128) measured
        assert rel_err(out64[row, :n], want) <= 1e-12
    for name, got, want in zip(("r", "log_w", "k", "v", "alpha", "beta"), grads, grads64):
        assert np.isfinite(np.asarray(got)).all()
        assert rel_err(np.asarray(got)[mask], want[mask]) <= 1e-5, name  # 3e-7 / 2e-6 measured


# --- the mixer: chunkwise == the paper's equations in float64 ---------------------------------

@pytest.mark.parametrize("bidirectional", [True, False])
def test_mixer_equals_the_papers_equations_in_float64(bidirectional):
    """Chunkwise (fp32) == the numpy pipeline (fp64, the paper's convention) in values; the
    gradients w.r.t. x and every parameter == those of the recurrent form in float64; x at padded
    positions gets no gradient."""
    module = build(bidirectional)
    x, weight = inputs(0)
    fn, params = module_grad(bidirectional, "chunkwise")
    (_, out), grads = fn(params, x, MASK_BxL, weight)
    p = params64(module)
    for row, n in enumerate(LENGTHS):
        want = reference(p, x[row, :n], 2 if bidirectional else 1)
        assert rel_err(out[row, :n], want) <= 1e-5   # ~2e-7 measured
    assert np.abs(np.asarray(grads[1])[~MASK_BxL]).max() == 0.0
    if bidirectional:
        causal_only = reference(p, x[0], directions=1)
        assert rel_err(out[0], causal_only) > 1e-2  # a planted bug: the reversed pass left out
    fn64, _ = module_grad(bidirectional, "recurrent")
    with jax.enable_x64(True):
        (_, out64), grads64 = fn64(to64(params), to64(x), MASK_BxL, to64(weight))
        grads64 = jax.tree.map(np.asarray, grads64)
    assert rel_err(np.asarray(out64)[MASK_BxL], np.concatenate(
        [reference(p, x[row, :n], 2 if bidirectional else 1)
         for row, n in enumerate(LENGTHS)])) <= 1e-9
    leaves, leaves64 = jax.tree.leaves(grads), jax.tree.leaves(grads64)
    assert len(leaves) == len(jax.tree.leaves(params)) + 1 == 17
    for got, want in zip(leaves, leaves64):
        assert np.abs(want).max() > 0 and rel_err(got, want) <= 1e-5  # 2e-7..6e-7 measured


@pytest.mark.parametrize("bidirectional", [True, False])
def test_padding_and_direction_of_information_flow(bidirectional):
    """Noise at padded positions moves no real output; a change at token 25 moves outputs >= 25
    only when causal (the token shift reaches 26 too), and output 0 too when bidirectional."""
    x, weight = inputs(2)
    fn, params = module_grad(bidirectional, "chunkwise")
    run = lambda x: np.asarray(fn(params, x, MASK_BxL, weight)[0][1])
    out = run(x)
    noise = 50.0 * np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    noisy = run(np.where(MASK_BxL[:, :, None], x, noise))
    assert np.abs(noisy - out)[MASK_BxL].max() <= 1e-6
    moved = np.abs(run(x + 3.0 * (np.arange(L) == 25)[:, None].astype(np.float32)) - out)
    assert moved[0, 25:].max() > 1e-3
    if bidirectional:
        assert moved[0, :25].max() > 1e-4
    else:
        assert moved[0, :25].max() <= 1e-7


# --- init, depth, ranks, parameters, config -----------------------------------------------------

def test_init_follows_the_papers_code():
    """The default (zero_init) module: the reference code's constants, the decay within
    (e^-e^-0.5, 1) on any input, and a zero output (W_o = 0) at init."""
    module = make_attention("rwkv7", 64, heads=2, head_dim=16)
    p, e, d = params64(module), 32, 16
    i = np.arange(e)
    linear = i / (e - 1) - 0.5
    z = ((i % d) - (d - 1) / 2) / ((d - 1) / 2)
    zigzag = z * np.abs(z)
    for row, power in enumerate((0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):  # layer 0 of 1
        np.testing.assert_allclose(p["mix_6xE"][row], 1.0 - (i / e) ** power, atol=1e-6)
    np.testing.assert_allclose(p["w0_E"], -6 + 6 * i / (e - 1) + 0.5 + 2.5 * zigzag, atol=1e-5)
    np.testing.assert_allclose(p["a0_E"], -0.19 + 0.3 * zigzag + 0.4 * linear, atol=1e-6)
    np.testing.assert_allclose(p["k_k_E"], 0.71 - 0.1 * linear, atol=1e-6)
    assert (p["k_a_E"] == np.float32(1.02)).all() and (p["r_k_HxD"] == np.float32(-0.04)).all()
    assert isinstance(module.w0_E, SSMParam)
    for name in ("w1_ExK", "a1_ExK", "g1_ExK", "out_ExE"):
        assert (p[name] == 0).all(), name
    for name in ("w2_KxE", "a2_KxE", "g2_KxE"):  # orthogonal rows x 0.1 (K = 8 < E = 32)
        np.testing.assert_allclose(p[name] @ p[name].T, 0.01 * np.eye(8), atol=1e-6)
    bound = 0.5 / math.sqrt(e)
    for c, scale in enumerate((1.0, 0.1, 1.0)):
        assert np.abs(p["rkv_3xExE"][c]).max() <= scale * bound
        assert np.abs(p["rkv_3xExE"][c]).max() > 0.9 * scale * bound
    x = 30.0 * np.random.default_rng(4).standard_normal((2, 64, e)).astype(np.float32)
    mask = np.ones((2, 64), bool)
    mask[1, 40:] = False
    _, log_w, kt, v, kh, _, _ = module.inputs(jnp.asarray(x), jnp.asarray(mask))
    log_w = np.asarray(log_w)
    assert (log_w[mask] >= -DECAY_FLOOR - 1e-7).all() and (log_w[mask] < 0).all()
    for held in (log_w, kt, v, kh):  # padding holds the state
        assert (np.asarray(held)[~mask] == 0).all()
    assert (np.asarray(module.mix(jnp.asarray(x), jnp.asarray(mask))) == 0).all()


def test_depth_dependent_init_reaches_every_layer():
    """A 3-layer model: the encoder's tie_layers call gives layer l the paper's mixes and w0 of
    layer l of 3 (a lone module is layer 0 of 1)."""
    from lra import models
    from lra.models.attention.rwkv7 import RWKV7Config
    from lra.models.config import ModelConfig

    spec = type("Spec", (), dict(vocab_size=20, num_classes=3, seq_len=32, kind="classify",
                                 default_pool="mean"))()
    model = models.build(ModelConfig(emb_dim=32, num_heads=2, num_layers=3, attention=RWKV7Config(),
                                     pos="none"), spec)
    mixers = [block.attention.attn for block in model.encoder.blocks]
    e = 32
    for layer, mixer in enumerate(mixers):
        mix_6xE, w0_E = depth_inits(e, 16, layer, 3)
        np.testing.assert_allclose(np.asarray(mixer.mix_6xE[...]), mix_6xE, atol=1e-6)
        np.testing.assert_allclose(np.asarray(mixer.w0_E[...]), w0_E, atol=1e-5)
    # Layer 2 of 3: mu_r = 1 - (i/E)^(0.2/3); w0's exponent 1 + 1^0.3 = 2.
    i = np.arange(e)
    np.testing.assert_allclose(np.asarray(mixers[2].mix_6xE[...][0]), 1 - (i / e) ** (0.2 / 3),
                               atol=1e-6)
    z = ((i % 16) - 7.5) / 7.5
    np.testing.assert_allclose(np.asarray(mixers[2].w0_E[...]),
                               -6 + 6 * (i / (e - 1)) ** 2 + 0.5 + 2.5 * z * np.abs(z), atol=1e-5)
    assert not np.allclose(np.asarray(mixers[0].mix_6xE[...]), np.asarray(mixers[1].mix_6xE[...]))


@pytest.mark.parametrize("width, ranks", [(16, (8, 8, 8)), (32, (8, 8, 8)), (64, (16, 16, 16)),
                                          (128, (24, 24, 32)), (768, (48, 48, 120))])
def test_lora_ranks_follow_the_papers_formulas_rounded_to_8(width, ranks):
    assert (lora_rank(width, 1.8, 0.5), lora_rank(width, 1.8, 0.5),
            lora_rank(width, 0.6, 0.8)) == ranks


@pytest.mark.parametrize("fields, count", [
    # E = 32, H = 2, ranks 8: mixes 6E + W_r, W_k, W_v 3E^2 + W_o E^2 + LoRAs w, a (2 x (2 E K + E))
    # + g (2 E K) + xi, alpha E each + rho H x D + GroupNorm 2E.
    ({}, 6 * 32 + 4 * 32 * 32 + 2 * (2 * 32 * 8 + 32) + 2 * 32 * 8 + 2 * 32 + 32 + 2 * 32),
    ({"decay_rank": 4, "iclr_rank": 6, "gate_rank": 12, "bidirectional": False},
     6 * 32 + 4 * 32 * 32 + (2 * 32 * 4 + 32) + (2 * 32 * 6 + 32) + 2 * 32 * 12 + 5 * 32),
])
def test_parameter_count_at_e32_h2(fields, count):
    module = make_attention("rwkv7", 64, heads=2, head_dim=16, **fields)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))) == count


def test_invalid_settings_fail_at_build():
    with pytest.raises(ValueError, match="rwkv7 needs 1 <= model.attention.chunk_size <= 128"):
        make_attention("rwkv7", L, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        make_attention("rwkv7", L, chunk_size=256)
    with pytest.raises(ValueError, match="gate_rank >= 0"):
        make_attention("rwkv7", L, gate_rank=-1)


def test_tiny_param_count_is_pinned():
    # rwkv7 (E = 32, H = 2, LoRA ranks 8): token-shift mixes 6E, W_r, W_k, W_v, W_o 4 x E x E (no
    # biases), LoRAs w and a 2 x (E x 8 + 8 x E + E), g E x 8 + 8 x E, xi, alpha E, rho H x D,
    # GroupNorm 2E.
    assert_tiny_params("rwkv7", TINY_TRANSFORMER - 4 * (32 * 32 + 32) + 6 * 32 + 4 * 32 * 32
                                + 2 * (2 * 32 * 8 + 32) + 2 * 32 * 8 + 2 * 32 + 32 + 2 * 32
                                - POS_TABLE, positions=False)
