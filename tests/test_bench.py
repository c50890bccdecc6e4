"""lra.bench: one fresh process per length, a result row per point whatever happens."""

from __future__ import annotations

import json

from conftest import run_cli
from lra.results import load_results

SMALL = ["bench.steps=2", "bench.warmup_steps=1", "bench.batch_size=2", "model.emb_dim=32",
         "model.num_heads=2", "model.num_layers=1", "model.mlp_dim=64"]


def test_bench_points_and_failures_are_rows(tmp_path, _isolated_cache):
    proc = run_cli("lra.bench", "model=bigbird", "bench.seq_lens=[128,512]", *SMALL,
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok = json.loads((tmp_path / "L512-b2" / "result.json").read_text())
    assert ok["kind"] == "bench" and ok["status"] == "ok" and ok["seq_len"] == 512
    assert ok["steps_per_s"] > 0 and ok["peak_memory_bytes"] > 0 and ok["flops_per_step"] > 0
    assert ok["config"]["model"]["num_layers"] == 1  # the overrides reached the worker
    # Achieved matmul FLOP/s against this machine's peak: the highest measured, cached.
    peak = ok["env"]["matmul_peak_flops_per_s"]
    assert peak > 1e8 and ok["matmul_flops_per_step"] > 0
    assert ok["achieved_flops_per_s"] == ok["matmul_flops_per_step"] * ok["steps_per_s"]
    assert ok["matmul_utilisation"] == ok["achieved_flops_per_s"] / peak
    cached = list((_isolated_cache / "matmul_peak").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["matmul_peak_flops_per_s"] == peak
    too_short = json.loads((tmp_path / "L128-b2" / "result.json").read_text())
    assert too_short["status"] == "error" and "block_size" in too_short["error"]
    df = load_results(tmp_path, verbose=False)
    assert sorted(df["seq_len"]) == [128, 512]
    # Re-run (skip_done): the ok point with this config is kept, the error point is measured again.
    proc = run_cli("lra.bench", "model=bigbird", "bench.seq_lens=[128,512]", *SMALL,
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped:") == 1 and "L512-b2" in proc.stdout.split("skipped:")[1]
    again = json.loads((tmp_path / "L512-b2" / "result.json").read_text())
    assert again["wall_time_s"] == ok["wall_time_s"]
    retried = json.loads((tmp_path / "L128-b2" / "result.json").read_text())
    assert retried["wall_time_s"] != too_short["wall_time_s"]


def test_find_max_len_doubles_until_failure_or_cap(tmp_path):
    proc = run_cli("lra.bench", "model=local", "bench.seq_lens=[128]", "bench.find_max_len=true",
                   "bench.max_len_cap=256", *SMALL, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "max_len.json").read_text())
    assert summary["max_feasible_seq_len"] == 256 and summary["first_failure"] is None
    proc = run_cli("lra.bench", "model=bigbird", "bench.seq_lens=[256]", "bench.find_max_len=true",
                   *SMALL, f"hydra.run.dir={tmp_path / 'bb'}")
    summary = json.loads((tmp_path / "bb" / "max_len.json").read_text())
    assert summary["max_feasible_seq_len"] is None and summary["first_failure"]["status"] == "error"


def test_killing_the_bench_stops_its_worker_and_leaves_an_interrupted_row(tmp_path):
    # kill -9 of lra.bench: its worker gets SIGTERM (PR_SET_PDEATHSIG), writes an `interrupted`
    # row and exits, instead of running on and skewing the next bench's timings.
    import os
    import select
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lra.bench", "model=transformer", "task=listops", "preset=tiny",
         "bench.seq_lens=[64]", "bench.steps=1000000", f"bench.out_dir={tmp_path}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "-> worker pid " in line:  # lra.sweep.executor's fresh worker for the length
            break
    else:
        raise AssertionError("".join(seen)[-3000:])
    pid = int(line.split("-> worker pid ")[1].split()[0])
    pidfd = os.pidfd_open(pid)  # wait on the orphaned worker without polling
    proc.kill()
    proc.wait(timeout=60)
    assert select.select([pidfd], [], [], 120)[0], "the worker outlived its bench"
    os.close(pidfd)
    result = json.loads(next(tmp_path.rglob("result.json")).read_text())
    assert result["status"] == "interrupted" and "the bench ended" in result["error"]


def test_the_matmul_peak_is_the_highest_measured_never_a_stale_low_one(_isolated_cache):
    """A peak cached from a busy machine (measured low) is replaced by a higher measurement; a
    higher cached one is kept."""
    from lra.train import measure

    measure.matmul_peak(size=256, repeats=3)  # writes the cache file for this size
    path = next((_isolated_cache / "matmul_peak").glob("*-256.json"))
    path.write_text(json.dumps({"matmul_peak_flops_per_s": 1.0, "matmul_peak_size": 256}))
    fresh = measure.matmul_peak(size=256, repeats=3)["matmul_peak_flops_per_s"]
    assert fresh > 1.0 and json.loads(path.read_text())["matmul_peak_flops_per_s"] == fresh
    path.write_text(json.dumps({"matmul_peak_flops_per_s": 1e18, "matmul_peak_size": 256}))
    assert measure.matmul_peak(size=256, repeats=3)["matmul_peak_flops_per_s"] == 1e18


def test_a_utilisation_above_the_peak_is_measured_again_then_recorded_as_none(caplog):
    """A peak measured under load (22 GFLOP/s where the CPU gives ~190) read 296.6% for every
    later row: the bench measures once more, and a fraction still above 1 is no figure."""
    from lra.bench import record_utilisation
    from lra.results import RunResult
    from lra.report.tables import flops_table

    peaks = iter([22e9, 190e9])
    row = RunResult(task="text", model="m", seq_len=1024, seed=0, preset="tiny", kind="bench",
                    matmul_flops_per_step=65e9, steps_per_s=1.0)
    record_utilisation(row, lambda: {"matmul_peak_flops_per_s": next(peaks)})
    assert row.env["matmul_peak_flops_per_s"] == 190e9 and row.matmul_utilisation == 65 / 190
    low = RunResult(task="text", model="m", seq_len=1024, seed=0, preset="tiny", kind="bench",
                    matmul_flops_per_step=65e9, steps_per_s=1.0)
    record_utilisation(low, lambda: {"matmul_peak_flops_per_s": 22e9})
    assert low.achieved_flops_per_s == 65e9 and low.matmul_utilisation is None
    assert "matmul utilisation not recorded" in caplog.text
    import pandas as pd

    frame = pd.DataFrame([{"kind": "bench", "status": "ok", "task": "text", "model": "m",
                           "seq_len": 1024, "batch_size": 1, "steps_per_s": 1.0,
                           "peak_memory_bytes": 1, "preset": "tiny",
                           "achieved_flops_per_s": 65e9, "matmul_utilisation": 2.966}])
    assert "(n/a)" in flops_table(frame).iloc[0, 0]
