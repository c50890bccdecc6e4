"""Linformer: identity projections recover dense softmax; projections slice and share as set."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention.base import masked_softmax_attention
from models.attention.linformer import LinformerAttention, LinformerConfig

B, H, D = 2, 2, 8


# One projection shape for every test: parameter init compiles once per shape.
MAX_LEN = K_PROJ = 64


def make_inputs(length: int, seed: int = 0):
    q, k, v = np.random.default_rng(seed).standard_normal((3, B, length, H, D), np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@nnx.jit
def run(module: LinformerAttention, q, k, v, mask):
    return module(q, k, v, mask)


def build(max_len: int, **kwargs) -> LinformerAttention:
    return LinformerAttention(LinformerConfig(**kwargs), num_heads=H, head_dim=D,
                              max_len=max_len, rngs=nnx.Rngs(0))


def test_identity_projection_equals_dense_softmax():
    length = MAX_LEN
    module = build(length, k=length)
    module.proj_k_LxK[...] = jnp.eye(length)
    module.proj_v_LxK[...] = jnp.eye(length)
    q, k, v = make_inputs(length)
    mask = jnp.ones((B, length), bool)
    out = np.asarray(run(module, q, k, v, mask))
    ref = np.asarray(masked_softmax_attention(q, k, v, mask[:, None, None, :]))
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel <= 1e-5, rel


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
