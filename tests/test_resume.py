"""Checkpoints: a run killed (SIGKILL) or interrupted (SIGTERM) midway resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, compose, run_cli

ARGS = ("model=transformer", "task=listops", "preset=tiny", "train.progress=false",
        "train.steps=40", "train.eval_every=20", "train.log_every=10",
        "train.checkpoint_every=10")  # the persistent compile cache serves the repeated runs


def read(directory):
    result = json.loads((directory / "result.json").read_text())
    curve = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return result, curve


def start_and_signal_at_first_checkpoint(directory, signum):
    """Start a run, send `signum` once it logs its first checkpoint, return the exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "lra.run", *ARGS, f"hydra.run.dir={directory}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:  # blocks on the child's output; no sleeping
        lines.append(line)
        if "checkpoint: step" in line:
            proc.send_signal(signum)
            break
    rest, _ = proc.communicate(timeout=300)
    assert any("checkpoint: step" in l for l in lines), "".join(lines) + rest
    return proc.returncode, "".join(lines) + rest


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("whole")
    proc = run_cli("lra.run", *ARGS, f"hydra.run.dir={directory}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read(directory)


def assert_same_run(resumed, whole):
    (r, curve), (w, whole_curve) = resumed, whole
    assert r["status"] == w["status"] == "ok"
    for key in ("steps", "val_accuracy", "test_accuracy", "best_step", "train_loss",
                "train_accuracy"):
        assert r[key] == w[key], key
    assert [row["step"] for row in curve] == [row["step"] for row in whole_curve]
    for a, b in zip(curve, whole_curve):
        assert a["train_loss"] == b["train_loss"] and a.get("val_accuracy") == b.get("val_accuracy")


def test_kill_9_then_rerun_resumes_to_the_same_metrics(tmp_path, uninterrupted):
    code, out = start_and_signal_at_first_checkpoint(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL, out[-2000:]
    assert not (tmp_path / "result.json").exists()
    proc = run_cli("lra.run", *ARGS, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read(tmp_path)
    assert 10 <= resumed[0]["resumed_from_step"] < 40
    assert_same_run(resumed, uninterrupted)


def test_sigterm_writes_interrupted_result_and_checkpoint_then_resumes(tmp_path, uninterrupted):
    code, out = start_and_signal_at_first_checkpoint(tmp_path, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out[-2000:]
    result, _ = read(tmp_path)
    assert result["status"] == "interrupted" and 10 <= result["steps"] < 40
    assert result["test_accuracy"] is None
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == result["steps"]
    proc = run_cli("lra.run", *ARGS, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read(tmp_path)
    assert resumed[0]["resumed_from_step"] == result["steps"]
    assert_same_run(resumed, uninterrupted)


def test_changed_config_refuses_the_checkpoint(tmp_path):
    from lra.run import execute

    overrides = [a for a in ARGS if not a.startswith("train.steps")] + ["train.steps=10"]
    first = execute(compose(*overrides), tmp_path)
    assert first.status == "ok" and (tmp_path / "checkpoints" / "10").is_dir()
    # No result.json was written (execute only returns it): the run counts as unfinished.
    result = execute(compose(*overrides, "model.emb_dim=16"), tmp_path)
    assert result.status == "error" and "different config" in result.error
    assert "train.resume=false" in result.error
    rerun = execute(compose(*overrides, "model.emb_dim=16", "train.resume=false"), tmp_path)
    assert rerun.status == "ok" and rerun.resumed_from_step is None


@pytest.fixture(scope="module")
def whole_in_process(tmp_path_factory):
    from lra.run import execute

    directory = tmp_path_factory.mktemp("whole_in_process")
    return execute(compose(*ARGS), directory), read_curve(directory)


def read_curve(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


# ("val", 40): the last step's val eval is cut; the resumed row's train loss must still be the
# last step's (it was the previous logged step's before).
@pytest.mark.parametrize("split,at_step", [("val", 20), ("val", 40), ("test", 40)])
def test_signal_during_an_eval_stops_it_and_the_resume_redoes_it(tmp_path, monkeypatch, split,
                                                                 at_step, whole_in_process):
    from lra import tasks
    from lra.run import execute
    from lra.train.ends import Stop

    stop, build = Stop(), tasks.build
    passes = {"val": 0, "test": 0}
    nth = at_step // 20 if split == "val" else 1  # val is evaluated every 20 steps

    def build_signalling(task_cfg):  # the signal arrives while `split` is being evaluated
        task = build(task_cfg)
        batches = task.batches

        def batches_then_signal(name, *args, **kwargs):
            if name in passes:
                passes[name] += 1
            for i, batch in enumerate(batches(name, *args, **kwargs)):
                if name == split and passes[name] == nth and i == 1 and stop.signum is None:
                    stop.signum = signal.SIGTERM
                yield batch

        task.batches = batches_then_signal
        return task

    monkeypatch.setattr(tasks, "build", build_signalling)
    cut = execute(compose(*ARGS), tmp_path, stop)
    assert cut.status == "interrupted" and cut.steps == at_step and cut.test_accuracy is None
    assert (tmp_path / "checkpoints" / str(at_step)).is_dir()
    evaluated = [row["step"] for row in read_curve(tmp_path) if "val_accuracy" in row]
    assert evaluated == [20, 40][:nth - 1 if split == "val" else 2]  # the cut eval is not recorded
    monkeypatch.undo()
    resumed = execute(compose(*ARGS), tmp_path, Stop())
    whole, whole_curve = whole_in_process
    assert resumed.status == "ok" and resumed.resumed_from_step == at_step
    for key in ("steps", "val_accuracy", "test_accuracy", "best_step", "train_loss"):
        assert getattr(resumed, key) == getattr(whole, key), key
    assert [(r["step"], r["train_loss"], r.get("val_accuracy")) for r in read_curve(tmp_path)] == \
        [(r["step"], r["train_loss"], r.get("val_accuracy")) for r in whole_curve]


def test_a_repeated_sigterm_is_one_request_and_a_second_sigint_forces():
    from lra.train.ends import Stop

    stop = Stop()
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)  # kill -9 of a sweep: PDEATHSIG once per parent thread
    assert stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    ctrl_c = Stop()
    ctrl_c._handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        ctrl_c._handle(signal.SIGINT, None)


def test_a_forced_stop_is_still_a_result_row(tmp_path, monkeypatch):
    import lra.run

    def forced(cfg, out_dir, stop, tracker):  # Ctrl-C twice while the run is busy
        stop._handle(signal.SIGINT, None)
        stop._handle(signal.SIGINT, None)

    monkeypatch.setattr(lra.run, "execute", forced)
    assert lra.run.run_here(compose(*ARGS), tmp_path) == 128 + signal.SIGINT
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "interrupted" and "second SIGINT" in result["error"]
    assert result["model"] == "transformer" and result["seq_len"] == 512


def test_a_diverging_run_is_a_diverged_row_with_no_checkpoint_of_its_nan_state(tmp_path):
    """lra.train.ends.Diverged: the row of the step whose loss went non-finite is logged, the state
    is not saved (a resume could only continue from NaN), and the run is finished, not resumed."""
    import math

    from lra.run import execute

    args = [a for a in ARGS if not a.startswith("train.eval_every")]
    result = execute(compose(*args, "train.lr=1e4", "train.eval_every=10"), tmp_path)
    assert result.status == "diverged" and result.steps < 40 and result.error is None
    rows = read_curve(tmp_path)
    assert rows[-1]["step"] == result.steps and not math.isfinite(rows[-1]["train_loss"])
    saved = [int(p.name) for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit()]
    assert all(step < result.steps for step in saved)
    assert result.convergence is None
