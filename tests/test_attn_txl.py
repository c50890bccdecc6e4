"""Transformer-XL tests: one segment = dense, plain memory = dense under the s/s-1 mask,
compressive memory and relative positions = an explicit per-segment float64 reference,
no gradient through memory, no padding leak."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import (POS_TABLE, TINY_TRANSFORMER, assert_tiny_params, dense_reference,
                      make_attention, masked_softmax, rel_err)
from lra import models
from lra.models.attention.dense import DenseConfig
from lra.models.attention.transformer_xl import (TransformerXLAttention, TransformerXLConfig,
                                                 relative_sinusoid, shift_rows)
from lra.models.config import ModelConfig

H, D = 2, 8


def build(length: int, **kwargs) -> TransformerXLAttention:
    """The pure segment recurrence by default (global_first=False): what the references state."""
    module = make_attention("transformer_xl", length, heads=H, head_dim=D,
                            **{"global_first": False, **kwargs})
    if module.cfg.rel_pos:  # u, v are zero at init: make them matter for the comparisons
        rng = np.random.default_rng(1)
        module.content_bias_HxD[...] = jnp.asarray(rng.standard_normal((H, D)), jnp.float32)
        module.position_bias_HxD[...] = jnp.asarray(rng.standard_normal((H, D)), jnp.float32)
    return module


def inputs(length: int, seed: int = 0):
    """q, k, v float32 [2, L, H, D]; row 0 full, row 1 with a hole of padding and a padded tail."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, length, H, D)).astype(np.float32) for _ in range(3))
    mask = np.ones((2, length), bool)
    mask[1, length // 4: length // 4 + 17] = False  # covers whole compressed windows
    mask[1, length - 9:] = False
    return q, k, v, mask


def apply(module, q, k, v, mask) -> np.ndarray:
    graphdef, state = nnx.split(module)
    return np.asarray(jax.jit(lambda *a: nnx.merge(graphdef, state)(*a))(q, k, v, mask))


def txl_sinusoid(distance: np.ndarray, dim: int) -> np.ndarray:
    """TXL's PositionalEmbedding: [sin(d / 10000^(2k/dim)) | cos(...)], k = 0 .. dim/2 - 1."""
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim)
    angle = distance[..., None] * inv_freq
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)


