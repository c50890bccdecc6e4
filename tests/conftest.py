import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# The tests compile hundreds of small programs, so XLA's LLVM optimisation is much of their
# time. Level 1 (below XLA's default) compiles them ~2x faster (one mamba layer's
# gradient: 10.5 s -> 5.4 s on 2 cores) and runs the tiny training runs as fast (level 0 ran
# nsa's 2.3x slower); the same arithmetic either way (no fast-math). It reaches the CLI runs the
# tests start, through the environment. LRA_TEST_XLA_OPT=1: XLA's default.
if os.environ.get("LRA_TEST_XLA_OPT") != "1":
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=1".strip()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated data and compiled executables go to per-session temp dirs, never the user's caches."""
    cache = tmp_path_factory.getbasetemp() / "lra-cache"
    monkeypatch.setenv("LRA_CACHE", str(cache))
    # JAX's persistent compile cache per test session: repeated shapes compile once.
    monkeypatch.setenv("LRA_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "jax-cache"))
    return cache


def run_cli(module: str, *args: str, cwd: Path | None = None, timeout: int = 300):
    """Run `python -m <module> args` like a user would; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def compose(*overrides: str):
    """The resolved Hydra config for `overrides`, as lra.run would see it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from lra import cli

    cli.setup()
    with initialize_config_dir(config_dir=str(cli.CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


# Parameter counts at the tiny preset on ListOps (vocab 17, 10 classes, L=512): the Transformer's,
# and its learned position table (L=512 x E=32).
TINY_TRANSFORMER = 28298
POS_TABLE = 512 * 32


def assert_tiny_params(model: str, expected: int, *, positions: bool = True) -> None:
    """`model=<model>`'s parameter count at the tiny preset on ListOps is `expected`. Each model
    pins its count in its own test file (tests/test_models.py checks that every model does): a
    change is a change of architecture and must be deliberate. `positions=False`: the model adds
    no position table (its paper adds no absolute positions: pos=none, or retnet's rope), so its
    result.json param_ratio compares with the Transformer without one too."""
    from omegaconf import OmegaConf

    from lra import models, tasks

    cfg = compose(f"model={model}", "task=listops", "preset=tiny")
    spec = tasks.build(OmegaConf.to_object(cfg.task)).spec
    model_cfg = OmegaConf.to_object(cfg.model)
    built = models.build(model_cfg, spec)
    assert models.param_count(built) == expected
    baseline = TINY_TRANSFORMER - (0 if positions else POS_TABLE)
    assert models.param_ratio(built, model_cfg, spec) == pytest.approx(expected / baseline)


# ------------------------------------------------------------------ attention test helpers
# (jax is imported where used: tests of the CLI and the tasks never load it through here)


def make_attention(kind, max_len: int, *, heads: int = 2, head_dim: int = 8, rngs_seed: int = 0,
                   **fields):
    """A freshly built attention module: `kind` a registered name or an Attention class, its
    config fields as keywords (the rest at their defaults)."""
    from flax import nnx

    from lra.models import attention

    cls = attention.get(kind) if isinstance(kind, str) else kind
    return cls(cls.config_cls(**fields), num_heads=heads, head_dim=head_dim, max_len=max_len,
               rngs=nnx.Rngs(rngs_seed))


def random_qkv(length: int, *, batch: int = 2, heads: int = 2, head_dim: int = 8, seed: int = 0):
    """q, k, v float32 [B, L, H, D], standard normal (jax.random)."""
    import jax

    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (batch, length, heads, head_dim)) for key in (kq, kk, kv))


def masked_softmax(scores, allowed=None):
    """Row softmax in float64 over the allowed entries (a row with none comes out uniform:
    compare real rows only)."""
    scores = np.asarray(scores, np.float64)
    if allowed is not None:
        scores = np.where(np.asarray(allowed), scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def dense_reference(q, k, v, allowed_BxHxLxM=None, bias_HxLxM=None):
    """The textbook softmax(q.k / sqrt(D) + bias) v over the allowed keys, in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores_BxHxLxM = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(q.shape[-1])
    if bias_HxLxM is not None:
        scores_BxHxLxM = scores_BxHxLxM + np.asarray(bias_HxLxM, np.float64)[None]
    return np.einsum("bhlm,bmhd->blhd", masked_softmax(scores_BxHxLxM, allowed_BxHxLxM), v)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def attention_matrix(module, length: int, mask_1xL):
    """A one-head module's attention weights [L, L]: q = k = 0 gives uniform weights over the
    allowed keys and v = identity reads them out."""
    import jax
    import jax.numpy as jnp

    q_1xLx1xL = jnp.zeros((1, length, 1, length))
    v_1xLx1xL = jnp.eye(length)[None, :, None, :]
    out_1xLx1xL = jax.jit(lambda q, v, m: module(q, q, v, m))(q_1xLx1xL, v_1xLx1xL, mask_1xL)
    return np.asarray(out_1xLx1xL)[0, :, 0, :]


def assert_equals_reference_mask(module, q, k, v, mask, tol: float = 1e-5) -> None:
    """The module's outputs at real positions equal masked dense softmax under its own
    `reference_mask` (jax, float32), elementwise to `tol`."""
    import jax

    from lra.models.attention.softmax import masked_softmax_attention

    out = jax.jit(lambda *a: module(*a))(q, k, v, mask)
    ref = jax.jit(lambda q, k, v, m: masked_softmax_attention(
        q, k, v, module.reference_mask(q, k, m)))(q, k, v, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=tol, atol=tol)


def mixer_vjp(module, x_BxLxE, weight_BxLxE, mask_BxL, *form):
    """(out, {parameter path: d/dparameter}, d/dx) of sum(weight * out) over real positions, for
    a token mixer's `mix(x, mask, *form)`; callers jit it with their static arguments, so one
    compile serves a file's value, gradient, padding and direction tests."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    out, pull = jax.vjp(lambda p, x: nnx.merge(graphdef, p, rest).mix(x, mask_BxL, *form),
                        params, x_BxLxE)
    g_params, g_x = pull(jnp.where(mask_BxL[:, :, None], weight_BxLxE, 0.0))
    return out, {".".join(map(str, path)): v.get_value()
                 for path, v in nnx.to_flat_state(g_params)}, g_x


def directional_errors(objective, params, x, grads, mask_BxL, *, eps: float = 1e-6,
                       probes: int = 3, seed: int = 3) -> dict:
    """name -> (relative error, autodiff, finite differences) of each gradient in `grads`
    (parameter names and "x") against central differences of the float64 `objective(params, x)`
    along `probes` random unit directions (for x only at real positions: padding moves nothing)."""
    rng, found = np.random.default_rng(seed), {}
    for name, g in grads.items():
        base = np.asarray(x, np.float64) if name == "x" else params[name]
        fd, ad = [], []
        for _ in range(probes):
            v = rng.standard_normal(base.shape)
            if name == "x":
                v = np.where(mask_BxL[:, :, None], v, 0.0)
            v /= np.linalg.norm(v)
            moved = [(params, base + s * v) if name == "x" else ({**params, name: base + s * v}, x)
                     for s in (eps, -eps)]
            fd.append((objective(*moved[0]) - objective(*moved[1])) / (2 * eps))
            ad.append(float(np.sum(g * v)))
        found[name] = (np.abs(np.subtract(ad, fd)).max() / np.abs(fd).max(), ad, fd)
    return found


# ------------------------------------------------------------------ float64 reference helpers


def np64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def silu(x):
    return x / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)
