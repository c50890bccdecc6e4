"""Registry-driven attention tests: every registered kind gets lra.check's conformance checks.

The checks and each variant's test settings (`check_settings`, `growth_settings`,
`growth_limit` on the class) live in lra/check.py and the variant itself, so registering a kind
adds it here with nothing to edit.
"""

from __future__ import annotations

import pytest

from lra import check
from lra.check import B, D, H, build, call, inputs  # noqa: F401 - used by the per-variant tests
from lra.check import largest_intermediate as _largest_intermediate  # noqa: F401
from lra.check import max_two_long_axes as _max_two_long_axes  # noqa: F401
from lra.models import attention

KINDS = sorted(attention.REGISTRY)
TEST_KWARGS = {kind: attention.get(kind).check_settings for kind in KINDS}


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


@pytest.mark.parametrize("kind", KINDS)
def test_exact_patterns_equal_masked_dense(kind):
    assert_check(check.check_exact(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_output_shape_and_finite_under_jit(kind):
    assert_check(check.check_shape_finite(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_leak(kind):
    assert_check(check.check_padding(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_finite(kind):
    assert_check(check.check_grad(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_no_length_squared_array(kind):
    assert_check(check.check_no_length_squared(kind))


@pytest.mark.parametrize("kind, extra", [(k, {}) for k in KINDS]
                         + [("synthesizer", {"mode": "random"}),
                            ("synthesizer", {"mode": "random", "plus_dot": True})])
def test_every_parameter_gets_a_gradient(kind, extra):
    assert_check(check.check_every_parameter(kind, **extra))


@pytest.mark.parametrize("kind", KINDS)
def test_memory_growth_exponent(kind):
    assert_check(check.check_growth(kind))


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
