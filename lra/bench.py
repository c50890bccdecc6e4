"""python -m lra.bench model=<m> [task=<t>] bench.seq_lens=[...]: speed/memory per sequence length.

Times the full train step (forward + backward + AdamW update) of the task's model on fixed-shape
synthetic batches. Each length runs alone in a fresh worker of lra.sweep.executor, so a point's peak
memory is its own and an OOM or a hang costs only that point, which still becomes a result row
with its status.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import signal
import statistics
import sys
import time
from pathlib import Path

import hydra
import jax
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lra import cli
from lra.sweep import launch
from lra.train.checkpoint import fingerprint
from lra.config import CONFIG_DIR
from lra.sweep.executor import Executor, Job, Sweep, redeliver
from lra.train.experiment import build, counts, new_result, throughput, typed
from lra.train.measure import PeakMemory, compiled_stats, environment, matmul_flops, matmul_peak
from lra.models.config import display_name
from lra.results import RunDirLock, RunResult, Status, atomic_write, write_result
from lra.run import finished_result
from lra.tasks.base import synthetic_batch
from lra.train.steps import make_steps

log = logging.getLogger(__name__)

cli.setup()


def point_dir(base: Path, seq_len: int, batch_size: int) -> Path:
    return base / f"L{seq_len}-b{batch_size}"


def base_result(cfg: DictConfig, seq_len: int) -> RunResult:
    return new_result(cfg, seq_len=seq_len, kind="bench", batch_size=cfg.bench.batch_size,
                      env=environment())


def run_point(cfg: DictConfig, seq_len: int) -> RunResult:
    """In the worker process: compile, warm up, time `bench.steps` steps one by one."""
    result = base_result(cfg, seq_len)
    task_cfg, model_cfg, train_cfg = typed(cfg, "task", "model", "train")
    task, model = build(task_cfg, model_cfg, cfg.seed, seq_len=seq_len, load=None)
    counts(result, model, model_cfg, task.spec)
    steps = make_steps(model, train_cfg)
    state = steps.init(jax.random.key(cfg.seed))
    batch = jax.device_put(synthetic_batch(task.spec, cfg.bench.batch_size, cfg.seed))
    clock = time.perf_counter()
    compiled = steps.train.lower(state, batch).compile()
    result.compile_time_s = time.perf_counter() - clock
    result.__dict__.update(compiled_stats(compiled))
    memory = PeakMemory()
    memory.start()
    for _ in range(cfg.bench.warmup_steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(cfg.bench.steps):
        clock = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(state)  # a benchmark syncs per step to time each one
        times.append(time.perf_counter() - clock)
    result.peak_memory_bytes, result.memory_source = memory.read(), memory.source
    loss = float(metrics["loss"])
    result.status = Status.OK.value if np.isfinite(loss) else Status.DIVERGED.value
    result.train_loss = loss
    result.steps = cfg.bench.warmup_steps + cfg.bench.steps
    result.__dict__.update(throughput(1.0 / statistics.median(times), cfg.bench.batch_size, seq_len))
    result.train_time_s = sum(times)
    # After the timed steps, so neither the jaxpr walk nor the peak matmul touch the memory peak.
    result.matmul_flops_per_step = matmul_flops(steps.train, state, batch)
    record_utilisation(result, matmul_peak)
    return result


def record_utilisation(result: RunResult, measure_peak) -> None:
    """achieved_flops_per_s and its fraction of the machine's matmul peak (`measure_peak()`:
    lra.train.measure.matmul_peak), measured again when the first reads below the step's own;
    a fraction above 1 is a peak measured low, recorded as none with a warning."""
    result.env.update(measure_peak())
    result.achieved_flops_per_s = result.matmul_flops_per_step * result.steps_per_s
    if result.achieved_flops_per_s > result.env["matmul_peak_flops_per_s"]:
        result.env.update(measure_peak())  # once more: a peak measured under load reads low
    utilisation = result.achieved_flops_per_s / result.env["matmul_peak_flops_per_s"]
    result.matmul_utilisation = utilisation if utilisation <= 1.0 else None
    if result.matmul_utilisation is None:
        log.warning("matmul utilisation not recorded: %.1f GFLOP/s achieved is above the measured "
                    "peak %.1f GFLOP/s (a peak measured under load reads low); rerun the bench "
                    "on idle cores", result.achieved_flops_per_s / 1e9,
                    result.env["matmul_peak_flops_per_s"] / 1e9)


def finished_point(out_dir: Path, cfg: DictConfig) -> RunResult | None:
    """The point's stored row when it needs no re-run (as lra.run's skip_done: ok, diverged or
    oom) and was measured with this config (same fingerprint and bench settings), else None."""
    if finished_result(out_dir) is None:
        return None
    try:
        row = json.loads((out_dir / "result.json").read_text())
        stored = row["config"]
    except (OSError, ValueError, KeyError):
        return None
    current = OmegaConf.to_container(cfg, resolve=True)
    if fingerprint(stored) != fingerprint(current) or stored.get("bench") != current["bench"]:
        return None
    fields = {f.name for f in dataclasses.fields(RunResult)}
    return RunResult(**{k: v for k, v in row.items() if k in fields})


def launch_point(cfg: DictConfig, seq_len: int, out_dir: Path) -> RunResult:
    """Run one length in a fresh worker of lra.sweep.executor (the timeout, signal, dead-point rules
    of lra.run's sweep points), alone, holding the point directory's lock; whatever happens, a
    result.json is written. Returns the row; a stop (Ctrl-C, SIGTERM) raises SystemExit once the
    point has recorded `interrupted`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(out_dir)
    holder = lock.acquire()
    if holder is not None:
        cli.fail(f"{out_dir} is being benchmarked by another process ({holder}); wait for it or "
                 f"stop it, or give this bench another directory (bench.out_dir=DIR)", code=1)
    timeout = float(cfg.bench.point_timeout_s or 0)

    def lost(config, ended, before) -> str:
        row = launch.settle(out_dir, ended, before, lambda: base_result(cfg, seq_len),
                            "bench.point_timeout_s", timeout, "re-run the bench for this length",
                            launcher="this bench")
        return f"{row.status}: {row.error}"

    try:
        for name in ("result.json", "log.txt"):  # this measurement's own, nothing older
            (out_dir / name).unlink(missing_ok=True)
        print(f"bench point: L={seq_len} -> {out_dir}", flush=True)
        # by reference (lra.bench, not this __main__), so the worker imports it
        point_fn = importlib.import_module("lra.bench").length_point
        sweep = Sweep(point_fn, None, None, fresh=True, alone=True, on_lost=lost)
        Executor(1).run([Job(0, [], sweep, config=(cfg, seq_len, str(out_dir)), out_dir=out_dir,
                             timeout_s=timeout, log=out_dir / "log.txt")])
        row = json.loads((out_dir / "result.json").read_text())
    finally:
        lock.release()
    fields = {f.name for f in dataclasses.fields(RunResult)}
    return RunResult(**{k: v for k, v in row.items() if k in fields})


class _Stopped(BaseException):  # not an Exception: no `except Exception` may swallow it
    """A signal in a worker: SIGUSR1 (bench.point_timeout_s) -> timeout; SIGINT/SIGTERM (the
    bench passed on Ctrl-C, or it died: PR_SET_PDEATHSIG) -> interrupted."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise _Stopped(signum)


def length_point(job: tuple[DictConfig, int, str]) -> None:
    """One bench length, in its executor worker (a fresh process). A signal stops it with a row
    that says why, instead of it running on and skewing the next point's timings."""
    cfg, seq_len, out_dir = job
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _on_signal)
    out = Path(out_dir)
    started = time.perf_counter()
    try:
        redeliver()  # a stop that came while the worker started
        cli.job_setup(cfg)  # the worker runs outside Hydra; same logging + compile cache
        result = run_point(cfg, seq_len)
    except _Stopped as stopped:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)  # the row below must get written
        result = base_result(cfg, seq_len)
        if stopped.signum == signal.SIGUSR1:
            result.status, result.time_limit = Status.TIMEOUT.value, "bench.point_timeout_s"
            result.error = (f"stopped at bench.point_timeout_s={cfg.bench.point_timeout_s:g} "
                            f"before the timed steps ended; re-run the bench for this length")
        else:
            result.status = Status.INTERRUPTED.value
            result.error = (f"{signal.Signals(stopped.signum).name}: the bench ended or stopped "
                            f"this point before it finished; re-run the bench")
        result.wall_time_s = time.perf_counter() - started
        write_result(result, out)
        if stopped.signum != signal.SIGUSR1:
            raise SystemExit(128 + stopped.signum) from None
        return
    except Exception as err:  # noqa: BLE001 - failure is data
        result = base_result(cfg, seq_len)
        result.status, result.error = launch.exception_status(err).value, launch.one_line(err)
    result.wall_time_s = time.perf_counter() - started
    write_result(result, out)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="bench")
