"""BigBird-specific tests: the random block draw (uniform and distance-decayed), the exact ITC
pattern, per-row key counts."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from conftest import TINY_TRANSFORMER, assert_tiny_params, dense_reference, make_attention, rel_err
from lra import check
from lra.models import attention
from lra.models.attention.bigbird import BigBirdConfig

H, D = 3, 8


def build(block_size: int, num_rand_blocks: int, max_len: int, seed: int | None = 0,
          rngs_seed: int = 0, decay: float = 0.0, heads: int = H):
    return make_attention("bigbird", max_len, heads=heads, head_dim=D, rngs_seed=rngs_seed,
                          block_size=block_size, num_rand_blocks=num_rand_blocks, seed=seed,
                          random_decay_exponent=decay)


def forward(module):
    """The module's forward under one jit (one compile; eager op-by-op is slower on CPU)."""
    graphdef, state = nnx.split(module)
    jitted = jax.jit(lambda *a: nnx.merge(graphdef, state)(*a))
    return lambda *a: np.asarray(jitted(*a))


def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def expected_block_pattern(index_HxTxA: np.ndarray, nb: int) -> np.ndarray:
    """bool[H, nb, nb] written directly from the paper's definition (loops; test-only)."""
    allowed = np.zeros((index_HxTxA.shape[0], nb, nb), bool)
    allowed[:, [0, nb - 1], :] = True  # global query blocks see everything
    allowed[:, :, [0, nb - 1]] = True  # every query block sees the global key blocks
    for i in range(1, nb - 1):
        allowed[:, i, i - 1:i + 2] = True
        for h in range(index_HxTxA.shape[0]):
            allowed[h, i, index_HxTxA[h, i - 1]] = True
    return allowed


