"""python -m lra.run model=<name> task=<name> [preset=...]: train, evaluate, write result.json."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import shutil
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from flax import nnx
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lra import cli, models
from lra.train import checkpoint, extrapolate, pretrain, tracking
from lra.sweep import launch, pool
from lra.train.checkpoint import last_saved_step
from lra.config import CONFIG_DIR, config_changes, row_fingerprint
from lra.train.experiment import build, counts, new_result, throughput, typed
from lra.sweep.launch import exception_status, one_line
from lra.train.measure import PeakMemory, compiled_stats, environment
from lra.results import RunDirLock, RunResult, Status, atomic_write, row_finished, write_result
from lra.train.ends import Interrupted, Stop, TimedOut
from lra.train.loop import fit
from lra.train.record import FitResult

cli.setup()
logger = logging.getLogger(__name__)


def execute(cfg: DictConfig, out_dir: Path, stop=None,
            tracker: tracking.Tracker | None = None) -> RunResult:
    """Build task and model, train, and return the filled RunResult (never raises).

    With train.checkpoint_every >= 0 the run checkpoints under out_dir/checkpoints and, when
    train.resume and no finished result is there, continues from the latest checkpoint.
    `tracker` (started here, finished by the caller) gets each logged row.
    """
    started = time.perf_counter()
    result = new_result(cfg, env=environment())
    task_cfg, model_cfg, train_cfg = typed(cfg, "task", "model", "train")

    def log(curve: list[dict]) -> None:
        atomic_write(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in curve))
        if tracker is not None:
            tracker.log(curve)

    try:
        with contextlib.suppress(OSError):  # an earlier attempt's, which this one replaces
            (out_dir / "traceback.txt").unlink(missing_ok=True)
        clock = time.perf_counter()
        task, model = build(task_cfg, model_cfg, cfg.seed,
                            extra_tokens=pretrain.extra_tokens(train_cfg.pretrain.objective))
        problem = extrapolate.length_problem(model_cfg, task.spec, list(cfg.eval.seq_lens))
        if problem:
            logger.warning(problem)
        counts(result, model, model_cfg, task.spec)
        fresh = getattr(task_cfg, "fresh_train", False)  # a stream: no train split to count
        sizes = "/".join("a fresh stream" if fresh and s == "train" else f"{task.num_examples(s):,}"
                         for s in ("train", "val", "test"))
        logger.info(f"{task_cfg.name} L={task_cfg.seq_len}: {sizes} train/val/test examples, "
                    f"{result.param_count / 1e6:.2f}M parameters; data and model ready in "
                    f"{tracking.duration(time.perf_counter() - clock)}")
        memory = PeakMemory()
        ckpt_dir = out_dir / "checkpoints"
        if not cfg.train.resume or finished_result(out_dir):
            checkpoint.clear(ckpt_dir)  # a rerun of a finished run starts over
            shutil.rmtree(out_dir / "pretrain", ignore_errors=True)
        if tracker is not None:
            tracker.start(result.config)
        fitted = None
        if pretrain.enabled(train_cfg):
            fitted = pretrain_phase(cfg, train_cfg, model, task, out_dir, stop, result)
        if fitted is None:
            checkpointer = checkpointer_at(ckpt_dir, cfg, result.config)
            try:
                fitted = fit(model, task, pretrain.fine_tune_config(train_cfg), cfg.seed,
                             on_log=log, memory=memory,
                             checkpointer=checkpointer, stop=stop)
            finally:
                if checkpointer is not None:
                    checkpointer.close()
        # Training's peak, before any longer-length evaluation.
        result.peak_memory_bytes, result.memory_source = memory.read(), memory.source
        point_timeout = stop is not None and stop.requested is TimedOut
        if fitted.status == Status.TIMEOUT:
            result.time_limit = "point_timeout_s" if point_timeout else "train.max_time_s"
            if point_timeout:
                result.error = (f"stopped at point_timeout_s={cfg.point_timeout_s:g} (SIGUSR1 from "
                                f"the sweep) with a checkpoint at step {fitted.steps}: a re-run of "
                                f"the sweep resumes it")
        if result.pretrain and result.pretrain["status"] != Status.OK:
            phase = result.pretrain
            resumable = phase["status"] == Status.INTERRUPTED or point_timeout
            result.error = (f"{phase['status']} during self-pretraining at step "
                            f"{phase['steps_done']} of {phase['steps']}"
                            + (f" ({result.error})" if result.error else "")
                            + ("; re-run the same command to resume it" if resumable else ""))
        if (cfg.eval.seq_lens and fitted.params is not None and not point_timeout
                and fitted.status in (Status.OK, Status.TIMEOUT)):
            try:
                result.eval_lengths = extrapolate.evaluate_lengths(
                    task_cfg, model_cfg, train_cfg, fitted.params, cfg.seed,
                    list(cfg.eval.seq_lens), stop)
            except Interrupted:  # an ok run's final checkpoint is saved: a re-run only evaluates
                fitted.status = Status.INTERRUPTED
        if fitted.params is not None:
            result.model_summary = model_summary(model, fitted.params)
        result = dataclasses.replace(result, **{
            **fitted.row(), **compiled_stats(fitted.compiled),
            **throughput(fitted.steps_per_s, cfg.train.batch_size, cfg.task.seq_len)})
    except Exception as err:  # noqa: BLE001 - failure is data: it becomes the row's status
        result.status, result.error = exception_status(err).value, one_line(err)
        with contextlib.suppress(OSError):  # the disk may be what failed: the row says so
            (out_dir / "traceback.txt").write_text(traceback.format_exc())
    result.wall_time_s = time.perf_counter() - started
    return result


def checkpointer_at(directory: Path, cfg: DictConfig, config: dict):
    """The run's checkpointer for `directory` (None: train.checkpoint_every=-1)."""
    if cfg.train.checkpoint_every < 0:
        return None
    return checkpoint.Checkpointer(directory, cfg.train.checkpoint_every,
                                   cfg.train.keep_checkpoints, checkpoint.fingerprint(config))


