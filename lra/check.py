"""python -m lra.check <kind> [<kind> ...|all] [plugins=[pkg.module]] [--no-run]

The conformance suite for a registered attention variant (a built-in one or a plugin's): the
same checks the project's registry-driven tests (tests/test_attention.py) assert for every
variant. Each prints a row; the command exits 0 only if none fails.

Per-variant settings come from the variant itself: `check_settings` (small-but-real config
fields), `growth_settings`, `growth_limit` and `growth_lengths` (class attributes of
models.attention.Attention).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lra import cli, models, tasks
from lra.models import attention
from lra.models.attention.softmax import masked_softmax_attention
from lra.models.config import ModelConfig
from lra.run import execute
from lra.train.measure import iter_eqns

B, H, D = 2, 2, 8
LENGTH = 128          # padding, gradients, exact pattern (a multiple of every test block size)
GROWTH_LENGTHS = (256, 1024)


class Outcome(NamedTuple):
    check: str
    status: str   # PASS | FAIL | n/a
    detail: str


def build(kind: str, length: int, **extra) -> attention.Attention:
    cls = attention.get(kind)
    cfg = cls.config_cls(**{**cls.check_settings, **extra})
    return cls(cfg, num_heads=H, head_dim=D, max_len=length, rngs=nnx.Rngs(0))


def inputs(length: int, seed: int = 0):
    """q, k, v of shape [B, L, H, D] and a mask whose second row has 37 padded positions."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, (B, length, H, D)) for key in (kq, kk, kv))
    lengths = jnp.array([length, length - 37])
    return q, k, v, jnp.arange(length)[None, :] < lengths[:, None]


def call(module, q, k, v, mask):
    return module(q, q if module.shared_qk else k, v, mask)


def max_two_long_axes(jaxpr, length: int) -> tuple[int, ...] | None:
    """First intermediate (nested jaxprs included) with two axes of size >= length, if any."""
    for eqn, _ in iter_eqns(jaxpr):
        for var in eqn.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            if sum(dim >= length for dim in shape) >= 2:
                return shape
    return None


def largest_intermediate(jaxpr) -> int:
    """Elements of the largest array any equation produces, loop bodies included."""
    return max(int(np.prod(getattr(var.aval, "shape", ())))
               for eqn, _ in iter_eqns(jaxpr) for var in eqn.outvars)


def _grad_jaxpr(module, length: int):
    q, k, v, mask = inputs(length)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(q, k, v, params):
        return jnp.sum(call(nnx.merge(graphdef, params, rest), q, k, v, mask) ** 2)

    return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, params).jaxpr


# ----------------------------------------------------------------------------- checks
# Each returns (status, detail): status True (PASS), False (FAIL) or None (n/a).


def check_shape_finite(kind: str):
    module = build(kind, LENGTH)
    q, k, v, mask = inputs(LENGTH)
    out = jax.jit(lambda q, k, v: call(module, q, k, v, mask))(q, k, v)
    if out.shape != q.shape:
        return False, f"output shape {out.shape}, expected {q.shape} (B, L, H, D)"
    finite = bool(np.isfinite(np.asarray(out)).all())
    return finite, f"{out.shape}, finite" if finite else "non-finite outputs"


def check_padding(kind: str):
    """Outputs at real positions do not change when q/k/v at padded positions change."""
    module = build(kind, LENGTH)
    q, k, v, mask = inputs(LENGTH)
    run = jax.jit(lambda q, k, v: call(module, q, k, v, mask))  # one compile for both calls
    out = np.asarray(run(q, k, v))
    pad = ~mask[:, :, None, None]
    noise = [jax.random.normal(jax.random.key(9 + i), q.shape) * 5 for i in range(3)]
    q2, k2, v2 = (jnp.where(pad, n, x) for n, x in zip(noise, (q, k, v)))
    out2 = np.asarray(run(q2, k2, v2))
    real = np.asarray(mask)
    diff = float(np.max(np.abs(out2[real] - out[real])))
    tolerance = 1e-5 + 1e-4 * float(np.max(np.abs(out[real])))
    return diff <= tolerance, f"max change at real positions {diff:.1e} (tolerance {tolerance:.1e})"


