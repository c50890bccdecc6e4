"""Issue 14 hardening: concurrent cache writers, report robustness, start-up range checks."""

from __future__ import annotations

import threading

import numpy as np

from lra.tasks.base import save_npz


def test_concurrent_cache_writers_never_clobber_each_other(tmp_path):
    # Before: fixed temp names ("x.tmp.npz") let one writer rename another's half-written file
    # (31 FileNotFoundErrors and 4 partial reads in 80 writes).
    path = tmp_path / "cache.L512.npz"
    errors, reads = [], []
    size = 200_000

    def writer(value: int) -> None:
        for _ in range(20):
            try:
                save_npz(path, inputs=np.full(size, value, np.int32))
                with np.load(path) as f:
                    arr = f["inputs"]
                    reads.append(arr.shape == (size,) and len(set(np.unique(arr))) == 1)
            except Exception as err:  # noqa: BLE001 - any failure is the bug
                errors.append(repr(err))

    threads = [threading.Thread(target=writer, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(reads) == 80 and all(reads)  # every read saw one whole file
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


def test_report_survives_corrupt_metrics_and_slashes_in_names(tmp_path, capsys):
    import json

    import pytest

    from lra.report import build_report
    from lra.results import RunResult, write_result

    for i, (task, model) in enumerate((("listops", "transformer"), ("my/task", "mine/v2"))):
        run = tmp_path / "runs" / f"r{i}"
        write_result(RunResult(task=task, model=model, seq_len=64, seed=0, preset="tiny",
                               status="ok", test_accuracy=0.5, val_accuracy=0.5, steps=20), run)
        good = json.dumps({"step": 10, "val_accuracy": 0.4}) + "\n"
        (run / "metrics.jsonl").write_bytes(
            good.encode() + b'{"step": 20, "val_acc\n' + b"\xff\xfe not json\n" + b"[1, 2]\n"
            + json.dumps({"step": 20, "val_accuracy": 0.5}).encode() + b"\n")
    out = tmp_path / "report"
    with pytest.warns(UserWarning, match="skipped 3 unreadable line"):
        report = build_report([str(tmp_path / "runs")], out)
    assert "and 6 unreadable metrics line(s)" in capsys.readouterr().out
    # Every figure is a file directly in the output directory, names slugified.
    assert report["figures"] and all(p.parent == out and p.is_file() for p in report["figures"])
    assert any("my_task" in p.name for p in report["figures"])


def test_out_of_range_values_and_added_keys_fail_at_start_up_without_a_row(tmp_path, capsys):
    # One process checks many inputs (each `lra.run` start-up is a few seconds): the same
    # function lra.run calls before Hydra creates a run directory.
    import pytest

    from lra import cli

    cli.setup()
    bad = {
        "train.steps=0": "train.steps=0 is out of range: use an integer >= 1",
        "train.steps=-3": "train.steps=-3 is out of range",
        "task.seq_len=0": "task.seq_len=0 is out of range",
        "train.batch_size=0": "train.batch_size=0 is out of range",
        "train.eval_every=0": "train.eval_every=0 is out of range",
        "model.dropout=1.5": "model.dropout=1.5 is out of range: use in [0, 1)",
        "model.attention.dropout=-0.1": "model.attention.dropout=-0.1 is out of range",
        "train.lr=0": "train.lr=0.0 is out of range: use a number > 0",
        "train.checkpoint_every=-2": "train.checkpoint_every=-2 is out of range",
        "+train.stepz=5": "'+train.stepz': configs are fixed schemas",
        "+foo=1": "'+foo': configs are fixed schemas",
    }
    for override, message in bad.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.check_overrides([override, f"hydra.run.dir={tmp_path / 'run'}"])
        assert exit_info.value.code == 2, override
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (override, err)
    # A sweep is checked value by value.
    with pytest.raises(SystemExit):
        cli.check_overrides(["-m", "train.lr=1e-3,-1"])
    cli.check_overrides(["-m", "train.lr=1e-3,3e-3", "train.steps=1"])  # fine: no exit
    # A bench sweep over models with one bench.out_dir would overwrite its points: refused.
    cli.check_bench_out_dir(["-m", "model=transformer,flash", "bench.seq_lens=[64,128]"])
    cli.check_bench_out_dir(["model=transformer", f"bench.out_dir={tmp_path}"])
    with pytest.raises(SystemExit):
        cli.check_bench_out_dir(["-m", "model=transformer,flash", f"bench.out_dir={tmp_path}"])
    assert "hydra.sweep.dir" in capsys.readouterr().err
    # A list value is one value, not a sweep (the README's bench sweep); each swept list is checked.
    cli.check_overrides(["-m", "model=transformer,flash", "eval.seq_lens=[64,128]"])
    with pytest.raises(SystemExit):
        cli.check_overrides(["-m", "eval.seq_lens=[64,128],[x]"])
    assert "eval.seq_lens=[x]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_range_error_messages_name_the_key_and_range(capsys):
    import pytest

    from lra import cli

    cli.setup()
    with pytest.raises(SystemExit):
        cli.check_overrides(["train.steps=0", "model.dropout=2"])
    line = capsys.readouterr().err.strip()
    assert line == ("error: train.steps=0 is out of range: use an integer >= 1 (and 1 more)")
    # 0 = the whole split where the task's own default says so (released data), else out of range.
    for released in ("text", "image", "retrieval"):
        cli.check_overrides([f"task={released}", "task.num_val=0"])  # no exit
        cli.check_overrides([f"task={released}"], config_name="bench")  # the README's bench rows
    with pytest.raises(SystemExit):
        cli.check_overrides(["task=copy", "task.num_train=0"])
    assert "task.num_train=0 is out of range" in capsys.readouterr().err


def test_run_cli_rejects_a_bad_value_without_a_row(tmp_path):
    from conftest import run_cli

    proc = run_cli("lra.run", "train.steps=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: train.steps=0 is out of range: use an integer >= 1")
    assert not (tmp_path / "run").exists()


def test_non_finite_float_values_fail_at_start_up_without_a_row(tmp_path, capsys):
    # inf passed every `v > 0` / `v >= 0` range check (nan failed them with a misleading reason).
    import pytest

    from lra import cli

    cli.setup()
    bad = {
        "train.lr=inf": "train.lr=inf is out of range: use a number > 0 (finite: not inf or nan)",
        "train.lr=nan": "train.lr=nan is out of range: use a number > 0 (finite",
        "train.lr=-inf": "train.lr=-inf is out of range: use a number > 0 (finite",
        "train.ssm_lr=inf": "train.ssm_lr=inf is out of range: use a number > 0 (finite",
        "train.eps=inf": "train.eps=inf is out of range",
        "train.weight_decay=inf": "train.weight_decay=inf is out of range: use a number >= 0 (finite",
        "train.grad_clip=nan": "train.grad_clip=nan is out of range: use a number >= 0 (finite",
        "train.max_time_s=inf": "train.max_time_s=inf is out of range",
        "train.min_delta=inf": "train.min_delta=inf is out of range",
        "train.solve_at=nan": "train.solve_at=nan is out of range: use an accuracy in (0, 1] (finite",
        "model.dropout=nan": "model.dropout=nan is out of range: use in [0, 1) (finite",
    }
    for override, message in bad.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.check_overrides([override, f"hydra.run.dir={tmp_path / 'run'}"])
        assert exit_info.value.code == 2, override
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (override, err)
    with pytest.raises(SystemExit) as exit_info:  # each swept value is checked
        cli.check_overrides(["-m", "train.lr=1e-3,inf"])
    assert exit_info.value.code == 2 and "train.lr=inf is out of range" in capsys.readouterr().err
    cli.check_overrides(["train.lr=1e300", "train.weight_decay=0", "train.grad_clip=0"])  # finite
    assert not (tmp_path / "run").exists()


def test_run_cli_rejects_an_infinite_lr_without_a_row(tmp_path):
    from conftest import run_cli

    proc = run_cli("lra.run", "train.lr=inf", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: train.lr=inf is out of range: use a number > 0 (finite: not inf or nan)")
    assert not (tmp_path / "run").exists()


def _listops_tsv(path, rows):
    path.write_bytes(b"Source\tTarget\n" + b"".join(r + b"\n" for r in rows))


def test_listops_reader_rejects_bad_labels_empty_and_non_utf8(tmp_path):
    import pytest

    from lra.tasks.base import DataError
    from lra.tasks.listops import read_tsv

    good = b"( [MAX 2 9 ] )\t9"
    cases = {
        "neg.tsv": ([good, b"( [MIN 3 1 ] )\t-1"], r"neg.tsv:3: label -1 outside 0-9"),
        "big.tsv": ([b"( [MIN 3 1 ] )\t42"], r"big.tsv:2: label 42 outside 0-9"),
        "empty.tsv": ([], r"empty.tsv: no examples after the header"),
        "latin1.tsv": ([good, b"( [MAX 2 \xe9 ] )\t9"], r"latin1.tsv: not UTF-8 text"),
    }
    for name, (rows, message) in cases.items():
        _listops_tsv(tmp_path / name, rows)
        with pytest.raises(DataError, match=message):
            read_tsv(tmp_path / name)


def test_every_task_checks_targets_against_its_classes():
    import numpy as np
    import pytest

    from lra.tasks.base import ArrayTask, DataError, TaskSpec

    class Fake(ArrayTask):
        def __init__(self, data):
            super().__init__(cfg=None)
            self.data = data

        @property
        def spec(self):
            return TaskSpec("fake", vocab_size=5, num_classes=3, seq_len=4, kind="classify")

        def load_split(self, split):
            return self.data

    inputs = np.ones((2, 4), np.int32)
    with pytest.raises(DataError, match=r"fake train split: 1 target\(s\) outside \[0, 3\), e.g. -1"):
        Fake({"inputs": inputs, "targets": np.array([0, -1])}).split("train")
    with pytest.raises(DataError, match="fake val split is empty"):
        Fake({"inputs": inputs[:0], "targets": np.array([], np.int32)}).split("val")
    # Per-token tasks: unweighted (padding) positions may hold anything.
    tokens = {"inputs": inputs, "targets": np.array([[0, 2, 9, 9]] * 2),
              "weights": np.array([[1, 1, 0, 0]] * 2, np.float32)}
    assert Fake(tokens).split("train") is tokens


# ---------------------------------------------------------------- item 3: what killed a point


def test_a_signal_death_is_oom_only_with_the_kernels_evidence():
    import signal

    from lra.sweep.launch import death_status as death_row

    counter = "/sys/fs/cgroup/memory.events"
    status, why = death_row(-signal.SIGKILL, [], (counter, 3), (counter, 4))
    assert status == "oom" and "oom_kill 3 -> 4" in why
    status, why = death_row(-signal.SIGKILL, [], (counter, 3), (counter, 3))  # before: always oom
    assert status == "killed" and "SIGKILL" in why and "resumes it" in why
    assert death_row(128 + signal.SIGKILL, [], None, None)[0] == "killed"  # no counter readable
    assert death_row(-signal.SIGSEGV, [], None, None)[0] == "killed"
    assert death_row(1, [], None, None)[0] == "error"
    # An XLA abort on allocation failure: the point's own log is the evidence.
    aborted = death_row(-signal.SIGABRT, [], None, None, "F0101 ... RESOURCE_EXHAUSTED: Out of memory")
    assert aborted[0] == "oom" and "RESOURCE_EXHAUSTED" in aborted[1]
    assert death_row(-signal.SIGTERM, [signal.SIGTERM], None, None)[0] == "interrupted"


def test_oom_kill_count_reads_a_kernel_counter():
    from lra.sweep.launch import oom_kill_count

    found = oom_kill_count()  # Linux: the cgroup's or /proc/vmstat's oom_kill line
    assert found is not None and found[1] >= 0 and "oom" in found[0] or "vmstat" in found[0]


def test_which_rows_a_rerun_skips(tmp_path):
    import json

    from lra.run import finished_result

    def row(**fields):
        (tmp_path / "result.json").write_text(json.dumps(fields))
        return finished_result(tmp_path)

    for status in ("ok", "diverged", "oom"):
        assert row(status=status) == status
    assert row(status="timeout", time_limit="train.max_time_s") == "timeout"  # the run's budget
    assert row(status="timeout", time_limit="point_timeout_s") is None  # one attempt's cap
    assert row(status="timeout", error="the point ran past point_timeout_s=10: ...") is None
    for status in ("killed", "interrupted", "error"):
        assert row(status=status) is None
    (tmp_path / "result.json").write_text("{half a fi")
    assert finished_result(tmp_path) is None


# ---------------------------------------------------------------- item 4: one run per directory


def test_run_dir_lock_is_exclusive_and_names_its_holder(tmp_path):
    import os

    from lra.results import RunDirLock

    first, second = RunDirLock(tmp_path), RunDirLock(tmp_path)
    assert first.acquire() is None
    assert second.acquire() == f"pid {os.getpid()}"  # flock: per open file, even in one process
    first.release()
    assert second.acquire() is None
    second.release()


def test_a_second_run_in_a_held_directory_exits_and_writes_no_row(tmp_path):
    import os

    from conftest import run_cli
    from lra.results import RunDirLock

    run_dir = tmp_path / "run"
    held = RunDirLock(run_dir)
    assert held.acquire() is None  # this test process plays the first run
    try:
        args = ("model=transformer", "task=listops", "preset=tiny", "train.steps=2",
                "train.progress=false")
        holders = run_dir / ".hydra"
        holders.mkdir(parents=True)
        (holders / "config.yaml").write_text("the holder's config\n")
        proc = run_cli("lra.run", *args, f"hydra.run.dir={run_dir}")
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1] == (
            f"error: {run_dir} is being run by another process (pid {os.getpid()}); wait for it "
            f"or stop it, or give this run another directory (hydra.run.dir=DIR)")
        assert not (run_dir / "result.json").exists()
        # Nor its config: Hydra's .hydra/ copy came before the lock (the run writes its own).
        assert sorted(p.name for p in holders.iterdir()) == ["config.yaml"]
        assert (holders / "config.yaml").read_text() == "the holder's config\n"
        # An overlapping sweep skips the held point and runs the free one.
        from lra.cli import tag

        sweep = tmp_path / "sweep"
        point = sweep / f"listops/transformer/L512-tiny-s0-{tag(['train.steps=2'])}"
        other = RunDirLock(point)
        assert other.acquire() is None
        try:
            proc = run_cli("lra.run", "-m", *args, "seed=0,1", f"hydra.sweep.dir={sweep}")
        finally:
            other.release()
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"skipped: {point} is being run by another process (pid {os.getpid()})" in proc.stdout
        assert not (point / "result.json").exists()
        assert (sweep / f"listops/transformer/L512-tiny-s1-{tag(['train.steps=2'])}/result.json").is_file()
        # The sweep's record and table say who has the held point, not that it is missing.
        import yaml

        (record,) = (sweep / "sweeps").glob("*.yaml")
        points = {p["seed"] if "seed" in p else "held": p
                  for p in yaml.safe_load(record.read_text())["points"]}
        assert points["held"]["status"] == "held"
        assert points["held"]["error"] == f"held by another process (pid {os.getpid()})"
        assert points[1]["status"] == "ok"
        assert "2 points: 1 ok, 1 held" in proc.stdout
    finally:
        held.release()


# ---------------------------------------------------------------- item 6: checkpoint fallback


def _three_checkpoints(directory):
    import jax.numpy as jnp

    from lra.train.checkpoint import Checkpointer

    template = {"w": jnp.arange(4.0)}
    ckpt = Checkpointer(directory, 10, 5, "fp")
    for step in (10, 20, 30):
        ckpt.save(step, {"w": template["w"] + step}, {"curve": [], "step": step})
    ckpt.close()
    return template


def _restore(directory, template):
    from lra.train.checkpoint import Checkpointer

    ckpt = Checkpointer(directory, 10, 5, "fp")
    try:
        return ckpt.restore(template)
    finally:
        ckpt.close()


def test_restore_falls_back_to_the_newest_readable_step(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    template = _three_checkpoints(directory)
    (directory / "70").mkdir()  # an empty step directory (before: KeyError 'meta', forever)
    (directory / "30" / "meta" / "metadata").write_text("{half")  # a corrupt record
    restored = _restore(directory, template)
    assert restored.step == 20 and float(restored.arrays["w"][0]) == 20.0
    assert "fell back to step 20" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints-invalid").iterdir()) == ["30", "70"]
    assert _restore(directory, template).step == 20  # set aside: the next start goes straight there


def test_restore_with_no_readable_step_names_the_directory_and_the_fix(tmp_path):
    import shutil

    import pytest

    from lra.train.checkpoint import CheckpointError

    directory = tmp_path / "checkpoints"
    template = _three_checkpoints(directory)
    for step in (10, 20, 30):
        shutil.rmtree(directory / str(step) / "arrays" / "d")  # the array data of every step
    with pytest.raises(CheckpointError) as err:
        _restore(directory, template)
    message = str(err.value)
    assert "\n" not in message and str(directory) in message and "train.resume=false" in message
    assert message.startswith(f"no readable checkpoint in {directory} (step(s) 30, 20, 10;")


def test_a_rerun_resumes_past_a_corrupt_last_checkpoint(tmp_path):
    import json

    from conftest import run_cli

    run_dir = tmp_path / "run"
    args = ("model=transformer", "task=listops", "preset=tiny", "train.steps=20",
            "train.checkpoint_every=10", "train.eval_every=10", "train.progress=false",
            f"hydra.run.dir={run_dir}")
    proc = run_cli("lra.run", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole = json.loads((run_dir / "result.json").read_text())
    # As if killed after the step-20 save started but its files are damaged.
    (run_dir / "result.json").write_text(json.dumps({**whole, "status": "killed"}))
    for f in (run_dir / "checkpoints" / "20" / "arrays" / "d").iterdir():
        f.write_bytes(b"\0")
    proc = run_cli("lra.run", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((run_dir / "result.json").read_text())
    assert "fell back to step 10" in proc.stdout + proc.stderr
    assert again["status"] == "ok" and again["resumed_from_step"] == 10
    assert again["test_accuracy"] == whole["test_accuracy"]  # bit-identical continuation


# ---------------------------------------------------------------- item 11: tables carry raw strings


def test_markdown_and_csv_tables_neutralise_html_pipes_and_formulas(tmp_path):
    import pandas as pd

    from lra.report import render, tables

    table = pd.DataFrame({"acc": ["=HYPERLINK(\"x\")", "-", "-3.5", "a|b <b>x</b>"]},
                         index=pd.Index(["<script>m</script>", "@m", "+m", "m"], name="model"))
    markdown = render.write_table(table, tmp_path, "t", "caption")
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown and "a\\|b" in markdown
    csv = pd.read_csv(tmp_path / "t.csv", index_col=0, dtype=str)
    assert list(csv["acc"]) == ["'=HYPERLINK(\"x\")", "-", "-3.5", "a|b <b>x</b>"]
    assert list(csv.index) == ["<script>m</script>", "'@m", "'+m", "m"]


def test_attention_kind_must_be_registered_and_match_the_model(capsys):
    # Before: both started a run and ended `error` (ValueError / AttributeError on DenseConfig).
    import pytest

    from lra import cli

    cli.setup()
    for args, message in [
        (["model=transformer", "model.attention.kind=myattn"], "unknown model.attention.kind 'myattn'"),
        (["model=transformer", "model.attention.kind=performer"],
         "model.attention.kind=performer does not match model=transformer"),
        (["-m", "model=transformer", "model.attention.kind=dense,performer"],
         "model.attention.kind=performer does not match model=transformer"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.check_overrides(args)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")
    cli.check_overrides(["model=performer", "model.attention.kind=performer"])  # its own kind


def test_a_process_that_measured_a_point_before_records_no_peak(monkeypatch):
    """A pool worker's second point read 'peak=592 KiB' (its RSS held the first point's pages):
    from the second measurement on, a process records no peak rather than a wrong one."""
    import numpy as np

    from lra.train.measure import PeakMemory

    monkeypatch.setattr(PeakMemory, "measured", 0)
    first = PeakMemory()
    first.start()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
    assert first.source == "process_rss" and first.read() >= 32 * 2**20
    del block
    second = PeakMemory()
    second.start()
    assert second.read() is None and second.source == "reused_process"


def test_a_suite_started_with_sigint_ignored_still_stops_on_sigint(tmp_path):
    """`lra.suite ... &` from a script: SIGINT arrives ignored (SIG_IGN is inherited, and Python
    keeps it), so kill -INT did nothing and the suite ran on. The entry points take Ctrl-C's
    default back (lra.run and lra.bench handle SIGINT themselves while training)."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lra.suite", "preset=tiny", "models=[linear]", "tasks=[listops]",
         "bench=false", "locality=false", f"out={tmp_path}"], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    for line in proc.stdout:
        if line.strip().startswith("total"):
            break
    while not list(tmp_path.glob("logs/*.log")):  # its first step has started
        proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:]
    assert "[suite] stopped; points so far are kept" in out
