"""What a run records and returns: its clocks (`Chrono`), the best-val parameters (`Best`), the
logged curve (`Record`), its checkpoint (`save` / `restore`), where it stands (`convergence`,
`milestones`) and `FitResult`."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp

from lra.config import TrainConfig
from lra.results import RunResult, Status
from lra.train.steps import TrainState


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
        names = {f.name for f in dataclasses.fields(RunResult)}
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}
        return {**fields, "status": Status(self.status).value, "steps_per_s": self.steps_per_s}


