"""Registry-driven attention tests: adding a kind to models.attention.REGISTRY adds it here."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import attention
from models.attention.base import masked_softmax_attention

# Small-but-real settings per kind so tests run in seconds (lengths are multiples of 16).
TEST_KWARGS: dict[str, dict] = {
    "dense": {},
    "flash": {"block_size": 32},
    "local": {"block_size": 16},
    "sparse": {"block_size": 16},
    "longformer": {"window": 8, "num_global": 2},
    "bigbird": {"block_size": 16, "num_rand_blocks": 2},
    "reformer": {"chunk_size": 16, "n_hashes": 2},
    "sinkhorn": {"block_size": 16, "hard": True},
    "synthesizer": {},
    "linformer": {"k": 32},
    "linear": {},
    "performer": {"num_features": 64},
    "nystrom": {"num_landmarks": 16},
    "fnet": {},
    "transformer_xl": {"segment_len": 32, "memory": "compressive", "compressed_segments": 2},
    "lstm": {},
    "s4d": {},
    "lru": {},
}
KINDS = sorted(attention.REGISTRY)
B, H, D = 2, 2, 8


def build(kind: str, length: int, **extra):
    cls = attention.get(kind)
    cfg = cls.config_cls(**{**TEST_KWARGS[kind], **extra})
    return cls(cfg, num_heads=H, head_dim=D, max_len=length, rngs=nnx.Rngs(0))


def inputs(length: int, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    shape = (B, length, H, D)
    q, k, v = (jax.random.normal(key, shape) for key in (kq, kk, kv))
    lengths = jnp.array([length, length - 37])  # second row padded
    mask_BxL = jnp.arange(length)[None, :] < lengths[:, None]
    return q, k, v, mask_BxL


def call(module, q, k, v, mask):
    if module.shared_qk:
        k = q
    return module(q, k, v, mask)


def test_registry_names_are_unique_and_importable():
    for kind in KINDS:
        cls = attention.get(kind)
        assert cls.config_cls().kind == kind
    with pytest.raises(ValueError, match="known: "):
        attention.get("nope")


@pytest.mark.parametrize("kind", [k for k in KINDS])
def test_exact_patterns_equal_masked_dense(kind):
    length = 128
    module = build(kind, length)
    if not module.exact_pattern:
        pytest.skip(f"{kind} is an approximation; see its own convergence test")
    q, k, v, mask = inputs(length)
    if module.shared_qk:
        k = q
    out = module(q, k, v, mask)
    allowed_BxHxLxL = module.reference_mask(q, k, mask)
    ref_k = module.reference_keys(q, k) if hasattr(module, "reference_keys") else k
    ref = masked_softmax_attention(q, ref_k, v, allowed_BxHxLxL)
    real = np.asarray(mask)
    got, want = np.asarray(out)[real], np.asarray(ref)[real]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel <= 1e-5, f"{kind}: relative error {rel:.2e} to masked dense"


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_leak(kind):
    length = 128
    module = build(kind, length)
    q, k, v, mask = inputs(length)
    out = call(module, q, k, v, mask)
    pad = ~mask[:, :, None, None]
    noise = [jax.random.normal(jax.random.key(9 + i), q.shape) * 5 for i in range(3)]
    q2, k2, v2 = (jnp.where(pad, n, x) for n, x in zip(noise, (q, k, v)))
    out2 = call(module, q2, k2, v2, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out2)[real], np.asarray(out)[real], rtol=1e-4, atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_finite(kind):
    length = 128
    module = build(kind, length)
    q, k, v, mask = inputs(length)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(q, k, v, params):
        m = nnx.merge(graphdef, params, rest)
        return jnp.sum(call(m, q, k, v, mask) ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, params)
    for leaf in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(leaf)).all()
    assert float(jnp.abs(grads[0]).sum() + jnp.abs(grads[2]).sum()) > 0


def _max_two_long_axes(jaxpr, length: int) -> tuple[int, ...] | None:
    """First intermediate shape having two axes of size >= length (an L x L array), if any."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            if sum(dim >= length for dim in shape) >= 2:
                return tuple(shape)
        for sub in jax.core.subjaxprs(eqn.params) if hasattr(jax.core, "subjaxprs") else []:
            found = _max_two_long_axes(sub, length)
            if found:
                return found
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                found = _max_two_long_axes(inner, length)
                if found:
                    return found
    return None


