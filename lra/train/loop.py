"""The loop: `fit` strings the steps, the record and the stops together (`Loop`), and shows
its progress at log steps (`Progress`)."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Callable

import jax
from flax import nnx
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lra.config import TrainConfig
from lra.results import Status
from lra.train.ends import Diverged, Interrupted, RunEnded, Stop, TimedOut
from lra.train.parallel import DataParallel
from lra.train.record import (CONVERGED, Best, Chrono, FitResult, convergence, milestones,
                              restore, save)
from lra.train.steps import evaluate, make_steps
from lra.train.tracking import duration, percent, rate

log = logging.getLogger(__name__)


def due(step: int, every: int, last: int | None = None) -> bool:
    """Whether `step` ends a period of `every` steps (every <= 0: never) or is the `last` one."""
    return (every > 0 and step % every == 0) or step == last



def fit(model: nnx.Module, task, cfg: TrainConfig, seed: int,
        on_log: Callable[[list[dict]], None] | None = None, memory=None, checkpointer=None,
        stop: Stop | None = None) -> FitResult:
    """Train `model` on `task`; evaluate val every `eval_every` steps; test at the best val.

    `memory.start()` (a measure.PeakMemory) is called after compilation, so the peak it reads
    is what the training steps add on top of the initialised state, not the compiler's.
    `checkpointer` (lra.train.checkpoint.Checkpointer): resume from its last checkpoint, save every
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
