"""Sweeps: every point writes a result whatever happens; a re-run only does what is missing."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from lra.results import load_results


def test_sweep_with_a_failing_point_then_resume(tmp_path):
    sweep, bad = tmp_path / "sweep", tmp_path / "bad"
    args = ["-m", "model=transformer,local", "task=listops", "preset=tiny", "train.progress=false",
            "train.steps=10", "train.log_every=5", "train.eval_every=10", f"hydra.sweep.dir={sweep}"]
    proc = run_cli("lra.run", *args, "task.seq_len=512,64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load_results(sweep, verbose=False)
    assert len(df) == 4 and set(df["status"]) == {"ok"}
    # Forced failures: a timeout point and a diverging point are rows too, and the sweep goes on.
    proc = run_cli("lra.run", *args[:-1], f"hydra.sweep.dir={bad}", "task.seq_len=512",
                   "train.max_time_s=1e-6,0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fail = load_results(bad, verbose=False)
    assert sorted(fail["status"]) == ["ok", "ok", "timeout", "timeout"]
    timed_out = fail[fail["status"] == "timeout"].iloc[0]
    assert timed_out["steps"] == 5 and 0 <= timed_out["val_accuracy"] <= 1  # metrics so far
    # Resume: delete one finished point, re-run the same sweep: only that point runs again.
    victim = df.sort_values("path").iloc[0]
    before = {p: json.loads(open(f"{p}/result.json").read())["wall_time_s"] for p in df["path"]}
    (sweep / victim["path"] / "result.json").unlink()
    proc = run_cli("lra.run", *args, "task.seq_len=512,64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped:") == 3
    after = load_results(sweep, verbose=False)
    assert len(after) == 4
    changed = [p for p in after["path"] if json.loads(open(f"{p}/result.json").read())["wall_time_s"] != before[p]]
    assert changed == [victim["path"]]


@pytest.mark.parametrize("launcher,plugin", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher"),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher"),
])
def test_launcher_plugin_sweep_writes_every_result(tmp_path, launcher, plugin):
    pytest.importorskip(plugin, reason='pip install -e ".[cluster]"')
    proc = run_cli("lra.run", "-m", f"hydra/launcher={launcher}", "model=transformer,local",
                   "task=listops", "preset=tiny", "train.progress=false", "train.steps=5",
                   "train.log_every=5", "train.eval_every=5", "train.checkpoint_every=-1",
                   f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load_results(tmp_path, verbose=False)
    assert sorted(df["model"]) == ["local", "transformer"] and set(df["status"]) == {"ok"}
