"""One training loop for every task and model: pure jitted steps, val-based model selection."""

from __future__ import annotations

import math
import signal
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
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


def peak_lr(cfg: TrainConfig) -> float:
    """The schedule's largest value (rsqrt: lr / sqrt(warmup); cosine, constant: lr)."""
    return cfg.lr / math.sqrt(max(cfg.warmup_steps, 1)) if cfg.schedule == "rsqrt" else cfg.lr


def param_groups(params) -> Any:
    """"ssm" for SSMParam leaves (recurrence parameters), "default" for every other parameter."""
    from lra.models.attention.base import SSMParam

    return jax.tree.map(lambda v: "ssm" if isinstance(v, SSMParam) else "default", params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: TrainConfig, groups=None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; with `groups` (param_groups) that name any "ssm" leaf,
    those get the same schedule rescaled to peak `train.ssm_lr` and no weight decay."""
    schedule = lr_schedule(cfg)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if groups is not None and "ssm" in jax.tree.leaves(groups):
        if cfg.ssm_lr <= 0:
            raise ValueError(f"train.ssm_lr={cfg.ssm_lr} must be > 0 (S4's is 1e-3)")
        ratio = cfg.ssm_lr / peak_lr(cfg)
        ssm = optax.adam(lambda step: schedule(step) * ratio, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        adamw = optax.multi_transform({"default": adamw, "ssm": ssm}, groups)
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
    tx = make_optimizer(cfg, param_groups(params))

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


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived during an evaluation (`evaluate` checks `stop` once per batch)."""


def evaluate(steps: Steps, params, batches, max_batches: int = 0, stop=None) -> dict[str, float]:
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
    num_devices: int = 1
    resumed_from_step: int | None = None
    params: Any = None  # the best-val parameters (those the test accuracy was measured with)
    lower_time_s: float = 0.0


class Stop:
    """Requests to stop a run, set by signals; the loop polls `requested` once per step.

    SIGINT/SIGTERM: `requested = "interrupted"` (checkpoint, no test evaluation; `signum` says
    which). SIGUSR1, which a sweep's supervisor sends at `point_timeout_s`: `requested =
    "timeout"`, ending the run as `train.max_time_s` does (checkpoint, then test accuracy of the
    best parameters so far). Used as a context manager it installs the handlers (main thread
    only) and restores the previous ones on exit. A second SIGINT (Ctrl-C twice) raises
    KeyboardInterrupt; a repeated SIGTERM is the same request again and is ignored: one kill -9
    of a multi-threaded sweep delivers a point's PR_SET_PDEATHSIG SIGTERM once per parent thread
    that exits.
    """

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: int | None = None      # the interrupting signal (SIGINT/SIGTERM)
        self.requested: str | None = None   # None | "interrupted" | "timeout"
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGUSR1:
            self.requested = self.requested or "timeout"
        elif self.signum is None:
            self.signum, self.requested = signum, "interrupted"
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> "Stop":
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def fit(model: nnx.Module, task, cfg: TrainConfig, seed: int,
        on_log: Callable[[list[dict]], None] | None = None, memory=None, checkpointer=None,
        stop: Stop | None = None) -> FitResult:
    """Train `model` on `task`; evaluate val every `eval_every` steps; test at the best val.

    `memory.start()` (a measure.PeakMemory) is called after compilation, so the peak it reads
    is what the training steps add on top of the initialised state, not the compiler's.
    `checkpointer` (lra.checkpoint.Checkpointer): resume from its latest checkpoint, save every
    `checkpoint_every` steps, at the end, on interrupt and on timeout. `stop.requested` set ->
    status interrupted or timeout (see Stop).
    """
    from lra.parallel import DataParallel

    dp = DataParallel(cfg.batch_size, cfg.data_parallel)
    steps, _ = make_steps(model, cfg)
    state = dp.state(steps.init(jax.random.key(seed)))
    best = {"val": -1.0, "params": None, "step": None}
    curve: list[dict] = []
    train_time, timed_steps, eval_time = 0.0, 0, 0.0
    start_step, last_metrics = 0, None
    pending = None  # a logged row whose val eval a signal cut short: done first on resume
    if checkpointer is not None:
        restored = checkpointer.restore({"params": state.params, "opt_state": state.opt_state,
                                         "step": state.step, "best_params": state.params})
        if restored is not None:
            arrays, meta = restored.arrays, restored.meta
            state = TrainState(arrays["params"], arrays["opt_state"], arrays["step"], state.rng)
            start_step = int(restored.step)
            if meta["best_step"] is not None:
                best = {"val": meta["best_val"], "step": meta["best_step"],
                        "params": arrays["best_params"]}
            curve = list(meta["curve"])
            pending = meta.get("pending_row")
            last_row = pending or (curve[-1] if curve else None)  # the checkpoint step's row
            if last_row is not None:
                last_metrics = {"loss": last_row["train_loss"],
                                "accuracy": last_row["train_accuracy"]}
            train_time, timed_steps = meta["train_time_s"], meta["timed_steps"]
            eval_time = meta["eval_time_s"]
    train_batches = task.batches("train", cfg.batch_size, seed, start_step=start_step)

    batch = dp.batch(next(train_batches))
    clock = time.perf_counter()
    lowered = steps.train.lower(state, batch)  # Python tracing + StableHLO: never cached
    lower_time = time.perf_counter() - clock
    compiled = lowered.compile()  # XLA: served by the persistent cache when warm
    compile_time = time.perf_counter() - clock
    if memory is not None:
        memory.start()

    def eval_split(params, split):
        batches = (dp.batch(b) for b in task.batches(split, cfg.batch_size))
        return evaluate(steps, params, batches, cfg.eval_batches, stop)

    def save(step_now: int) -> None:
        if checkpointer is None:
            return
        checkpointer.save(step_now, {
            "params": state.params, "opt_state": state.opt_state, "step": state.step,
            "best_params": best["params"] if best["params"] is not None else state.params,
        }, {"best_val": best["val"], "best_step": best["step"], "curve": curve,
            "train_time_s": train_time, "timed_steps": timed_steps, "eval_time_s": eval_time,
            "pending_row": pending})

    def validate(row: dict, step_now: int) -> None:
        """Val eval at a boundary: fill `row`, keep the best params, append it to the curve."""
        nonlocal best, eval_time
        clock = time.perf_counter()
        val = eval_split(state.params, "val")  # raises Interrupted on a signal
        row.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
        if val["accuracy"] > best["val"]:
            best = {"val": val["accuracy"], "step": step_now,
                    "params": jax.tree.map(jnp.copy, state.params)}
        eval_time += time.perf_counter() - clock
        curve.append(row)

    status = "ok"
    if pending is not None:  # interrupted during this step's val eval last time: do it now
        try:
            validate(pending, start_step)
            pending = None
            if on_log:
                on_log(curve)
        except Interrupted:
            status = "interrupted"
    metrics = None
    run_start = time.perf_counter()
    timer_start, timer_step = None, start_step
    warm = start_step + max(cfg.timing_warmup_steps, 1)
    progress = _progress(cfg, start_step)
    save_every = checkpointer.every if checkpointer is not None else 0  # hoisted off the step loop
    step = start_step
    while status == "ok" and step < cfg.steps:
        state, metrics = compiled(state, batch)
        step += 1
        batch = dp.batch(next(train_batches))  # host prepares the next batch while the device works
        if step == warm:
            jax.block_until_ready(state)
            timer_start, timer_step = time.perf_counter(), step
        if stop is not None and stop.requested:
            status = stop.requested
        boundary_eval = step % cfg.eval_every == 0 or step == cfg.steps
        boundary_log = step % cfg.log_every == 0 or boundary_eval
        boundary_save = save_every > 0 and step % save_every == 0
        if not (boundary_log or boundary_save or status != "ok"):
            continue
        last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # syncs
        now = time.perf_counter()
        if timer_start is not None and step > timer_step:
            train_time += now - timer_start
            timed_steps += step - timer_step
            timer_start, timer_step = now, step
        if not math.isfinite(last_metrics["loss"]):
            status = "diverged"
        if boundary_log or status == "diverged":
            rate = timed_steps / train_time if train_time > 0 else float("nan")
            row = {"step": step, "train_loss": last_metrics["loss"],
                   "train_accuracy": last_metrics["accuracy"], "steps_per_s": rate}
            if boundary_eval and status != "diverged":
                try:
                    if status == "interrupted":
                        raise Interrupted
                    validate(row, step)
                except Interrupted:
                    status, pending = "interrupted", row  # the resumed run evaluates it first
            else:
                curve.append(row)
            if on_log and pending is None:
                on_log(curve)  # the whole curve (a resumed run's includes the restored rows)
            progress.update(step, row)
        if status == "diverged":
            break
        if (status == "ok" and cfg.max_time_s and step < cfg.steps
                and time.perf_counter() - run_start > cfg.max_time_s):
            status = "timeout"
        if boundary_save or status != "ok":  # interrupted or timed out: resumable from here
            clock = time.perf_counter()
            save(step)
            eval_time += time.perf_counter() - clock  # bookkeeping, not training time
        if status != "ok":
            break
        if timer_start is not None:
            timer_start = time.perf_counter()  # eval, logging, saving are not training time
    progress.close()
    if status == "ok":
        save(step)
    test_accuracy = None
    try:
        if status == "timeout" and best["params"] is None:
            # No evaluation before the deadline: report the parameters reached so far.
            clock = time.perf_counter()
            best = {"val": eval_split(state.params, "val")["accuracy"], "step": step,
                    "params": state.params}
            eval_time += time.perf_counter() - clock
        if best["params"] is not None and status != "interrupted":
            clock = time.perf_counter()
            test_accuracy = eval_split(best["params"], "test")["accuracy"]
            eval_time += time.perf_counter() - clock
    except Interrupted:  # the final checkpoint is saved: a re-run only evaluates
        status = "interrupted"
    return FitResult(status, step, best["val"] if best["params"] is not None else None,
                     test_accuracy, best["step"],
                     last_metrics and last_metrics["loss"], last_metrics and last_metrics["accuracy"],
                     compile_time, train_time, timed_steps, eval_time, compiled, curve,
                     dp.num_devices, start_step or None, best["params"], lower_time)


class _progress:
    """tqdm bar updated only at log steps (no per-step host work)."""

    def __init__(self, cfg: TrainConfig, initial: int = 0):
        self.bar = None
        if cfg.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.steps, initial=initial, unit="step", dynamic_ncols=True,
                            leave=False)

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