@pytest.mark.parametrize("decay", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("nb,r", [(8, 3), (12, 2), (6, 1), (30, 3)])
def test_random_blocks_avoid_window_and_globals(nb, r, decay):
    module = build(block_size=4, num_rand_blocks=r, max_len=4 * 30, decay=decay)
    index_HxTxA = np.asarray(module.random_blocks(nb))
    assert index_HxTxA.shape == (H, nb - 2, r)
    for h in range(H):
        for i in range(1, nb - 1):
            picked = set(index_HxTxA[h, i - 1].tolist())
            assert len(picked) == r, "random blocks repeat within a row"
            assert picked.isdisjoint({0, nb - 1, i - 1, i, i + 1}), (h, i, picked)
            assert all(1 <= j <= nb - 2 for j in picked)
    if nb >= 12:  # the draw differs between heads (per-head randomness)
        assert not all(np.array_equal(index_HxTxA[0], index_HxTxA[h]) for h in range(1, H))


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_random_pattern_is_fixed_and_seeded(decay):
    a = np.asarray(build(4, 3, 64, seed=5, decay=decay).random_blocks(16))
    b = np.asarray(build(4, 3, 64, seed=5, rngs_seed=1, decay=decay).random_blocks(16))
    c = np.asarray(build(4, 3, 64, seed=6, decay=decay).random_blocks(16))
    np.testing.assert_array_equal(a, b)  # an int seed fixes the pattern
    assert not np.array_equal(a, c)
    # seed=None draws from rngs.params(): different layers (rng states) get different patterns
    d = np.asarray(build(4, 3, 64, seed=None, rngs_seed=0, decay=decay).random_blocks(16))
    e = np.asarray(build(4, 3, 64, seed=None, rngs_seed=1, decay=decay).random_blocks(16))
    assert not np.array_equal(d, e)


def test_default_draw_is_the_uniform_top_r_of_the_priorities():
    """Default (decay 0): per row, the r candidates with the highest stored uniform priorities,
    in that order (the pre-decay rule, unchanged); a decay reuses the same stored priorities."""
    nb, r = 14, 3
    module = build(4, r, 4 * nb, seed=3)
    priority_HxNxN = np.asarray(module.rand_priority[...])
    want = np.zeros((H, nb - 2, r), np.int64)
    for h in range(H):
        for i in range(1, nb - 1):
            cand = [j for j in range(1, nb - 1) if abs(i - j) > 1]
            order = np.argsort(-priority_HxNxN[h, i, cand], kind="stable")[:r]
            want[h, i - 1] = np.asarray(cand)[order]
    np.testing.assert_array_equal(np.asarray(module.random_blocks(nb)), want)
    decayed = build(4, r, 4 * nb, seed=3, decay=1.0)
    np.testing.assert_array_equal(np.asarray(decayed.rand_priority[...]), priority_HxNxN)
    assert not np.array_equal(np.asarray(decayed.random_blocks(nb)), want)


def successive_inclusion(w: np.ndarray, r: int) -> np.ndarray:
    """P(j is drawn) in r successive draws without replacement, each with P ~ w over the rest:
    the exact joint law of the ordered draws as an [n]*r array, then its marginals."""
    n = len(w)
    joint, drawn = np.ones(()), np.zeros(())
    for k in range(r):
        index = np.indices((n,) * (k + 1))
        fresh = np.all(index[:k] != index[k], axis=0)
        left = w.sum() - drawn[..., None]
        step = np.divide(w[index[k]], left, out=np.zeros(fresh.shape), where=fresh)
        joint, drawn = joint[..., None] * step, drawn[..., None] + w[index[k]]
    return sum(joint.sum(axis=tuple(a for a in range(r) if a != k)) for k in range(r))


def target_distance_distribution(nb: int, r: int, decay: float) -> np.ndarray:
    """float64[nb]: expected share of random links at block distance d, over middle rows."""
    expected_N = np.zeros(nb)
    for i in range(1, nb - 1):
        cand = np.array([j for j in range(1, nb - 1) if abs(i - j) > 1])
        weight = np.abs(cand - i).astype(np.float64) ** -decay
        np.add.at(expected_N, np.abs(cand - i), successive_inclusion(weight, r))
    return expected_N / expected_N.sum()


def distance_counts(index_HxTxA: np.ndarray, nb: int) -> np.ndarray:
    rows_T = np.arange(1, nb - 1)
    return np.bincount(np.abs(index_HxTxA - rows_T[:, None]).ravel(), minlength=nb)


def chi_square(counts_N: np.ndarray, target_N: np.ndarray) -> tuple[float, int]:
    """Pearson statistic and dof over distance bins, the far tail merged to >= 5 expected."""
    expected_N = target_N * counts_N.sum()
    bins, acc_obs, acc_exp = [], 0.0, 0.0
    for obs, exp in zip(counts_N[::-1], expected_N[::-1]):  # merge from the far (rare) end
        acc_obs, acc_exp = acc_obs + obs, acc_exp + exp
        if acc_exp >= 5.0:
            bins.append((acc_obs, acc_exp))
            acc_obs, acc_exp = 0.0, 0.0
    assert acc_obs == 0.0, "a draw outside the target's support"
    if acc_exp > 0:  # leftover near-zero mass goes into the last bin
        bins[-1] = (bins[-1][0], bins[-1][1] + acc_exp)
    obs_K, exp_K = np.array(bins).T
    return float(((obs_K - exp_K) ** 2 / exp_K).sum()), len(bins) - 1


@pytest.mark.parametrize("decay", [1.0, 2.0])
def test_decayed_draw_matches_power_law_distances(decay):
    """Block distances of the drawn links over 4 seeds x 64 heads x 30 query blocks x r = 3
    (23040 links) fit the exact target of successive draws with P(j) ~ |i-j|^-decay; the
    uniform draw (same priorities) fails the same bound and passes its own target."""
    nb, r = 32, 3
    target_N = target_distance_distribution(nb, r, decay)
    uniform_target_N = target_distance_distribution(nb, r, 0.0)
    counts, uniform_counts = np.zeros(nb, np.int64), np.zeros(nb, np.int64)
    for seed in range(4):
        counts += distance_counts(np.asarray(
            build(1, r, nb, seed=seed, decay=decay, heads=64).random_blocks(nb)), nb)
        uniform_counts += distance_counts(np.asarray(
            build(1, r, nb, seed=seed, heads=64).random_blocks(nb)), nb)
    # The draws of one row are distinct (negatively correlated), which only lowers the
    # statistic below its chi-square reference: a false-alarm rate <= 1e-6.
    stat, dof = chi_square(counts, target_N)
    bound = stats.chi2.ppf(1 - 1e-6, dof)
    assert stat <= bound, (stat, bound)
    tv = 0.5 * np.abs(counts / counts.sum() - target_N).sum()
    assert tv <= 0.03, tv
    # The same bounds reject the uniform sampler, which itself fits the uniform target.
    uniform_stat, _ = chi_square(uniform_counts, target_N)
    assert uniform_stat > 10 * bound, (uniform_stat, bound)
    assert 0.5 * np.abs(uniform_counts / uniform_counts.sum() - target_N).sum() > 0.1
    own_stat, own_dof = chi_square(uniform_counts, uniform_target_N)
    assert own_stat <= stats.chi2.ppf(1 - 1e-6, own_dof), own_stat
    # Far links are rarer than under the uniform draw (mean distance strictly lower).
    dist_N = np.arange(nb)
    assert (counts * dist_N).sum() < 0.8 * (uniform_counts * dist_N).sum()


def test_negative_decay_is_rejected():
    with pytest.raises(ValueError, match="random_decay_exponent"):
        build(4, 3, 64, decay=-1.0)


@pytest.mark.parametrize("length,max_len,block_size,r,decay", [
    (100, 100, 8, 3, 0.0),    # not a block multiple: padded to 104 = 13 blocks
    (150, 256, 16, 1, 0.0),   # call length shorter than max_len (10 of 16 blocks)
    (40, 40, 8, 0, 0.0),      # block multiple, no random blocks: window + global only
    (100, 100, 8, 3, 1.0),    # distance-decayed random blocks (Kleinberg's exponent)
    (150, 256, 16, 1, 2.0),   # decayed, call length shorter than max_len
])
def test_output_equals_dense_under_paper_pattern(length, max_len, block_size, r, decay):
    module = build(block_size, r, max_len, decay=decay)
    q, k, v = (normal(length + i, (2, length, H, D)) for i in range(3))
    mask = np.arange(length)[None, :] < np.array([length, length - 13])[:, None]
    nb = -(-length // block_size)
    blocks = expected_block_pattern(np.asarray(module.random_blocks(nb)), nb)
    tokens = blocks.repeat(block_size, 1).repeat(block_size, 2)[:, :length, :length]
    allowed = tokens[None] & mask[:, None, None, :]
    np.testing.assert_array_equal(np.asarray(module.reference_mask(q, k, mask)), allowed)
    want = dense_reference(q, k, v, allowed)[mask]
    got = forward(module)(q, k, v, mask)[mask]
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("block_size,r,nb", [(16, 3, 10), (8, 2, 16)])
def test_per_row_key_counts(block_size, r, nb):
    length = nb * block_size
    module = build(block_size, r, length)
    x = np.zeros((1, length, H, D), np.float32)
    counts_HxL = np.asarray(module.reference_mask(x, x, np.ones((1, length), bool))[0].sum(-1))
    row_block = np.arange(length) // block_size
    middle = (row_block >= 2) & (row_block <= nb - 3)
    assert (counts_HxL[:, middle] == (3 + 2 + r) * block_size).all()
    # Rows 1 and nb-2: their window already contains a global block (counted once).
    edge = (row_block == 1) | (row_block == nb - 2)
    assert (counts_HxL[:, edge] == (4 + r) * block_size).all()
    glob = (row_block == 0) | (row_block == nb - 1)
    assert (counts_HxL[:, glob] == length).all()


def test_output_ignores_keys_outside_pattern():
    """Perturbing a value block outside a row's pattern leaves that row's output unchanged."""
    bs, r, nb = 8, 2, 12
    module = build(bs, r, nb * bs)
    q, k, v = (normal(i, (1, nb * bs, H, D)) for i in range(3))
    mask = np.ones((1, nb * bs), bool)
    run = forward(module)
    blocks = np.asarray(module.block_pattern(nb))
    i = 5
    outside = [j for j in range(nb) if not blocks[0, i, j]]
    inside = [j for j in range(nb) if blocks[0, i, j]]
    base = run(q, k, v, mask)[0, i * bs:(i + 1) * bs, 0]
    for j, changes in [(outside[0], False), (inside[-2], True)]:
        v2 = v.copy()
        v2[:, j * bs:(j + 1) * bs, 0] += 3.0
        out = run(q, k, v2, mask)[0, i * bs:(i + 1) * bs, 0]
        assert (not np.allclose(out, base, atol=1e-6)) == changes, (j, changes)


def test_growth_check_at_the_default_block():
    """lra.check's growth exponent at the defaults (block 64, r = 3), not only at the test block
    16. The largest fwd+bwd intermediate is the random-block scores [B, H, nb - 2, bs, r bs]:
    exactly linear in L - 2 bs (the global blocks' fixed part), so it reads L^1.22 from 512 to
    1024 and L^1.07 from 1024 to 4096, the lengths the class measures at."""
    cls = attention.get("bigbird")
    defaults = BigBirdConfig()
    assert cls.growth_settings == {"block_size": defaults.block_size,
                                   "num_rand_blocks": defaults.num_rand_blocks} == {
        "block_size": 64, "num_rand_blocks": 3}
    ok, detail = check.check_growth("bigbird")
    assert ok, detail
    exponent, sizes = check.growth_exponent("bigbird", cls.growth_lengths, **cls.growth_settings)
    assert exponent <= cls.growth_limit, (exponent, sizes)
    bs, r = 64, 3
    for length, size in zip(cls.growth_lengths, sizes):
        assert size == check.B * check.H * (length // bs - 2) * bs * r * bs, (length, size)


def test_tiny_param_count_is_pinned():
    assert_tiny_params("bigbird", TINY_TRANSFORMER)
