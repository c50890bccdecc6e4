"""Adaptive-span-specific tests: the banded blocked computation against the soft mask applied to
the full L x L softmax (float64), the ramp's values, the limits (a hard band, dense), the span's
gradient, the sown L1 penalty and the learned-span summary."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import (TINY_TRANSFORMER, assert_tiny_params, attention_matrix, dense_reference,
                      make_attention, random_qkv, rel_err)
from lra import models
from lra.config import TrainConfig
# Importing the module registers the kind (a plugin until it is built in).
from lra.models.attention.adaptive_span import AdaptiveSpanConfig, projected_clip, soft_mask
from lra.models.attention.base import AuxLoss
from lra.models.config import ModelConfig
from lra.models.posenc import AlibiBias
from lra.train.steps import make_steps

H, D = 3, 8


def soft_span_reference(q, k, v, mask_BxL, spans_H, ramp, bias_HxLxL=None):
    """a_ij = m(|i-j|) exp(s_ij) / sum_r m(|i-r|) exp(s_ir) over real keys, on the whole L x L
    matrix, m(x) = clip((R + z - x) / R, 0, 1): float64 numpy, no band, no blocks."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    length = q.shape[1]
    scores_BxHxLxL = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(q.shape[-1])
    if bias_HxLxL is not None:
        scores_BxHxLxL = scores_BxHxLxL + np.asarray(bias_HxLxL, np.float64)[None]
    distance_LxL = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])
    soft_HxLxL = np.clip((ramp + np.asarray(spans_H, np.float64)[:, None, None] - distance_LxL)
                         / ramp, 0.0, 1.0)
    weights = (np.exp(scores_BxHxLxL - scores_BxHxLxL.max(-1, keepdims=True)) * soft_HxLxL[None]
               * np.asarray(mask_BxL)[:, None, None, :])
    # A padded query can have no key within its span: its row (never compared) stays 0.
    sums = np.maximum(weights.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhlm,bmhd->blhd", weights / sums, v)


def padded_mask(length: int, short: int) -> np.ndarray:
    return np.arange(length)[None, :] < np.array([length, length - short])[:, None]


def with_spans(module, fractions) -> None:
    module.span_H[...] = jnp.asarray(fractions, jnp.float32)


def jitted(module, bias=None):
    graphdef, state = nnx.split(module)
    return jax.jit(lambda *a: nnx.merge(graphdef, state)(*a, bias=bias))


@pytest.mark.parametrize("length,block_size,max_span,ramp,fractions", [
    (100, 16, 40, 8, (0.0, 0.51, 1.0)),    # z at 0, mid, max; L not a multiple of the block
    (90, 8, 20, 4, (1.0, 0.0, 0.37)),
    (64, 16, 100, 8, (0.3, 0.7, 1.0)),     # band wider than the sequence
])
def test_banded_blocks_equal_soft_mask_on_the_full_matrix(length, block_size, max_span, ramp,
                                                         fractions):
    module = make_attention("adaptive_span", length, heads=H, head_dim=D, block_size=block_size,
                            max_span=max_span, ramp=ramp)
    with_spans(module, fractions)
    q, k, v = random_qkv(length, heads=H, head_dim=D, seed=length)
    mask = padded_mask(length, 13)
    got = np.asarray(jitted(module)(q, k, v, mask))[mask]
    want = soft_span_reference(q, k, v, mask, np.asarray(fractions) * max_span, ramp)[mask]
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("length,max_span", [(96, 20), (40, 50)])
def test_full_span_with_a_unit_ramp_is_band_or_dense_softmax(length, max_span):
    # z = S, R = 1: m = 1 for |i-j| <= S and 0 beyond, i.e. softmax over the hard band (dense
    # softmax once S >= L - 1).
    module = make_attention("adaptive_span", length, heads=H, head_dim=D, block_size=16,
                            max_span=max_span, ramp=1)
    with_spans(module, (1.0,) * H)
    q, k, v = random_qkv(length, heads=H, head_dim=D, seed=1)
    mask = padded_mask(length, 9)
    band_LxL = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :]) <= max_span
    allowed = band_LxL[None, None] & mask[:, None, None, :]
    got = np.asarray(jitted(module)(q, k, v, mask))[mask]
    assert rel_err(got, dense_reference(q, k, v, allowed)[mask]) <= 1e-5


