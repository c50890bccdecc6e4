"""One training loop for every task and model: pure jitted steps, val-based model selection.

The pieces, in the order `fit` uses them: `lr_schedule` / `make_optimizer` (optimisation),
`loss_and_metrics` (the loss), `make_steps` (the jitted train and eval steps), `evaluate` (one
split), `due` (every periodic boundary), `Chrono` (where the time goes), `Best` (model selection
on val), `restore` (continue from a checkpoint) and `Stop` (signals). `fit` is the loop that
strings them together; `FitResult` is what it returns, by keyword.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lra.config import TrainConfig
from lra.results import Status
from lra.tracking import duration, percent, rate

log = logging.getLogger(__name__)


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
    from lra.models.attention.base import NoDecayParam, SSMParam

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
    from lra.models.attention.base import AuxLoss

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


class RunEnded(Exception):
    """A run that ends before train.steps, raised where that is noticed; `fit` turns it into the
    row's Status, once."""

    status: ClassVar[Status]


class Diverged(RunEnded):
    """The training loss became NaN or inf: the run ends without a checkpoint of that state."""

    status = Status.DIVERGED


class TimedOut(RunEnded):
    """train.max_time_s passed, or SIGUSR1 (a sweep's point_timeout_s) arrived: a checkpoint,
    then test accuracy of the best parameters so far."""

    status = Status.TIMEOUT


class Interrupted(RunEnded):
    """SIGINT/SIGTERM: a checkpoint and no test evaluation. Raised at the step's boundary, and by
    `evaluate`, which checks `stop` once per batch."""

    status = Status.INTERRUPTED


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


CONVERGED = ("solved", "plateaued")
MILESTONES = (0.5, 0.9, 0.99)


def convergence(curve: list[dict], cfg: TrainConfig) -> str | None:
    """Where a run stands by its val evaluations (rows of `curve` with val_accuracy): "solved"
    (best val >= train.solve_at), "plateaued" (the last train.patience evaluations gained no
    more than train.min_delta over the best before them; patience 0: never), else "capped"
    (still improving, or too few evaluations to tell); None before any evaluation."""
    vals = [row["val_accuracy"] for row in curve if row.get("val_accuracy") is not None]
    if not vals:
        return None
    if max(vals) >= cfg.solve_at:
        return "solved"
    last = cfg.patience
    if last > 0 and len(vals) > last and max(vals[-last:]) <= max(vals[:-last]) + cfg.min_delta:
        return "plateaued"
    return "capped"


def milestones(curve: list[dict], batch_size: int, solve_at: float) -> tuple[dict, int | None]:
    """Sample efficiency from the val evaluations: for each fraction f of MILESTONES, the first
    evaluated step whose val accuracy reached f x the run's best val ({"50%": {"step",
    "examples"}, ...}; examples = steps x batch size), and the first step at >= solve_at
    (None when never)."""
    evals = [(row["step"], row["val_accuracy"]) for row in curve
             if row.get("val_accuracy") is not None]
    if not evals:
        return {}, None
    best = max(v for _, v in evals)
    out = {}
    for fraction in MILESTONES:
        step = next(s for s, v in evals if v >= fraction * best)
        out[f"{round(100 * fraction)}%"] = {"step": step, "examples": step * batch_size}
    solved = next((s for s, v in evals if v >= solve_at), None)
    return out, solved


def due(step: int, every: int, last: int | None = None) -> bool:
    """Whether `step` ends a period of `every` steps (every <= 0: never) or is the `last` one."""
    return (every > 0 and step % every == 0) or step == last