def naive_txl(module: TransformerXLAttention, q, k, v, mask) -> np.ndarray:
    """Sequential reference: for every segment, build its keys explicitly (compressed windows as
    mean over their real tokens at absolute position = window centre, the previous segment,
    itself), score every pair with TXL's formula and softmax, in float64."""
    cfg = module.cfg
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_size, length = mask.shape
    seg = min(cfg.segment_len, length)
    num_segments = -(-length // seg)
    out = np.zeros_like(q)
    if cfg.rel_pos:
        u, vb = (np.asarray(p[...], np.float64) for p in (module.content_bias_HxD,
                                                           module.position_bias_HxD))
        w_r = np.asarray(module.rel_proj.kernel[...], np.float64)
    for b in range(b_size):
        for s in range(num_segments):
            keys, values, ok, pos = [], [], [], []
            compressive = cfg.memory == "compressive"
            older = range(max(s - cfg.compressed_segments - 1, 0), s - 1) if compressive else []
            for o in older:  # oldest first
                for start in range(o * seg, (o + 1) * seg, cfg.compress_rate):
                    window = np.arange(start, min(start + cfg.compress_rate, (o + 1) * seg))
                    real = window[window < length]
                    real = real[mask[b, real]]
                    keys.append(k[b, real].mean(0) if len(real) else np.zeros((H, D)))
                    values.append(v[b, real].mean(0) if len(real) else np.zeros((H, D)))
                    ok.append(len(real) > 0)
                    pos.append(window.mean())
            for o in (s - 1, s) if s > 0 else (s,):  # segment 0 has no memory
                for j in range(o * seg, min((o + 1) * seg, length)):
                    keys.append(k[b, j])
                    values.append(v[b, j])
                    ok.append(mask[b, j])
                    pos.append(float(j))
            keys_MxHxD, values_MxHxD = np.stack(keys), np.stack(values)
            rows = np.arange(s * seg, min((s + 1) * seg, length))
            q_TxHxD = q[b, rows]
            if cfg.rel_pos:
                distance_TxM = rows[:, None] - np.asarray(pos)[None, :]
                rel_TxMxE = txl_sinusoid(distance_TxM, H * D) @ w_r  # W_R r_{i-j} per pair
                rel_TxMxHxD = rel_TxMxE.reshape(*distance_TxM.shape, H, D)
                scores = (np.einsum("thd,mhd->htm", q_TxHxD + u, keys_MxHxD)
                          + np.einsum("thd,tmhd->htm", q_TxHxD + vb, rel_TxMxHxD))
            else:
                scores = np.einsum("thd,mhd->htm", q_TxHxD, keys_MxHxD)
            probs = masked_softmax(scores / np.sqrt(D), np.asarray(ok)[None, None, :])
            out[b, rows] = np.einsum("htm,mhd->thd", probs, values_MxHxD)
    return out


def rel_error(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    return rel_err(got[mask], want[mask])


@pytest.mark.parametrize("length,segment_len", [(64, 64), (64, 512), (50, 50)])
def test_one_segment_equals_dense(length, segment_len):
    q, k, v, mask = inputs(length)
    module = build(length, segment_len=segment_len, rel_pos=False, memory="compressive")
    want = dense_reference(q, k, v, mask[:, None, None, :])
    assert rel_error(apply(module, q, k, v, mask), want, mask) <= 1e-5


@pytest.mark.parametrize("segment_len", [64, 512])
def test_one_segment_model_equals_transformer(segment_len):
    length = 64
    spec = types.SimpleNamespace(vocab_size=17, num_classes=10, seq_len=length, kind="classify",
                                 default_pool="cls")

    def model_cfg(attention):
        return ModelConfig(emb_dim=32, num_heads=2, num_layers=2, mlp_dim=64, dropout=0.0,
                           attention=attention)

    dense = models.build(model_cfg(DenseConfig()), spec, seed=0)
    txl = models.build(model_cfg(TransformerXLConfig(segment_len=segment_len, rel_pos=False)),
                       spec, seed=1)
    nnx.update(txl, nnx.state(dense, nnx.Param))
    tokens = np.random.default_rng(0).integers(1, 17, (3, length))
    tokens[1, 40:] = 0

    @nnx.jit
    def forward(model, tokens):
        return model.encoder(tokens), model({"inputs": tokens})

    (hidden_dense, mask), logits_dense = forward(dense, jnp.asarray(tokens))
    (hidden_txl, _), logits_txl = forward(txl, jnp.asarray(tokens))
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(hidden_txl)[real], np.asarray(hidden_dense)[real],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits_txl), np.asarray(logits_dense),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length,segment_len", [(64, 16), (100, 16), (90, 30)])
def test_plain_memory_equals_dense_under_segment_mask(length, segment_len):
    q, k, v, mask = inputs(length, seed=length)
    module = build(length, segment_len=segment_len, rel_pos=False)
    seg_L = np.arange(length) // segment_len
    near = (seg_L[None, :] == seg_L[:, None]) | (seg_L[None, :] == seg_L[:, None] - 1)
    want = dense_reference(q, k, v, (near[None] & mask[:, None, :])[:, None])
    assert rel_error(apply(module, q, k, v, mask), want, mask) <= 1e-5


@pytest.mark.parametrize("length,segment_len,rate,older", [(100, 16, 4, 1), (90, 10, 4, 3),
                                                           (64, 8, 3, 2)])
@pytest.mark.parametrize("rel_pos", [False, True])
def test_compressive_memory_equals_pooled_reference(length, segment_len, rate, older, rel_pos):
    q, k, v, mask = inputs(length, seed=length + rate)
    module = build(length, segment_len=segment_len, memory="compressive", compress_rate=rate,
                   compressed_segments=older, rel_pos=rel_pos)
    want = naive_txl(module, q, k, v, mask)
    assert rel_error(apply(module, q, k, v, mask), want, mask) <= 1e-5


@pytest.mark.parametrize("length,segment_len", [(64, 16), (100, 30), (48, 64)])
def test_rel_pos_plain_equals_reference(length, segment_len):
    q, k, v, mask = inputs(length, seed=7)
    module = build(length, segment_len=segment_len)
    want = naive_txl(module, q, k, v, mask)
    assert rel_error(apply(module, q, k, v, mask), want, mask) <= 1e-5


@pytest.mark.parametrize("memory", ["plain", "compressive"])
def test_no_gradient_through_memory(memory):
    length, seg, s = 80, 16, 3
    q, k, v, mask = inputs(length, seed=3)
    module = build(length, segment_len=seg, memory=memory, compressed_segments=2)
    graphdef, state = nnx.split(module)
    rows = slice(s * seg, (s + 1) * seg)
    weights = np.random.default_rng(0).standard_normal(q[:, rows].shape).astype(np.float32)

    @jax.jit
    def segment_loss(q, k, v):
        return jnp.sum(nnx.merge(graphdef, state)(q, k, v, mask)[:, rows] * weights)

    # Memory is really read in the forward pass: segment s changes with segments s-1 (and s-2).
    memory_rows = slice((s - 2 if memory == "compressive" else s - 1) * seg, s * seg)
    k_moved = k.copy()
    k_moved[0, memory_rows] += 1.0
    assert abs(float(segment_loss(q, k_moved, v)) - float(segment_loss(q, k, v))) > 1e-3

    grads = jax.jit(jax.grad(segment_loss, argnums=(0, 1, 2)))(q, k, v)
    in_segment = np.zeros(length, bool)
    in_segment[rows] = True
    for grad in (np.asarray(g) for g in grads):  # d/dq, d/dk, d/dv
        assert np.all(grad[:, ~in_segment] == 0.0)
        assert np.abs(grad[0, in_segment]).sum() > 0


@pytest.mark.parametrize("memory", ["plain", "compressive"])
def test_rel_pos_finite_and_padding_does_not_leak(memory):
    length = 96
    q, k, v, mask = inputs(length, seed=11)
    module = build(length, segment_len=16, memory=memory, compressed_segments=2)
    out = apply(module, q, k, v, mask)
    pad = ~mask[:, :, None, None]
    noise = np.random.default_rng(5).standard_normal((3, *q.shape)).astype(np.float32) * 100
    q2, k2, v2 = (np.where(pad, n, x) for n, x in zip(noise, (q, k, v)))
    out2 = apply(module, q2, k2, v2, mask)
    assert np.isfinite(out).all() and np.isfinite(out2).all()
    np.testing.assert_allclose(out2[mask], out[mask], rtol=1e-5, atol=1e-5)

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(q, k, v, mask) ** 2)))(
        params)
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert len(leaves) == 3 and all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in leaves)


