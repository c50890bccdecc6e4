"""python -m lra.bench model=<m> [task=<t>] bench.seq_lens=[...]: speed/memory per sequence length.

Times the full train step (forward + backward + AdamW update) of the task's model on fixed-shape
synthetic batches. Each length runs in a fresh process, so a point's peak memory is its own and
an OOM or a hang costs only that point, which still becomes a result row with its status.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lra import cli
from lra.config import CONFIG_DIR
from lra.config import from_container
from lra.results import RunResult, atomic_write, write_result

cli.setup()


def synthetic_batch(spec, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length random tokens (no padding) in the shape the task kind takes."""
    rng = np.random.default_rng(seed)

    def tokens():
        return rng.integers(2, spec.vocab_size, (batch_size, spec.seq_len), dtype=np.int32)

    if spec.kind == "match":
        return {"inputs1": tokens(), "inputs2": tokens(),
                "targets": rng.integers(0, spec.num_classes, batch_size, dtype=np.int32)}
    if spec.kind == "tokens":
        return {"inputs": tokens(), "weights": np.ones((batch_size, spec.seq_len), np.float32),
                "targets": rng.integers(0, spec.num_classes, (batch_size, spec.seq_len), dtype=np.int32)}
    return {"inputs": tokens(), "targets": rng.integers(0, spec.num_classes, batch_size, dtype=np.int32)}


def point_dir(base: Path, seq_len: int, batch_size: int) -> Path:
    return base / f"L{seq_len}-b{batch_size}"


def base_result(cfg: DictConfig, seq_len: int) -> RunResult:
    from lra.measure import environment
    from lra.run import new_result

    return new_result(cfg, seq_len=seq_len, kind="bench", batch_size=cfg.bench.batch_size,
                      env=environment())


def run_point(cfg: DictConfig, seq_len: int) -> RunResult:
    """In the worker process: compile, warm up, time `bench.steps` steps one by one."""
    import dataclasses

    import jax

    from lra import models
    from lra import tasks
    from lra.measure import PeakMemory, compiled_stats, matmul_flops, matmul_peak
    from lra.train import make_steps

    result = base_result(cfg, seq_len)
    spec = dataclasses.replace(tasks.build(OmegaConf.to_object(cfg.task)).spec, seq_len=seq_len)
    model = models.build(OmegaConf.to_object(cfg.model), spec, seed=cfg.seed)
    result.param_count = models.param_count(model)
    result.param_ratio = models.param_ratio(model, OmegaConf.to_object(cfg.model), spec)
    steps, _ = make_steps(model, OmegaConf.to_object(cfg.train))
    state = steps.init(jax.random.key(cfg.seed))
    batch = jax.device_put(synthetic_batch(spec, cfg.bench.batch_size, cfg.seed))
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
    result.status = "ok" if np.isfinite(loss) else "diverged"
    result.train_loss = loss
    result.steps = cfg.bench.warmup_steps + cfg.bench.steps
    median = statistics.median(times)
    result.steps_per_s = 1.0 / median
    result.examples_per_s = cfg.bench.batch_size / median
    result.tokens_per_s = cfg.bench.batch_size * seq_len / median
    result.train_time_s = sum(times)
    # After the timed steps, so neither the jaxpr walk nor the peak matmul touch the memory peak.
    result.matmul_flops_per_step = matmul_flops(steps.train, state, batch)
    result.env.update(matmul_peak())
    result.achieved_flops_per_s = result.matmul_flops_per_step * result.steps_per_s
    result.matmul_utilisation = (result.achieved_flops_per_s
                                 / result.env["matmul_peak_flops_per_s"])
    return result


