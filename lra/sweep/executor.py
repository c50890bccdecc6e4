"""The one executor of sweep points: `lra.run -m hydra/launcher=pool` and `lra.suite` hand it
their points; it runs them `size` at a time in worker processes it owns.

A point is a Hydra job: (its sweep, its overrides), composed here into its config and run
directory just before it starts, then run in a worker by Hydra's `run_job` (the job's logging,
run.log and callbacks, as Hydra's own launchers run it); or a plain job (lra.bench's lengths:
its config, run directory and timeout given, the task function called with the config). A
`Sweep` is what its points share: the task function, the Hydra context (config loader,
callbacks: the sweep's record) and master config, and how its workers start (extra environment,
fresh per point or reused, alone or beside others, where their output goes).

What it guarantees, whatever a point does:
- **Workers.** Reused from point to point (one import of JAX per worker), or fresh per point
  (`Sweep.fresh`: a point's peak memory is then its own); spawned, never forked (JAX's threads).
  A point with `Sweep.alone` runs with no other point beside it (timings).
- **One timeout rule.** A point past its timeout (`point_timeout_s`; `bench.point_timeout_s`)
  gets SIGUSR1 (lra.train.ends.Stop:
  stop as a timeout, checkpoint, record) and SIGKILL `lra.sweep.launch.POINT_GRACE_S` later.
- **One signal rule.** SIGINT reaches the workers with the executor (a terminal's Ctrl-C signals
  the process group); SIGTERM to the executor alone is passed on to the busy workers once. Either
  way no new point starts, the running ones checkpoint and record `interrupted`, and `run` raises
  SystemExit(128 + the signal) once they have. Workers get SIGTERM when the executor dies
  (PR_SET_PDEATHSIG), kill -9 included.
- **A dead point's row.** A worker that dies under its point (the OOM killer, a crash in XLA, a
  kill -9) costs that point only: the `on_lost` hook (lra.run.record_lost_point) writes its row
  (`killed`, or `oom` with the kernel's OOM-kill counter as evidence: lra.sweep.launch.settle), the
  sweep's record gets its entry (the callbacks' on_job_end, here), a fresh worker takes its
  place, and the other points go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lra.sweep import launch

log = logging.getLogger(__name__)

# Writes the row of a point whose worker died, from (the point's composed config, how it ended,
# its result.json's mtime_ns before it started or None); returns the row's one-line note.
LostHandler = Callable[[DictConfig, launch.Ended, "int | None"], str]
_on_lost: LostHandler | None = None
TICK_S = 60.0  # the longest wait between two looks at the workers (timeouts, `tick`)
STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # Ctrl-C, the end, the timeout


def on_lost(handler: LostHandler) -> None:
    """Who writes a dead point's row (lra.run sets lra.run.record_lost_point)."""
    global _on_lost
    _on_lost = handler


