"""A full or read-only disk (issue 32, items 1 and 5): an `error` row (never `oom`) where a row can
be written, else one line naming the path; a sweep goes on with its other points; a finished run
on a read-only tree is skipped. The end-to-end cases inject the faults with tests/faults/
sitecustomize.py (no root, no mount); examples/hardening_drill.py does it on a real 3 MiB tmpfs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from lra.sweep import launch
from lra.results import RunResult, Status

RUN = ("model=linear", "task=listops", "preset=tiny", "train.steps=5", "train.eval_every=5",
       "train.progress=false", "logger=none")
# What orbax / TensorStore raised on a 3 MiB tmpfs (its JSON spec cut), and XLA's allocator.
TENSORSTORE_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local '
                      'file "/runs/x/checkpoints/20.orbax-checkpoint-tmp/ocdbt.process_0/": Failed '
                      'to write 208318 bytes to file 26: No space left on device '
                      "[os_error_code='28'] [tensorstore_spec='{\"context\": {}}']")
XLA_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes."


def test_a_full_disk_is_an_error_naming_the_file_and_xla_oom_stays_oom():
    full = ValueError(TENSORSTORE_ENOSPC)
    assert launch.exception_status(full) == Status.ERROR
    line = launch.one_line(full)
    assert line.startswith("no space left on device while writing /runs/x/checkpoints/")
    assert "tensorstore_spec" not in line and "re-run" in line
    assert launch.exception_status(OSError(errno.EROFS, "Read-only file system", "/a")) == Status.ERROR
    chained = RuntimeError("saving failed")
    chained.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/runs/y/result.json")
    assert launch.exception_status(chained) == Status.ERROR
    assert "/runs/y/result.json" in launch.one_line(chained)
    assert launch.exception_status(RuntimeError(XLA_OOM)) == Status.OOM
    assert launch.exception_status(MemoryError()) == Status.OOM
    assert launch.exception_status(RuntimeError("RESOURCE_EXHAUSTED: quota")) == Status.ERROR


def test_a_dead_point_whose_log_says_disk_full_is_an_error_not_oom():
    status, why = launch.death_status(1, [], None, None, f"... ValueError: {TENSORSTORE_ENOSPC}")
    assert status == Status.ERROR and "no space left on device" in why
    status, _ = launch.death_status(-6, [], None, None, f"F0101 {XLA_OOM}")
    assert status == Status.OOM


def test_settle_on_a_full_disk_prints_one_line_and_returns_the_row(tmp_path, monkeypatch, capsys):
    def full(result, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "result.json"))

    monkeypatch.setattr(launch, "write_result", full)
    ended = launch.Ended(1, None, [], None, None, 3.0)
    blank = RunResult(task="listops", model="linear", seq_len=64, seed=0, preset="tiny")
    result = launch.settle(tmp_path, ended, None, lambda: blank, "point_timeout_s", 0, "re-run")
    assert result.status == Status.ERROR
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'result.json'}: no space left on device; free space" in err
    assert "Traceback" not in err


def _cli(tmp_path, *args, fault: str | None = None, names: str = ""):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "faults"), str(ROOT)])}
    if fault:
        env.update(LRA_FAULT=fault, LRA_FAULT_DIR=str(tmp_path), LRA_FAULT_NAMES=names)
    given = {a.partition("=")[0] for a in args}
    base = [a for a in RUN if a.partition("=")[0] not in given]
    flags = [a for a in args if a.startswith("-")]
    return subprocess.run([sys.executable, "-m", "lra.run", *flags, *base,
                           *(a for a in args if not a.startswith("-"))], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_sweep_on_a_full_disk_goes_on_and_says_which_files(tmp_path):
    sweep = tmp_path / "sweep"
    out = _cli(tmp_path, "-m", "model=linear,local", f"hydra.sweep.dir={sweep}", "fresh_process=false",
               fault="enospc",
               names="result.json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    # Both points trained and said where their row could not go; neither left a row.
    for model in ("linear", "local"):
        (run_dir,) = (sweep / "listops" / model).iterdir()
        assert f"cannot write {run_dir / 'result.json'}: no space left on device" in out.stderr
        assert not (run_dir / "result.json").exists()
    assert "2 points: 2 missing" in out.stdout


def test_a_read_only_tree_skips_its_finished_run_and_refuses_the_rest_in_one_line(tmp_path):
    run_dir = tmp_path / "runs" / "done"
    first = _cli(tmp_path, f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    row = (run_dir / "result.json").read_text()

    skipped = _cli(tmp_path, f"hydra.run.dir={run_dir}", fault="erofs")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert f"skipped: {run_dir} already has a result with status 'ok'" in skipped.stdout
    assert (run_dir / "result.json").read_text() == row

    for args in ([f"hydra.run.dir={run_dir}", "skip_done=false"],
                 [f"hydra.run.dir={tmp_path / 'runs' / 'new'}"]):
        refused = _cli(tmp_path, *args, fault="erofs")
        assert refused.returncode == 1
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "read-only file system; make it writable" in errors[0]
        assert "Traceback" not in refused.stderr
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"
    assert not (tmp_path / "runs" / "new").exists()
    # Another config's row there cannot be set aside: refused, never "skipped: already ok".
    other = _cli(tmp_path, f"hydra.run.dir={run_dir}", "model=local", fault="erofs")
    assert other.returncode == 1 and "skipped" not in other.stdout
    assert "its result.json was made with another configuration" in other.stderr


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_an_empty_output_dir_is_refused(tmp_path, key):
    out = _cli(tmp_path, *(["-m"] if "sweep" in key else []), f"{key}=")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {key} is empty; give a directory ({key}=DIR) or leave it at its default")
    assert not any(tmp_path.iterdir())