def launch_point(cfg: DictConfig, seq_len: int, out_dir: Path) -> RunResult:
    """Run one length in a fresh process; whatever happens, a result.json is written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(OmegaConf.to_container(cfg, resolve=True)))
    (out_dir / "result.json").unlink(missing_ok=True)
    command = [sys.executable, "-m", "lra.bench", "--point", str(out_dir), str(seq_len),
               str(os.getpid())]
    from lra.run import death_row, oom_kill_count

    started = time.perf_counter()
    status, error = None, None
    oom_before = oom_kill_count()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    print(f"bench worker {child.pid}: L={seq_len} -> {out_dir}", flush=True)
    try:
        stdout, stderr = child.communicate(timeout=cfg.bench.point_timeout_s or None)
        proc = subprocess.CompletedProcess(command, child.returncode, stdout, stderr)
        (out_dir / "log.txt").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.strip().splitlines()[-3:])[-1000:]
            if "RESOURCE_EXHAUSTED" in proc.stderr or "MemoryError" in proc.stderr:
                status, error = "oom", f"exit {proc.returncode}: {tail}"
            elif proc.returncode < 0 or proc.returncode > 128:  # a signal: oom only with evidence
                status, error = death_row(proc.returncode, [], oom_before, oom_kill_count(),
                                          then="re-run the bench for this length")
            else:
                status, error = "error", f"exit {proc.returncode}: {tail}"
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        status, error = "timeout", f"point exceeded bench.point_timeout_s={cfg.bench.point_timeout_s}"
    path = out_dir / "result.json"
    if path.is_file():
        written = RunResult(**json.loads(path.read_text()))
        if status is None or written.status == "interrupted":  # the worker's own account
            return written
    result = base_result(cfg, seq_len)
    result.status, result.error = status or "error", error or "worker wrote no result"
    result.wall_time_s = time.perf_counter() - started
    write_result(result, out_dir)
    return result


class _BenchGone(BaseException):  # not an Exception: no `except Exception` may swallow it
    """SIGTERM in a worker: its bench ended (PR_SET_PDEATHSIG) or someone stopped it."""


def _on_sigterm(signum, frame):
    raise _BenchGone


def _worker(out_dir: str, seq_len: str, parent_pid: str | None = None) -> None:
    """One bench point in its own process. It ends with its bench: PR_SET_PDEATHSIG delivers
    SIGTERM when the bench process dies (kill -9 included), and the point is recorded
    `interrupted` instead of running on and skewing the next bench's timings."""
    import signal

    from lra.run import is_oom

    signal.signal(signal.SIGTERM, _on_sigterm)
    cli.die_with_parent(signal.SIGTERM)
    out = Path(out_dir)
    cfg = from_container(json.loads((out / "config.json").read_text()))
    started = time.perf_counter()
    try:
        if parent_pid is not None and os.getppid() != int(parent_pid):
            raise _BenchGone  # the bench ended before the death signal was armed
        cli.job_setup(cfg)  # the worker runs outside Hydra; same logging + compile cache
        result = run_point(cfg, int(seq_len))
    except _BenchGone:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the row below must get written
        result = base_result(cfg, int(seq_len))
        result.status = "interrupted"
        result.error = ("SIGTERM: the bench process ended (or the worker was stopped) before "
                        "this point finished; re-run the bench")
        result.wall_time_s = time.perf_counter() - started
        write_result(result, out)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as err:  # noqa: BLE001 - failure is data
        result = base_result(cfg, int(seq_len))
        result.status = "oom" if is_oom(err) else "error"
        result.error = f"{type(err).__name__}: {' '.join(str(err).split())[:2000]}"
    result.wall_time_s = time.perf_counter() - started
    write_result(result, out)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="bench")
def main(cfg: DictConfig) -> None:
    base = Path(cfg.bench.out_dir or HydraConfig.get().runtime.output_dir)
    cli.job_setup(cfg)
    print(f"{'model':<12} {'L':>6} {'status':<8} {'steps/s':>9} {'peak MB':>9} {'compile s':>9} "
          f"{'GFLOP/s':>8} {'of peak':>7}")

    def point(seq_len: int) -> RunResult:
        r = launch_point(cfg, seq_len, point_dir(base, seq_len, cfg.bench.batch_size))
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
            if r.status != "ok":
                failed = {"seq_len": seq_len, "status": r.status, "error": r.error}
                break
            best, seq_len = seq_len, seq_len * 2
        summary = {"task": cfg.task.name, "model": cfg.model.name, "batch_size": cfg.bench.batch_size,
                   "max_feasible_seq_len": best, "first_failure": failed}
        atomic_write(base / "max_len.json", json.dumps(summary, indent=2))
        print(f"{cfg.model.name}: largest feasible L = {best}; first failure: {failed and failed['status']}")
    else:
        for seq_len in cfg.bench.seq_lens:
            point(int(seq_len))
    print(base.resolve())


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--point":
        _worker(*sys.argv[2:])
    else:
        cli.check_overrides(sys.argv[1:], config_name="bench")
        main()
