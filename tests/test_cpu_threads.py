"""$LRA_CPU_THREADS sizes XLA's CPU compute pool (lra.cli.size_cpu_pool), which the suite sets so
that points run side by side do not each start a thread per core."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

PROBE = """
import collections, json, os
from lra import cli
cpus = sorted(os.sched_getaffinity(0))
asked = cli.size_cpu_pool()
import jax
float(jax.numpy.ones(3).sum())  # the backend is in use
tasks = os.listdir("/proc/self/task")
names = collections.Counter(open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks)
wide = all(sorted(os.sched_getaffinity(int(t))) == cpus for t in tasks)
print(json.dumps({"asked": asked, "pool": names.get("tf_XLAEigen", 0), "cpus": len(cpus),
                  "wide": wide}))
"""


def probe(value: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("LRA_CPU_THREADS", None)
    if value is not None:
        env["LRA_CPU_THREADS"] = value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
                    or not os.path.isdir("/proc/self/task"), reason="needs Linux and >= 2 cores")
def test_one_thread_pool_and_every_thread_keeps_all_cores():
    default = probe(None)
    assert default.returncode == 0, default.stderr[-2000:]
    base = json.loads(default.stdout.strip().splitlines()[-1])
    one = probe("1")
    assert one.returncode == 0, one.stderr[-2000:]
    got = json.loads(one.stdout.strip().splitlines()[-1])
    assert base["asked"] == 0 and base["pool"] > 1  # JAX's default: a thread per core
    assert got["asked"] == 1 and got["pool"] == 1
    assert got["wide"]  # the narrowed affinity was given back to every thread, pool included


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_value_fails_in_one_line(value):
    proc = probe(value)
    assert proc.returncode == 2
    assert "error: LRA_CPU_THREADS=" in proc.stderr and "positive number" in proc.stderr
