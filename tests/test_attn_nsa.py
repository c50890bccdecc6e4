"""Native Sparse Attention (models/attention/nsa.py): the chunked module against a float64 numpy
loop of the paper's equations (phi compression, p_cmp, eq. 9's block scores, the group sum, top-n
with the initial and local blocks, the three softmaxes, the gates), one query at a time over each
row's real tokens only (a padded row is a shorter sequence), in values, in the selection itself and
in gradients (central finite differences in float64 along random directions). The selected branch
also equals a dense softmax restricted to the module's own selected blocks, and full attention
when n covers every block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lra.models.attention.nsa  # noqa: F401 - registers nsa
from conftest import (TINY_TRANSFORMER, assert_tiny_params, make_attention, masked_softmax, rel_err,
                      silu)
from lra.models.attention.nsa import NativeSparseAttention, selection_scores

B, L, H, D = 2, 45, 2, 8          # L: not a multiple of the chunk (8), l' (8) or d (2)
E = H * D
LENGTHS = (L, 29)                 # second row padded; its end inside selection block 3
MASK_BxL = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]
# l = 4, d = 2, l' = 8: 23 compressed keys, 6 selection blocks of which n = 4 (up to 3 forced).
SETTINGS = {"compress_block": 4, "compress_stride": 2, "select_block": 8, "num_selected": 4,
            "window": 6, "query_chunk": 8}
# Bidirectional with one selection for both heads; causal with one per head (I = H).
CONFIGS = {"bidirectional": {"causal": False, "selection_groups": 1},
           "causal": {"causal": True, "selection_groups": 2}}
OUTPUTS = ("out", "cmp", "slc", "win")


@functools.cache
def build(config: str, **extra):
    """One module per setting for the whole file: every build costs XLA compiles."""
    return make_attention("nsa", L, heads=H, head_dim=D, **{**SETTINGS, **CONFIGS[config], **extra})


@functools.cache
def module_grad(config: str):
    """jit(value_and_grad) of sum_i weights[i] * outputs[i] (outputs: out and the three branches)
    w.r.t. (params, q, k, v), with the outputs and the selection as aux; params are an argument,
    so edited copies reuse the compile."""
    graphdef, params, rest = nnx.split(build(config), nnx.Param, ...)

    def loss(params, q, k, v, mask, weights_4xBxLxHxD):
        module = nnx.merge(graphdef, params, rest)
        br = module.branches(q, k, v, mask)
        g = module.gates(q)
        out = g[..., 0:1] * br.cmp + g[..., 1:2] * br.slc + g[..., 2:3] * br.win
        outputs = jnp.stack([out, br.cmp, br.slc, br.win])
        return jnp.sum(outputs * weights_4xBxLxHxD), (outputs, g, br.chosen_BxIxLxA,
                                                      br.chosen_ok_BxIxLxA)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)), params


def run(config: str, q, k, v, weights=None, params=None, mask=MASK_BxL):
    """(loss, (outputs [4, B, L, H, D], gates, chosen, chosen_ok)), (d params, dq, dk, dv)."""
    fn, own = module_grad(config)
    weights = np.zeros((4, B, L, H, D), np.float32) if weights is None else weights
    return fn(own if params is None else params, q, k, v, mask, weights)


def inputs(seed: int):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, L, H, D)).astype(np.float32) for _ in range(3))


def only(name: str, seed: int = 9) -> np.ndarray:
    """Loss weights on output `name` at real positions, zero elsewhere."""
    weights = np.zeros((4, B, L, H, D), np.float32)
    weights[OUTPUTS.index(name)] = (np.random.default_rng(seed).standard_normal((B, L, H, D))
                                    * MASK_BxL[:, :, None, None])
    return weights


def params64(module) -> dict[str, np.ndarray]:
    _, params, _ = nnx.split(module, nnx.Param, ...)
    return {".".join(map(str, path)): np.asarray(v.get_value(), np.float64)
            for path, v in nnx.to_flat_state(params)}


# --- float64 reference -------------------------------------------------------------------------

def softmax_attend(q_D, k_TxD, v_TxD) -> np.ndarray:
    return masked_softmax(k_TxD @ q_D / math.sqrt(len(q_D))) @ v_TxD


def nearest_blocks(t: int, size: int, count: int, causal: bool) -> set[int]:
    """The `count` blocks nearest to t by token distance (ties: the earlier block), virtual
    blocks past either end included, then those that do not exist dropped by the caller."""
    own = t // size
    candidates = range(own - count - 1, own + 1 if causal else own + count + 2)
    distance = lambda j: 0 if j == own else (t - (j + 1) * size + 1 if j < own else j * size - t)
    return set(sorted(candidates, key=lambda j: (distance(j), j))[:count])


def reference_row(p, cfg, q, k, v):
    """One row's real tokens q, k, v [T, H, D], one query at a time: the four outputs [4, T, H, D],
    the chosen blocks {(group, t): set} and the smallest score gap at the top-n boundary."""
    t_len = len(q)
    l, d, size, n, w = (cfg.compress_block, cfg.compress_stride, cfg.select_block,
                        cfg.num_selected, cfg.window)
    groups, causal = cfg.selection_groups, cfg.causal
    per_group = H // groups
    m, num_blocks = -(-t_len // d), -(-t_len // size)
    # Compression (eq. 7): phi of each block of l tokens at stride d, zero-extended at the end.
    kv_zero = [np.concatenate([x, np.zeros((l, H, D))]) for x in (k, v)]
    compressed = np.zeros((2, m, H, D))
    for c in range(2):
        for i in range(m):
            for h in range(H):
                block_SxD = kv_zero[c][i * d:i * d + l, h]
                hidden_K = silu(np.einsum("sd,sdk->k", block_SxD, p["compress_in_2xSxDxK"][c])
                                + p["compress_in_bias_2xHxK"][c, h])
                compressed[c, i, h] = (hidden_K @ p["compress_out_2xKxD"][c]
                                       + p["compress_out_bias_2xD"][c])
    out = np.zeros((4, t_len, H, D))
    chosen, gap = {}, np.inf
    for t in range(t_len):
        visible = [i for i in range(m) if not causal or i * d + l - 1 <= t]
        p_cmp = np.zeros((H, m))
        for h in range(H):
            if visible:
                probs = masked_softmax(compressed[0, visible, h] @ q[t, h] / math.sqrt(D))
                p_cmp[h, visible] = probs
                out[1, t, h] = probs @ compressed[1, visible, h]
        p_slc = np.zeros((H, num_blocks))  # eq. 9, overlap reading
        for j in range(num_blocks):
            for a in range(size // d):
                for b in range(l // d):
                    if 0 <= (size // d) * j + a - b < m:
                        p_slc[:, j] += p_cmp[:, (size // d) * j + a - b]
        allowed = [j for j in range(num_blocks) if not causal or j * size <= t]
        local = nearest_blocks(t, size, cfg.num_local_blocks, causal)
        forced = sorted(j for j in allowed if j < cfg.num_init_blocks or j in local)
        for g in range(groups):
            heads = range(g * per_group, (g + 1) * per_group)
            score = p_slc[list(heads)].sum(0)  # eq. 10
            rest = sorted((j for j in allowed if j not in forced), key=lambda j: (-score[j], j))
            free = n - len(forced)
            if 0 < free < len(rest) and score[rest[free - 1]] > 0:
                gap = min(gap, score[rest[free - 1]] - score[rest[free]])
            chosen[g, t] = set(forced) | set(rest[:free])
            keys = [s for j in chosen[g, t] for s in range(j * size, min((j + 1) * size, t_len))
                    if not causal or s <= t]
            for h in heads:
                out[2, t, h] = softmax_attend(q[t, h], k[keys, h], v[keys, h])
        window = [s for s in range(t_len) if (0 <= t - s < w if causal else abs(t - s) < w)]
        gates = 1.0 / (1.0 + np.exp(-(q[t].reshape(E) @ p["gate.kernel"] + p["gate.bias"])))
        gates_Hx3 = gates.reshape(H, 3)
        for h in range(H):
            out[3, t, h] = softmax_attend(q[t, h], k[window, h], v[window, h])
        out[0, t] = sum(gates_Hx3[:, c, None] * out[c + 1, t] for c in range(3))
    return out, chosen, gap


def reference(p, cfg, q, k, v):
    """`reference_row` on every row's real tokens: outputs [4, B, L, H, D] (zeros at padding),
    chosen {(row, group, t): set} and the smallest gap."""
    want, chosen, gap = np.zeros((4, B, L, H, D)), {}, np.inf
    for row, t_len in enumerate(LENGTHS):
        got = reference_row(p, cfg, *(np.asarray(x[row, :t_len], np.float64) for x in (q, k, v)))
        want[:, row, :t_len] = got[0]
        chosen.update({(row, *key): s for key, s in got[1].items()})
        gap = min(gap, got[2])
    return want, chosen, gap


def module_chosen(chosen_BxIxLxA, ok_BxIxLxA) -> dict:
    chosen, ok = np.asarray(chosen_BxIxLxA), np.asarray(ok_BxIxLxA)
    return {(row, g, t): set(chosen[row, g, t][ok[row, g, t]].tolist())
            for row, t_len in enumerate(LENGTHS) for g in range(chosen.shape[1])
            for t in range(t_len)}


# --- values and the selection --------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_module_equals_float64_loop(config):
    """out, each branch, the gates and the selected blocks equal the numpy loop at every real
    position of both rows (row 2 computed alone on its 29 tokens)."""
    module = build(config)
    q, k, v = inputs(0)
    _, (outputs, gates, chosen, ok) = run(config, q, k, v)[0]
    want, want_chosen, gap = reference(params64(module), module.cfg, q, k, v)
    assert gap > 1e-4  # no near-tie at the top-n boundary: float32 picks the same blocks
    assert module_chosen(chosen, ok) == want_chosen
    outputs = np.asarray(outputs)
    for i, name in enumerate(OUTPUTS):
        assert np.isfinite(outputs[i]).all()
        assert rel_err(outputs[i][MASK_BxL], want[i][MASK_BxL]) <= 1e-5, name  # ~2e-7
    assert ((gates > 0) & (gates < 1)).all()
    # Real sparsity: at most n = 4 of row 1's 6 blocks, and not the same 4 for every query.
    sizes = [len(s) for s in want_chosen.values()]
    assert min(sizes) >= 1 and max(sizes) == 4
    assert len({frozenset(s) for (row, *_), s in want_chosen.items() if row == 0}) > 3


@pytest.mark.parametrize("config", CONFIGS)
def test_gradients_equal_float64_finite_differences(config):
    """Per parameter array and for q, k, v: the float32 gradient along 2 random directions equals
    the float64 central difference of the loop, for the gated output and for the compressed branch
    alone; no gradient at padded positions."""
    module = build(config)
    p, (q, k, v) = params64(module), inputs(0)
    rng, eps = np.random.default_rng(3), 1e-6
    for name in ("out", "cmp"):
        which, weights = OUTPUTS.index(name), only(name)
        _, (g_params, g_q, g_k, g_v) = run(config, q, k, v, weights)
        grads = {**{".".join(map(str, path)): np.asarray(x.get_value(), np.float64)
                    for path, x in nnx.to_flat_state(g_params)},
                 "q": np.asarray(g_q, np.float64), "k": np.asarray(g_k, np.float64),
                 "v": np.asarray(g_v, np.float64)}
        assert set(grads) == set(p) | {"q", "k", "v"}
        for x in (g_q, g_k, g_v):
            assert np.abs(np.asarray(x)[~MASK_BxL]).max() == 0.0
        def objective(p, qkv, which=which, weights=weights):
            return float(np.sum(weights[which] * reference(p, module.cfg, *qkv)[0][which]))

        qkv = [np.asarray(x, np.float64) for x in (q, k, v)]
        for key, g in grads.items():
            base = qkv["qkv".index(key)] if key in ("q", "k", "v") else p[key]
            if name == "cmp" and key.startswith("gate"):
                assert np.abs(g).max() == 0.0
                continue
            fd, ad = [], []
            for _ in range(2):
                direction = rng.standard_normal(base.shape)
                if key in ("q", "k", "v"):
                    direction *= MASK_BxL[:, :, None, None]
                direction /= np.linalg.norm(direction)
                values = []
                for sign in (1, -1):
                    moved = base + sign * eps * direction
                    if key in ("q", "k", "v"):
                        args = (p, [moved if i == "qkv".index(key) else x
                                    for i, x in enumerate(qkv)])
                    else:
                        args = ({**p, key: moved}, qkv)
                    values.append(objective(*args))
                fd.append((values[0] - values[1]) / (2 * eps))
                ad.append(float(np.sum(g * direction)))
            err = np.abs(np.subtract(ad, fd)).max() / np.abs(fd).max()
            assert err <= 5e-5, (name, key, err, ad, fd)  # <= 9e-6 measured


@pytest.mark.parametrize("config", CONFIGS)
def test_selected_branch_equals_dense_softmax_on_its_blocks(config):
    """The selected branch == dense float64 softmax under the mask of the module's own selected
    blocks (and causal order), in values and in q, k, v gradients; its loss gives the parameters
    no gradient (top-n is not differentiable); full attention differs (the mask is sparse)."""
    module = build(config)
    q, k, v = inputs(1)
    weights = only("slc")
    (_, (outputs, _, chosen, ok)), (g_params, g_q, g_k, g_v) = run(config, q, k, v, weights)
    size, per_group = module.cfg.select_block, H // module.cfg.selection_groups
    allowed_BxHxLxL = np.zeros((B, H, L, L), bool)
    for (row, g, t), blocks in module_chosen(chosen, ok).items():
        for j in blocks:
            heads = slice(g * per_group, (g + 1) * per_group)
            allowed_BxHxLxL[row, heads, t, j * size:(j + 1) * size] = True
    allowed_BxHxLxL &= MASK_BxL[:, None, None, :]
    if module.cfg.causal:
        allowed_BxHxLxL &= np.tril(np.ones((L, L), bool))
    real = MASK_BxL[:, None, :, None] & MASK_BxL[:, None, None, :]
    everything = np.broadcast_to(np.tril(real) if module.cfg.causal else real,
                                 allowed_BxHxLxL.shape)
    assert (allowed_BxHxLxL.sum(-1) < everything.sum(-1)).sum() >= 10 * H  # sparse query rows
    q64, k64, v64 = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))
    w64 = np.asarray(weights[2], np.float64).transpose(0, 2, 1, 3)
    probs = masked_softmax(q64 @ k64.transpose(0, 1, 3, 2) / math.sqrt(D), allowed_BxHxLxL)
    want = probs @ v64
    # Analytic VJP of O = softmax(Q K^T / sqrt(D)) V under the fixed mask.
    dprobs = w64 @ v64.transpose(0, 1, 3, 2)
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True)) / math.sqrt(D)
    want_grads = (dscores @ k64, dscores.transpose(0, 1, 3, 2) @ q64,
                  probs.transpose(0, 1, 3, 2) @ w64)
    want = want.transpose(0, 2, 1, 3)
    assert rel_err(np.asarray(outputs[2])[MASK_BxL], want[MASK_BxL]) <= 1e-5  # ~2e-7
    for got_g, want_g in zip((g_q, g_k, g_v), want_grads):
        assert rel_err(got_g, want_g.transpose(0, 2, 1, 3)) <= 1e-5  # ~3e-7
    assert all(np.abs(np.asarray(x.get_value())).max() == 0.0
               for _, x in nnx.to_flat_state(g_params))
    full = (masked_softmax(q64 @ k64.transpose(0, 1, 3, 2) / math.sqrt(D), everything) @ v64
            ).transpose(0, 2, 1, 3)
    assert rel_err(full[MASK_BxL], want[MASK_BxL]) > 1e-2


@functools.cache
def all_blocks_branches(config: str):
    module = build(config, num_selected=6, window=L)  # n = all 6 blocks, w >= L
    return jax.jit(lambda q, k, v, mask: module.branches(q, k, v, mask))


@pytest.mark.parametrize("config", CONFIGS)
def test_selected_branch_with_every_block_is_full_attention(config):
    """n covering every block (and w >= L): the selected and window branches are full softmax
    attention over the real keys (causal: those up to t)."""
    q, k, v = inputs(2)
    br = all_blocks_branches(config)(q, k, v, MASK_BxL)
    allowed = MASK_BxL[:, None, None, :] & np.ones((1, H, L, 1), bool)
    if CONFIGS[config]["causal"]:
        allowed = allowed & np.tril(np.ones((L, L), bool))
    q64, k64, v64 = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))
    want = (masked_softmax(q64 @ k64.transpose(0, 1, 3, 2) / math.sqrt(D), allowed) @ v64
            ).transpose(0, 2, 1, 3)
    for got in (br.slc, br.win):
        assert rel_err(np.asarray(got)[MASK_BxL], want[MASK_BxL]) <= 1e-5


def test_selection_scores_follow_block_overlap():
    """Eq. 9 (overlap reading) at l = 4, d = 2, l' = 8: compressed block m covers pieces m, m + 1,
    selection block j pieces 4j .. 4j + 3, so block 2 adds to block 0 twice and block 4 (pieces
    4, 5) to block 1 twice; block 7 (pieces 7, 8) to blocks 1 and 2 once each."""
    p_xM = np.zeros((3, 23), np.float32)
    p_xM[0, 2], p_xM[1, 4], p_xM[2, 7] = 1.0, 1.0, 1.0
    got = np.asarray(selection_scores(jnp.asarray(p_xM), 4, 2, 8, 6))
    want = np.zeros((3, 6))
    want[0, 0], want[1, 1], want[2, 1], want[2, 2] = 2.0, 2.0, 1.0, 1.0
    np.testing.assert_array_equal(got, want)


def test_selection_picks_the_dominant_block():
    """phi set to (almost exactly) the sum of a block's keys, queries ~ u, keys = noise: the block
    of 1..3 that the fewest queries select; then its keys made 2u: every real query of both rows
    selects it."""
    module = nnx.clone(build("bidirectional"))
    eye = np.eye(D, dtype=np.float32)
    module.compress_in_2xSxDxK[...] = np.broadcast_to(eye, (2, 4, D, D)).copy()
    module.compress_in_bias_2xHxK[...] = np.full((2, H, D), 20.0, np.float32)  # SiLU ~ identity
    module.compress_out_2xKxD[...] = np.broadcast_to(eye, (2, D, D)).copy()
    module.compress_out_bias_2xD[...] = np.full((2, D), -20.0, np.float32)
    params = nnx.split(module, nnx.Param, ...)[1]
    rng = np.random.default_rng(4)
    u = rng.standard_normal(D).astype(np.float32)
    u *= 3.0 / np.linalg.norm(u)
    q = (u + 0.5 * rng.standard_normal((B, L, H, D))).astype(np.float32)
    k, v = (0.3 * rng.standard_normal((B, L, H, D)).astype(np.float32) for _ in range(2))
    chosen = module_chosen(*run("bidirectional", q, k, v, params=params)[0][1][2:])
    target = min((1, 2, 3), key=lambda j: sum(j in s for s in chosen.values()))
    assert sum(target not in s for s in chosen.values()) >= 10
    size = SETTINGS["select_block"]
    k[:, target * size:(target + 1) * size] = 2.0 * u
    chosen = module_chosen(*run("bidirectional", q, k, v, params=params)[0][1][2:])
    assert all(target in s for s in chosen.values())


# --- padding, direction --------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_padding_invariance(config):
    """Noise at padded q, k, v moves no real output of any branch nor any selection."""
    q, k, v = inputs(5)
    _, (outputs, _, chosen, ok) = run(config, q, k, v)[0]
    pad = ~MASK_BxL[:, :, None, None]
    noise = [30.0 * np.random.default_rng(6 + i).standard_normal(q.shape).astype(np.float32)
             for i in range(3)]
    noisy_qkv = (np.where(pad, z, x) for z, x in zip(noise, (q, k, v)))
    _, (noisy, _, chosen2, ok2) = run(config, *noisy_qkv)[0]
    assert np.abs(np.asarray(noisy) - np.asarray(outputs))[:, MASK_BxL].max() <= 1e-6
    assert module_chosen(chosen, ok) == module_chosen(chosen2, ok2)


@pytest.mark.parametrize("config", CONFIGS)
def test_direction_of_information_flow(config):
    """Causal: a change of k, v at token 30 moves outputs >= 30 only and no selected block starts
    after its query; bidirectional: outputs before 30 move too."""
    q, k, v = inputs(7)
    _, (outputs, _, chosen, ok) = run(config, q, k, v)[0]
    bump = 3.0 * (np.arange(L) == 30)[None, :, None, None].astype(np.float32)
    moved = np.abs(np.asarray(run(config, q, k + bump, v + bump)[0][1][0]) - np.asarray(outputs))
    assert moved[0, 0, 30:].max() > 1e-3
    if CONFIGS[config]["causal"]:
        assert moved[:, 0, :30].max() == 0.0
        for (_, _, t), blocks in module_chosen(chosen, ok).items():
            assert max(blocks) * SETTINGS["select_block"] <= t
    else:
        assert moved[0, 0, :30].max() > 1e-4


# --- init, parameters, settings ------------------------------------------------------------------

def test_init_and_gates():
    """Zero biases, LeCun-normal phi weights (fan-in l D, then K = D); gates in (0, 1)."""
    module = build("bidirectional")
    w1 = np.asarray(module.compress_in_2xSxDxK[...])
    assert w1.shape == (2, 4, D, D) and abs(w1.std() * math.sqrt(4 * D) - 1.0) < 0.15
    assert module.compress_out_2xKxD[...].shape == (2, D, D)
    assert not np.asarray(module.compress_in_bias_2xHxK[...]).any()
    assert not np.asarray(module.compress_out_bias_2xD[...]).any()
    gates = np.asarray(module.gates(jnp.asarray(inputs(8)[0])))
    assert gates.shape == (B, L, H, 3) and ((gates > 0) & (gates < 1)).all()


def parameter_count(e: int, h: int, d: int, block: int, factor: int = 1) -> int:
    """phi_K and phi_V: l D K + H K + K D + D each (K = factor D); gates: E 3H + 3H."""
    k = factor * d
    return 2 * (block * d * k + h * k + k * d + d) + e * 3 * h + 3 * h


def test_parameter_count():
    module = build("causal")
    assert sum(x.size for x in params64(module).values()) == parameter_count(E, H, D, 4)
    # The tiny preset's dims (E = 32, H = 2, D = 16) at the paper's l = 32: 17190.
    wide = nnx.eval_shape(lambda: make_attention("nsa", 64, heads=2, head_dim=16))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(wide, nnx.Param)))
    assert count == parameter_count(32, 2, 16, 32) == 17190


def test_invalid_settings_fail_at_build():
    with pytest.raises(ValueError, match="multiples of compress_stride"):
        make_attention("nsa", L, compress_block=6, compress_stride=4)
    with pytest.raises(ValueError, match="num_selected >= num_init_blocks"):
        make_attention("nsa", L, num_selected=2)
    with pytest.raises(ValueError, match="window"):
        make_attention("nsa", L, window=0)
    with pytest.raises(ValueError, match="selection_groups=3 must divide num_heads=2"):
        make_attention(NativeSparseAttention, L, selection_groups=3)


def test_tiny_param_count_is_pinned():
    # nsa (D = 16, compression MLP width K = D, blocks of l = 32): per keys and values W1 l x D x
    # K + b1 H x K + W2 K x D + b2 D; gates q (E) -> 3H with bias. Reads the encoder's q, k, v and
    # keeps its W_O and position table.
    assert_tiny_params("nsa", TINY_TRANSFORMER + 2 * (32 * 16 * 16 + 2 * 16 + 16 * 16 + 16)
                              + 3 * 2 * (32 + 1))
