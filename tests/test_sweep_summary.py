"""A sweep's own record (<sweep dir>/sweeps/*.yaml) and its closing table of points
(lra.sweep.callbacks.SweepSummary): a real sweep with the basic launcher, then joblib, and the
callback driven directly over fake result.json rows."""

from __future__ import annotations

import os
import re

import yaml
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from conftest import run_cli
from lra.sweep.callbacks import SweepSummary
from lra.results import RunResult, write_result


def table_rows(stdout: str) -> list[list[str]]:
    """The rows of the table a sweep printed last (header excluded), split into cells."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("task ") and "status" in line)
    end = next(i for i in range(start, len(lines)) if re.match(r"\d+ points?: ", lines[i]))
    return [re.split(r"\s{2,}", line.strip()) for line in lines[start + 1:end]]


def test_two_sweeps_print_their_points_and_keep_two_records(tmp_path):
    args = ["-m", "model=transformer,local", "task=listops", "preset=tiny", "task.seq_len=32",
            "train.steps=3", "train.eval_every=3", "train.log_every=3", "train.progress=false",
            "train.checkpoint_every=-1", "fresh_process=false", f"hydra.sweep.dir={tmp_path}"]
    first = run_cli("lra.run", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = table_rows(first.stdout)
    assert sorted(r[1] for r in rows) == ["local", "transformer"]
    assert all(r[0] == "listops" and r[2] == "32" and r[3] == "0" and r[4] == "ok" for r in rows)
    assert "2 points: 2 ok" in first.stdout
    records = sorted((tmp_path / "sweeps").glob("*.yaml"))
    assert len(records) == 1 and f"record: {records[0]}" in first.stdout
    record = yaml.safe_load(records[0].read_text())
    assert record["end"] and record["counts"] == {"ok": 2}
    assert "model=transformer,local" in record["overrides"]
    for point in record["points"]:  # each names its run dir, whose row says the same
        row = yaml.safe_load((tmp_path / point["dir"] / "result.json").read_text())
        assert (point["status"], point["model"]) == (row["status"], row["model"])
        assert f"model={row['model']}" in point["overrides"] and "kept" not in point
    # The same sweep again through joblib (jobs in worker processes): its own record, and both
    # points kept by skip_done; the first record is untouched and multirun.yaml is just the last.
    before = records[0].read_text()
    second = run_cli("lra.run", *args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert second.returncode == 0, second.stderr[-3000:]
    records = sorted((tmp_path / "sweeps").glob("*.yaml"))
    assert len(records) == 2 and records[0].read_text() == before
    again = yaml.safe_load(next(r for r in records if r.read_text() != before).read_text())
    assert sorted(p["model"] for p in again["points"]) == ["local", "transformer"]
    assert all(p["kept"] and p["status"] == "ok" for p in again["points"])
    assert sorted(r[4] for r in table_rows(second.stdout)) == ["ok (kept)", "ok (kept)"]
    assert "2 points: 2 ok (2 kept" in second.stdout
    assert "hydra/launcher=joblib" in (tmp_path / "multirun.yaml").read_text()


# ---------------------------------------------------------------- the callback on fake rows


def job_config(sweep, out, num, overrides, config_name="config", **extra):
    hydra = {"sweep": {"dir": str(sweep)}, "runtime": {"output_dir": str(out)},
             "job": {"num": num, "config_name": config_name}, "overrides": {"task": overrides}}
    return OmegaConf.create({"hydra": hydra, **extra})


def run_job(callback, sweep, out, num, overrides, status=JobStatus.COMPLETED, value=None,
            write=None, **extra):
    """One job as Hydra's run_job drives the callback; `write(out)` plays the job's work."""
    config = job_config(sweep, out, num, overrides, **extra)
    callback.on_job_start(config)
    if write is not None:
        write(out)
    callback.on_job_end(config, JobReturn(overrides=overrides, status=status, _return_value=value))


def row(model, status="ok", acc=0.5, seq_len=512, **fields):
    return RunResult(task="listops", model=model, seq_len=seq_len, seed=0, preset="tiny",
                     status=status, test_accuracy=acc, steps_per_s=2.0,
                     peak_memory_bytes=3 * 2**20, **fields)


def test_the_table_counts_statuses_and_names_only_the_overrides_that_differ(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    callback = SweepSummary()
    callback.on_multirun_start(job_config(sweep, sweep, 0, ["train.lr=1e-3,2e-3", "seed=0"]))
    jobs = [("a", "error", None, "train.lr=2e-3"), ("b", "oom", None, "train.lr=1e-3"),
            ("c", "ok", 0.25, "train.lr=2e-3")]
    for num, (name, status, acc, lr) in enumerate(jobs):
        result = row("transformer", status, acc, error=None if status == "ok" else f"{status}!")
        run_job(callback, sweep, sweep / name, num, ["model=transformer", lr, "seed=0"],
                write=lambda out, r=result: write_result(r, out))
    # A job that raised before writing a row is a point too, with the exception's message.
    run_job(callback, sweep, sweep / "d", 3, ["model=transformer", "train.lr=1e-3", "seed=0"],
            JobStatus.FAILED, ValueError("bad\nthing"))
    # Mid-sweep (or after a kill) the record already parses, with the points done so far.
    record_path = next((sweep / "sweeps").glob("*.yaml"))
    partial = yaml.safe_load(record_path.read_text())
    assert partial["end"] is None and len(partial["points"]) == 4
    callback.on_multirun_end(job_config(sweep, sweep, 0, []))
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [r[1] for r in rows] == ["transformer train.lr=2e-3", "transformer train.lr=1e-3",
                                    "transformer train.lr=2e-3", "- train.lr=1e-3"]
    assert [r[4] for r in rows] == ["error", "oom", "ok", "error"]
    assert rows[2][5:] == ["25.00", "2", "3"] and rows[0][5] == "-"  # acc %, steps/s, MiB
    assert "4 points: 1 ok, 1 oom, 2 error" in out  # Status order, not the jobs' order
    record = yaml.safe_load(record_path.read_text())
    assert record["counts"] == {"ok": 1, "oom": 1, "error": 2} and record["end"]
    assert [p["dir"] for p in record["points"]] == ["a", "b", "c", "d"]
    assert record["points"][0]["error"] == "error!"
    assert record["points"][3]["error"] == "ValueError: bad thing"


def test_bench_jobs_record_the_lengths_they_measured_and_a_kept_run_is_marked(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    callback = SweepSummary()
    callback.on_multirun_start(job_config(sweep, sweep, 0, ["model=transformer"]))
    stale = sweep / "bench_model" / "L64-b2"
    write_result(row("transformer", seq_len=64), stale)  # an earlier bench's length
    os.utime(stale / "result.json", (1_000_000_000, 1_000_000_000))

    def bench(out):
        for seq_len in (2048, 256):
            write_result(row("transformer", acc=None, seq_len=seq_len, kind="bench"),
                         out / f"L{seq_len}-b2")

    run_job(callback, sweep, sweep / "bench_model", 0, ["model=transformer"], write=bench,
            config_name="bench", bench={"out_dir": "", "batch_size": 2})
    kept = sweep / "kept"
    write_result(row("local"), kept)
    os.utime(kept / "result.json", (1_000_000_000, 1_000_000_000))
    run_job(callback, sweep, kept, 1, ["model=local"])
    callback.on_multirun_end(job_config(sweep, sweep, 0, []))
    rows = table_rows(capsys.readouterr().out)
    assert [(r[1], r[2], r[4]) for r in rows] == [("transformer", "256", "ok"),
                                                  ("transformer", "2048", "ok"),
                                                  ("local", "512", "ok (kept)")]


def test_a_plain_run_writes_no_record(tmp_path):
    callback = SweepSummary()
    run_job(callback, tmp_path, tmp_path / "run", 0, [],
            write=lambda out: write_result(row("transformer"), out))
    callback.on_run_end(job_config(tmp_path, tmp_path / "run", 0, []))
    assert not (tmp_path / "sweeps").exists()