def main(cfg: DictConfig) -> None:
    base = Path(cfg.bench.out_dir or HydraConfig.get().runtime.output_dir)
    cli.job_setup(cfg)
    print(f"{'model':<12} {'L':>6} {'status':<8} {'steps/s':>9} {'peak MB':>9} {'compile s':>9} "
          f"{'GFLOP/s':>8} {'of peak':>7}")

    def point(seq_len: int) -> RunResult:
        out = point_dir(base, seq_len, cfg.bench.batch_size)
        r = finished_point(out, cfg) if cfg.skip_done else None
        if r is not None:
            print(f"skipped: {out} already has this bench's result (status {r.status}); "
                  f"skip_done=false re-measures it", flush=True)
            return r
        r = launch_point(cfg, seq_len, out)  # a stop raises SystemExit (the row: interrupted)
        mb = r.peak_memory_bytes / 2**20 if r.peak_memory_bytes else float("nan")
        sps = r.steps_per_s or float("nan")
        gflops = (r.achieved_flops_per_s or float("nan")) / 1e9
        print(f"{r.model:<12} {r.seq_len:>6} {r.status:<8} {sps:>9.3f} {mb:>9.0f} "
              f"{(r.compile_time_s or float('nan')):>9.1f} {gflops:>8.1f} "
              f"{(r.matmul_utilisation or float('nan')):>7.1%}", flush=True)
        return r

    if cfg.bench.find_max_len:
        seq_len, best, failed = int(cfg.bench.seq_lens[0]), None, None
        while seq_len <= cfg.bench.max_len_cap:
            r = point(seq_len)
            if r.status != Status.OK:
                failed = {"seq_len": seq_len, "status": r.status, "error": r.error}
                break
            best, seq_len = seq_len, seq_len * 2
        summary = {"task": cfg.task.name, "model": display_name(cfg.model), "batch_size": cfg.bench.batch_size,
                   "max_feasible_seq_len": best, "first_failure": failed}
        atomic_write(base / "max_len.json", json.dumps(summary, indent=2))
        print(f"{cfg.model.name}: largest feasible L = {best}; first failure: {failed and failed['status']}")
    else:
        for seq_len in cfg.bench.seq_lens:
            point(int(seq_len))
    print(base.resolve())


if __name__ == "__main__":
    cli.restore_sigint()
    cli.check_overrides(sys.argv[1:], config_name="bench")
    cli.check_bench_out_dir(sys.argv[1:])
    main()