@pytest.mark.parametrize("rel_pos", [True, False])
def test_global_first_row_sees_every_segment(rel_pos):
    """Position 0 (the CLS token) attends to every real key with TXL's own scores; the other
    rows are the recurrence unchanged. Without it, row 0 ignores everything after segment 0."""
    length, seg = 128, 32
    q, k, v, mask = inputs(length)
    recurrent = build(length, segment_len=seg, rel_pos=rel_pos)
    global_first = build(length, segment_len=seg, rel_pos=rel_pos, global_first=True)
    out_rec, out_glob = apply(recurrent, q, k, v, mask), apply(global_first, q, k, v, mask)
    np.testing.assert_array_equal(out_glob[:, 1:], out_rec[:, 1:])
    # Row 0 against an explicit float64 computation over all keys (distance 0 - j).
    scores = np.einsum("bhd,bmhd->bhm", q[:, 0].astype(np.float64), k) / np.sqrt(D)
    if rel_pos:
        u = np.asarray(global_first.content_bias_HxD[...], np.float64)
        w = np.asarray(global_first.position_bias_HxD[...], np.float64)
        kernel = np.asarray(global_first.rel_proj.kernel[...], np.float64)
        rel_MxHxD = (txl_sinusoid(-np.arange(length, dtype=np.float64), H * D) @ kernel
                     ).reshape(length, H, D)
        scores = (np.einsum("bhd,bmhd->bhm", q[:, 0] + u, k)
                  + np.einsum("bhd,mhd->bhm", q[:, 0] + w, rel_MxHxD)) / np.sqrt(D)
    want = np.einsum("bhm,bmhd->bhd", masked_softmax(scores, mask[:, None, :]), v)
    np.testing.assert_allclose(out_glob[:, 0], want, rtol=1e-4, atol=1e-5)
    # Changing the last segment's values moves row 0 only with global_first.
    v2 = v.copy()
    v2[:, length - seg:] += 1.0
    assert np.abs(apply(global_first, q, k, v2, mask)[:, 0] - out_glob[:, 0]).max() > 1e-3
    assert np.abs(apply(recurrent, q, k, v2, mask)[:, 0] - out_rec[:, 0]).max() == 0.0


