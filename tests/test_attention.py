"""Registry-driven attention tests: every registered kind gets lra.check's conformance checks,
and one table holds every variant's config/length errors.

The checks and each variant's test settings (`check_settings`, `growth_settings`,
`growth_limit` on the class) live in lra/check.py and the variant itself, so registering a kind
adds it here with nothing to edit.
"""

from __future__ import annotations

import pytest

from conftest import make_attention
from lra import check
from lra.models import attention

KINDS = sorted(attention.REGISTRY)

# lra.check's per-kind checks (the whole-model ones are below and in test_models.py).
PER_KIND_CHECKS = [check.check_exact, check.check_shape_finite, check.check_padding,
                   check.check_grad, check.check_no_length_squared, check.check_growth]


def assert_check(result) -> None:
    ok, detail = result
    if ok is None:
        pytest.skip(detail)
    assert ok, detail


def test_registry_names_are_unique_and_importable():
    for kind in KINDS:
        cls = attention.get(kind)
        assert cls.config_cls().kind == kind
    with pytest.raises(ValueError, match="known: "):
        attention.get("nope")


@pytest.mark.parametrize("check_fn", PER_KIND_CHECKS,
                         ids=[fn.__name__.removeprefix("check_") for fn in PER_KIND_CHECKS])
@pytest.mark.parametrize("kind", KINDS)
def test_conformance(kind, check_fn):
    assert_check(check_fn(kind))


@pytest.mark.parametrize("kind, extra", [(k, {}) for k in KINDS]
                         + [("synthesizer", {"mode": "random"}),
                            ("synthesizer", {"mode": "random", "plus_dot": True})])
def test_every_parameter_gets_a_gradient(kind, extra):
    assert_check(check.check_every_parameter(kind, **extra))


# (kind, config fields, seq_len, substrings the one-line error names; None = valid)
CONFIG_CASES = [
    ("local", {}, 7, None),  # any length works: padding is masked
    ("local", {"block_size": 0}, 128, ["model.attention.block_size"]),
    ("bigbird", {"block_size": 64, "num_rand_blocks": 3}, 7 * 64 + 1, None),  # 8 = 5 + 3 blocks
    ("bigbird", {"block_size": 64, "num_rand_blocks": 3}, 7 * 64,
     ["model.attention.block_size", "model.attention.num_rand_blocks", "task.seq_len"]),
    ("bigbird", {"block_size": 16, "num_rand_blocks": 2}, 96, ["task.seq_len"]),
    ("longformer", {"num_global": 16}, 16, ["num_global"]),
    ("longformer", {"window": 1}, 256, ["window"]),
    ("longformer", {}, 128, None),  # a window wider than L is fine
    ("sparse", {"block_size": 8, "summary": 8}, 256, ["block_size"]),
    ("sparse", {"summary": 0}, 256, ["summary"]),
    ("sparse", {}, 32, None),  # the automatic block size never collides
    ("reformer", {"chunk_size": 64}, 64, ["raise task.seq_len"]),
    ("reformer", {"n_buckets": 5}, 1024, ["even"]),
    ("reformer", {}, 65, None),
    ("sinkhorn", {"block_size": 64}, 64, ["raise task.seq_len"]),
    ("sinkhorn", {"temperature": 0.0}, 1024, ["temperature"]),
    ("sinkhorn", {"sort": "nope"}, 1024, ["sort='nope'; use one of sinkhorn, softmax"]),
    ("sinkhorn", {}, 65, None),
    ("nystrom", {"num_landmarks": 64}, 64, None),
    ("nystrom", {"num_landmarks": 64}, 32, ["model.attention.num_landmarks"]),
    ("transformer_xl", {}, 7, None),  # one segment: fine
    ("transformer_xl", {"memory": "xl"}, 128, ["model.attention.memory"]),
    ("transformer_xl", {"segment_len": 0}, 128, ["model.attention.segment_len"]),
    ("synthesizer", {"mode": "bogus"}, 64, ["model.attention.mode"]),
    ("performer", {"kernel": "bogus"}, 16,
     ["model.attention.kernel='bogus'; use one of softmax, relu"]),
    ("dense", {"impl": "einsum"}, 8, ["use one of auto, explicit, cudnn, reference"]),
]


@pytest.mark.parametrize("kind, fields, seq_len, names", CONFIG_CASES)
def test_config_errors_name_the_fix_in_one_line(kind, fields, seq_len, names):
    """`check_seq_len` accepts a valid config; an invalid one fails in one line naming the fix,
    and building the module at that length fails with the same message (the one hook)."""
    cls = attention.get(kind)
    cfg = cls.config_cls(**fields)
    if names is None:
        cls.check_seq_len(cfg, seq_len)
        return
    with pytest.raises(ValueError) as err:
        cls.check_seq_len(cfg, seq_len)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    with pytest.raises(ValueError) as built:
        make_attention(kind, seq_len, **fields)
    assert str(built.value) == message


def test_check_catches_a_leak_and_a_hidden_quadratic(monkeypatch):
    """The checks are not vacuous: linear attention with its padding mask removed fails the
    padding check, and one that builds its scores pairwise fails both size checks."""
    import jax.numpy as jnp

    from lra.models.attention.linear import LinearAttention, elu_feature_map

    original = LinearAttention.__call__

    def leaky(self, q, k, v, mask_BxL, *, rng=None):
        return original(self, q, k, v, jnp.ones_like(mask_BxL), rng=rng)

    monkeypatch.setattr(attention.REGISTRY["linear"], "__call__", leaky)
    ok, detail = check.check_padding("linear")
    assert ok is False and "max change" in detail

    def pairwise(self, q, k, v, mask_BxL, *, rng=None):
        scores = jnp.einsum("blhd,bmhd->bhlm", elu_feature_map(q), elu_feature_map(k))
        scores = scores * mask_BxL[:, None, None, :]
        return jnp.einsum("bhlm,bmhd->blhd", scores, v) / (scores.sum(-1)[..., None].swapaxes(1, 2) + 1)

    monkeypatch.setattr(attention.REGISTRY["linear"], "__call__", pairwise)
    assert check.check_no_length_squared("linear")[0] is False
    ok, detail = check.check_growth("linear")
    assert ok is False and "L^2.00" in detail
