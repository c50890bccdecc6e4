"""Sweeps: every point writes a result whatever happens; a re-run only does what is missing."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run_cli
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


def start_sweep(sweep, *overrides):
    """Start `lra.run -m` with merged stdout/stderr; returns the Popen."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "lra.run", "-m", "task=listops", "preset=tiny", "model=local",
         "train.progress=false", "train.log_every=5", "train.eval_every=5",
         "train.checkpoint_every=5", f"hydra.sweep.dir={sweep}", *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_pid(text: str) -> int:
    """The pid in the executor's first "job #N -> worker pid P" line of `text`."""
    return int(text.split("-> worker pid ")[1].split()[0])


def read_until(proc, marker: str, lines: list[str]) -> str:
    for line in proc.stdout:  # blocks on the sweep's output; no sleeping
        lines.append(line)
        if marker in line:
            return line
    raise AssertionError("".join(lines)[-3000:])


def test_a_sigkilled_point_is_a_killed_row_and_a_rerun_resumes_it(tmp_path):
    # The first point is SIGKILLed (preemption, kill -9, or the OOM killer: here the kernel's
    # OOM counter does not move, so the row says `killed`, not `oom`); the sweep records it and
    # runs the second point in a new process. Before: `oom`, counted finished, never resumed.
    args = ("train.steps=200,5", "train.checkpoint_every=10")
    proc = start_sweep(tmp_path, *args)
    lines: list[str] = []
    pid = worker_pid(read_until(proc, "-> worker pid", lines))
    read_until(proc, "checkpoint: step", lines)
    os.kill(pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(lines)[-2000:] + rest[-3000:]
    rows = {r["status"]: r for r in load_results(tmp_path, verbose=False).to_dict("records")}
    assert sorted(rows) == ["killed", "ok"], rest[-3000:]
    killed = rows["killed"]
    assert "killed by SIGKILL, not by this sweep" in killed["error"] and "no OOM kill" in killed["error"]
    assert f"(checkpoint: step {killed['steps']})" in killed["error"] and killed["steps"] >= 10
    assert rows["ok"]["steps"] == 5
    assert rest.count("-> worker pid") == 1 and worker_pid(rest) != pid  # another process
    # The same command again: the finished point is skipped, the killed one resumes.
    proc = start_sweep(tmp_path, *args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("skipped:") == 1 and out.count("-> worker pid") == 2  # fresh per point
    rows = load_results(tmp_path, verbose=False).sort_values("steps").to_dict("records")
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[1]["steps"] == 200
    assert rows[1]["resumed_from_step"] >= 10


def test_a_pool_worker_killed_under_its_point_costs_that_point_only(tmp_path):
    # hydra/launcher=pool (lra.suite's): points in reused worker processes. Killing the worker of
    # the first point leaves a `killed` row and record entry for it; the other points run in a
    # fresh worker. (With hydra/launcher=joblib the sweep itself dies: every point is lost.)
    args = ("hydra/launcher=pool", "hydra.launcher.n_jobs=1", "fresh_process=false",
            "train.steps=200,5,6", "train.checkpoint_every=10")
    proc = start_sweep(tmp_path, *args)
    lines: list[str] = []
    pid = int(read_until(proc, "job #0 -> worker pid", lines).rsplit(" ", 1)[1])
    read_until(proc, "checkpoint: step", lines)
    os.kill(pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    rows = load_results(tmp_path, verbose=False).sort_values("steps").to_dict("records")
    assert [r["status"] for r in rows] == ["ok", "ok", "killed"], out[-3000:]
    assert [r["steps"] for r in rows[:2]] == [5, 6]
    killed = rows[2]
    assert "killed by SIGKILL, not by this sweep" in killed["error"]
    assert f"(checkpoint: step {killed['steps']})" in killed["error"] and killed["steps"] >= 10
    assert "3 points: 2 ok, 1 killed" in out
    new_pid = int(out.split("job #1 -> worker pid ")[1].split()[0])
    assert new_pid != pid and f"job #2 -> worker pid {new_pid}" in out  # reused (fresh_process=false)
    (record,) = (tmp_path / "sweeps").glob("*.yaml")
    points = yaml.safe_load(record.read_text())["points"]
    assert [p["status"] for p in points] == ["killed", "ok", "ok"] and points[0]["job"] == 0
    # The same command again: the finished points are kept, the killed one resumes.
    proc = start_sweep(tmp_path, *args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("skipped:") == 2
    rows = load_results(tmp_path, verbose=False).sort_values("steps").to_dict("records")
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"] and rows[2]["steps"] == 200
    assert rows[2]["resumed_from_step"] >= 10


def test_an_interrupted_pool_point_is_in_the_sweep_record(tmp_path):
    # SIGTERM to a pool sweep: the running point checkpoints and records `interrupted`, and the
    # sweep's record lists it (its process ended by SystemExit, past Hydra's on_job_end).
    args = ("hydra/launcher=pool", "hydra.launcher.n_jobs=1", "fresh_process=false",
            "train.steps=400,5", "train.checkpoint_every=10")
    proc = start_sweep(tmp_path, *args)
    lines: list[str] = []
    read_until(proc, "checkpoint: step", lines)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, ("".join(lines) + rest)[-3000:]
    (record,) = (tmp_path / "sweeps").glob("*.yaml")
    points = yaml.safe_load(record.read_text())["points"]
    assert [(p["job"], p["status"]) for p in points] == [(0, "interrupted")]


def test_sweep_killed_with_sigkill_leaves_a_checkpoint_and_resumes(tmp_path):
    # kill -9 of the sweep itself: its point gets SIGTERM (PR_SET_PDEATHSIG), checkpoints and
    # records `interrupted`; the same command then resumes it.
    args = ("train.steps=40", "train.checkpoint_every=10")
    proc = start_sweep(tmp_path, *args)
    lines: list[str] = []
    pid = worker_pid(read_until(proc, "-> worker pid", lines))
    pidfd = os.pidfd_open(pid)  # to wait on the orphaned point without polling
    read_until(proc, "checkpoint: step", lines)
    proc.kill()
    try:  # the PDEATHSIG comes once per exiting sweep thread: a repeat must not cut the save short
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)
    assert select.select([pidfd], [], [], 120)[0], "the point outlived its sweep"
    os.close(pidfd)
    point = next(tmp_path.glob("listops/local/*"))
    result = json.loads((point / "result.json").read_text())
    assert result["status"] == "interrupted" and 10 <= result["steps"] < 40
    proc = start_sweep(tmp_path, *args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    result = json.loads((point / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 40
    assert 10 <= result["resumed_from_step"] < 40


@pytest.mark.parametrize("on_sigusr1,outcome", [("SIG_DFL", "stopped"), ("SIG_IGN", "killed")])
def test_the_executor_stops_a_point_past_its_timeout(on_sigusr1, outcome, tmp_path, monkeypatch):
    """The one timeout rule: SIGUSR1 at the timeout; a point that does not end on it (hung
    outside its step loop) is SIGKILLed POINT_GRACE_S later. Either way it is a dead point
    whose row the sweep's handler writes, and the executor goes on (no stop)."""
    from hang_point import hang

    from lra.sweep import executor, launch

    # Long enough for the worker to start and import hang_point under load (the SIG_DFL point
    # then ends at once); the SIG_IGN point waits it out.
    monkeypatch.setattr(launch, "POINT_GRACE_S", 10.0)
    seen = []

    def lost(config, ended, before) -> str:
        seen.append((config, ended.overran, ended.code))
        return "recorded"

    sweep = executor.Sweep(hang, None, None, fresh=True, on_lost=lost)
    jobs = [executor.Job(0, [], sweep, config=on_sigusr1, out_dir=tmp_path, timeout_s=0.2)]
    assert executor.Executor(1).run(jobs) == []
    code = -signal.SIGUSR1 if outcome == "stopped" else -signal.SIGKILL
    assert seen == [(on_sigusr1, outcome, code)]


def test_a_point_past_point_timeout_s_is_a_timeout_row_with_test_accuracy_then_resumes(tmp_path):
    # point_timeout_s: the supervisor sends SIGUSR1, the point stops as a train.max_time_s
    # timeout does (checkpoint, test accuracy of the best parameters). Before: SIGTERM, a row
    # without test accuracy, and a re-run skipped it as finished.
    args = ("train.steps=100000", "point_timeout_s=10")
    proc = start_sweep(tmp_path, *args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]  # a timeout is a row; the sweep goes on
    (row,) = load_results(tmp_path, verbose=False).to_dict("records")
    assert row["status"] == "timeout" and row["time_limit"] == "point_timeout_s", row["error"]
    assert "point_timeout_s=10" in row["error"] and 0 < row["steps"] < 100000
    assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["val_accuracy"] <= 1
    proc = start_sweep(tmp_path, *args)  # not finished: the re-run resumes it
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "skipped:" not in out, out[-3000:]
    (again,) = load_results(tmp_path, verbose=False).to_dict("records")
    assert again["resumed_from_step"] == row["steps"] and again["steps"] > row["steps"]


def test_a_pool_worker_whose_pool_died_ends_quietly(monkeypatch):
    # A worker whose executor was killed (during its point's compilation) records its point, then
    # finds the pipe broken: it ends, without a BrokenPipeError traceback.
    import types

    import cloudpickle
    from hydra.core.singleton import Singleton

    from lra.sweep import executor

    class DeadPool:
        def __init__(self):
            # a Hydra job's payload: (task function, Hydra context, Hydra's state)
            state = cloudpickle.dumps((None, types.SimpleNamespace(), Singleton.get_state()))
            self.messages = [(1, state, {"a": "point"}, None)]

        def recv(self):
            if not self.messages:
                raise EOFError
            return self.messages.pop()

        def send(self, message):
            raise BrokenPipeError(32, "Broken pipe")

    def interrupted(**_):
        raise SystemExit(128 + signal.SIGTERM)  # what a point that recorded `interrupted` raises

    monkeypatch.setattr(executor.launch, "enter_point", lambda parent: None)
    monkeypatch.setattr(executor, "run_job", interrupted)
    monkeypatch.setattr(executor.HydraConfig, "instance",
                        lambda: types.SimpleNamespace(set_config=lambda config: None))
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert executor._worker_main(DeadPool(), os.getppid()) is None
    finally:
        signal.signal(signal.SIGINT, previous)
