"""Honest numbers: peak memory (device stats or process RSS), XLA estimates, FLOPs, environment."""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import optax

from lra.results import atomic_write


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of what runs between `start()` and `read()`.

    On an accelerator: the device allocator's peak. On CPU: the process's peak RSS (VmHWM, reset
    at start through /proc/self/clear_refs) minus the RSS at start, i.e. what training added;
    none (source `reused_process`) in a process that measured a point before (a pool worker,
    an in-process sweep): its RSS already holds the earlier point's pages and compiled code, so
    what this point adds reads far too low (592 KiB). fresh_process=true measures every point.
    """

    measured = 0  # CPU measurements started in this process

    def __init__(self) -> None:
        device = jax.devices()[0]
        stats = device.memory_stats() if device.platform != "cpu" else None
        self.source = "device" if stats and "peak_bytes_in_use" in stats else "process_rss"
        self.baseline = 0
        self._hwm_reset = False

    def start(self) -> None:
        if self.source == "device":
            self.baseline = 0
            return
        PeakMemory.measured += 1
        if PeakMemory.measured > 1:
            self.source = "reused_process"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        rss_kb = _proc_status_kb("VmRSS")
        self.baseline = (rss_kb or 0) * 1024

    def read(self) -> int | None:
        if self.source == "device":
            return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
        if self.source == "reused_process":
            return None
        peak_kb = _proc_status_kb("VmHWM") if self._hwm_reset else None
        if peak_kb is None:  # no procfs: ru_maxrss is the lifetime peak (KiB on Linux)
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak_kb * 1024 - self.baseline, 0)


def compiled_stats(compiled) -> dict:
    """FLOPs per call and XLA's memory estimate (on CPU it understates temporaries)."""
    out: dict = {"flops_per_step": None, "xla_estimate_bytes": None}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and cost.get("flops") is not None:
            out["flops_per_step"] = float(cost["flops"])
    except Exception:  # noqa: BLE001 - optional diagnostics, backend-dependent
        pass
    try:
        mem = compiled.memory_analysis()
        if mem is not None:
            out["xla_estimate_bytes"] = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                            + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    except Exception:  # noqa: BLE001
        pass
    return out


def environment() -> dict:
    device = jax.devices()[0]
    return {"jax_version": jax.__version__, "flax_version": flax.__version__,
            "optax_version": optax.__version__, "platform": device.platform,
            "device_kind": device.device_kind, "num_devices": jax.device_count(),
            "host": platform.node(), "python": platform.python_version(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "lra_version": package_version(), "commit": source_commit()}


def package_version() -> str | None:
    try:
        return version("lra-bench")
    except Exception:  # noqa: BLE001 - not installed (PYTHONPATH=.)
        return None


@functools.cache
def source_commit() -> str | None:
    """The git commit of the code that runs (with "+dirty" for uncommitted changes); None
    outside a git checkout. One `git` call per process."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dot_flops(eqn) -> float:
    """2 x (output size) x (contracted size) for a dot_general; 0 for anything else."""
    if eqn.primitive.name != "dot_general":
        return 0.0
    (contract_lhs, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = 1
    for axis in contract_lhs:
        contracted *= lhs_shape[axis]
    out_size = 1
    for dim in eqn.outvars[0].aval.shape:
        out_size *= dim
    return 2.0 * out_size * contracted


def iter_eqns(jaxpr, times: int = 1):
    """Every equation of `jaxpr` and of the jaxprs nested in its equations' parameters (pjit,
    scan and cond bodies, custom derivatives), with how many times it runs per call (scan bodies
    times their length; a cond branch counts once)."""
    for eqn in jaxpr.eqns:
        yield eqn, times
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from iter_eqns(inner, times * repeat)


def matmul_flops(fn, *args) -> float:
    """Matrix-multiply FLOPs of one call of `fn(*args)`, counted on its jaxpr: every dot_general
    (2 x output size x contracted size), scan bodies times their length, custom VJPs' backward
    passes included. XLA's `cost_analysis()` counts a loop body once, so a blocked kernel (flash)
    would look cheaper than it is; this count is the same for every form of the same maths."""
    return sum(times * _dot_flops(eqn)
               for eqn, times in iter_eqns(jax.make_jaxpr(fn)(*args).jaxpr))


def matmul_peak(size: int = 2048, repeats: int = 10) -> dict:
    """This machine's fp32 matmul rate (jitted size^2 x size^2, median of `repeats`): measured in
    every process that asks (about a second on a CPU) and kept as the highest seen per host /
    device kind / JAX version under $LRA_CACHE (or ~/.cache/lra-bench). A value measured once on
    a busy machine and cached for good understated the peak ~4x (utilisations above 100%)."""
    device = jax.devices()[0]
    name = "-".join([platform.node(), device.platform, device.device_kind, jax.__version__,
                     str(size)]).replace("/", "_").replace(" ", "_")
    cache = Path(os.environ.get("LRA_CACHE", "~/.cache/lra-bench")).expanduser()
    path = cache / "matmul_peak" / f"{name}.json"
    try:
        cached = json.loads(path.read_text())
        float(cached["matmul_peak_flops_per_s"])
    except (OSError, ValueError, KeyError, TypeError):
        cached = None
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, a))
    times = []
    for _ in range(repeats):
        clock = time.perf_counter()
        jax.block_until_ready(matmul(a, a))
        times.append(time.perf_counter() - clock)
    peak = {"matmul_peak_flops_per_s": 2.0 * size ** 3 / statistics.median(times),
            "matmul_peak_size": size, "matmul_peak_measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    if cached and float(cached["matmul_peak_flops_per_s"]) >= peak["matmul_peak_flops_per_s"]:
        return cached
    try:
        atomic_write(path, json.dumps(peak))
    except OSError:  # a read-only cache: the fresh measurement still serves
        pass
    return peak