class Chrono:
    """Where a run's time goes: steady-state training (`train_time_s` over `timed_steps`) and the
    pauses between (`eval_time_s`: evaluations and checkpoints).

    The clock starts `warmup_steps` (at least 1) after the (re)started step, once that step is
    done (`step`: the only per-step call, a comparison). `lap` at each host sync adds the steps
    and time since the last lap; `paused()` times a pause as eval time; `restart` after the
    boundary work (eval, logging, saving) keeps all of it out of training time. A resumed run
    continues the totals its checkpoint saved (`totals`)."""

    TOTALS = ("train_time_s", "timed_steps", "eval_time_s")

    def __init__(self, start_step: int, warmup_steps: int, train_time_s: float = 0.0,
                 timed_steps: int = 0, eval_time_s: float = 0.0):
        self.warm_step = start_step + max(warmup_steps, 1)
        self.train_time_s, self.timed_steps, self.eval_time_s = train_time_s, timed_steps, eval_time_s
        self._since: float | None = None  # the clock: perf_counter at the last lap
        self._since_step = start_step

    def step(self, step: int, state) -> None:
        if step == self.warm_step:
            jax.block_until_ready(state)
            self._since, self._since_step = time.perf_counter(), step

    def lap(self, step: int) -> None:
        if self._since is not None and step > self._since_step:
            now = time.perf_counter()
            self.train_time_s += now - self._since
            self.timed_steps += step - self._since_step
            self._since, self._since_step = now, step

    def restart(self) -> None:
        if self._since is not None:
            self._since = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        clock = time.perf_counter()
        yield
        self.eval_time_s += time.perf_counter() - clock

    @property
    def steps_per_s(self) -> float:
        return self.timed_steps / self.train_time_s if self.train_time_s > 0 else float("nan")

    def totals(self) -> dict:
        return {name: getattr(self, name) for name in self.TOTALS}


@dataclasses.dataclass
class Best:
    """Model selection: the best val accuracy so far, its step and its parameters."""

    val: float = -1.0
    step: int | None = None
    params: Any = None

    def offer(self, val: float, step: int, params) -> None:
        if val > self.val:  # copied: the next train step donates (invalidates) `params`
            self.val, self.step, self.params = val, step, jax.tree.map(jnp.copy, params)


@dataclasses.dataclass
class Record:
    """What a run has recorded (a checkpoint's JSON part, with the best parameters beside it):
    the logged rows, the best val, and a row whose val evaluation a signal cut short."""

    curve: list[dict] = dataclasses.field(default_factory=list)
    best: Best = dataclasses.field(default_factory=Best)
    pending: dict | None = None

    def last_train(self) -> dict | None:
        """Train loss/accuracy of the newest row (the checkpoint step's)."""
        row = self.pending or (self.curve[-1] if self.curve else None)
        return None if row is None else {"loss": row["train_loss"], "accuracy": row["train_accuracy"]}


def _checkpoint_arrays(state: TrainState, best_params) -> dict:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "best_params": best_params if best_params is not None else state.params}


def save(checkpointer, step: int, state: TrainState, record: Record, chrono: Chrono) -> None:
    checkpointer.save(step, _checkpoint_arrays(state, record.best.params), {
        "best_val": record.best.val, "best_step": record.best.step, "curve": record.curve,
        **chrono.totals(), "pending_row": record.pending})


def restore(checkpointer, state: TrainState) -> tuple[TrainState, int, Record, dict]:
    """Continue from the newest readable checkpoint: (state, its step, its record, the timing
    totals); the fresh `state` at step 0 when there is none (or no checkpointer)."""
    restored = checkpointer.restore(_checkpoint_arrays(state, None)) if checkpointer else None
    if restored is None:
        return state, 0, Record(), {}
    arrays, meta = restored.arrays, restored.meta
    state = TrainState(arrays["params"], arrays["opt_state"], arrays["step"], state.rng)
    best = (Best(meta["best_val"], meta["best_step"], arrays["best_params"])
            if meta["best_step"] is not None else Best())
    record = Record(list(meta["curve"]), best, meta.get("pending_row"))
    return state, int(restored.step), record, {name: meta[name] for name in Chrono.TOTALS}