@pytest.mark.parametrize("kind", KINDS)
def test_no_length_squared_array(kind):
    length = 1024
    module = build(kind, length)
    q, k, v, mask = inputs(length)
    graphdef, state = nnx.split(module)

    def loss(q, k, v):
        return jnp.sum(call(nnx.merge(graphdef, state), q, k, v, mask))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    found = _max_two_long_axes(jaxpr, length)
    if module.quadratic:
        assert found is not None, f"{kind} claims to be quadratic but builds no L x L array"
    else:
        assert found is None, f"{kind} builds an L x L array of shape {found}"


@pytest.mark.parametrize("kind, extra", [(k, {}) for k in KINDS]
                         + [("synthesizer", {"mode": "random"}),
                            ("synthesizer", {"mode": "random", "plus_dot": True})])
def test_every_parameter_gets_a_gradient(kind, extra):
    """Whole model on a random padded batch: no parameter that nothing reads (its gradient
    would be identically 0 while it counts towards the parameter budget and gets decayed)."""
    import optax

    import models
    from models.config import ModelConfig

    length = 128
    cls = attention.get(kind)
    cfg = ModelConfig(emb_dim=16, num_heads=2, num_layers=1, mlp_dim=16, dropout=0.0,
                      attention=cls.config_cls(**{**TEST_KWARGS[kind], **extra}))
    spec = type("Spec", (), dict(vocab_size=20, num_classes=3, seq_len=length, kind="classify",
                                 default_pool="mean"))()
    graphdef, params, rest = nnx.split(models.build(cfg, spec), nnx.Param, ...)
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 20, (2, length)).astype(np.int32)
    inputs[1, 90:] = 0
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.array([0, 2])}

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(batch, rng=jax.random.key(1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    grads = jax.jit(jax.grad(loss))(params)
    dead = [".".join(map(str, path)) for path, g in grads.flat_state()
            if not np.any(np.asarray(g.get_value()) != 0)]
    assert not dead, f"{kind}: parameters with an all-zero gradient: {dead}"


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest array any equation produces, loop bodies included."""
    from lra.measure import iter_eqns

    return max(int(np.prod(getattr(var.aval, "shape", ())))
               for eqn, _ in iter_eqns(jaxpr) for var in eqn.outvars)


# Sparse's pattern is O(L sqrt L) at its automatic block size; the fixed test block would be O(L^2).
GROWTH_KWARGS = {"sparse": {"block_size": 0}}


@pytest.mark.parametrize("kind", KINDS)
def test_memory_growth_exponent(kind):
    """The largest intermediate of the fwd+bwd jaxpr at L = 256 and 1024 grows like L^p with
    p <= 1.2 (1.6 for sparse): this sees all-pairs work done in blocks ([N, N, b, b]), which has
    no two axes of size L and passes the L x L check above."""
    if attention.get(kind).quadratic:
        pytest.skip(f"{kind} is dense by design")
    sizes = []
    for length in (256, 1024):
        module = build(kind, length, **GROWTH_KWARGS.get(kind, {}))
        q, k, v, mask = inputs(length)
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def loss(q, k, v, params):
            return jnp.sum(call(nnx.merge(graphdef, params, rest), q, k, v, mask) ** 2)

        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, params).jaxpr
        sizes.append(_largest_intermediate(jaxpr))
    exponent = np.log(sizes[1] / sizes[0]) / np.log(4)
    assert exponent <= (1.6 if kind == "sparse" else 1.2), (kind, sizes, exponent)
