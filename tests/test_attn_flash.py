"""The fast exact attentions against the textbook reference: dense's explicit form and flash
(blockwise, custom VJP), values and gradients, with padding, ALiBi and RoPE; flash's memory
shape; the FLOP count the bench divides by; cheap dropout."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY_TRANSFORMER, assert_tiny_params, make_attention, rel_err
from lra import models
from lra.check import largest_intermediate, max_two_long_axes
from lra.train.measure import iter_eqns, matmul_flops
from lra.train.steps import make_steps
from lra.models.attention import dense as dense_module
from lra.models.attention.flash import flash_attention
from lra.models.attention.softmax import masked_softmax_attention, softmax_attention
from lra.models.config import ModelConfig
from lra.models.encoder import dropout, dropout_bits
from lra.models.posenc import AlibiBias
from lra.config import TrainConfig


def qkv(length, b=2, h=3, d=8, seed=0, real=(None, -29)):
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, (b, length, h, d)) for key in keys)
    lengths = jnp.array([length if r is None else length + r for r in real])
    return q, k, v, jnp.arange(length)[None, :] < lengths[:, None]


rel = rel_err


def explicit_alibi(slopes_H, length: int):
    """ALiBi's [H, L, L] bias written out: -m_h |i - j| (None: no bias)."""
    if slopes_H is None:
        return None
    pos = jnp.arange(length)
    return -jnp.asarray(slopes_H)[:, None, None] * jnp.abs(pos[:, None] - pos[None, :])


def reference(q, k, v, mask, slopes_H=None):
    bias = explicit_alibi(slopes_H, q.shape[1])
    return masked_softmax_attention(q, k, v, mask[:, None, None, :],
                                    None if bias is None else bias[None])


def as_bias(slopes_H):
    return None if slopes_H is None else AlibiBias(slopes_H)


FAST = {
    "explicit": lambda q, k, v, mask, s=None: softmax_attention(
        q, k, v, mask, explicit_alibi(s, q.shape[1])),
    "flash-32": lambda q, k, v, mask, s=None: flash_attention(q, k, v, mask, as_bias(s),
                                                              block_size=32),
    "flash-48": lambda q, k, v, mask, s=None: flash_attention(q, k, v, mask, as_bias(s),
                                                              block_size=48),
}


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("name", sorted(FAST))
def test_fast_forms_equal_reference_values_and_gradients(name, alibi):
    """L=100 is no multiple of either block: the padded last key block is masked correctly."""
    q, k, v, mask = qkv(100)
    slopes = AlibiBias.for_heads(q.shape[2]).slopes_H if alibi else None
    real = np.asarray(mask)
    cotangent = jax.random.normal(jax.random.key(5), q.shape) * real[:, :, None, None]

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, mask, slopes) * cotangent)

    got = jax.jit(lambda q, k, v: FAST[name](q, k, v, mask, slopes))(q, k, v)
    want = reference(q, k, v, mask, slopes)
    assert rel(np.asarray(got)[real], np.asarray(want)[real]) <= 1e-5
    grads = jax.jit(jax.grad(loss(FAST[name]), argnums=(0, 1, 2)))(q, k, v)
    grads_ref = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for which, g, g_ref in zip("qkv", grads, grads_ref):
        assert rel(g, g_ref) <= 1e-5, f"d{which}: {rel(g, g_ref):.2e}"
    no_bias = reference(q, k, v, mask)
    assert alibi == (rel(np.asarray(no_bias)[real], np.asarray(want)[real]) > 1e-3)


def tiny_model(kind: str, pos: str, **attn):
    cls = models.attention.get(kind)
    cfg = ModelConfig(emb_dim=32, num_heads=4, num_layers=2, mlp_dim=64, dropout=0.0, pos=pos,
                      pool="mean", attention=cls.config_cls(**attn))
    spec = type("Spec", (), dict(vocab_size=20, num_classes=3, seq_len=96, kind="classify",
                                 default_pool="cls"))()
    return models.build(cfg, spec, seed=0)


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_transformer_forms_and_flash_give_the_same_model(pos):
    """Whole model, same parameters: logits and every parameter gradient agree (<= 1e-5)."""
    rng = np.random.default_rng(0)
    lengths = np.array([96, 61])
    inputs = rng.integers(2, 20, (2, 96)).astype(np.int32)
    inputs[np.arange(96)[None, :] >= lengths[:, None]] = 0
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.array([0, 2])}
    results = {}
    for name, kind, attn in [("reference", "dense", {"impl": "reference"}),
                             ("explicit", "dense", {"impl": "explicit"}),
                             ("flash", "flash", {"block_size": 32})]:
        graphdef, params, rest = nnx.split(tiny_model(kind, pos, **attn), nnx.Param, ...)

        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(batch)
            return optax_xent(logits, batch["targets"]), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results[name] = (logits, jax.tree.leaves(grads))
    want_logits, want_grads = results["reference"]
    for name in ("explicit", "flash"):
        logits, grads = results[name]
        assert rel(logits, want_logits) <= 1e-5, name
        flat, flat_ref = (np.concatenate([np.ravel(g) for g in gs]) for gs in (grads, want_grads))
        assert rel(flat, flat_ref) <= 1e-5, name
        assert np.abs(flat_ref).sum() > 0