def check_grad(kind: str):
    """jit(grad) through q, k, v and the parameters: finite, and q or v gets a gradient."""
    module = build(kind, LENGTH)
    q, k, v, mask = inputs(LENGTH)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(q, k, v, params):
        return jnp.sum(call(nnx.merge(graphdef, params, rest), q, k, v, mask) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, params)
    if not all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads)):
        return False, "non-finite gradients"
    size = float(jnp.abs(grads[0]).sum() + jnp.abs(grads[2]).sum())
    return size > 0, f"|dq| + |dv| = {size:.3g}"


def check_every_parameter(kind: str, **extra):
    """Whole model on a padded batch: every parameter gets a non-zero gradient (one nothing
    reads would count towards the budget and be decayed while its gradient is always 0)."""
    cls = attention.get(kind)
    cfg = ModelConfig(emb_dim=16, num_heads=2, num_layers=1, mlp_dim=16, dropout=0.0,
                      attention=cls.config_cls(**{**cls.check_settings, **extra}))
    spec = type("Spec", (), dict(vocab_size=20, num_classes=3, seq_len=LENGTH, kind="classify",
                                 default_pool="mean"))()
    graphdef, params, rest = nnx.split(models.build(cfg, spec), nnx.Param, ...)
    tokens = np.random.default_rng(0).integers(1, 20, (2, LENGTH)).astype(np.int32)
    tokens[1, 90:] = 0
    batch = {"inputs": jnp.asarray(tokens), "targets": jnp.array([0, 2])}

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(batch, rng=jax.random.key(1))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    grads = jax.jit(jax.grad(loss))(params)
    flat = list(grads.flat_state())
    dead = [".".join(map(str, path)) for path, g in flat
            if not np.any(np.asarray(g.get_value()) != 0)]
    if dead:
        return False, f"all-zero gradient: {', '.join(dead)}"
    return True, f"{len(flat)} parameter arrays"


def check_no_length_squared(kind: str):
    """No intermediate with two axes of length >= L at L=1024, unless declared quadratic."""
    length = GROWTH_LENGTHS[-1]
    module = build(kind, length)
    found = max_two_long_axes(_grad_jaxpr(module, length), length)
    if module.quadratic:
        return found is not None, ("declared quadratic, builds " + str(found) if found else
                                   "declared quadratic but builds no L x L array")
    return found is None, f"builds an L x L array {found}" if found else f"none at L={length}"


def growth_exponent(kind: str, lengths: tuple[int, int], **fields) -> tuple[float, list[int]]:
    """p with largest fwd+bwd intermediate ~ L^p between the two `lengths`, and the two sizes
    (the variant's check_settings, overridden by `fields`)."""
    sizes = [largest_intermediate(_grad_jaxpr(build(kind, n, **fields), n)) for n in lengths]
    return float(np.log(sizes[1] / sizes[0]) / np.log(lengths[1] / lengths[0])), sizes


def check_growth(kind: str):
    """The largest fwd+bwd intermediate grows like L^p between the variant's `growth_lengths`
    (256 and 1024 unless it says otherwise); p must stay within its `growth_limit` (1.2: linear
    up to log factors). This sees all-pairs work done in blocks ([N, N, b, b]), which has no two
    axes of size L."""
    cls = attention.get(kind)
    if cls.quadratic:
        return None, "declared quadratic"
    lengths = cls.growth_lengths
    exponent, sizes = growth_exponent(kind, lengths, **cls.growth_settings)
    return exponent <= cls.growth_limit, (f"L^{exponent:.2f} (limit {cls.growth_limit}; largest "
                                          f"{sizes[0]} -> {sizes[1]} elements at L={lengths[0]} "
                                          f"-> {lengths[1]})")


def check_exact(kind: str):
    """Variants declaring an exact pattern equal masked dense softmax under `reference_mask`."""
    module = build(kind, LENGTH)
    if not module.exact_pattern:
        return None, "an approximation (declares no exact pattern)"
    q, k, v, mask = inputs(LENGTH)
    if module.shared_qk:
        k = q
    out = jax.jit(lambda q, k, v: module(q, k, v, mask))(q, k, v)  # as it trains: compiled
    allowed_BxHxLxL = module.reference_mask(q, k, mask)  # the test-only pattern, eager
    ref_k = module.reference_keys(q, k) if hasattr(module, "reference_keys") else k
    ref = masked_softmax_attention(q, ref_k, v, allowed_BxHxLxL)
    real = np.asarray(mask)
    got, want = np.asarray(out)[real], np.asarray(ref)[real]
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    return rel <= 1e-5, f"relative error {rel:.1e} to masked dense (limit 1e-5)"


