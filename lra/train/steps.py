"""The optimisation and the pure, jitted steps: `lr_schedule` / `make_optimizer`, the loss
(`loss_and_metrics`), `make_steps` (train and eval steps) and `evaluate` (one split)."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lra.config import TrainConfig
from lra.models.attention.base import AuxLoss, NoDecayParam, SSMParam
from lra.train.ends import Interrupted


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    warmup = max(cfg.warmup_steps, 1)
    if cfg.schedule == "rsqrt":
        # LRA's "constant * linear_warmup * rsqrt_decay": lr * min(1, s/w) / sqrt(max(s, w)).
        def rsqrt(step):
            step = jnp.asarray(step, jnp.float32)
            return cfg.lr * jnp.minimum(1.0, step / warmup) * jax.lax.rsqrt(jnp.maximum(step, warmup))
        return rsqrt
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1))
    if cfg.schedule == "constant":
        return optax.linear_schedule(0.0, cfg.lr, warmup)
    raise ValueError(f"train.schedule={cfg.schedule!r}; use rsqrt, cosine or constant")


def peak_lr(cfg: TrainConfig) -> float:
    """The schedule's largest value (rsqrt: lr / sqrt(warmup); cosine, constant: lr)."""
    return cfg.lr / math.sqrt(max(cfg.warmup_steps, 1)) if cfg.schedule == "rsqrt" else cfg.lr


def param_groups(params) -> Any:
    """The optimizer group of every parameter: "ssm" for SSMParam leaves (recurrence parameters:
    train.ssm_lr, no decay), "no_decay" for NoDecayParam leaves (the base rate, no decay: Mamba's
    D, adaptive span's z), "default" for every other parameter (AdamW)."""
    def group(v: nnx.Variable) -> str:
        if isinstance(v, SSMParam):
            return "ssm"
        return "no_decay" if isinstance(v, NoDecayParam) else "default"

    return jax.tree.map(group, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: TrainConfig, groups=None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; with `groups` (param_groups), "ssm" leaves get the same
    schedule rescaled to peak `train.ssm_lr` and no weight decay, "no_decay" leaves the schedule
    itself and no weight decay."""
    schedule = lr_schedule(cfg)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    labels = set(jax.tree.leaves(groups)) if groups is not None else set()
    if labels - {"default"}:
        transforms = {"default": adamw}
        if "ssm" in labels:
            if cfg.ssm_lr <= 0:
                raise ValueError(f"train.ssm_lr={cfg.ssm_lr} must be > 0 (S4's is 1e-3)")
            ratio = cfg.ssm_lr / peak_lr(cfg)
            transforms["ssm"] = optax.adam(lambda step: schedule(step) * ratio, b1=cfg.b1,
                                           b2=cfg.b2, eps=cfg.eps)
        if "no_decay" in labels:
            transforms["no_decay"] = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        adamw = optax.multi_transform(transforms, groups)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw


def loss_and_metrics(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    """Mean cross-entropy; per-token tasks weight positions by batch['weights']."""
    targets = batch["targets"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (logits.argmax(-1) == targets).astype(jnp.float32)
    weights = batch.get("weights", jnp.ones_like(losses))
    if "valid" in batch:
        valid = batch["valid"].astype(jnp.float32)
        weights = weights * valid.reshape(valid.shape + (1,) * (weights.ndim - 1))
    total = jnp.maximum(weights.sum(), 1.0)
    return (losses * weights).sum() / total, {
        "loss_sum": (losses * weights).sum(), "correct": (correct * weights).sum(), "count": weights.sum()}


class Steps(NamedTuple):
    init: Callable    # rng -> TrainState
    train: Callable   # (state, batch) -> (state, metrics); state donated
    eval: Callable    # (params, batch) -> sums


def make_steps(model: nnx.Module, cfg: TrainConfig) -> Steps:
    """The pure train and eval steps of `model` (jitted; the train step donates its state).

    The train step minimises cross-entropy plus every AuxLoss a module sows during the call
    (models.attention.base.AuxLoss); its metrics report the cross-entropy as `loss` and, for
    models that sow any, their sum as `aux_loss`."""
    nnx.pop(model, AuxLoss)  # values sown by an earlier call are not part of the state
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg, param_groups(params))

    def apply(params, batch, rng):
        module = nnx.merge(graphdef, params, others)
        logits = module(batch, rng=rng)
        sown = jax.tree.leaves(nnx.pop(module, AuxLoss))
        return logits, (sum(jnp.sum(x) for x in sown) if sown else None)

    def init(rng: jax.Array) -> TrainState:
        return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), rng)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(p):
            logits, aux = apply(p, batch, rng)
            loss, sums = loss_and_metrics(logits, batch)
            return (loss if aux is None else loss + aux), (loss, sums, aux)

        (_, (loss, sums, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": sums["correct"] / jnp.maximum(sums["count"], 1.0)}
        if aux is not None:
            metrics["aux_loss"] = aux
        return TrainState(new_params, opt_state, state.step + 1, state.rng), metrics

    def eval_step(params, batch: dict) -> dict:
        return loss_and_metrics(apply(params, batch, None)[0], batch)[1]

    return Steps(init, jax.jit(train_step, donate_argnums=0), jax.jit(eval_step))



def evaluate(steps: Steps, params, batches, max_batches: int = 0, stop=None) -> dict[str, float]:
    """Accuracy and loss of `params` over `batches` (the first `max_batches`; 0: all)."""
    totals = None
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        if stop is not None and stop.signum is not None:
            raise Interrupted
        sums = steps.eval(params, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss_sum"]) / count}