def pretrain_phase(cfg: DictConfig, train_cfg, model, task, out_dir: Path, stop,
                   result: RunResult) -> FitResult | None:
    """Self-pretraining (lra.train.pretrain), run or resumed in <out_dir>/pretrain/, its record
    in `result.pretrain`: None when fine-tuning may start (the encoder pretrained in place), else
    the run's FitResult (the phase's status, nothing fine-tuned). Done already when fine-tuning
    has a checkpoint: its weights come from there."""
    home = out_dir / "pretrain"
    done = home / "phase.json"
    if done.is_file() and last_saved_step(out_dir / "checkpoints") is not None:
        result.pretrain = json.loads(done.read_text())
        return None
    home.mkdir(exist_ok=True)

    def log(curve: list[dict]) -> None:
        atomic_write(home / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in curve))

    checkpointer = checkpointer_at(home / "checkpoints", cfg, result.config)
    try:
        phase, wall_time_s = pretrain.run(model, task, train_cfg, cfg.seed, checkpointer, stop, log)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    result.pretrain = pretrain.record(phase, train_cfg, wall_time_s)
    if phase.status != Status.OK:
        return FitResult(status=phase.status, steps=0)
    atomic_write(done, json.dumps(result.pretrain))
    return None


def model_summary(model, params) -> dict | None:
    """models.summary of `model` with `params` (the best-val ones) in place."""
    nnx.update(model, params)
    return models.summary(model) or None


