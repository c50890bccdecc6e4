"""A module's auxiliary loss (AuxLoss, sown during its call) is trained on but not reported as
the loss; evaluation ignores it; values sown before the steps were made are not counted."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lra.config import TrainConfig
from lra.models.attention.base import AuxLoss
from lra.train.steps import make_steps


class Toy(nnx.Module):
    """Logits = x @ w; sows coef * sum(w^2)."""

    def __init__(self, coef: float):
        self.w = nnx.Param(jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32))
        self.coef = coef

    def __call__(self, batch, rng=None):
        self.sow(AuxLoss, "penalty", self.coef * jnp.sum(self.w[...] ** 2))
        return batch["inputs"] @ self.w[...]


BATCH = {"inputs": jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)), jnp.float32),
         "targets": jnp.asarray([0, 1, 2, 0, 1, 2, 0, 1], jnp.int32)}
CFG = TrainConfig(lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip=0.0)


def cross_entropy(w) -> float:
    logits = BATCH["inputs"] @ w
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, BATCH["targets"]).mean())


def step(coef: float, call_first: bool = False):
    model = Toy(coef)
    if call_first:
        model(BATCH)  # sows once outside the steps
    w0 = np.asarray(model.w.value)
    steps = make_steps(model, CFG)
    state, metrics = steps.train(steps.init(jax.random.key(0)), BATCH)  # warm-up: lr 0
    first = metrics
    state, _ = steps.train(state, BATCH)
    return w0, state, first, steps


def test_the_aux_loss_is_minimised_and_reported_apart():
    w0, state, metrics, steps = step(100.0)
    assert abs(float(metrics["loss"]) - cross_entropy(w0)) < 1e-6
    assert abs(float(metrics["aux_loss"]) - 100.0 * float((w0 ** 2).sum())) < 1e-3
    w1 = np.asarray(state.params["w"][...])
    # The penalty's gradient (200 w) dominates: Adam's first step at lr > 0 moves every entry towards 0.
    assert np.all(np.abs(w1) < np.abs(w0))
    # Without it the cross-entropy alone moves some entries away from 0.
    _, state0, metrics0, _ = step(0.0)
    assert np.any(np.abs(np.asarray(state0.params["w"][...])) > np.abs(w0))
    assert abs(float(metrics0["loss"]) - cross_entropy(w0)) < 1e-6
    # Evaluation reports the cross-entropy only.
    sums = steps.eval(state.params, BATCH)
    assert abs(float(sums["loss_sum"]) / float(sums["count"]) - cross_entropy(w1)) < 1e-5


def test_values_sown_before_the_steps_are_not_counted_again():
    w0, _, metrics, _ = step(1.0, call_first=True)
    assert abs(float(metrics["aux_loss"]) - float((w0 ** 2).sum())) < 1e-4


def test_models_without_aux_loss_report_none():
    class Plain(Toy):
        def __call__(self, batch, rng=None):
            return batch["inputs"] @ self.w[...]

    steps = make_steps(Plain(0.0), CFG)
    _, metrics = steps.train(steps.init(jax.random.key(0)), BATCH)
    assert set(metrics) == {"loss", "accuracy"}
