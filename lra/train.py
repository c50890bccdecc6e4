"""One training loop for every task and model: pure jitted steps, val-based model selection."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lra.config import TrainConfig


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


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
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
    init: Callable
    train: Callable   # (state, batch) -> (state, metrics); state donated
    eval: Callable    # (params, batch) -> sums


def make_steps(model: nnx.Module, cfg: TrainConfig) -> tuple[Steps, Any]:
    graphdef, params, others = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(cfg)

    def apply(params, batch, rng):
        return nnx.merge(graphdef, params, others)(batch, rng=rng)

    def init(rng: jax.Array) -> TrainState:
        return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), rng)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(p):
            return loss_and_metrics(apply(p, batch, rng), batch)

        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": sums["correct"] / jnp.maximum(sums["count"], 1.0)}
        return TrainState(new_params, opt_state, state.step + 1, state.rng), metrics

    def eval_step(params, batch: dict) -> dict:
        return loss_and_metrics(apply(params, batch, None), batch)[1]

    steps = Steps(init, jax.jit(train_step, donate_argnums=0), jax.jit(eval_step))
    return steps, graphdef


def evaluate(steps: Steps, params, batches, max_batches: int = 0) -> dict[str, float]:
    totals = None
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        sums = steps.eval(params, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss_sum"]) / count}


class FitResult(NamedTuple):
    status: str
    steps: int
    val_accuracy: float | None
    test_accuracy: float | None
    best_step: int | None
    train_loss: float | None
    train_accuracy: float | None
    compile_time_s: float
    train_time_s: float
    timed_steps: int
    eval_time_s: float
    compiled: Any
    curve: list[dict]


def fit(model: nnx.Module, task, cfg: TrainConfig, seed: int,
        on_log: Callable[[dict], None] | None = None, memory=None) -> FitResult:
    """Train `model` on `task`; evaluate val every `eval_every` steps; test at the best val.

    `memory.start()` (a measure.PeakMemory) is called after compilation, so the peak it reads
    is what the training steps add on top of the initialised state, not the compiler's.
    """
    steps, _ = make_steps(model, cfg)
    state = steps.init(jax.random.key(seed))
    train_batches = task.batches("train", cfg.batch_size, seed)

    batch = next(train_batches)
    clock = time.perf_counter()
    compiled = steps.train.lower(state, batch).compile()
    compile_time = time.perf_counter() - clock
    if memory is not None:
        memory.start()

    def eval_split(params, split):
        return evaluate(steps, params, task.batches(split, cfg.batch_size), cfg.eval_batches)

    curve: list[dict] = []
    best = {"val": -1.0, "params": None, "step": None}
    status, train_time, timed_steps, eval_time = "ok", 0.0, 0, 0.0
    last_metrics, metrics = None, None
    run_start = time.perf_counter()
    timer_start, timer_step = None, 0
    progress = _progress(cfg)
    step = 0
    while step < cfg.steps:
        state, metrics = compiled(state, batch)
        step += 1
        batch = next(train_batches)  # host prepares the next batch while the device works
        if step == cfg.timing_warmup_steps or (cfg.timing_warmup_steps == 0 and step == 1):
            jax.block_until_ready(state)
            timer_start, timer_step = time.perf_counter(), step
        boundary_eval = step % cfg.eval_every == 0 or step == cfg.steps
        boundary_log = step % cfg.log_every == 0 or boundary_eval
        if not boundary_log:
            continue
        last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        if timer_start is not None and step > timer_step:
            train_time += now - timer_start
            timed_steps += step - timer_step
            timer_start, timer_step = now, step
        rate = timed_steps / train_time if train_time > 0 else float("nan")
        row = {"step": step, "train_loss": last_metrics["loss"],
               "train_accuracy": last_metrics["accuracy"], "steps_per_s": rate}
        if not math.isfinite(last_metrics["loss"]):
            status = "diverged"
        elif boundary_eval:
            clock = time.perf_counter()
            val = eval_split(state.params, "val")
            row.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
            if val["accuracy"] > best["val"]:
                best = {"val": val["accuracy"], "step": step,
                        "params": jax.tree.map(jnp.copy, state.params)}
            eval_time += time.perf_counter() - clock
        curve.append(row)
        if on_log:
            on_log(row)
        progress.update(step, row)
        if status != "ok":
            break
        if cfg.max_time_s and time.perf_counter() - run_start > cfg.max_time_s and step < cfg.steps:
            status = "timeout"
            break
        if timer_start is not None:
            timer_start = time.perf_counter()  # eval and logging are not training time
    progress.close()
    if status == "timeout" and best["params"] is None:
        # No evaluation before the deadline: report the parameters reached so far.
        clock = time.perf_counter()
        best = {"val": eval_split(state.params, "val")["accuracy"], "step": step,
                "params": state.params}
        eval_time += time.perf_counter() - clock

    test_accuracy = None
    if best["params"] is not None:
        clock = time.perf_counter()
        test_accuracy = eval_split(best["params"], "test")["accuracy"]
        eval_time += time.perf_counter() - clock
    return FitResult(status, step, best["val"] if best["params"] is not None else None,
                     test_accuracy, best["step"],
                     last_metrics and last_metrics["loss"], last_metrics and last_metrics["accuracy"],
                     compile_time, train_time, timed_steps, eval_time, compiled, curve)


class _progress:
    """tqdm bar updated only at log steps (no per-step host work)."""

    def __init__(self, cfg: TrainConfig):
        self.bar = None
        if cfg.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.steps, unit="step", dynamic_ncols=True, leave=False)

    def update(self, step: int, row: dict) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_accuracy']:.3f}",
                             sps=f"{row['steps_per_s']:.2f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
