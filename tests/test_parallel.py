"""Data parallelism on 4 CPU devices: same loss curve as one device with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

ARGS = ("model=transformer", "task=listops", "preset=tiny", "train.progress=false",
        "train.steps=20", "train.log_every=5", "train.eval_every=10", "train.batch_size=8",
        "train.checkpoint_every=-1", "compile_cache_dir=off")


def run4(*args):
    """lra.run in a fresh process that sees 4 CPU devices."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    return subprocess.run([sys.executable, "-m", "lra.run", *ARGS, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def read(directory):
    result = json.loads((directory / "result.json").read_text())
    curve = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return result, curve


def test_four_devices_match_one_device(tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    p1 = run4("train.data_parallel=false", f"hydra.run.dir={one}")
    assert p1.returncode == 0, p1.stderr[-3000:]
    p4 = run4(f"hydra.run.dir={four}")  # default: on, since 4 devices are visible
    assert p4.returncode == 0, p4.stderr[-3000:]
    (r1, c1), (r4, c4) = read(one), read(four)
    assert r1["num_devices"] == 1 and r4["num_devices"] == 4
    assert r4["config"]["train"]["data_parallel"] is None
    assert [r["step"] for r in c1] == [r["step"] for r in c4] == [5, 10, 15, 20]
    np.testing.assert_allclose([r["train_loss"] for r in c4], [r["train_loss"] for r in c1],
                               rtol=1e-4)
    np.testing.assert_allclose([r["val_loss"] for r in c4 if "val_loss" in r],
                               [r["val_loss"] for r in c1 if "val_loss" in r], rtol=1e-4)
    assert r4["test_accuracy"] == pytest.approx(r1["test_accuracy"], abs=1e-6)


def test_batch_not_divisible_by_devices_is_one_line_error():
    code = ("from lra.train.parallel import DataParallel\n"
            "try:\n    DataParallel(6)\nexcept ValueError as e:\n    print(e)\n"
            "print(DataParallel(8).num_devices, DataParallel(6, enabled=False).num_devices)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == ("train.batch_size=6 does not divide over 4 devices; use a multiple of 4 "
                        "or train.data_parallel=false"), out.stderr[-2000:]
    assert lines[1] == "4 1"


def test_each_process_feeds_its_own_rows():
    from lra.train.parallel import DataParallel

    dp = DataParallel(batch_size=8, enabled=False)
    dp.process_count, dp.process_index = 4, 2
    assert dp.local_rows(8) == slice(4, 6)
