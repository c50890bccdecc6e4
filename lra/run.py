"""python -m lra.run model=<name> task=<name> [preset=...]: train, evaluate, write result.json."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lra import cli
from lra.config import CONFIG_DIR
from lra.config import from_container
from lra.measure import PeakMemory, compiled_stats, environment
from lra.results import RunDirLock, RunResult, atomic_write, write_result

cli.setup()
logger = logging.getLogger(__name__)


def is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return isinstance(err, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def new_result(cfg: DictConfig, **fields) -> RunResult:
    """An empty RunResult naming this run (task, model, length, seed, preset, config); `fields`
    set or override any field."""
    named = dict(task=cfg.task.name, model=cfg.model.name, seq_len=cfg.task.seq_len,
                 seed=cfg.seed, preset=cfg.preset, batch_size=cfg.train.batch_size,
                 config=OmegaConf.to_container(cfg, resolve=True))
    return RunResult(**{**named, **fields})


def execute(cfg: DictConfig, out_dir: Path, stop=None) -> RunResult:
    """Build task and model, train, and return the filled RunResult (never raises).

    With train.checkpoint_every >= 0 the run checkpoints under out_dir/checkpoints and, when
    train.resume and no finished result is there, continues from the latest checkpoint.
    """
    from lra import models
    from lra import tasks
    from lra import checkpoint
    from lra.train import fit

    started = time.perf_counter()
    result = new_result(cfg, env=environment())

    def log(curve: list[dict]) -> None:
        atomic_write(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in curve))

    try:
        task = tasks.build(OmegaConf.to_object(cfg.task))
        task.prepare()
        for split in ("train", "val", "test"):
            task.split(split)  # load before the memory baseline
        model = models.build(OmegaConf.to_object(cfg.model), task.spec, seed=cfg.seed)
        if cfg.eval.seq_lens:
            from lra.extrapolate import length_problem

            problem = length_problem(cfg.model, cfg.task.seq_len, list(cfg.eval.seq_lens))
            if problem:
                logger.warning(problem)
        result.param_count = models.param_count(model)
        result.param_ratio = models.param_ratio(model, OmegaConf.to_object(cfg.model), task.spec)
        memory = PeakMemory()
        checkpointer = None
        ckpt_dir = out_dir / "checkpoints"
        if not cfg.train.resume or finished_result(out_dir):
            checkpoint.clear(ckpt_dir)  # a rerun of a finished run starts over
        if cfg.train.checkpoint_every >= 0:
            checkpointer = checkpoint.Checkpointer(
                ckpt_dir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints,
                checkpoint.fingerprint(result.config))
        try:
            fitted = fit(model, task, OmegaConf.to_object(cfg.train), cfg.seed, on_log=log,
                         memory=memory, checkpointer=checkpointer, stop=stop)
        finally:
            if checkpointer is not None:
                checkpointer.close()
        result.num_devices, result.resumed_from_step = fitted.num_devices, fitted.resumed_from_step
        result.peak_memory_bytes = memory.read()  # training's peak, before any longer-length eval
        result.memory_source = memory.source
        point_timeout = stop is not None and stop.requested == "timeout"
        if fitted.status == "timeout":
            result.time_limit = "point_timeout_s" if point_timeout else "train.max_time_s"
            if point_timeout:
                result.error = (f"stopped at point_timeout_s={cfg.point_timeout_s:g} (SIGUSR1 from "
                                f"the sweep) with a checkpoint at step {fitted.steps}: a re-run of "
                                f"the sweep resumes it")
        if (cfg.eval.seq_lens and fitted.params is not None and fitted.status in ("ok", "timeout")
                and not point_timeout):
            from lra.extrapolate import evaluate_lengths
            from lra.train import Interrupted

            try:
                result.eval_lengths = evaluate_lengths(
                    OmegaConf.to_object(cfg.task), OmegaConf.to_object(cfg.model),
                    OmegaConf.to_object(cfg.train), fitted.params, cfg.seed,
                    list(cfg.eval.seq_lens), stop)
            except Interrupted:  # an ok run's final checkpoint is saved: a re-run only evaluates
                fitted = fitted._replace(status="interrupted")
        result.__dict__.update(compiled_stats(fitted.compiled))
        result.status = fitted.status
        result.steps = fitted.steps
        result.val_accuracy, result.test_accuracy = fitted.val_accuracy, fitted.test_accuracy
        result.best_step = fitted.best_step
        result.train_loss, result.train_accuracy = fitted.train_loss, fitted.train_accuracy
        result.compile_time_s, result.eval_time_s = fitted.compile_time_s, fitted.eval_time_s
        result.lower_time_s = fitted.lower_time_s
        result.train_time_s = fitted.train_time_s
        if fitted.train_time_s > 0:
            rate = fitted.timed_steps / fitted.train_time_s
            result.steps_per_s = rate
            result.examples_per_s = rate * cfg.train.batch_size
            result.tokens_per_s = rate * cfg.train.batch_size * cfg.task.seq_len
    except Exception as err:  # noqa: BLE001 - failure is data: it becomes the row's status
        result.status = "oom" if is_oom(err) else "error"
        result.error = f"{type(err).__name__}: {' '.join(str(err).split())[:2000]}"
        (out_dir / "traceback.txt").write_text(traceback.format_exc())
    result.wall_time_s = time.perf_counter() - started
    return result


def finished_result(out_dir: Path) -> str | None:
    """Status of a readable result.json in `out_dir` that needs no rerun: ok, diverged, oom, and
    a timeout at the run's own budget (train.max_time_s). `killed`, `interrupted`, `error` and
    a timeout at point_timeout_s (one attempt's cap) are re-run, resuming from the checkpoint."""
    try:
        row = json.loads((out_dir / "result.json").read_text())
        status = row.get("status")
    except (OSError, ValueError, AttributeError):
        return None
    if status in ("ok", "diverged", "oom"):
        return status
    if status == "timeout":
        limit = row.get("time_limit") or ("point_timeout_s" if "point_timeout_s" in str(row.get("error"))
                                          else "train.max_time_s")  # rows written before time_limit
        return status if limit == "train.max_time_s" else None
    return None


def run_here(cfg: DictConfig, out_dir: Path) -> int:
    """Train in this process, write result.json, print the summary; the exit code it calls for:
    128+signal when interrupted, 1 for status error, else 0."""
    from lra.train import Stop

    started = time.perf_counter()
    with Stop() as stop:
        try:
            result = execute(cfg, out_dir, stop)
        except KeyboardInterrupt:  # Ctrl-C twice: stop now, but the run is still a row
            result = new_result(cfg, status="interrupted", wall_time_s=time.perf_counter() - started,
                                error="stopped by a second SIGINT before it could finish; "
                                      "re-run the same command to resume from the last checkpoint")
        path = write_result(result, out_dir)
    summary = (f"{result.model} on {result.task} L={result.seq_len}: status={result.status} "
               f"test_acc={result.test_accuracy} steps/s={result.steps_per_s} "
               f"peak_mem={result.peak_memory_bytes} ({result.memory_source})")
    print(summary, flush=True)
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    print(path.resolve(), flush=True)
    if result.status == "interrupted":
        # A sweep stops here too; re-running the same command resumes from the checkpoint.
        print(f"interrupted by signal {stop.signum}: checkpoint in {out_dir / 'checkpoints'}; "
              f"re-run the same command to resume", file=sys.stderr)
        return 128 + stop.signum
    return 1 if result.status == "error" else 0


def _fresh_process(cfg: DictConfig, hydra_cfg) -> bool:
    """Sweep points run each in a fresh process (`fresh_process`, default true), so a point's
    peak memory is its own (RSS high-water marks and a GPU's peak_bytes_in_use are per process)
    and an OOM kill costs that point only. Submitit jobs are their own processes already."""
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    return (bool(cfg.fresh_process) and hydra_cfg.mode == RunMode.MULTIRUN
            and "submitit" not in launcher and cfg.dist.num_processes <= 1)


def launch_point(cfg: DictConfig, out_dir: Path, lock: RunDirLock | None = None) -> int:
    """Run this sweep point as `python -m lra.run --point <out_dir> <pid>`; whatever happens a
    result.json is there afterwards. SIGINT/SIGTERM are passed on to the point (which then
    checkpoints and records `interrupted`); a point past `point_timeout_s` is told to stop and
    recorded `timeout` (see supervise). A point that dies by a signal the sweep did not send is
    `oom` if the kernel counted an OOM kill meanwhile, else `killed`. The point process shares
    `lock` (the run directory's), so it stays held until the point itself ends. Returns the exit
    code the sweep should stop with (0: go on)."""
    import signal
    import subprocess
    import threading

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "config.json", json.dumps(OmegaConf.to_container(cfg, resolve=True)))
    path = out_dir / "result.json"
    before = path.stat().st_mtime_ns if path.is_file() else None
    oom_before = oom_kill_count()
    started = time.perf_counter()
    # Own session: a terminal's Ctrl-C reaches this process only, which passes it on once.
    shared = () if lock is None or lock.fd is None else (lock.fd,)
    child = subprocess.Popen([sys.executable, "-m", "lra.run", "--point", str(out_dir),
                              str(os.getpid())], start_new_session=True, pass_fds=shared)
    if shared:
        lock.record(f"pid {child.pid} (a point of the sweep with pid {os.getpid()})")
    logger.info("point process %d: %s", child.pid, out_dir)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        child.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code, overran = supervise(child, cfg.point_timeout_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    wrote = path.is_file() and path.stat().st_mtime_ns != before
    recorded = RunResult(**json.loads(path.read_text())) if wrote else None
    result = None  # set when the row must be written here, not by the point
    if overran and (recorded is None or recorded.status == "interrupted"):
        result = recorded or new_result(cfg)  # metrics so far; the row says why it ended
        result.status, result.time_limit = "timeout", "point_timeout_s"
        result.error = (f"the point ran past point_timeout_s={cfg.point_timeout_s:g} and did not "
                        f"stop within {POINT_GRACE_S:g} s of SIGUSR1 (hung outside the step loop, "
                        f"e.g. in XLA), so it was SIGKILLed; a re-run resumes from its checkpoint"
                        if overran == "killed" else
                        f"the point ran past point_timeout_s={cfg.point_timeout_s:g} and ended "
                        f"before it could record its timeout; a re-run resumes from its checkpoint")
    elif recorded is None:
        result = new_result(cfg)
        result.status, result.error = death_row(code, received, oom_before, oom_kill_count())
    if result is not None and result.status != "oom":
        from lra.checkpoint import last_saved_step

        saved = last_saved_step(out_dir / "checkpoints")
        result.steps = max(result.steps, saved or 0)  # the progress that survives
        result.error += (f" (checkpoint: step {saved})" if saved is not None else
                         " (no checkpoint yet: it starts over)")
    if result is not None:
        result.error += f"; log: {out_dir / 'run.log'}"
        result.wall_time_s = time.perf_counter() - started
        write_result(result, out_dir)
        print(f"{result.model} on {result.task} L={result.seq_len}: status={result.status}: "
              f"{result.error}", file=sys.stderr)
    if received:
        return 128 + received[0]
    return code if code >= 128 and not overran else 0


def death_row(code: int, received: list[int], oom_before: tuple[str, int] | None,
              oom_after: tuple[str, int] | None,
              then: str = "a re-run of the sweep resumes it from its last checkpoint",
              ) -> tuple[str, str]:
    """(status, error) for a point process that ended with exit `code` without writing a row.
    `oom` only with evidence: the kernel's OOM-kill counter (oom_kill_count) rose meanwhile."""
    import signal

    if received:
        return "interrupted", (f"the sweep received {signal.Signals(received[0]).name} and the "
                               f"point ended (exit code {code}) before recording it")
    signum = -code if code < 0 else code - 128 if code > 128 else 0
    if not signum:
        return "error", f"the point's process ended with exit code {code} without writing a result"
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
    rose = (oom_before is not None and oom_after is not None and oom_before[0] == oom_after[0]
            and oom_after[1] > oom_before[1])
    if signum == signal.SIGKILL and rose:
        return "oom", (f"SIGKILLed by the kernel's out-of-memory killer ({oom_after[0]}: oom_kill "
                       f"{oom_before[1]} -> {oom_after[1]} while it ran)")
    where = f"{oom_after[0]} counted none" if oom_after else "no OOM counter is readable here"
    return "killed", (f"the point's process was killed by {name}, not by this sweep, and the "
                      f"kernel recorded no OOM kill ({where}): preemption, a job limit or a manual "
                      f"kill; {then}")


def oom_kill_count() -> tuple[str, int] | None:
    """(file, count) of the kernel's OOM kills where this process's memory is accounted: its
    cgroup's memory.events (v2) or memory.oom_control (v1), else the host's /proc/vmstat. A
    point inherits the sweep's cgroup, and the kernel counts a kill there whether the cgroup's
    limit or the whole host ran out."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            rel = rel.lstrip("/")
            if controllers == "":
                candidates += [Path("/sys/fs/cgroup") / rel / "memory.events",
                               Path("/sys/fs/cgroup/memory.events")]
            elif "memory" in controllers.split(","):
                candidates += [Path("/sys/fs/cgroup/memory") / rel / "memory.oom_control",
                               Path("/sys/fs/cgroup/memory/memory.oom_control")]
    except (OSError, ValueError):
        pass
    for path in [*candidates, Path("/proc/vmstat")]:
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return str(path), int(value)
        except (OSError, ValueError):
            continue
    return None


POINT_GRACE_S = 60.0  # after SIGUSR1, time for a point to checkpoint, test and write its row


def supervise(child, timeout_s: float, grace_s: float = POINT_GRACE_S) -> tuple[int, str | None]:
    """Wait for `child`; past `timeout_s` (0: never) send it SIGUSR1 (lra.train.Stop: stop as a
    timeout, checkpoint, evaluate test, record), and SIGKILL it if it has not ended `grace_s`
    later. Returns (exit code, None | "stopped" | "killed")."""
    import signal
    import subprocess

    try:
        return child.wait(timeout=timeout_s or None), None
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGUSR1)
    try:
        return child.wait(timeout=grace_s), "stopped"
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait(), "killed"


def _point(out_dir: str, parent_pid: str) -> None:
    """The process of one sweep point (see launch_point): ends when its parent ends."""
    import signal

    cli.die_with_parent(signal.SIGTERM)  # checkpoint + `interrupted` when the sweep dies
    if os.getppid() != int(parent_pid):
        raise SystemExit(128 + signal.SIGTERM)  # the sweep ended before we got here
    out = Path(out_dir)
    cfg = from_container(json.loads((out / "config.json").read_text()))
    # What Hydra's job logging gives an in-process run: the console and <run dir>/run.log.
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(), logging.FileHandler(out / "run.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    cli.job_setup(cfg)
    raise SystemExit(run_here(cfg, out))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    lock = RunDirLock(out_dir)
    holder = lock.acquire()
    if holder is not None:  # nothing written: the row is the other process's to write
        if sweep:  # overlapping sweeps: each point runs once, in whichever got there first
            print(f"skipped: {out_dir} is being run by another process ({holder})")
            return
        cli.fail(f"{out_dir} is being run by another process ({holder}); wait for it or stop it, "
                 f"or give this run another directory (hydra.run.dir=DIR)", code=1)
    try:
        done = finished_result(out_dir)
        if cfg.skip_done and done:
            print(f"skipped: {out_dir} already has a result with status {done!r} "
                  f"(skip_done=false reruns it)")
            print((out_dir / "result.json").resolve())
            return
        if _fresh_process(cfg, hydra_cfg):
            code = launch_point(cfg, out_dir, lock)
        else:
            cli.job_setup(cfg)
            code = run_here(cfg, out_dir)
            if code == 1 and sweep:
                code = 0  # in a sweep an error is a row; the sweep goes on
    finally:
        lock.release()
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--point":
        _point(sys.argv[2], sys.argv[3])
    else:
        cli.check_overrides(sys.argv[1:])
        main()