@dataclasses.dataclass
class FitResult:
    status: Status                            # ok | diverged | timeout | interrupted
    steps: int
    convergence: str | None = None            # solved | plateaued | capped (`convergence`)
    steps_to: dict | None = None              # `milestones`: {"50%": {"step", "examples"}, ...}
    solved_step: int | None = None            # first evaluated step at val >= train.solve_at
    val_accuracy: float | None = None         # of the best-val parameters
    test_accuracy: float | None = None        # of the same parameters
    best_step: int | None = None
    train_loss: float | None = None           # at the last host sync
    train_accuracy: float | None = None
    compile_time_s: float = 0.0
    lower_time_s: float = 0.0
    train_time_s: float = 0.0
    timed_steps: int = 0
    eval_time_s: float = 0.0
    num_devices: int = 1
    resumed_from_step: int | None = None
    curve: list[dict] = dataclasses.field(default_factory=list)
    compiled: Any = None                      # the compiled train step (for compiled_stats)
    params: Any = None                        # the best-val parameters

    @property
    def steps_per_s(self) -> float | None:
        return self.timed_steps / self.train_time_s if self.train_time_s > 0 else None

    def row(self) -> dict:
        """The RunResult fields this fills (by name)."""
        from lra.results import RunResult

        names = {f.name for f in dataclasses.fields(RunResult)}
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}
        return {**fields, "status": Status(self.status).value, "steps_per_s": self.steps_per_s}


