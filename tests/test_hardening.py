"""Issue 14 hardening: concurrent cache writers, report robustness, start-up range checks."""

from __future__ import annotations

import threading

import numpy as np

from tasks.base import save_npz


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
    assert not (tmp_path / "run").exists()


def test_range_error_messages_name_the_key_and_range(capsys):
    import pytest

    from lra import cli

    cli.setup()
    with pytest.raises(SystemExit):
        cli.check_overrides(["train.steps=0", "model.dropout=2"])
    line = capsys.readouterr().err.strip()
    assert line == ("error: train.steps=0 is out of range: use an integer >= 1 (and 1 more)")


def test_run_cli_rejects_a_bad_value_without_a_row(tmp_path):
    from conftest import run_cli

    proc = run_cli("lra.run", "train.steps=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: train.steps=0 is out of range: use an integer >= 1")
    assert not (tmp_path / "run").exists()


def _listops_tsv(path, rows):
    path.write_bytes(b"Source\tTarget\n" + b"".join(r + b"\n" for r in rows))


def test_listops_reader_rejects_bad_labels_empty_and_non_utf8(tmp_path):
    import pytest

    from tasks.base import DataError
    from tasks.listops import read_tsv

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

    from tasks.base import ArrayTask, DataError, TaskSpec

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
