"""Linformer: identity projections recover dense softmax; projections slice and share as set."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import TINY_TRANSFORMER, assert_tiny_params, make_attention, rel_err
from lra.models.attention.linformer import LinformerAttention, LinformerConfig
from lra.models.attention.softmax import masked_softmax_attention

B, H, D = 2, 2, 8


# One projection shape for every test: parameter init compiles once per shape.
MAX_LEN = K_PROJ = 64


def make_inputs(length: int, seed: int = 0):
    q, k, v = np.random.default_rng(seed).standard_normal((3, B, length, H, D), np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@nnx.jit
def run(module: LinformerAttention, q, k, v, mask):
    return module(q, k, v, mask)


build = functools.partial(make_attention, "linformer", heads=H, head_dim=D)


def test_identity_projection_equals_dense_softmax():
    length = MAX_LEN
    module = build(length, k=length)
    module.proj_k_LxK[...] = jnp.eye(length)
    module.proj_v_LxK[...] = jnp.eye(length)
    q, k, v = make_inputs(length)
    mask = jnp.ones((B, length), bool)
    out = np.asarray(run(module, q, k, v, mask))
    ref = np.asarray(masked_softmax_attention(q, k, v, mask[:, None, None, :]))
    assert rel_err(out, ref) <= 1e-5


def test_shorter_call_uses_first_projection_rows():
    length = 40
    module = build(MAX_LEN, k=K_PROJ)
    q, k, v = make_inputs(length, seed=1)
    mask = jnp.arange(length)[None, :] < jnp.array([length, length - 9])[:, None]
    out = np.asarray(run(module, q, k, v, mask))
    # Reference: explicit E^T K, F^T V with the first `length` rows, padding zeroed, float64.
    e = np.asarray(module.proj_k_LxK[...], np.float64)[:length]
    f = np.asarray(module.proj_v_LxK[...], np.float64)[:length]
    keep = np.asarray(mask, np.float64)[:, :, None, None]
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    kp = np.einsum("blhd,lk->bkhd", k64 * keep, e)
    vp = np.einsum("blhd,lk->bkhd", v64 * keep, f)
    scores = np.einsum("blhd,bkhd->bhlk", q64 / np.sqrt(D), kp)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ref = np.einsum("bhlk,bkhd->blhd", probs, vp)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_share_kv_ties_projections():
    shared = build(MAX_LEN, k=K_PROJ, share_kv=True)
    separate = build(MAX_LEN, k=K_PROJ)
    n_shared = sum(x.size for x in jax.tree.leaves(nnx.state(shared, nnx.Param)))
    n_separate = sum(x.size for x in jax.tree.leaves(nnx.state(separate, nnx.Param)))
    assert n_shared == MAX_LEN * K_PROJ and n_separate == 2 * MAX_LEN * K_PROJ
    # With E = F, projected values are the same mixture as projected keys: v = k gives out
    # equal to attention over K' with values K'.
    q, k, _ = make_inputs(MAX_LEN, seed=2)
    mask = jnp.ones((B, MAX_LEN), bool)
    out = run(shared, q, k, k, mask)
    kp = jnp.einsum("blhd,lk->bkhd", k, shared.proj_k_LxK[...])
    ref = masked_softmax_attention(q, kp, kp, jnp.ones((1, 1, 1, K_PROJ), bool))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_layerwise_sharing_is_one_parameter_trained_by_every_layer():
    from lra import models
    from lra.models.config import ModelConfig

    spec = type("Spec", (), dict(vocab_size=20, num_classes=3, seq_len=64, kind="classify",
                                 default_pool="mean"))()

    def make(**kw):
        cfg = ModelConfig(emb_dim=16, num_heads=2, num_layers=3, mlp_dim=16, dropout=0.0,
                          attention=LinformerConfig(k=8, **kw))
        return models.build(cfg, spec)

    separate, shared_kv, shared = make(), make(share_kv=True), make(share_kv=True,
                                                                    share_layers=True)
    per_matrix = 64 * 8
    assert models.param_count(separate) - models.param_count(shared_kv) == 3 * per_matrix
    assert models.param_count(shared_kv) - models.param_count(shared) == 2 * per_matrix
    two = make(share_layers=True)  # E and F kept apart, each shared by the 3 layers
    assert models.param_count(separate) - models.param_count(two) == 4 * per_matrix

    attns = [blk.attention.attn for blk in shared.encoder.blocks]
    assert all(a.proj_k_LxK is attns[0].proj_k_LxK for a in attns)
    # The gradient of the one matrix is the sum of what each layer contributes: compare with
    # the same model whose layers hold equal but separate copies (share_kv only).
    for blk_copy, blk in zip(shared_kv.encoder.blocks, shared.encoder.blocks):
        blk_copy.attention.attn.proj_k_LxK[...] = attns[0].proj_k_LxK[...]
    batch = {"inputs": jnp.asarray(np.random.default_rng(0).integers(1, 20, (2, 64)), jnp.int32)}

    def grads(model):
        return nnx.grad(lambda m: m(batch).sum())(model)

    # Same seed, so every other parameter is equal too: the forward passes agree.
    np.testing.assert_allclose(shared_kv(batch), shared(batch), rtol=1e-5, atol=1e-6)
    g_copy, g_shared = grads(shared_kv), grads(shared)
    g_copy_blocks = [g_copy["encoder"]["blocks"][i]["attention"]["attn"]["proj_k_LxK"][...]
                     for i in range(3)]
    g_one = g_shared["encoder"]["blocks"][0]["attention"]["attn"]["proj_k_LxK"][...]
    assert float(jnp.abs(g_copy_blocks[2]).max()) > 0
    np.testing.assert_allclose(g_one, sum(g_copy_blocks), rtol=1e-4, atol=1e-6)


def test_tiny_param_count_is_pinned():
    assert_tiny_params("linformer", TINY_TRANSFORMER + 2 * 512 * 256)
