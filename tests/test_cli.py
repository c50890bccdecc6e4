"""Bad input dies at start-up with one line that names the fix."""

from __future__ import annotations

import pytest

from conftest import run_cli


def last_error_line(proc) -> str:
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert lines, proc.stderr[-2000:]
    return lines[-1]


@pytest.mark.parametrize("args, expected", [
    (["model=nope"], "unknown model 'nope'; known: "),
    (["task=nope"], "unknown task 'nope'; known: "),
    (["preset=huge"], "unknown preset 'huge'; known: "),
    (["model.num_layrs=2"], "unknown key 'model.num_layrs' in model; valid keys there: "),
    (["train.stepz=2"], "unknown key 'train.stepz' in train"),
    (["model.num_layers=two"], "bad override"),
])
def test_bad_config_fails_in_one_line(args, expected):
    proc = run_cli("lra.run", *args)
    assert proc.returncode != 0
    line = last_error_line(proc)
    assert expected in line
    if "; known: " in expected:
        assert "transformer" in line or "listops" in line or "tiny" in line


def test_seq_len_not_fitting_the_block_size(tmp_path):
    proc = run_cli("lra.run", "model=bigbird", "task=listops", "preset=tiny", "task.seq_len=128",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    line = last_error_line(proc)
    assert "block_size" in line and "task.seq_len" in line
    assert (tmp_path / "result.json").is_file()  # the failure is still a result row


def test_missing_data_dir_files(tmp_path):
    proc = run_cli("lra.run", "task=listops", "preset=tiny", f"task.data_dir={tmp_path}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1
    assert "task.data_dir" in last_error_line(proc)
    proc = run_cli("lra.data", "task=listops", f"task.data_dir={tmp_path}",
                   f"hydra.run.dir={tmp_path / 'data'}")
    assert proc.returncode == 1 and "task.data_dir" in last_error_line(proc)