@dataclasses.dataclass(eq=False)
class Sweep:
    """What the points of one Hydra multirun share (see the module doc)."""

    task_function: TaskFunction
    hydra_context: HydraContext | None  # None: plain jobs
    config: DictConfig | None           # the master config (hydra.mode MULTIRUN)
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # added to a worker's environ
    fresh: bool = False             # a worker of its own per point
    alone: bool = False             # no other point runs beside one of these
    log: Path | None = None         # the workers' stdout and stderr while they run its points
    on_lost: LostHandler | None = None  # this sweep's dead-point row (else the registered one)
    payload: bytes = b""

    def __post_init__(self) -> None:
        # cloudpickle: lra.run's task function may live in __main__, so it goes by value. Hydra's
        # singletons (its ConfigStore, with every registered plugin's config class) go to Hydra
        # jobs only: a plain job's function imports what it needs itself.
        hydra = self.hydra_context is not None
        self.payload = cloudpickle.dumps((self.task_function, self.hydra_context,
                                          Singleton.get_state() if hydra else None))

    def prepare(self, job: Job) -> None:
        """A Hydra job's composed config, output dir included, and its timeout: the executor
        reads its timeout and run dir, the worker runs it. A plain job's are given."""
        if self.hydra_context is None:
            return
        job.config = self.job_config(job)
        job.out_dir = Path(job.config.hydra.runtime.output_dir)
        job.timeout_s = float(OmegaConf.select(job.config, "point_timeout_s", default=0) or 0)

    def job_config(self, job: Job) -> DictConfig:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, job.overrides)
        with open_dict(config):
            config.hydra.job.id = f"{config.hydra.job.name}_{job.idx}"
            config.hydra.job.num = job.idx
        HydraConfig.instance().set_config(config)  # sweep.subdir's ${hydra:...} resolves by it
        out = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        with read_write(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(out.resolve())
        return config


@dataclasses.dataclass(eq=False)
class Job:
    idx: int
    overrides: list[str]
    sweep: Sweep
    config: Any = None              # composed at dispatch (Hydra jobs), or given (plain jobs)
    out_dir: Path | None = None     # its run directory: result.json, and run.log unless `log`
    timeout_s: float = 0.0          # 0: none
    log: Path | None = None         # this point's output (else the sweep's), read if it dies
    ret: Any = None                 # a Hydra job's JobReturn, or a plain job's return value


@dataclasses.dataclass(eq=False)
class Worker:
    process: Any
    conn: Any
    sweep: Sweep | None             # whose environment it started with
    seen: set = dataclasses.field(default_factory=set)  # ids of the sweeps whose payload it has
    job: Job | None = None
    started: float = 0.0
    deadline: float = 0.0           # point_timeout_s past the start (inf: none)
    stopped_at: float = 0.0         # when SIGUSR1 was sent
    overran: str | None = None
    oom_before: tuple[str, int] | None = None
    result_mtime: int | None = None
    log_size: int = 0
    used: bool = False              # it has run a point (a fresh sweep's worker retires after)


class Executor:
    """Runs jobs `size` at a time (see the module doc); `tick()` is called at least every
    `tick_s` while points run (lra.suite's progress line)."""

    def __init__(self, size: int, tick: Callable[[], None] | None = None,
                 tick_s: float = TICK_S) -> None:
        if size < 1:
            raise ValueError(f"{size} workers; use 1 or more")
        self.size, self.tick, self.tick_s = size, tick, tick_s
        self.context = multiprocessing.get_context("spawn")  # no fork of a process with JAX threads
        self.signum = 0       # a stop signal the executor received
        self.exit_code = 0    # a point's own SystemExit (e.g. 130: it was interrupted)
        self.workers: list[Worker] = []

    def run(self, jobs: list[Job]) -> list[JobReturn]:
        """Run every job (in order, as workers free up); their JobReturns. Raises SystemExit once
        the running points have ended when a stop came (see the module doc)."""
        pending = list(jobs)
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                self.dispatch_ready(pending)
                busy = [w for w in self.workers if w.job is not None]
                if not busy:
                    break
                self.wait(busy)
                if self.tick is not None:
                    self.tick()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for worker in list(self.workers):
                self.retire(worker)
        if self.stopping:
            raise SystemExit(128 + self.signum if self.signum else self.exit_code)
        return [job.ret for job in jobs if job.ret is not None]

    @property
    def stopping(self) -> bool:
        return bool(self.signum or self.exit_code)

    def dispatch_ready(self, pending: list[Job]) -> None:
        """Start what may start now: `size` points at a time; a `Sweep.alone` point only on its
        own, and nothing beside it."""
        while pending and not self.stopping:
            busy = [w for w in self.workers if w.job is not None]
            job = pending[0]
            if len(busy) >= self.size or (busy and (job.sweep.alone or busy[0].job.sweep.alone)):
                return
            pending.pop(0)
            self.dispatch(self.worker_for(job.sweep), job)

    def worker_for(self, sweep: Sweep) -> Worker:
        """An idle live worker started with `sweep`'s environment (and unused, for a fresh
        sweep); otherwise idle ones are retired until a new one fits under `size`."""
        idle = [w for w in self.workers if w.job is None]
        for worker in idle:
            if (worker.process.is_alive() and worker.sweep is not None
                    and worker.sweep.env == sweep.env and not (sweep.fresh and worker.used)):
                return worker
        for worker in idle:
            if len(self.workers) < self.size:
                break
            self.retire(worker)
        worker = self.start_worker(sweep)
        self.workers.append(worker)
        return worker

    def start_worker(self, sweep: Sweep) -> Worker:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(target=_worker_main, args=(theirs, os.getpid()), daemon=True)
        saved = {k: os.environ.get(k) for k in sweep.env}
        os.environ.update(sweep.env)  # a spawned process takes the environment at its start
        # ...and the signal mask: it starts with the stops blocked, until it holds them back
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        theirs.close()
        return Worker(process, ours, sweep)

    def retire(self, worker: Worker) -> None:
        with _quiet():
            worker.conn.send(None)
        worker.process.join(timeout=10)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        if worker in self.workers:
            self.workers.remove(worker)

    def _stop(self, signum, frame) -> None:
        first = not self.signum
        self.signum = self.signum or signum
        if first:
            log.warning("pool: got %s; no new point starts, the running ones record and stop",
                        signal.Signals(signum).name)
        if signum == signal.SIGTERM:  # SIGINT reached the process group (workers) already
            for worker in (w for w in self.workers if w.job is not None):
                with _quiet():
                    os.kill(worker.process.pid, signum)

    def dispatch(self, worker: Worker, job: Job) -> None:
        job.sweep.prepare(job)
        result, run_log = job.out_dir / "result.json", job.log or job.out_dir / "run.log"
        worker.job, worker.started = job, time.monotonic()
        worker.deadline = worker.started + job.timeout_s if job.timeout_s > 0 else float("inf")
        worker.stopped_at, worker.overran, worker.used = 0.0, None, True
        worker.oom_before = launch.oom_kill_count()
        worker.result_mtime = result.stat().st_mtime_ns if result.is_file() else None
        worker.log_size = run_log.stat().st_size if run_log.is_file() else 0
        first = id(job.sweep) not in worker.seen
        worker.seen.add(id(job.sweep))
        output = job.log or job.sweep.log
        with _quiet():  # a worker that died already is found by wait(), its point recorded
            worker.conn.send((id(job.sweep), job.sweep.payload if first else None, job.config,
                              str(output) if output else None))
        # Said once the job is in the worker's pipe: from here on, its row is written even if
        # this process dies (the worker reads the job, then its held-back SIGTERM).
        log.info("pool: job #%d -> worker pid %d", job.idx, worker.process.pid)

    def wait(self, busy: list[Worker]) -> None:
        now = time.monotonic()
        next_deadline = min(w.stopped_at + launch.POINT_GRACE_S if w.overran else w.deadline
                            for w in busy)
        timeout = max(0.0, min(next_deadline - now, self.tick_s))
        ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout)
        for worker in busy:
            if worker.conn in ready:
                try:
                    kind, value = worker.conn.recv()
                except (EOFError, OSError):  # died mid-message: treated as a death below
                    kind, value = None, None
                if kind == "return":
                    worker.job.ret = cloudpickle.loads(value)
                    self.done(worker)
                    continue
                if kind == "exit":  # the point raised SystemExit (interrupted: 128 + signal)
                    if not worker.overran:  # past its timeout it was told to stop: no stop here
                        self.exit_code = self.exit_code or int(value or 0)
                    # Hydra's run_job ended without its on_job_end: the record gets the point here.
                    self.end_job(worker, f"its process exited ({value})")
                    continue
            if worker.job is not None and (worker.process.sentinel in ready
                                           or not worker.process.is_alive()):
                worker.process.join()
                self.lost(worker)
                if worker in self.workers:  # the next point gets a fresh one
                    self.workers.remove(worker)
        now = time.monotonic()
        for worker in busy:
            if worker.job is None or not worker.process.is_alive():
                continue
            if not worker.overran and now >= worker.deadline:
                log.warning("pool: job #%d ran past point_timeout_s: SIGUSR1", worker.job.idx)
                worker.overran, worker.stopped_at = "stopped", now
                with _quiet():
                    os.kill(worker.process.pid, signal.SIGUSR1)
            elif worker.overran == "stopped" and now >= worker.stopped_at + launch.POINT_GRACE_S:
                worker.overran = "killed"
                worker.process.kill()

    def done(self, worker: Worker) -> None:
        sweep = worker.job.sweep
        worker.job = None
        if sweep.fresh:
            self.retire(worker)

    def lost(self, worker: Worker) -> None:
        """The worker died with its point: the point's row, its record entry, its JobReturn."""
        job = worker.job
        assert job is not None
        code = worker.process.exitcode if worker.process.exitcode is not None else -signal.SIGKILL
        ended = launch.Ended(code, worker.overran, [self.signum] if self.signum else [],
                             worker.oom_before, launch.oom_kill_count(),
                             time.monotonic() - worker.started, job.log or job.out_dir / "run.log",
                             worker.log_size)
        note = f"its worker process (pid {worker.process.pid}) died (exit {code})"
        handler = job.sweep.on_lost or _on_lost
        if handler is not None:
            note = handler(job.config, ended, worker.result_mtime)
        log.warning("pool: job #%d: %s", job.idx, note)
        self.end_job(worker, note)

    def end_job(self, worker: Worker, note: str) -> None:
        """The JobReturn of a point that ended without one, and the callbacks' on_job_end (the
        sweep record's entry, read from its row)."""
        job, config = worker.job, worker.job.config
        if job.sweep.hydra_context is not None:  # Hydra's record of it (plain jobs have none)
            task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
            job.ret = JobReturn(overrides=job.overrides, cfg=task_cfg, hydra_cfg=config,
                                working_dir=str(job.out_dir), task_name=str(config.hydra.job.name),
                                status=JobStatus.COMPLETED, _return_value=note)
            job.sweep.hydra_context.callbacks.on_job_end(config=config, job_return=job.ret)
        self.done(worker)