def finished_result(out_dir: Path) -> str | None:
    """Status of a readable result.json in `out_dir` that needs no rerun: ok, diverged, oom, and
    a timeout at the run's own budget (train.max_time_s). `killed`, `interrupted`, `error` and
    a timeout at point_timeout_s (one attempt's cap) are re-run, resuming from the checkpoint."""
    try:
        row = json.loads((out_dir / "result.json").read_text())
        return row["status"] if row_finished(row) else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def stale_row(out_dir: Path, cfg: DictConfig) -> str | None:
    """What changed, when <out_dir>/result.json was made under another config than `cfg`
    (lra.config.row_fingerprint differs: an edited YAML or code default, a hand-chosen
    hydra.run.dir holding another run); None when it matches or there is no readable row."""
    try:
        stored = json.loads((out_dir / "result.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(stored, dict):
        return None
    current = OmegaConf.to_container(cfg, resolve=True)
    if row_fingerprint(stored) == row_fingerprint(current):
        return None
    return config_changes(stored, current) or "the same keys, other values"


def set_aside(out_dir: Path) -> Path:
    """Move a stale row (result.json, metrics, checkpoints) to <out_dir>/stale/<time>/, where no
    report or resume reads it; returns that folder."""
    kept = out_dir / "stale" / f"{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
    kept.mkdir(parents=True)
    for name, to in (("result.json", "row.json"), ("metrics.jsonl", "metrics.jsonl"),
                     ("checkpoints", "checkpoints"), ("traceback.txt", "traceback.txt"),
                     ("pretrain", "pretrain")):
        if (out_dir / name).exists():
            (out_dir / name).rename(kept / to)
    return kept


def run_here(cfg: DictConfig, out_dir: Path) -> int:
    """Train in this process, write result.json, print the summary; the exit code it calls for:
    128+signal when interrupted, 1 for status error, else 0."""
    started = time.perf_counter()
    names = tracking.backends(cfg.logger) if cfg.dist.process_id == 0 else []
    with Stop() as stop, tracking.Tracker(names, out_dir) as tracker:
        try:
            result = execute(cfg, out_dir, stop, tracker)
        except KeyboardInterrupt:  # Ctrl-C twice: stop now, but the run is still a row
            result = new_result(cfg, status=Status.INTERRUPTED.value, wall_time_s=time.perf_counter() - started,
                                error="stopped by a second SIGINT before it could finish; "
                                      "re-run the same command to resume from the last checkpoint")
        try:
            path = write_result(result, out_dir)
        except OSError as err:  # a full or read-only disk: the numbers are printed, not recorded
            path, unrecorded = None, launch.unwritable(out_dir / "result.json", err,
                                                       "then re-run the same command")
        with contextlib.suppress(OSError):
            tracker.finish(result)
    print(tracking.summary(result), flush=True)
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    if path is None:
        print(unrecorded, file=sys.stderr)
        return 1
    print(path.resolve(), flush=True)
    if result.status == Status.INTERRUPTED:
        # A sweep stops here too; re-running the same command resumes from the checkpoint.
        print(f"interrupted by signal {stop.signum}: checkpoint in {out_dir / 'checkpoints'}; "
              f"re-run the same command to resume", file=sys.stderr)
        return 128 + stop.signum
    return 1 if result.status == Status.ERROR else 0


RESUME = "a re-run of the sweep resumes it from its last checkpoint"


def resume_note(out_dir: Path):
    """lra.sweep.launch.settle's `annotate` for a point that died: the step a rerun resumes at."""
    def annotate(result: RunResult) -> None:
        if result.status == Status.OOM:
            return
        saved = last_saved_step(out_dir / "checkpoints")
        result.steps = max(result.steps, saved or 0)  # the progress that survives
        pretrained = None if saved is not None else \
            last_saved_step(out_dir / "pretrain" / "checkpoints")
        result.error += (f" (checkpoint: step {saved})" if saved is not None else
                         f" (self-pretraining checkpoint: step {pretrained})"
                         if pretrained is not None else " (no checkpoint yet: it starts over)")
    return annotate


def record_lost_point(config: DictConfig, ended: launch.Ended, before: int | None) -> str:
    """lra.sweep.pool's hook: the row of a point whose worker process died under it (`config`: the
    point's composed config, hydra node included); returns the row's status and reason."""
    out_dir = Path(config.hydra.runtime.output_dir)
    cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    result = launch.settle(out_dir, ended, before, lambda: new_result(cfg), "point_timeout_s",
                           cfg.point_timeout_s, RESUME, resume_note(out_dir))
    return f"{result.status}: {result.error}"


pool.register(on_lost=record_lost_point)


def task(cfg: DictConfig) -> str | None:
    """One run or a sweep point, as Hydra's job (lra.sweep.executor's workers run it for lra.suite):
    the run directory's lock, a stale row set aside, a finished row skipped, then training."""
    problem = tracking.problem(cfg.logger)
    if problem:
        cli.fail(problem)
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    lock = RunDirLock(out_dir)
    try:
        holder = lock.acquire()
    except OSError as err:  # a read-only or full tree: a finished run is kept, others refused
        done = finished_result(out_dir)
        changed = stale_row(out_dir, cfg)
        if changed:  # its row is another config's, and it cannot be set aside here
            return _unwritable(out_dir, err, sweep, f"its result.json was made with another "
                                                    f"configuration ({changed})")
        if cfg.skip_done and done:
            print(f"skipped: {out_dir} already has a result with status {done!r} "
                  f"(it is not writable here: {launch.disk_fault(err) or err.strerror})")
            return None
        return _unwritable(out_dir, err, sweep)
    if holder is not None:  # nothing written: the row is the other process's to write
        if sweep:  # overlapping sweeps: each point runs once, in whichever got there first
            print(f"skipped: {out_dir} is being run by another process ({holder})")
            return f"held by another process ({holder})"  # the sweep record's note for it
        cli.fail(f"{out_dir} is being run by another process ({holder}); wait for it or stop it, "
                 f"or give this run another directory (hydra.run.dir=DIR)", code=1)
    try:
        changed = stale_row(out_dir, cfg)
        if changed:
            kept = set_aside(out_dir)
            print(f"re-running {out_dir}: its result.json was made with another configuration "
                  f"({changed}); the old row and checkpoints are kept in {kept}")
        done = finished_result(out_dir)
        if cfg.skip_done and done:
            print(f"skipped: {out_dir} already has a result with status {done!r} "
                  f"(skip_done=false reruns it)")
            print((out_dir / "result.json").resolve())
            return
        cli.save_job_config(cfg, hydra_cfg, out_dir)  # Hydra's .hydra/, written once the lock is ours
        cli.job_setup(cfg)
        code = run_here(cfg, out_dir)
        if code == 1 and sweep:
            code = 0  # in a sweep an error is a row; the sweep goes on
    except OSError as err:
        if not launch.disk_fault(err):
            raise
        return _unwritable(out_dir, err, sweep)
    finally:
        lock.release()
    if code:
        raise SystemExit(code)


def _unwritable(out_dir: Path, err: OSError, sweep: bool, why: str = "") -> str:
    """A run directory that cannot be written: one line; a sweep goes on with its other points
    (the sweep record notes it), a single run stops with exit 1."""
    line = launch.unwritable(out_dir, err, "or write elsewhere (hydra.run.dir= / hydra.sweep.dir=)")
    if why:
        line = f"{line} ({why})"
    if not sweep:
        cli.fail(line, code=1)
    print(line, file=sys.stderr)
    return line


main = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")(task)


if __name__ == "__main__":
    cli.restore_sigint()
    cli.check_overrides(sys.argv[1:])
    main()