class Stop:
    """Requests to stop a run, set by signals; the loop polls `requested` once per step.

    SIGINT/SIGTERM: `requested = Interrupted` (checkpoint, no test evaluation; `signum` says
    which). SIGUSR1, which a sweep's supervisor sends at `point_timeout_s`: `requested =
    TimedOut`, ending the run as `train.max_time_s` does (checkpoint, then test accuracy of the
    best parameters so far). Used as a context manager it installs the handlers (main thread
    only) and restores the previous ones on exit. A second SIGINT (Ctrl-C twice) raises
    KeyboardInterrupt; a repeated SIGTERM is the same request again and is ignored: one kill -9
    of a multi-threaded sweep delivers a point's PR_SET_PDEATHSIG SIGTERM once per parent thread
    that exits.
    """

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: int | None = None      # the interrupting signal (SIGINT/SIGTERM)
        self.requested: type[RunEnded] | None = None   # None | Interrupted | TimedOut
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGUSR1:
            self.requested = self.requested or TimedOut
        elif self.signum is None:
            self.signum, self.requested = signum, Interrupted
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
    status interrupted or timeout (see Stop). How the run ended is the RunEnded raised inside
    (Diverged, TimedOut, Interrupted), or none; its Status is the result's. `on_log(curve)` after
    each logged row (and first, on a resume, with the curve the checkpoint restored).
    """
    loop = Loop(model, task, cfg, seed, on_log, checkpointer, stop)
    if memory is not None:
        memory.start()
    ended = loop.pending_validation()
    if ended is None:
        ended = loop.run()
    return loop.finish(ended)


class Loop:
    """One run's training loop: state, data, clocks and record; `fit` drives it."""

    def __init__(self, model, task, cfg: TrainConfig, seed: int, on_log, checkpointer, stop):
        from lra.parallel import DataParallel

        self.task, self.cfg, self.on_log, self.checkpointer, self.stop = (task, cfg, on_log,
                                                                          checkpointer, stop)
        self.dp = DataParallel(cfg.batch_size, cfg.data_parallel)
        self.steps = make_steps(model, cfg)
        self.state, self.start_step, self.record, totals = restore(
            checkpointer, self.dp.state(self.steps.init(jax.random.key(seed))))
        if on_log and self.record.curve:  # resumed: observers restart from the checkpoint's record
            on_log(self.record.curve)
        self.train_metrics = dict(self.record.last_train() or {})
        self.train_batches = self.dp.feed(task.batches("train", cfg.batch_size, seed,
                                                       start_step=self.start_step))
        self.batch = next(self.train_batches)
        clock = time.perf_counter()
        lowered = self.steps.train.lower(self.state, self.batch)  # tracing + StableHLO: never cached
        self.lower_time = time.perf_counter() - clock
        self.compiled = lowered.compile()  # XLA: served by the persistent cache when warm
        self.compile_time = time.perf_counter() - clock
        log.info("compiled the train step in %s (tracing and lowering %s)",
                 duration(self.compile_time), duration(self.lower_time))
        self.chrono = Chrono(self.start_step, cfg.timing_warmup_steps, **totals)
        self.step, self.metrics = self.start_step, None

    def evaluate_split(self, params, split: str) -> dict:
        with self.chrono.paused():
            batches = self.dp.feed(self.task.batches(split, self.cfg.batch_size))
            return evaluate(self.steps, params, batches, self.cfg.eval_batches, self.stop)

    def validate(self, row: dict, step: int) -> None:
        """Val eval at a boundary: fill `row`, offer the params as the best, log the row."""
        val = self.evaluate_split(self.state.params, "val")  # raises Interrupted on a signal
        row.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
        self.record.best.offer(val["accuracy"], step, self.state.params)
        self.record.curve.append(row)
        log.info("step %d/%d val_acc=%s best=%s", step, self.cfg.steps, percent(val["accuracy"]),
                 percent(self.record.best.val))

    def pending_validation(self) -> RunEnded | None:
        """A signal cut the last checkpoint step's val eval: do it now."""
        if self.record.pending is None:
            return None
        try:
            self.validate(self.record.pending, self.start_step)
        except Interrupted as err:
            return err
        self.record.pending = None
        if self.on_log:
            self.on_log(self.record.curve)
        return None

    def save(self) -> None:
        with self.chrono.paused():  # bookkeeping, not training time
            save(self.checkpointer, self.step, self.state, self.record, self.chrono)

    def run(self) -> RunEnded | None:
        """Train to train.steps, to convergence (train.early_stop: also a resumed run that already
        was) or to the RunEnded that stops it; checkpoints on the way."""
        cfg, stop = self.cfg, self.stop
        save_every = self.checkpointer.every if self.checkpointer is not None else 0
        self.deadline = time.perf_counter() + cfg.max_time_s if cfg.max_time_s else None
        self.progress = Progress(cfg, self.start_step)
        settled = cfg.early_stop and convergence(self.record.curve, cfg) in CONVERGED
        ended = None
        while ended is None and self.step < cfg.steps and not settled:
            self.state, self.metrics = self.compiled(self.state, self.batch)
            self.step += 1
            self.batch = next(self.train_batches)  # the host prepares it while the device works
            self.chrono.step(self.step, self.state)
            requested = stop.requested if stop is not None else None
            at_eval = due(self.step, cfg.eval_every, cfg.steps)
            at_log = at_eval or due(self.step, cfg.log_every)
            at_save = due(self.step, save_every)
            if not (at_log or at_save or requested):
                continue
            try:
                settled = self.boundary(requested, at_eval, at_log)
            except RunEnded as err:
                ended = err
            if self.checkpointer is not None and (at_save or ended is not None) \
                    and not isinstance(ended, Diverged):  # resumable from here
                self.save()
            self.chrono.restart()  # eval, logging and saving are not training time
        self.progress.close()
        if ended is None and self.checkpointer is not None:
            save(self.checkpointer, self.step, self.state, self.record, self.chrono)
        return ended

    def boundary(self, requested: type[RunEnded] | None, at_eval: bool, at_log: bool) -> bool:
        """A logging, evaluation or checkpoint step, or one a stop was requested at: the only
        host syncs of the loop. Logs the row, validates; raises Diverged, or the requested end
        once the row is recorded. True when the run has converged (train.early_stop)."""
        cfg, step, record = self.cfg, self.step, self.record
        self.train_metrics = {k: float(v) for k, v in jax.device_get(self.metrics).items()}
        self.chrono.lap(step)
        diverged = not math.isfinite(self.train_metrics["loss"])
        converged = False
        if at_log or diverged:
            row = {"step": step, "train_loss": self.train_metrics["loss"],
                   "train_accuracy": self.train_metrics["accuracy"],
                   "steps_per_s": self.chrono.steps_per_s}
            if "aux_loss" in self.train_metrics:  # what modules added to the loss (AuxLoss)
                row["train_aux_loss"] = self.train_metrics["aux_loss"]
            self.progress.update(step, row)  # before the val evaluation: the bar shows this step
            if at_eval and not diverged:
                try:
                    if requested is Interrupted:
                        raise Interrupted
                    self.validate(row, step)
                except Interrupted:
                    record.pending = row  # the resumed run evaluates it first
                    raise
            else:
                record.curve.append(row)
            if self.on_log:
                self.on_log(record.curve)  # the whole curve (a resumed run's: restored rows too)
            if at_eval and requested is None and cfg.early_stop:
                converged = convergence(record.curve, cfg) in CONVERGED
                if converged:
                    log.info("step %d: %s (train.early_stop)", step, convergence(record.curve, cfg))
        if diverged:
            raise Diverged
        if requested is not None:
            raise requested
        if self.deadline and step < cfg.steps and time.perf_counter() > self.deadline:
            raise TimedOut
        return converged

    def finish(self, ended: RunEnded | None) -> FitResult:
        """Test accuracy of the best-val parameters (none when interrupted), and the result."""
        cfg, record = self.cfg, self.record
        test_accuracy = None
        try:
            if isinstance(ended, TimedOut) and record.best.params is None:
                # No evaluation before the deadline: report the parameters reached so far.
                val = self.evaluate_split(self.state.params, "val")["accuracy"]
                record.best = Best(val, self.step, self.state.params)
            if record.best.params is not None and not isinstance(ended, Interrupted):
                test_accuracy = self.evaluate_split(record.best.params, "test")["accuracy"]
        except Interrupted as err:  # the final checkpoint is saved: a re-run only evaluates
            ended = err
        status = Status.OK if ended is None else ended.status
        found = record.best.params is not None
        steps_to, solved_step = milestones(record.curve, cfg.batch_size, cfg.solve_at)
        return FitResult(
            status=status, steps=self.step,  # how a run that ended stands (not one cut short)
            convergence=(convergence(record.curve, cfg)
                         if status in (Status.OK, Status.TIMEOUT) else None),
            steps_to=steps_to or None, solved_step=solved_step,
            val_accuracy=record.best.val if found else None,
            test_accuracy=test_accuracy, best_step=record.best.step,
            train_loss=self.train_metrics.get("loss"),
            train_accuracy=self.train_metrics.get("accuracy"),
            compile_time_s=self.compile_time, lower_time_s=self.lower_time,
            train_time_s=self.chrono.train_time_s, timed_steps=self.chrono.timed_steps,
            eval_time_s=self.chrono.eval_time_s, num_devices=self.dp.num_devices,
            resumed_from_step=self.start_step or None, curve=record.curve,
            compiled=self.compiled, params=record.best.params)


class Progress:
    """Progress at log steps only (no per-step host work), off with train.progress=false. On a
    terminal a tqdm bar that stays when done, log lines routed above it; otherwise (a SLURM log,
    a pipe) one plain log line per logged step."""

    def __init__(self, cfg: TrainConfig, initial: int = 0):
        self.total, self.bar, self._redirect = cfg.steps, None, contextlib.ExitStack()
        self.enabled = cfg.progress
        if self.enabled and sys.stdout.isatty() and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=cfg.steps, initial=initial, unit="step", dynamic_ncols=True,
                            leave=True)
            self._redirect.enter_context(logging_redirect_tqdm())

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        loss, acc, sps = row["train_loss"], percent(row["train_accuracy"]), row["steps_per_s"]
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=acc, sps=rate(sps), refresh=False)
            self.bar.refresh()
            return
        line = f"step {step}/{self.total} loss={loss:.3f} acc={acc}"
        if math.isfinite(sps):  # nan until the clock has started (after the warm-up steps)
            line += f" steps/s={rate(sps)}"
            if step < self.total:
                line += f" eta={duration((self.total - step) / sps)}"
        log.info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._redirect.close()
