"""The tiny end-to-end runs the task tests share: `lra.run` as a user runs it, or in-process on
tfds mock data. Each asserts the run ended ok with an accuracy in [0, 1]."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import compose, run_cli


def tiny_cli_run(run_dir: Path, task: str, *overrides: str) -> dict:
    """`python -m lra.run model=transformer task=<task> preset=tiny <overrides>`: result.json."""
    proc = run_cli("lra.run", "model=transformer", f"task={task}", "preset=tiny",
                   "train.progress=false", *overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["task"] == task
    assert 0.0 <= result["test_accuracy"] <= 1.0
    return result


def tiny_mock_tfds_run(run_dir: Path, task: str):
    """Four steps of `task` at L=256 in this process, its tfds dataset mocked; the RunResult."""
    import tensorflow_datasets as tfds

    from lra.run import execute

    cfg = compose("model=transformer", f"task={task}", "preset=tiny", "train.progress=false",
                  "train.steps=4", "train.eval_every=4", "task.seq_len=256")
    with tfds.testing.mock_data(num_examples=16):
        result = execute(cfg, run_dir)
    assert result.status == "ok", result.error
    assert result.steps == 4 and 0.0 <= result.test_accuracy <= 1.0
    return result