def test_global_first_is_the_default_so_cls_pooling_sees_every_segment():
    """The default config makes position 0 global (CLS pooling summarises the whole sequence):
    a change in the last segment moves row 0 of one layer, and the CLS-pooled logits of a
    default-configured model. Under the pure recurrence (global_first=False) neither moves."""
    assert TransformerXLConfig().global_first is True
    length, seg = 128, 32
    q, k, v, mask = inputs(length)
    module = make_attention("transformer_xl", length, heads=H, head_dim=D, segment_len=seg)
    v2 = v.copy()
    v2[:, length - seg:] += 1.0  # the last segment only (row 1: its real tokens 96..118)
    moved_BxHxD = apply(module, q, k, v2, mask)[:, 0] - apply(module, q, k, v, mask)[:, 0]
    assert np.abs(moved_BxHxD).max(axis=(1, 2)).min() > 1e-3  # in both rows

    spec = types.SimpleNamespace(vocab_size=17, num_classes=10, seq_len=length, kind="classify",
                                 default_pool="cls")
    cfg = ModelConfig(emb_dim=16, num_heads=2, num_layers=1, mlp_dim=16, dropout=0.0,
                      attention=TransformerXLConfig(segment_len=seg))
    model = models.build(cfg, spec, seed=0)
    tokens = np.random.default_rng(0).integers(1, 17, (1, length))
    changed = tokens.copy()
    changed[0, length - 5] = changed[0, length - 5] % 16 + 1  # another token in the last segment
    logits = nnx.jit(lambda model, tokens: model({"inputs": tokens}))
    delta = np.asarray(logits(model, jnp.asarray(changed)) - logits(model, jnp.asarray(tokens)))
    assert np.abs(delta).max() > 1e-6


def test_tiny_param_count_is_pinned():
    # + per layer (1 at tiny) W_R 32x32 without bias + u, v of H x D = 2 x 16 each.
    assert_tiny_params("transformer_xl", TINY_TRANSFORMER + 32 * 32 + 2 * 2 * 16
                                         - POS_TABLE, positions=False)


def gathered_position_scores(module, qv_BxHxNxSxD, num_segments):
    """The former relative term: one table over the distinct distances, gathered per pair."""
    h, seg, d = qv_BxHxNxSxD.shape[1], qv_BxHxNxSxD.shape[3], qv_BxHxNxSxD.shape[-1]
    dist_SxW = np.arange(seg, dtype=np.float64)[:, None] - module.key_offsets(seg, num_segments)
    distances_U, index_flat = np.unique(dist_SxW, return_inverse=True)
    r_UxE = jnp.asarray(relative_sinusoid(distances_U, h * d), qv_BxHxNxSxD.dtype)
    rel_UxHxD = module.rel_proj(r_UxE).reshape(-1, h, d)
    table_BxHxNxSxU = jnp.einsum("bhstd,nhd->bhstn", qv_BxHxNxSxD, rel_UxHxD)
    index_1x1x1xSxW = jnp.asarray(index_flat.reshape(dist_SxW.shape))[None, None, None]
    return jnp.take_along_axis(table_BxHxNxSxU, index_1x1x1xSxW, axis=-1)


def test_shift_rows_reads_each_rows_window():
    s, width = 5, 7
    table = np.arange(3 * s * (s + width)).reshape(3, s, s + width)
    i_Sx1, w_1xW = np.arange(s)[:, None], np.arange(width)[None, :]
    want = table[:, i_Sx1, w_1xW + s - 1 - i_Sx1]
    np.testing.assert_array_equal(shift_rows(jnp.asarray(table), width), want)
    np.testing.assert_array_equal(shift_rows(jnp.asarray(table[:, :1, :width + 1]), width),
                                  table[:, :1, :width])  # one query row


@pytest.mark.parametrize("seg,num_segments,memory,older", [
    (16, 4, "plain", 1), (16, 1, "plain", 1), (12, 5, "compressive", 2), (10, 4, "compressive", 1),
    (1, 3, "plain", 1)])
def test_shifted_position_scores_equal_the_gathered_ones(seg, num_segments, memory, older):
    """TXL's shift gives the very values of the former gather over distinct distances, and the
    same gradients (q + v and W_R), in float64; compress_rate 5 leaves a partial window."""
    module = build(seg * num_segments, segment_len=seg, memory=memory, compress_rate=5,
                   compressed_segments=older)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    rng = np.random.default_rng(seg)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        qv = jnp.asarray(rng.standard_normal((2, H, num_segments, seg, D)))
        width = len(module.key_offsets(seg, num_segments))
        cot = jnp.asarray(rng.standard_normal((2, H, num_segments, seg, width)))

        def value_and_grad(form):
            def loss(p, qv):
                scores = form(nnx.merge(graphdef, p, rest), qv, num_segments)
                return jnp.sum(scores * cot), scores
            (_, scores), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
                params, qv)
            return [scores, *jax.tree.leaves(grads)]

        got = value_and_grad(TransformerXLAttention.position_scores)
        want = value_and_grad(gathered_position_scores)
    assert got[0].shape == (2, H, num_segments, seg, width)
    np.testing.assert_array_equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
