"""Honest numbers: peak memory (device stats or process RSS), XLA estimates, FLOPs, environment."""

from __future__ import annotations

import platform
import resource

import jax


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
    at start through /proc/self/clear_refs) minus the RSS at start, i.e. what training added.
    """

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
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        rss_kb = _proc_status_kb("VmRSS")
        self.baseline = (rss_kb or 0) * 1024

    def read(self) -> int:
        if self.source == "device":
            return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
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
    import flax
    import optax

    device = jax.devices()[0]
    return {"jax_version": jax.__version__, "flax_version": flax.__version__,
            "optax_version": optax.__version__, "platform": device.platform,
            "device_kind": device.device_kind, "num_devices": jax.device_count(),
            "host": platform.node(), "python": platform.python_version()}