def test_ramp_values_match_the_formula():
    span, ramp = 6.5, 4
    x = jnp.asarray([0.0, 3.0, 6.5, 8.5, 10.0, 10.5, 30.0])
    np.testing.assert_allclose(np.asarray(soft_mask(x, span, ramp)),
                               [1.0, 1.0, 1.0, 0.5, 0.125, 0.0, 0.0], atol=1e-7)
    # Through the whole module: with q = k = 0 the weights are m(|i-j|) / sum_r m(|i-r|), so a
    # row divided by its diagonal (m(0) = 1) is the mask itself.
    length = 48
    module = make_attention("adaptive_span", length, heads=1, head_dim=length, block_size=8,
                            max_span=16, ramp=ramp)
    with_spans(module, (span / 16,))
    weights_LxL = attention_matrix(module, length, jnp.ones((1, length), bool))
    distance_LxL = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])
    want_LxL = np.clip((ramp + span - distance_LxL) / ramp, 0.0, 1.0)
    np.testing.assert_allclose(weights_LxL / np.diag(weights_LxL)[:, None], want_LxL, atol=1e-6)


def test_distance_bias_is_added_to_the_scores():
    length, max_span, ramp = 80, 24, 8
    module = make_attention("adaptive_span", length, heads=H, head_dim=D, block_size=16,
                            max_span=max_span, ramp=ramp)
    with_spans(module, (0.2, 0.6, 1.0))
    bias = AlibiBias.for_heads(H)
    q, k, v = random_qkv(length, heads=H, head_dim=D, seed=2)
    mask = padded_mask(length, 7)
    got = np.asarray(jitted(module, bias)(q, k, v, mask))[mask]
    offsets_HxLxL = bias(jnp.arange(length)[:, None] - jnp.arange(length)[None, :])
    want = soft_span_reference(q, k, v, mask, np.array([0.2, 0.6, 1.0]) * max_span, ramp,
                               offsets_HxLxL)[mask]
    assert rel_err(got, want) <= 1e-5


def test_real_outputs_ignore_padded_positions():
    length = 96
    module = make_attention("adaptive_span", length, heads=H, head_dim=D, block_size=16,
                            max_span=40, ramp=8)
    with_spans(module, (0.0, 0.5, 1.0))
    q, k, v = random_qkv(length, heads=H, head_dim=D, seed=3)
    mask = padded_mask(length, 30)
    pad = ~mask[:, :, None, None]
    noisy = [jnp.where(pad, 50.0 * x[::-1], x) for x in (q, k, v)]
    call = jitted(module)
    np.testing.assert_allclose(np.asarray(call(*noisy, mask))[mask],
                               np.asarray(call(q, k, v, mask))[mask], rtol=0, atol=1e-6)


def test_span_gradient_is_finite_nonzero_and_matches_finite_differences():
    length, max_span, ramp = 64, 32, 8
    module = make_attention("adaptive_span", length, heads=H, head_dim=D, block_size=16,
                            max_span=max_span, ramp=ramp)
    fractions = np.array([0.0, 0.43, 0.81])
    with_spans(module, fractions)
    q, k, v = random_qkv(length, heads=H, head_dim=D, seed=4)
    mask = padded_mask(length, 11)
    cot = np.asarray(random_qkv(length, heads=H, head_dim=D, seed=5)[0]) * mask[:, :, None, None]
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(q, k, v, mask) * cot)

    grad_H = np.asarray(jax.jit(jax.grad(loss))(params)["span_H"][...])
    assert np.all(np.isfinite(grad_H)) and np.all(grad_H != 0)

    def reference_loss(fractions_H):
        return float(np.sum(soft_span_reference(q, k, v, mask, fractions_H * max_span, ramp) * cot))

    eps = 1e-5
    for h in (1, 2):  # z inside (0, S) and z + R not an integer: differentiable there
        step = np.eye(H)[h] * eps
        numeric = (reference_loss(fractions + step) - reference_loss(fractions - step)) / (2 * eps)
        assert abs(grad_H[h] - numeric) <= 1e-4 * abs(numeric)