def model_name(kind: str) -> str:
    """The `model=` config whose attention is `kind` (transformer for dense, else the kind)."""
    names = cli.choices("model")
    if kind in names:
        return kind
    for name in names:
        if _compose(f"model={name}").model.attention.kind == kind:
            return name
    raise ValueError(f"no model config selects attention kind {kind!r}")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(cli.CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def check_param_ratio(kind: str):
    """Parameters / the Transformer's with the same dims and head (informational: LRA's budget
    is about 1; over 1.1 is flagged in the report's params table, not failed here)."""
    cfg = _compose(f"model={model_name(kind)}", "task=listops", "preset=tiny")
    model_cfg = OmegaConf.to_object(cfg.model)
    spec = tasks.build(OmegaConf.to_object(cfg.task)).spec
    model = models.build(model_cfg, spec, seed=0)
    ratio = models.param_ratio(model, model_cfg, spec)
    return True, f"{ratio:.2f} x transformer (tiny ListOps dims)"


def check_tiny_run(kind: str):
    """`python -m lra.run model=<it> task=listops preset=tiny` in this process ends `ok`."""
    cfg = _compose(f"model={model_name(kind)}", "task=listops", "preset=tiny",
                   "train.progress=false", "train.checkpoint_every=-1")
    with tempfile.TemporaryDirectory(prefix="lra-check-") as tmp:
        result = execute(cfg, Path(tmp))
    detail = (f"status {result.status}, {result.steps} steps, test accuracy "
              f"{result.test_accuracy}" + (f": {result.error}" if result.error else ""))
    return result.status == "ok", detail


CHECKS: list[tuple[str, Callable]] = [
    ("output shape, finite", check_shape_finite),
    ("padding invariance", check_padding),
    ("jit + grad", check_grad),
    ("every parameter gets a gradient", check_every_parameter),
    ("no L x L intermediate", check_no_length_squared),
    ("memory growth exponent", check_growth),
    ("equals masked dense", check_exact),
    ("parameter ratio", check_param_ratio),
    ("tiny ListOps run", check_tiny_run),
]


def run_checks(kind: str, tiny_run: bool = True) -> list[Outcome]:
    outcomes = []
    for name, fn in CHECKS:
        if fn is check_tiny_run and not tiny_run:
            continue
        try:
            ok, detail = fn(kind)
        except Exception as err:  # noqa: BLE001 - a crash is a failed check, named
            ok, detail = False, f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
        outcomes.append(Outcome(name, {True: "PASS", False: "FAIL", None: "n/a"}[ok], detail))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cli.setup()  # imports the command line's plugins, registers the schemas
    kinds = [a for a in argv if "=" not in a and not a.startswith("-")]
    if not kinds or "-h" in argv or "--help" in argv:
        print(__doc__.strip().splitlines()[0])
        print(f"registered: {', '.join(sorted(attention.REGISTRY))}")
        return 0 if kinds or "-h" in argv or "--help" in argv else 2
    if kinds == ["all"]:
        kinds = sorted(attention.REGISTRY)
    unknown = [k for k in kinds if k not in attention.REGISTRY]
    if unknown:
        cli.fail(f"unknown attention kind {unknown[0]!r}; registered: "
                 f"{', '.join(sorted(attention.REGISTRY))} (a plugin's kind needs plugins=[its.module])")
    failed = []
    for kind in kinds:
        started = time.perf_counter()
        outcomes = run_checks(kind, tiny_run="--no-run" not in argv)
        print(f"\n{kind} ({attention.get(kind).__module__}.{attention.get(kind).__qualname__})")
        width = max(len(o.check) for o in outcomes)
        for o in outcomes:
            print(f"  {o.check:{width}s}  {o.status:4s}  {o.detail}")
        bad = [o.check for o in outcomes if o.status == "FAIL"]
        print(f"  -> {'FAIL: ' + ', '.join(bad) if bad else 'all checks pass'} "
              f"({time.perf_counter() - started:.0f} s)")
        failed += [f"{kind}: {b}" for b in bad]
    if len(kinds) > 1:
        print(f"\n{len(kinds) - len({f.split(':')[0] for f in failed})}/{len(kinds)} kinds pass"
              + (f"; failed: {'; '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
