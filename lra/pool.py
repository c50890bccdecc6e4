"""`hydra/launcher=pool`: sweep points `n_jobs` at a time in worker processes that are reused from
point to point (one import of JAX per worker, not per point), where a worker's death costs its
own point only.

Hydra's joblib launcher reuses workers too, but when one dies (the kernel's OOM killer, a crash
in XLA, a kill -9) loky ends the whole multirun: the points that were running beside it and every
point not yet started are lost, and nobody writes the dead point's row. Here the pool knows which
point each worker runs: the dead one gets its row (`killed`, or `oom` with the kernel's OOM-kill
counter as evidence: lra.launch.settle) and its sweep-record entry, a fresh worker takes its
place, and the sweep goes on. A point past its `point_timeout_s` gets SIGUSR1 (stop as a timeout
and record) and SIGKILL `lra.launch.POINT_GRACE_S` later, as a fresh-process point does.

Stops: SIGINT reaches the workers with the pool (a terminal's Ctrl-C and lra.suite's stop signal
the whole process group); SIGTERM to the pool alone is passed on to the busy workers. Either way
no new point starts, the running ones checkpoint and record `interrupted`, and the pool exits
128 + the signal once they have. Workers get SIGTERM when the pool dies (PR_SET_PDEATHSIG).

Hydra takes launchers from the `hydra_plugins` package only, so `register()` (lra.cli.setup)
lists this class there under that name; the launcher's config is stored as hydra/launcher=pool.
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
import types
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Sequence

import cloudpickle
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import (JobReturn, JobStatus, configure_log, filter_overrides, run_job,
                              setup_globals)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lra import launch

log = logging.getLogger(__name__)

PLUGIN_MODULE = "hydra_plugins.lra_pool"
# Writes the row of a point whose worker died, from (the point's composed config, how it ended,
# its result.json's mtime_ns before it started or None); returns the row's one-line note.
LostHandler = Callable[[DictConfig, launch.Ended, "int | None"], str]
_on_lost: LostHandler | None = None


@dataclasses.dataclass
class PoolConf:
    _target_: str = f"{PLUGIN_MODULE}.PoolLauncher"
    n_jobs: int = 2  # points at a time (one worker process each)


def register(on_lost: LostHandler | None = None) -> None:
    """Make `hydra/launcher=pool` known to Hydra (idempotent); `on_lost` writes a dead point's
    row (lra.run sets it: lra.run.record_lost_point)."""
    global _on_lost
    if on_lost is not None:
        _on_lost = on_lost
    if PLUGIN_MODULE not in sys.modules:
        module = types.ModuleType(PLUGIN_MODULE, "lra.pool's launcher, as Hydra wants it named")
        module.PoolLauncher = PoolLauncher
        sys.modules[PLUGIN_MODULE] = module
        PoolLauncher.__module__ = PLUGIN_MODULE
        ConfigStore.instance().store(group="hydra/launcher", name="pool", node=PoolConf,
                                     provider="lra")
    Plugins.instance().register(PoolLauncher)


class PoolLauncher(Launcher):
    def __init__(self, n_jobs: int = 2, **_: Any) -> None:
        if int(n_jobs) < 1:
            raise ValueError(f"hydra.launcher.n_jobs={n_jobs}; use 1 or more")
        self.n_jobs = int(n_jobs)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("pool of %d worker(s) launching %d jobs, sweep output dir: %s",
                 self.n_jobs, len(job_overrides), sweep_dir)
        for idx, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
        # cloudpickle: lra.run's task function lives in __main__, so it goes by value.
        payload = cloudpickle.dumps((self.task_function, self.hydra_context, Singleton.get_state()))
        jobs = [Job(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        return Pool(self, payload, min(self.n_jobs, len(jobs))).run(jobs)

    def job_config(self, job: Job) -> DictConfig:
        """The job's composed config, output dir included: the pool reads its timeout and run dir,
        the worker runs it."""
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, job.overrides)
        with open_dict(config):
            config.hydra.job.id = f"{config.hydra.job.name}_{job.idx}"
            config.hydra.job.num = job.idx
        HydraConfig.instance().set_config(config)  # sweep.subdir's ${hydra:...} resolves by it
        out = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        with read_write(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(out.resolve())
        return config


@dataclasses.dataclass
class Job:
    idx: int
    overrides: list[str]
    ret: JobReturn | None = None


@dataclasses.dataclass
class Worker:
    process: Any
    conn: Any
    job: Job | None = None
    started: float = 0.0
    deadline: float = 0.0         # point_timeout_s past the start (inf: none)
    stopped_at: float = 0.0       # when SIGUSR1 was sent
    overran: str | None = None
    oom_before: tuple[str, int] | None = None
    result_mtime: int | None = None
    log_size: int = 0
    config: DictConfig | None = None


class Pool:
    def __init__(self, launcher: PoolLauncher, payload: bytes, size: int) -> None:
        self.launcher, self.payload, self.size = launcher, payload, size
        self.context = multiprocessing.get_context("spawn")  # no fork of a process with JAX threads
        self.signum = 0       # a stop signal the pool received
        self.exit_code = 0    # a point's own SystemExit (e.g. 130: it was interrupted)
        self.workers: list[Worker] = []

    def start_worker(self) -> Worker:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(target=_worker_main, args=(theirs, os.getpid()), daemon=True)
        process.start()
        theirs.close()
        ours.send_bytes(self.payload)
        return Worker(process, ours)

    def run(self, jobs: list[Job]) -> list[JobReturn]:
        pending = list(jobs)
        self.workers = [self.start_worker() for _ in range(self.size)]
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                for i, worker in enumerate(self.workers):
                    if worker.job is None and pending and not self.stopping:
                        if not worker.process.is_alive():  # died between points: replace it
                            self.workers[i] = worker = self.start_worker()
                        self.dispatch(worker, pending.pop(0))
                busy = [w for w in self.workers if w.job is not None]
                if not busy:
                    break
                self.wait(busy)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for worker in self.workers:
                with _quiet():
                    worker.conn.send(None)
            for worker in self.workers:
                worker.process.join(timeout=10)
                if worker.process.is_alive():
                    worker.process.kill()
        if self.stopping:
            raise SystemExit(128 + self.signum if self.signum else self.exit_code)
        return [job.ret for job in jobs if job.ret is not None]

    @property
    def stopping(self) -> bool:
        return bool(self.signum or self.exit_code)

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
        config = self.launcher.job_config(job)
        out = Path(config.hydra.runtime.output_dir)
        result, run_log = out / "result.json", out / "run.log"
        timeout = float(OmegaConf.select(config, "point_timeout_s", default=0) or 0)
        worker.job, worker.config, worker.started = job, config, time.monotonic()
        worker.deadline = worker.started + timeout if timeout > 0 else float("inf")
        worker.stopped_at, worker.overran = 0.0, None
        worker.oom_before = launch.oom_kill_count()
        worker.result_mtime = result.stat().st_mtime_ns if result.is_file() else None
        worker.log_size = run_log.stat().st_size if run_log.is_file() else 0
        log.info("pool: job #%d -> worker pid %d", job.idx, worker.process.pid)
        with _quiet():  # a worker that died already is found by wait(), its point recorded
            worker.conn.send(config)

    def wait(self, busy: list[Worker]) -> None:
        now = time.monotonic()
        next_deadline = min(w.stopped_at + launch.POINT_GRACE_S if w.overran else w.deadline
                            for w in busy)
        timeout = max(0.0, min(next_deadline - now, 60.0))
        ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout)
        for worker in busy:
            if worker.conn in ready:
                try:
                    kind, value = worker.conn.recv()
                except (EOFError, OSError):  # died mid-message: treated as a death below
                    kind, value = None, None
                if kind == "return":
                    worker.job.ret = cloudpickle.loads(value)
                    worker.job = None
                    continue
                if kind == "exit":  # the point raised SystemExit (interrupted: 128 + signal)
                    self.exit_code = self.exit_code or int(value or 0)
                    # Hydra's run_job ended without its on_job_end: the record gets the point here.
                    self.end_job(worker, f"its process exited ({value})")
                    continue
                    continue
            if worker.job is not None and (worker.process.sentinel in ready
                                           or not worker.process.is_alive()):
                worker.process.join()
                self.lost(worker)
                if not self.stopping:  # a fresh worker for the points still to run
                    self.workers[self.workers.index(worker)] = self.start_worker()
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

    def lost(self, worker: Worker) -> None:
        """The worker died with its point: the point's row, its record entry, its JobReturn."""
        job, config = worker.job, worker.config
        assert job is not None and config is not None
        code = worker.process.exitcode if worker.process.exitcode is not None else -signal.SIGKILL
        out = Path(config.hydra.runtime.output_dir)
        ended = launch.Ended(code, worker.overran, [self.signum] if self.signum else [],
                             worker.oom_before, launch.oom_kill_count(),
                             time.monotonic() - worker.started, out / "run.log", worker.log_size)
        note = f"its worker process (pid {worker.process.pid}) died (exit {code})"
        if _on_lost is not None:
            note = _on_lost(config, ended, worker.result_mtime)
        log.warning("pool: job #%d: %s", job.idx, note)
        self.end_job(worker, note)

    def end_job(self, worker: Worker, note: str) -> None:
        """The JobReturn of a point that ended without one, and the callbacks' on_job_end (the
        sweep record's entry, read from its row)."""
        job, config = worker.job, worker.config
        assert job is not None and config is not None
        out = Path(config.hydra.runtime.output_dir)
        task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        job.ret = JobReturn(overrides=job.overrides, cfg=task_cfg, hydra_cfg=config,
                            working_dir=str(out), task_name=str(config.hydra.job.name),
                            status=JobStatus.COMPLETED, _return_value=note)
        assert self.launcher.hydra_context is not None
        self.launcher.hydra_context.callbacks.on_job_end(config=config, job_return=job.ret)
        worker.job = None


def _quiet():
    """For sends and signals to a worker that may have died meanwhile."""
    return contextlib.suppress(OSError, ValueError)


def _worker_main(conn, parent_pid: int) -> None:
    """A worker: the sweep's state once, then one job's composed config per message until None
    (or EOF)."""
    try:
        launch.enter_point(str(parent_pid))  # SIGTERM when the pool dies
    except launch.Orphaned:
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    task_function, hydra_context, singleton_state = cloudpickle.loads(conn.recv_bytes())
    setup_globals()
    Singleton.set_state(singleton_state)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if message is None:
            return
        sweep_config = message
        try:
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
        try:
            conn.send(reply)
        except OSError:  # the pool died meanwhile (its point has recorded itself): end quietly
            return