def test_projected_clip_lets_only_updates_back_into_range_through():
    p = jnp.asarray([-0.2, 0.0, 0.5, 1.0, 1.3])
    np.testing.assert_array_equal(np.asarray(projected_clip(p)), [0.0, 0.0, 0.5, 1.0, 1.0])
    up = np.asarray(jax.grad(lambda x: -projected_clip(x).sum())(p))     # descent raises p
    down = np.asarray(jax.grad(lambda x: projected_clip(x).sum())(p))    # descent lowers p
    np.testing.assert_array_equal(up, [-1.0, -1.0, -1.0, -1.0, 0.0])
    np.testing.assert_array_equal(down, [0.0, 1.0, 1.0, 1.0, 1.0])


def test_the_l1_span_penalty_is_sown():
    length, max_span = 64, 40
    module = make_attention("adaptive_span", length, heads=H, head_dim=D, block_size=16,
                            max_span=max_span, ramp=8, span_penalty=1e-3)
    with_spans(module, (0.25, 0.5, 1.3))  # 1.3 counts as 1: spans 10, 20, 40 tokens
    q, k, v = random_qkv(length, heads=H, head_dim=D)
    nnx.jit(lambda m, *a: m(*a))(module, q, k, v, jnp.ones((2, length), bool))
    sown = jax.tree.leaves(nnx.pop(module, AuxLoss))
    assert len(sown) == 1 and abs(float(sown[0]) / (1e-3 * (10 + 20 + 40) / 3) - 1) < 1e-6


def test_training_adds_the_penalty_and_moves_the_spans():
    cfg = ModelConfig(emb_dim=24, num_heads=H, num_layers=2, mlp_dim=32, dropout=0.0,
                      attention=AdaptiveSpanConfig(max_span=16, ramp=4, block_size=8, span_init=0.5,
                                                   span_penalty=1e-2))
    spec = type("Spec", (), dict(vocab_size=20, num_classes=3, seq_len=48, kind="classify",
                                 default_pool="mean"))()
    model = models.build(cfg, spec, seed=0)
    tokens = np.random.default_rng(0).integers(1, 20, (4, 48)).astype(np.int32)
    tokens[1, 30:] = 0
    batch = {"inputs": jnp.asarray(tokens), "targets": jnp.array([0, 2, 1, 0])}
    train = dataclasses.replace(TrainConfig(), lr=1e-2, schedule="constant", warmup_steps=0,
                                weight_decay=0.0, grad_clip=0.0)
    steps = make_steps(model, train)
    state, metrics = steps.train(steps.init(jax.random.key(0)), batch)  # warm-up: lr 0
    # Two layers, each lambda * mean_h z_h = 1e-2 * 8 tokens.
    assert abs(float(metrics["aux_loss"]) - 2 * 1e-2 * 8.0) < 1e-6
    state, _ = steps.train(state, batch)
    nnx.update(model, state.params)
    summary = models.summary(model)
    assert set(summary) == {f"encoder.blocks.{i}.attention.attn" for i in range(2)}
    spans = np.array([s["spans"] for s in summary.values()])
    assert spans.shape == (2, H) and np.all(spans != 8.0) and np.all(np.abs(spans - 8.0) < 1.0)


def test_summary_reports_spans_and_trimmed_cost():
    module = make_attention("adaptive_span", 128, heads=2, block_size=16, max_span=40, ramp=8)
    with_spans(module, (0.25, 0.1))
    summary = module.summary()
    np.testing.assert_allclose(summary["spans"], [10.0, 4.0], rtol=1e-6)
    assert summary["max_span"] == 40 and abs(summary["mean_span"] - 7.0) < 1e-5
    # Computed now: ceil((40 + 8 - 1) / 16) = 3 blocks a side; the longest span (10) reaches
    # distance 17, 2 blocks a side: 5 of the 7 key blocks per query block.
    assert abs(summary["trimmed_cost"] - 5 / 7) < 1e-9
    with_spans(module, (1.0, 0.0))
    assert module.summary()["trimmed_cost"] == 1.0


@pytest.mark.parametrize("fields", [{"ramp": 0}, {"max_span": 0}, {"block_size": 0},
                                    {"span_init": 1.5}, {"span_penalty": -1.0}])
def test_invalid_settings_are_refused_naming_the_field(fields):
    (name, value), = fields.items()
    with pytest.raises(ValueError, match=f"^model.attention.{name}={value} must be"):
        make_attention("adaptive_span", 64, **fields)


def test_tiny_param_count_is_pinned():
    # one span per head (H = 2)
    assert_tiny_params("adaptive_span", TINY_TRANSFORMER + 2)