def _quiet():
    """For sends and signals to a worker that may have died meanwhile."""
    return contextlib.suppress(OSError, ValueError)


def _redirect(path: str | None, current: list) -> None:
    """Point this worker's stdout and stderr (fds 1 and 2) at `path` (appending), or back at
    what they were when it started; `current` holds (path, saved fds)."""
    if current[0] == path:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if current[1] is None:
        current[1] = (os.dup(1), os.dup(2))
    if path is None:
        os.dup2(current[1][0], 1)
        os.dup2(current[1][1], 2)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    current[0] = path


_deferred: list[int] = []  # stop signals a worker got before a point's own handlers took over


def _defer(signum, frame) -> None:
    _deferred.append(signum)


def redeliver() -> None:
    """For a plain job's function, once its own signal handlers are in place: the stop signals
    that came before (the executor's death: PR_SET_PDEATHSIG's SIGTERM; a Ctrl-C; the timeout's
    SIGUSR1), delivered again, so a stop that came early still ends in the point's own row."""
    while _deferred:
        signal.raise_signal(_deferred.pop(0))


def _worker_main(conn, parent_pid: int) -> None:
    """A worker: per point, (its sweep's key, the sweep's state the first time, the composed
    config, where output goes); until None (or EOF). Stop signals are held back (`_deferred`)
    until a point runs: a plain job's function takes them with `redeliver`; before a Hydra job
    they are raised as they would have been (Ctrl-C: KeyboardInterrupt, SIGTERM: the end)."""
    for sig in STOPS:
        signal.signal(sig, _defer)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # blocked from its start (start_worker)
    try:
        launch.enter_point(str(parent_pid))  # SIGTERM when the executor dies
    except launch.Orphaned:  # it died already: its death's SIGTERM, for the point sent (if any)
        _deferred.append(signal.SIGTERM)
    sweeps: dict[int, tuple] = {}
    output: list = [None, None]
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        key, payload, sweep_config, log_path = message
        if payload is not None:
            sweeps[key] = cloudpickle.loads(payload)
        task_function, hydra_context, singleton_state = sweeps[key]
        try:
            _redirect(log_path, output)
            if hydra_context is None:  # a plain job
                ret = task_function(sweep_config)
            else:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # lra.train.ends.Stop takes it over
                redeliver()
                setup_globals()
                Singleton.set_state(singleton_state)
                HydraConfig.instance().set_config(sweep_config)
                ret = run_job(hydra_context=hydra_context, config=sweep_config,
                              task_function=task_function, job_dir_key="hydra.sweep.dir",
                              job_subdir_key="hydra.sweep.subdir")
        except SystemExit as stop:
            reply = ("exit", stop.code if isinstance(stop.code, int) else 1)
        except KeyboardInterrupt:
            reply = ("exit", 128 + signal.SIGINT)
        else:
            reply = ("return", cloudpickle.dumps(ret))
        for sig in STOPS:  # held back again until the next point
            signal.signal(sig, _defer)
        try:
            conn.send(reply)
        except OSError:  # the executor died meanwhile (its point has recorded itself): end quietly
            return
