"""A ranking that measures capability: fresh training data for generated tasks, convergence and
sample efficiency recorded per run, early stopping, the tuning grid chosen on validation, and
Table 1's Avg over the tasks that rank only."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import compose, run_cli
from lra.report import tables
from lra.config import TrainConfig
from lra.results import RunResult, load_results, write_result
from lra.train.record import convergence, milestones
from lra.tasks.copy import Copy, CopyConfig
from lra.tasks.mqar import MQAR, MQARConfig


# ------------------------------------------------------------------ fresh data every batch

@pytest.mark.parametrize("task", [MQAR(MQARConfig(seq_len=64, num_pairs=4, fresh_train=True)),
                                  Copy(CopyConfig(seq_len=64, variant="induction",
                                                  fresh_train=True))])
def test_fresh_stream_never_repeats_resumes_exactly_and_leaves_val_test_fixed(task):
    first = [b["inputs"] for _, b in zip(range(20), task.batches("train", 32, seed=3))]
    rows = {row.tobytes() for batch in first for row in batch}
    assert len(rows) == 20 * 32  # 640 sequences, none seen twice
    # A resumed run (start_step=12) continues the same stream; the same seed repeats it.
    resumed = next(task.batches("train", 32, seed=3, start_step=12))["inputs"]
    np.testing.assert_array_equal(resumed, first[12])
    again = next(task.batches("train", 32, seed=3))["inputs"]
    np.testing.assert_array_equal(again, first[0])
    other = next(task.batches("train", 32, seed=4))["inputs"]
    assert not np.array_equal(other, first[0])  # another training seed, another stream
    # Val and test are the fixed splits whatever the stream: equal to a run without it.
    fixed = type(task)(dataclasses.replace(task.cfg, fresh_train=False))
    for split in ("val", "test"):
        np.testing.assert_array_equal(task.split(split)["inputs"], fixed.split(split)["inputs"])
    assert not rows & {row.tobytes() for row in task.split("val")["inputs"]}


def test_fresh_batches_are_valid_examples_of_the_task():
    task = MQAR(MQARConfig(seq_len=64, num_pairs=4, fresh_train=True))
    batch = next(task.batches("train", 16, seed=0))
    assert batch["inputs"].shape == (16, 64) and batch["weights"].sum(1).tolist() == [4.0] * 16
    # every scored target is the value that follows its query key among the pairs
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
        pairs = dict(zip(inputs[0:8:2], inputs[1:8:2]))
        for at in np.flatnonzero(weights):
            assert targets[at] == pairs[inputs[at]]


# ------------------------------------------------------------------ convergence, milestones

def curve(*vals, every=100):
    return [{"step": every * (i + 1), "val_accuracy": v} for i, v in enumerate(vals)]


def test_convergence_solved_plateaued_capped():
    cfg = TrainConfig(solve_at=0.99, patience=3, min_delta=0.005)
    assert convergence([], cfg) is None
    assert convergence(curve(0.2, 0.995), cfg) == "solved"
    assert convergence(curve(0.2, 0.5, 0.502, 0.501, 0.504), cfg) == "plateaued"
    assert convergence(curve(0.2, 0.5, 0.502, 0.501, 0.51), cfg) == "capped"  # gained 1 point
    assert convergence(curve(0.5, 0.5, 0.5), cfg) == "capped"  # too few evaluations to tell
    assert convergence(curve(0.2, 0.5, 0.5, 0.5, 0.5), TrainConfig(patience=0)) == "capped"


def test_milestones_are_the_first_evaluations_at_each_fraction_of_the_best():
    steps_to, solved = milestones(curve(0.1, 0.5, 0.95, 0.995), batch_size=64, solve_at=0.99)
    assert steps_to["50%"] == {"step": 200, "examples": 12800}  # 0.5 >= 0.4975
    assert steps_to["90%"] == {"step": 300, "examples": 19200}
    assert steps_to["99%"] == {"step": 400, "examples": 25600}
    assert solved == 400
    assert milestones(curve(0.1, 0.3), 8, 0.99)[1] is None


def test_early_stop_ends_a_solved_run_and_its_resume_trains_no_further(tmp_path):
    """A threshold every run reaches at its first evaluation: the run stops there, not at
    train.steps, and the row records it; a resume of its checkpoint (result.json lost) adds no
    step; without early_stop the run goes on to train.steps and still records convergence."""
    from lra.run import execute, run_here

    overrides = ["model=transformer", "task=copy", "preset=tiny", "train.progress=false",
                 "task.seq_len=16", "task.fresh_train=true", "train.steps=40",
                 "train.eval_every=10", "train.solve_at=0.01", "logger=none"]
    cfg = compose(*overrides, "train.early_stop=true", "train.checkpoint_every=0")
    assert run_here(cfg, tmp_path) == 0
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["status"] == "ok" and written["convergence"] == "solved"
    assert written["steps"] == 10 and written["solved_step"] == 10
    assert written["steps_to"]["50%"] == {"step": 10, "examples": 10 * written["batch_size"]}
    (tmp_path / "result.json").unlink()
    assert run_here(cfg, tmp_path) == 0
    resumed = json.loads((tmp_path / "result.json").read_text())
    assert resumed["resumed_from_step"] == 10 and resumed["steps"] == 10
    assert resumed["test_accuracy"] == written["test_accuracy"]
    full = execute(compose(*overrides, "train.checkpoint_every=-1"), tmp_path / "full")
    assert full.steps == 40 and full.convergence == "solved" and full.solved_step == 10


# ------------------------------------------------------------------ the tuning grid

def write(root, model, task, val, test, lr, seed=0, convergence="solved", **extra):
    config = {"seed": seed, "preset": "small", "model": {"pos": "learned"},
              "task": {"name": task, "seq_len": 64},
              "train": {"lr": lr, "weight_decay": 0.01}}
    path = root / f"{task}-{model}-lr{lr}-s{seed}"
    write_result(RunResult(task=task, model=model, seq_len=64, seed=seed, preset="small",
                           val_accuracy=val, test_accuracy=test, config=config,
                           convergence=convergence, batch_size=32, **extra), path)


def test_the_learning_rate_is_chosen_on_validation_never_on_test(tmp_path):
    write(tmp_path, "transformer", "mqar", val=0.80, test=0.70, lr=1e-3)
    write(tmp_path, "transformer", "mqar", val=0.60, test=0.95, lr=1e-2)  # best test, worse val
    write(tmp_path, "mamba", "mqar", val=0.50, test=0.50, lr=1e-3)
    write(tmp_path, "mamba", "mqar", val=0.90, test=0.88, lr=1e-2)
    chosen = load_results(tmp_path, verbose=False)
    assert sorted(zip(chosen["model"], chosen["tuning"])) == [
        ("mamba", "lr=0.01 weight_decay=0.01"), ("transformer", "lr=0.001 weight_decay=0.01")]
    acc = tables.accuracy_table(chosen)
    assert acc.loc["transformer", "mqar"] == "70.00"  # not the 95% of the rejected lr
    assert acc.loc["mamba", "mqar"] == "88.00"
    every = load_results(tmp_path, verbose=False, tuned="all")
    assert len(every) == 4 and every["chosen"].sum() == 2
    grid = tables.tuning_table(every)
    assert grid.loc["transformer", "mqar"] == "lr=0.001 80.0* | lr=0.01 60.0"  # what varies


def test_a_diverged_candidate_never_wins_and_still_shows(tmp_path):
    write(tmp_path, "transformer", "mqar", val=0.40, test=0.41, lr=1e-3)
    path = tmp_path / "div"
    write_result(RunResult(task="mqar", model="transformer", seq_len=64, seed=0, preset="small",
                           status="diverged", config={"seed": 0, "preset": "small",
                           "task": {"name": "mqar", "seq_len": 64},
                           "train": {"lr": 1.0, "weight_decay": 0.01}}), path)
    chosen = load_results(tmp_path, verbose=False)
    assert list(chosen["status"]) == ["ok"]
    grid = tables.tuning_table(load_results(tmp_path, verbose=False, tuned="all"))
    assert "lr=1 DIVERGED" in grid.loc["transformer", "mqar"]


# ------------------------------------------------------------------ Table 1: capped, Avg, steps

def write_task_run(root, model, task, acc, seq_len, block_size=None):
    attention = {"kind": "local", "block_size": block_size} if block_size else {"kind": "dense"}
    config = {"seed": 0, "preset": "small", "model": {"pos": "learned", "attention": attention},
              "task": {"name": task, "seq_len": seq_len}}
    write_result(RunResult(task=task, model=model, seq_len=seq_len, seed=0, preset="small",
                           val_accuracy=acc, test_accuracy=acc, config=config),
                 root / f"{task}-{model}-{seq_len}")

def test_capped_cells_are_marked_and_steps_to_solve_sits_beside(tmp_path):
    write(tmp_path, "transformer", "mqar", 0.995, 0.99, 1e-3, solved_step=1500)
    write(tmp_path, "mamba", "mqar", 0.60, 0.58, 1e-3, convergence="capped")
    write(tmp_path, "hyena", "mqar", 0.30, 0.31, 1e-3, convergence="plateaued")
    df = load_results(tmp_path, verbose=False)
    acc = tables.accuracy_table(df)
    assert acc.loc["mamba", "mqar"] == f"58.00 {tables.CAPPED}"
    assert acc.loc["transformer", "mqar"] == "99.00" and acc.attrs["capped"] == 1
    assert "1 capped cell" in tables.accuracy_caption(acc)
    steps = tables.steps_table(df)
    assert steps.loc["transformer", "mqar"] == "1500 (48k)"
    assert steps.loc["mamba", "mqar"] == "capped 60.0"
    assert steps.loc["hyena", "mqar"] == "plateau 30.0"


def test_avg_averages_tasks_not_lengths_and_skips_local_tasks(tmp_path):
    # listops at two lengths counts once in Avg; copy ranks; a local task is left out.
    for model, accs in {"transformer": (0.40, 0.60, 0.90, 0.80), "s4d": (0.20, 0.40, 0.50, 0.80)}.items():
        write_task_run(tmp_path / "main", model, "listops", accs[0], seq_len=128)
        write_task_run(tmp_path / "main", model, "listops", accs[1], seq_len=256)
        write_task_run(tmp_path / "main", model, "copy", accs[2], seq_len=64)
        write_task_run(tmp_path / "main", model, "mqar", accs[3], seq_len=64)
    write_task_run(tmp_path / "loc", "local", "mqar", 0.795, seq_len=64, block_size=16)
    write_task_run(tmp_path / "loc", "local", "copy", 0.10, seq_len=64, block_size=16)
    df = load_results(tmp_path / "main", verbose=False)
    local = tables.locality_frame(load_results(tmp_path / "loc", verbose=False), df)
    acc = tables.accuracy_table(df, local=local)
    assert list(acc.attrs["unranked"]) == ["mqar"]
    assert "the task is local" in acc.attrs["unranked"]["mqar"]
    # transformer: listops (40 + 60) / 2 = 50, copy 90 -> 70; not the 3-column mean 63.33
    assert acc.loc["transformer", "Avg"] == "70.00"
    assert acc.loc["s4d", "Avg"] == "40.00"
    assert "not in Avg: mqar" in tables.accuracy_caption(acc)


# ------------------------------------------------------------------ the suite's grid

def test_suite_grid_multiplies_the_points_and_bad_values_fail_in_one_line(tmp_path):
    proc = run_cli("lra.suite", "preset=tiny", f"out={tmp_path}", "models=[transformer,mamba]",
                   "tasks=[mqar]", "lr=[1e-4,1e-3,1e-2]", "bench=false", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x lr [0.0001, 0.001, 0.01]" in proc.stdout
    assert "mqar" in proc.stdout and " 6 points" in proc.stdout
    assert "train.lr=0.0001,0.001,0.01" in proc.stdout
    bad = run_cli("lra.suite", "preset=tiny", "lr=[fast]", "--dry-run")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("error: lr=[fast]: use a list of numbers")


def test_suite_eta_does_not_charge_the_one_off_start_to_every_point(tmp_path):
    """A start of 60 s before the first point (worker imports, first compiles), then points of
    10 s each where the plan estimated 5: the ETA follows the points' own rate (2x the plan),
    not 60 s per point as charging the start to the first one would."""
    from lra.suite import Progress, Step

    step = Step("mqar", "lra.run", [], tmp_path / "mqar", points=10, est_s=50.0)
    now = [0.0]
    progress = Progress([step], clock_fn=lambda: now[0])

    def finish(n: int, at: float) -> str:
        now[0] = at
        for i in range(n):
            (step.dir / str(i)).mkdir(parents=True, exist_ok=True)
            (step.dir / str(i) / "result.json").write_text("{}")
        return progress.line(step)

    assert finish(0, 30.0).endswith("ETA 0:00:50")  # nothing done: the plan's 10 x 5 s
    assert finish(1, 60.0).endswith("ETA 0:00:45")  # one point: still the plan's rate
    line = finish(3, 80.0)  # two more points in 20 s: 10 s each where 5 were planned
    assert line.startswith("[suite] 3/10 points") and line.endswith("ETA 0:01:10")  # 7 x 10 s


def test_a_resumed_suite_counts_only_the_rows_it_will_not_run_again(tmp_path):
    """Rows an earlier session left: ok (or a timeout at the run's own budget) is done; an
    interrupted, killed or error row resumes, so it is still to do (it read "done" before, and
    the ETA left it out); any row written in this session is done."""
    import json
    import os

    from lra.suite import Progress, Step

    step = Step("mqar", "lra.run", [], tmp_path / "mqar", points=6, est_s=60.0)
    earlier = [{"status": "ok"}, {"status": "interrupted"}, {"status": "killed"},
               {"status": "error"}, {"status": "timeout", "time_limit": "train.max_time_s"}]
    for i, row in enumerate(earlier):
        (step.dir / str(i)).mkdir(parents=True)
        path = step.dir / str(i) / "result.json"
        path.write_text(json.dumps(row))
        os.utime(path, (1e9, 1e9))  # 2001: an earlier session's row
    progress = Progress([step], clock_fn=lambda: 0.0)
    assert progress.line(step).startswith("[suite] 2/6 points")
    (step.dir / "1" / "result.json").write_text(json.dumps({"status": "interrupted"}))
    assert progress.line(step).startswith("[suite] 3/6 points")  # written in this session


def test_suite_sends_its_points_through_a_named_hydra_launcher(tmp_path):
    proc = run_cli("lra.suite", "preset=tiny", f"out={tmp_path}", "models=[transformer]",
                   "tasks=[mqar]", "bench=false", "locality=false", "launcher=submitit_local",
                   "hydra.launcher.timeout_min=30", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    command = next(line for line in proc.stdout.splitlines() if line.startswith("$ "))
    assert "hydra/launcher=submitit_local hydra.launcher.timeout_min=30" in command
    assert "hydra/launcher=pool" not in command
    bad = run_cli("lra.suite", "preset=tiny", "launcher=nope", "--dry-run")
    assert bad.returncode != 0 and "nope" in bad.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("preset", ["full", "calibration", "mad"])
def test_each_suite_preset_composes_every_point(preset, tmp_path):
    """--dry-run checks every step's overrides against the configs (each calibration and MAD
    cell composes with its grid) before printing the plan."""
    proc = run_cli("lra.suite", f"preset={preset}", f"out={tmp_path}", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train.lr=" in proc.stdout and "estimated" in proc.stdout
