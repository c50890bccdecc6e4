"""SSM / LRU recurrence parameters form their own optimizer group (train.ssm_lr, no weight decay);
NoDecayParam leaves (Mamba's D, adaptive span's z) another (the base rate, no weight decay)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lra import models
from lra.config import TrainConfig
from lra.train.steps import make_optimizer, param_groups, peak_lr
from lra.models.attention.base import SSMParam
from lra.models.config import ModelConfig

SPEC = type("Spec", (), dict(vocab_size=20, num_classes=3, seq_len=64, kind="classify",
                             default_pool="mean"))()
# LRA text's paper optimizer (configs/task_preset/text/paper.yaml).
PAPER = dataclasses.replace(TrainConfig(), lr=0.05, schedule="rsqrt", warmup_steps=8000,
                            weight_decay=0.1, grad_clip=0.0)


def model(kind, **fields):
    cls = models.attention.get(kind)
    cfg = ModelConfig(emb_dim=16, num_heads=2, num_layers=1, mlp_dim=16,
                      attention=cls.config_cls(**(fields or {"state_dim": 8})))
    return models.build(cfg, SPEC)


def flat(state) -> dict:
    """path -> plain value (array or label) of an nnx.State."""
    return {path: v.get_value() if isinstance(v, nnx.Variable) else v
            for path, v in state.flat_state()}


@pytest.mark.parametrize("kind, names", [("s4d", {"log_dt_E", "log_a_real_ExN", "a_imag_ExN"}),
                                         ("lru", {"nu_log_N", "theta_log_N", "gamma_log_N"})])
def test_recurrence_parameters_get_no_decay_and_the_ssm_rate(kind, names):
    _, params, _ = nnx.split(model(kind), nnx.Param, ...)
    groups = param_groups(params)
    labels = flat(groups)
    assert {path[-1] for path, label in labels.items() if label == "ssm"} == names
    values = flat(params)

    def second_update(cfg, grad_fn):
        """Updates of the 2nd step (the warm-up-free constant schedule is 0 at step 0)."""
        tx = make_optimizer(cfg, groups)
        state = tx.init(params)
        grads = jax.tree.map(grad_fn, params)
        _, state = tx.update(grads, state, params)
        return flat(tx.update(grads, state, params)[0])

    base = dataclasses.replace(PAPER, schedule="constant", warmup_steps=0, lr=0.01, ssm_lr=0.002)
    # Zero gradient: AdamW decays every default parameter by lr * wd * p; SSM parameters stay.
    updates = second_update(base, jnp.zeros_like)
    for path, label in labels.items():
        want = 0.0 if label == "ssm" else -0.01 * 0.1 * np.asarray(values[path])
        np.testing.assert_allclose(np.asarray(updates[path]), want, rtol=1e-5, atol=1e-12)
    # Unit gradient, no decay: Adam's step is -lr per element, ssm_lr for the SSM group.
    updates = second_update(dataclasses.replace(base, weight_decay=0.0), jnp.ones_like)
    for path, label in labels.items():
        want = -0.002 if label == "ssm" else -0.01
        np.testing.assert_allclose(np.asarray(updates[path]), want, rtol=1e-4)
    # Under rsqrt the group keeps the schedule's shape, rescaled to peak ssm_lr.
    assert peak_lr(PAPER) == pytest.approx(0.05 / np.sqrt(8000))


@pytest.mark.parametrize("kind, fields, no_decay, ssm", [
    # Mamba's reference (mamba_simple.py) sets D._no_weight_decay at the base rate.
    ("mamba", {"state_dim": 4}, {"d_CxK"}, {"a_log_CxKxN", "dt_bias_CxK"}),
    # Adaptive span: z has its own L1 penalty; the paper's code uses no weight decay at all.
    ("adaptive_span", {"max_span": 16, "ramp": 4, "block_size": 16}, {"span_H"}, set()),
])
def test_no_decay_parameters_get_the_base_rate_without_decay(kind, fields, no_decay, ssm):
    _, params, _ = nnx.split(model(kind, **fields), nnx.Param, ...)
    groups = param_groups(params)
    labels = flat(groups)
    named = {label: {path[-1] for path, lab in labels.items() if lab == label}
             for label in ("no_decay", "ssm")}
    assert named == {"no_decay": no_decay, "ssm": ssm}
    values = flat(params)
    base = dataclasses.replace(PAPER, schedule="constant", warmup_steps=0, lr=0.01, ssm_lr=0.002)

    def second_update(cfg, grad_fn):
        tx = make_optimizer(cfg, groups)
        state = tx.init(params)
        grads = jax.tree.map(grad_fn, params)
        _, state = tx.update(grads, state, params)
        return flat(tx.update(grads, state, params)[0])

    # Zero gradient: only weight decay moves a parameter; "no_decay" and "ssm" ones stay.
    updates = second_update(base, jnp.zeros_like)
    for path, label in labels.items():
        want = -0.01 * 0.1 * np.asarray(values[path]) if label == "default" else 0.0
        np.testing.assert_allclose(np.asarray(updates[path]), want, rtol=1e-5, atol=1e-12,
                                   err_msg=f"{path} ({label})")
    # Unit gradient, no decay: Adam's step is -lr, the base rate for "no_decay" (not ssm_lr).
    updates = second_update(dataclasses.replace(base, weight_decay=0.0), jnp.ones_like)
    for path, label in labels.items():
        want = -0.002 if label == "ssm" else -0.01
        np.testing.assert_allclose(np.asarray(updates[path]), want, rtol=1e-4,
                                   err_msg=f"{path} ({label})")


def test_models_without_recurrence_parameters_have_one_group():
    transformer = models.build(ModelConfig(emb_dim=16, num_heads=2, num_layers=1, mlp_dim=16), SPEC)
    _, params, _ = nnx.split(transformer, nnx.Param, ...)
    assert set(jax.tree.leaves(param_groups(params))) == {"default"}
    assert not any(isinstance(v, SSMParam) for v in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def test_bad_ssm_lr_is_a_one_line_error():
    _, params, _ = nnx.split(model("lru"), nnx.Param, ...)
    with pytest.raises(ValueError, match="train.ssm_lr=0.0 must be > 0"):
        make_optimizer(dataclasses.replace(PAPER, ssm_lr=0.0), param_groups(params))