def optax_xent(logits, targets):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def test_flash_has_no_length_squared_array_forward_or_backward():
    length, block = 512, 64
    q, k, v, mask = qkv(length, b=1, h=2, real=(-100,))

    def loss(q, k, v):
        return jnp.sum(flash_attention(q, k, v, mask, block_size=block) ** 2)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    assert max_two_long_axes(jaxpr, length) is None

    # Nothing bigger than one score block [B, H, L, block] anywhere, loops and backward included
    # (a blocked all-pairs array [N, B, H, block, block] or [B, H, L, L] would be 8x bigger).
    assert largest_intermediate(jaxpr) <= 1 * 2 * length * block
    # The backward pass was traced (custom VJP): its 4 matmuls per block plus the forward's 2.
    dots = sum(1 for eqn, _ in iter_eqns(jaxpr) if eqn.primitive.name == "dot_general")
    assert dots >= 6


def test_matmul_flops_counts_loops_and_the_recomputation():
    a = jnp.ones((8, 16))
    assert matmul_flops(lambda x: x @ x.T, a) == 2 * 8 * 8 * 16
    scanned = lambda x: jax.lax.scan(lambda c, _: (c @ jnp.ones((16, 16)), None), x, None,
                                     length=5)[0]
    assert matmul_flops(scanned, a) == 5 * 2 * 8 * 16 * 16
    # Flash recomputes Q K^T once in its backward: exactly one score matmul more than dense.
    b, length, h, d = 1, 128, 2, 8
    q, k, v, mask = qkv(length, b=b, h=h, d=d, real=(None,))

    def grad_flops(f):
        return matmul_flops(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, mask)), (0, 1, 2)),
                            q, k, v)

    dense = grad_flops(FAST["explicit"])
    flash = grad_flops(FAST["flash-32"])
    assert dense == 6 * 2 * b * h * length * length * d  # QK^T, PV; dP, dV, dQ, dK
    assert flash - dense == 2 * b * h * length * length * d


def test_dense_impl_choice_is_logged():  # an unknown impl: test_attention.CONFIG_CASES
    if jax.default_backend() == "gpu":
        pytest.skip("the CPU fallback is what this test checks")
    module = make_attention("dense", 100, heads=3, head_dim=8)
    q, k, v, mask = qkv(100)
    out = module(q, k, v, mask)
    assert any(m.startswith("dense attention: explicit XLA form (impl=auto; cuDNN needs a GPU")
               for m in dense_module._logged)
    real = np.asarray(mask)
    assert rel(np.asarray(out)[real], np.asarray(reference(q, k, v, mask))[real]) <= 1e-5
    cudnn = make_attention("dense", 100, heads=3, head_dim=8, impl="cudnn")
    with pytest.raises(Exception):
        cudnn(q, k, v, mask)  # forced cuDNN where there is none: an error, not a fallback


def test_dropout_rate_independence_and_determinism():
    x = jnp.ones((64, 1024))
    key = jax.random.key(3)
    out = np.asarray(dropout(x, 0.1, key))
    kept = out != 0
    assert abs(1 - kept.mean() - 0.1) < 0.005  # 65536 draws: 5 sigma is ~0.006
    np.testing.assert_allclose(out[kept], 1 / 0.9, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(dropout(x, 0.1, key)), out)
    # Neighbours (along rows and across rows) and two keys are independent: P(both kept) ~ 0.81.
    for a, b in ((kept[:, 1:], kept[:, :-1]), (kept[1:], kept[:-1])):
        assert abs((a & b).mean() - 0.81) < 0.01
    other = np.asarray(dropout(x, 0.1, jax.random.key(4))) != 0
    assert abs((kept & other).mean() - 0.81) < 0.01
    # The bits themselves: each of the 32 bit positions is a fair coin.
    bits = np.asarray(dropout_bits(key, (1 << 16,)))
    ones = ((bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(0)
    assert np.all(np.abs(ones - 0.5) < 0.01)
    assert dropout(x, 0.1, None) is x


def test_same_seed_same_step_with_dropout():
    """Two fresh steps from one seed with dropout on: identical losses and parameters."""
    cfg = dataclasses.replace(TrainConfig(), batch_size=2, steps=2, warmup_steps=1)
    batch = {"inputs": jnp.asarray(np.random.default_rng(0).integers(1, 20, (2, 96)), jnp.int32),
             "targets": jnp.array([0, 1])}
    outs = []
    for _ in range(2):
        model = tiny_model("dense", "learned")
        model.encoder.rate = 0.3
        for block in model.encoder.blocks:
            block.rate = 0.3
        steps = make_steps(model, cfg)
        state = steps.init(jax.random.key(0))
        state, m1 = steps.train(state, batch)
        state, m2 = steps.train(state, batch)
        outs.append((float(m1["loss"]), float(m2["loss"]), jax.tree.leaves(state.params)[0]))
    assert outs[0][:2] == outs[1][:2]
    np.testing.assert_array_equal(np.asarray(outs[0][2]), np.asarray(outs[1][2]))


def test_transformer_tiny_param_count_is_pinned():
    assert_tiny_params("transformer", TINY_TRANSFORMER)


def test_flash_tiny_param_count_is_pinned():
    assert_tiny_params("flash", TINY_TRANSFORMER)
