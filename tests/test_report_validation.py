"""Issue 32 items 3 and 4: result.json rows are validated on read (lra.schema.check_row,
ROW_SCHEMA): a bad row is skipped with its reason, never raised, and the good rows beside it give
the same tables; every text the report writes to a CSV is neutralised (lra.report.render.csv_safe)."""

from __future__ import annotations

import csv
import dataclasses
import json
import typing
from pathlib import Path

import pandas as pd
import pytest

from lra.report import render, tables
from lra.report import build_report, main
from lra.results import RunResult, load_results, read_rows, skipped_text
from lra.schema import ROW_REQUIRED, ROW_SCHEMA, check_row


def good(**fields) -> dict:
    """A whole row as lra.run writes it (RunResult's every key), `fields` replaced."""
    seed = fields["seed"] if isinstance(fields.get("seed"), int) else 0
    row = RunResult(task="listops", model="transformer", seq_len=512, seed=seed, preset="small",
                    test_accuracy=0.40, val_accuracy=0.41, best_step=20, steps=20, batch_size=8,
                    train_loss=0.9, train_accuracy=0.5, train_time_s=3.0, wall_time_s=9.0,
                    steps_per_s=2.0, peak_memory_bytes=2**20, memory_source="process_rss",
                    param_count=1000, param_ratio=1.0, num_devices=1, env={"jax": "0.4"},
                    config={"seed": seed, "preset": "small", "model": {"pos": "learned"}})
    return {**dataclasses.asdict(row), **fields}


def write_row(directory: Path, text: str | bytes) -> Path:
    directory.mkdir(parents=True)
    path = directory / "result.json"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def good_tree(root: Path) -> None:
    for model, accs, params in (("transformer", (0.40, 0.44), 1000),
                                ("bigbird", (0.50, 0.52), 1050)):
        for seed, acc in enumerate(accs):
            row = good(model=model, seed=seed, test_accuracy=acc, param_count=params,
                       param_ratio=params / 1000, steps_per_s=2.0 + len(model) / 10)
            write_row(root / f"{model}-s{seed}", json.dumps(row))


def bad(**fields) -> str:
    """A row of seed 7 (a cell it would change, were it read) with `fields` replaced."""
    return json.dumps(good(**{"seed": 7, "test_accuracy": 0.99, **fields}))


def without(key: str) -> str:
    row = good(seed=7, test_accuracy=0.99)
    del row[key]
    return json.dumps(row)


def nested(levels: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(levels):
        value = {"a": value}
    return value


# case -> (file text, what the reason says)
CASES = {
    "task_missing": (without("task"), "missing task"),
    "task_null": (bad(task=None), "task is null"),
    "model_empty": (bad(model=" "), "model is empty"),
    "seq_len_missing": (without("seq_len"), "missing seq_len"),
    "seq_len_text": (bad(seq_len="long"), "seq_len 'long' is not an int"),
    "seq_len_number_as_text": (bad(seq_len="512"), "seq_len '512' is not an int"),
    "seq_len_zero": (bad(seq_len=0), "seq_len 0 is outside >= 1"),
    "seq_len_float": (bad(seq_len=512.0), "seq_len 512.0 is not an int"),
    "seed_missing": (without("seed"), "missing seed"),
    "seed_bool": (bad(seed=True), "seed True is not an int"),
    "status_missing": (without("status"), "missing status"),
    "status_unknown": (bad(status="great"), "status 'great' is not one of ok, diverged, oom"),
    "test_accuracy_7.5": (bad(test_accuracy=7.5), "test_accuracy 7.5 is outside [0, 1]"),
    "val_accuracy_negative": (bad(val_accuracy=-0.1), "val_accuracy -0.1 is outside [0, 1]"),
    "test_accuracy_nan_literal": (bad(test_accuracy=float("nan")),
                                  "test_accuracy nan is not finite"),
    "steps_per_s_infinity_literal": (bad(steps_per_s=float("inf")),
                                     "steps_per_s inf is not finite"),
    "test_accuracy_overflows_to_inf": (bad(test_accuracy=0.99).replace('"test_accuracy": 0.99',
                                                                       '"test_accuracy": 1e999'),
                                       "test_accuracy inf is not finite"),
    "train_loss_nan_on_an_ok_row": (bad(train_loss=float("nan")), "train_loss nan is not finite"),
    "test_accuracy_list": (bad(test_accuracy=[0.5]), "test_accuracy [0.5] is not a number"),
    "peak_memory_list": (bad(peak_memory_bytes=[1, 2]), "peak_memory_bytes [1, 2] is not an int"),
    "param_count_bool": (bad(param_count=True), "param_count True is not an int"),
    "steps_per_s_text": (bad(steps_per_s="fast"), "steps_per_s 'fast' is not a number"),
    "train_time_negative": (bad(train_time_s=-1.0), "train_time_s -1.0 is outside >= 0"),
    "memory_negative": (bad(peak_memory_bytes=-5), "peak_memory_bytes -5 is outside >= 0"),
    "batch_size_zero": (bad(batch_size=0), "batch_size 0 is outside >= 1"),
    "env_list": (bad(env=["jax"]), "env is a list, not an object"),
    "config_text": (bad(config="lr=1"), "config is a str, not an object"),
    "config_null": (bad(config=None), "config is null"),
    "eval_lengths_accuracy": (bad(eval_lengths={"1024": {"status": "ok", "test_accuracy": 3.0}}),
                              "eval_lengths 1024 test_accuracy 3.0 is outside [0, 1]"),
    "eval_lengths_key": (bad(eval_lengths={"long": {"status": "ok"}}),
                         "eval_lengths 'long' is not a length"),
    "nested_100000_lists": ("[" * 100_000 + "]" * 100_000, "unreadable: JSON nested too deeply"),
    "nested_config": (bad(config=nested(200)), "nested deeper than 32 levels"),
    "huge_integer": ('{"seq_len": 1' + "0" * 5000 + "}", "not JSON"),
    "a_list_not_a_row": ("[1, 2]", "not a result row: a JSON list"),
    "not_utf8": (b'{"task": "\xff\xfe"}', "unreadable: not UTF-8"),
    "empty": ("", "empty file"),
    "half_written": (bad()[:40], "not JSON"),
}


def report_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {"accuracy": tables.accuracy_table(df), "params": tables.params_table(df),
            "efficiency": tables.efficiency_table(df), "seq_len": tables.seq_len_table(df),
            "steps": tables.steps_table(df), "flops": tables.flops_table(df),
            "extrapolation": tables.extrapolation_table(df)}


def assert_same_tables(got: dict, want: dict) -> None:
    for name, table in want.items():
        pd.testing.assert_frame_equal(got[name], table, obj=name)
        assert got[name].attrs.get("bold") == table.attrs.get("bold"), name


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_row_is_skipped_with_its_reason_and_the_good_rows_give_the_same_tables(tmp_path,
                                                                                    case):
    good_tree(tmp_path / "good")
    want = report_tables(load_results(tmp_path / "good", verbose=False))
    text, reason = CASES[case]
    path = write_row(tmp_path / "bad", text)
    df = load_results(tmp_path, verbose=False)  # never raises
    assert len(df) == 4 and set(df["seed"]) == {0, 1}
    assert list(df.attrs["skipped"]) == [str(path)]
    assert reason in df.attrs["skipped"][str(path)], df.attrs["skipped"]
    assert_same_tables(report_tables(df), want)


def test_every_bad_row_at_once_through_the_cli(tmp_path, capsys):
    """`python -m lra.report DIR`: no crash (StopIteration in params_table, ValueError in
    _task_columns, RecursionError before), one line naming the skipped files with reasons, and
    the CSV tables of the good rows unchanged: no 7.5 averaged in as 382.81 ± 519.28, in bold."""
    good_tree(tmp_path / "good" / "runs")
    main([str(tmp_path / "good" / "runs"), "--out", str(tmp_path / "good" / "report")])
    capsys.readouterr()
    good_tree(tmp_path / "mixed" / "runs")
    for case, (text, _) in CASES.items():
        write_row(tmp_path / "mixed" / "runs" / f"bad-{case}", text)
    main([str(tmp_path / "mixed" / "runs"), "--out", str(tmp_path / "mixed" / "report")])
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("skipped")]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"skipped {len(CASES)} result file(s): ")
    assert line.endswith(f" and {len(CASES) - 3} more")  # the first three named, then a count
    first = min(CASES)  # read in path order
    assert f"bad-{first}/result.json ({CASES[first][1]}" in line
    assert f"skipped {len(CASES)} result file(s) and 0 unreadable metrics line(s)" in printed
    for name in ("accuracy", "params", "efficiency", "seq_len", "hyperparameters"):
        assert ((tmp_path / "mixed" / "report" / f"{name}.csv").read_text()
                == (tmp_path / "good" / "report" / f"{name}.csv").read_text()), name
    accuracy = (tmp_path / "mixed" / "report" / "accuracy.md").read_text()
    assert "382.81" not in accuracy and "**42.00 ± 2.83**" not in accuracy
    assert "51.00 ± 1.41" in accuracy


def test_build_report_skips_bad_rows_and_says_so_when_none_is_left(tmp_path):
    write_row(tmp_path / "a", bad(task=None))
    with pytest.raises(SystemExit, match=r"no valid result.json under .*skipped 1 result "
                                         r"file\(s\): .*\(task is null\)"):
        build_report([str(tmp_path)], tmp_path / "out", quiet=True)


def test_a_diverged_runs_nan_loss_is_kept(tmp_path):
    """A NaN / inf loss is what a diverged run reports (lra.train, lra.bench): its row stays."""
    write_row(tmp_path / "div", json.dumps(good(status="diverged", train_loss=float("nan"),
                                                train_accuracy=float("inf"),
                                                test_accuracy=None, val_accuracy=None)))
    write_row(tmp_path / "bench", json.dumps(good(status="diverged", kind="bench", seed=1,
                                                  train_loss=float("-inf"))))
    df = load_results(tmp_path, verbose=False)
    assert list(df["status"]) == ["diverged", "diverged"] and not df.attrs["skipped"]


def test_schema_covers_runresult_and_the_stored_rows_pass():
    hints = typing.get_type_hints(RunResult)
    assert set(ROW_SCHEMA) == set(hints)  # a new field gets a rule
    for name, hint in hints.items():
        assert ROW_SCHEMA[name].null == (type(None) in typing.get_args(hint)), name
    assert check_row(good()) is None and check_row(dataclasses.asdict(
        RunResult(task="copy", model="lstm", seq_len=64, seed=0, preset="tiny"))) is None
    root = Path(__file__).resolve().parents[1] / "results" / "reference"
    for file in sorted(root.glob("*.json")):
        for run in json.loads(file.read_text())["runs"]:
            assert check_row(run["result"]) is None, (file.name, run["path"])


def test_read_rows_asks_only_for_what_its_caller_needs(tmp_path):
    """lra.suite's cost reader reads rows of any shape (model, status, wall time); the report
    asks for ROW_REQUIRED. A present key is checked either way."""
    write_row(tmp_path / "a", json.dumps({"model": "m", "status": "ok", "wall_time_s": 10}))
    write_row(tmp_path / "b", json.dumps({"model": "m", "status": "ok", "wall_time_s": -3}))
    rows, bad_files = read_rows([tmp_path])
    assert [r["wall_time_s"] for r in rows] == [10]
    assert bad_files == {tmp_path / "b" / "result.json": "wall_time_s -3 is outside >= 0"}
    rows, bad_files = read_rows([tmp_path], required=ROW_REQUIRED)
    assert rows == [] and bad_files[tmp_path / "a" / "result.json"] == "missing task, seq_len, seed"


def test_skipped_text_names_the_first_few():
    assert skipped_text({"a": "empty file"}) == "skipped 1 result file(s): a (empty file)"
    many = {f"p{i}": f"why {i}" for i in range(5)}
    assert skipped_text(many) == ("skipped 5 result file(s): p0 (why 0), p1 (why 1), p2 (why 2) "
                                  "and 2 more")


# ------------------------------------------------------------------ item 4: formula injection

FORMULA = "=+-@\t\r"
EVIL_MODELS = ("=cmd|' /C calc'!A0", "@SUM(A1)", "+1+cmd|' /C calc'!A0", "-2+3", "=", " =1+1")


def fields_of(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [field for row in csv.reader(f) for field in row]


def assert_no_formula(path: Path) -> None:
    for field in fields_of(path):
        if field and (field[0] in FORMULA or field.lstrip()[:1] in tuple(FORMULA)):
            assert field == "-" or render.CSV_NUMBER.fullmatch(field), (path.name, field)


def test_no_csv_the_report_writes_starts_a_formula(tmp_path):
    for i, model in enumerate(EVIL_MODELS):
        for seed in (0, 1):
            row = good(model=model, seed=seed, task="+evil", test_accuracy=0.3 + 0.1 * seed,
                       train_loss=-0.5, param_count=1000 + i, param_ratio=1.0,
                       config={"seed": seed, "preset": "small", "model": {"pos": "@pos"}})
            write_row(tmp_path / "runs" / f"{i}-s{seed}", json.dumps(row))
    write_row(tmp_path / "runs" / "len", json.dumps(good(task="-evil", seq_len=1024,
                                                         model="=cmd|' /C calc'!A0")))
    out = tmp_path / "report"
    build_report([str(tmp_path / "runs")], out, quiet=True)
    written = sorted(out.glob("*.csv"))
    assert {"accuracy.csv", "efficiency.csv", "hyperparameters.csv", "params.csv",
            "runs.csv"} <= {p.name for p in written}
    for path in written:
        assert_no_formula(path)
    accuracy = fields_of(out / "accuracy.csv")
    assert "'=cmd|' /C calc'!A0" in accuracy and "'+evil" in accuracy and "'=" in accuracy
    assert "' =1+1" in accuracy and "'-evil" in accuracy
    assert "'+evil/=cmd|' /C calc'!A0" in fields_of(out / "efficiency.csv")
    assert "'+evil/@SUM(A1)" in fields_of(out / "hyperparameters.csv")
    runs = fields_of(out / "runs.csv")
    assert "-0.5" in runs and "'@pos" in runs  # numbers stay numbers


def test_csv_safe_reaches_every_label_level_and_name(tmp_path):
    index = pd.MultiIndex.from_tuples([("=a", 1), ("@b", 2), ("-k", 3)], names=["+i", "-j"])
    columns = pd.MultiIndex.from_tuples([("=c", "+d"), ("@e", -0.5)], names=["=top", "-level"])
    frame = pd.DataFrame([["=1+2", -0.5], ["-", "@x"], [["=list"], float("nan")]], index=index,
                         columns=columns)
    render.write_csv(frame, tmp_path / "t.csv")
    flat = pd.DataFrame({"=col": [-0.5, 2.0], "ok": ["+1", "-"]},
                        index=pd.Index(["=r", "s"], name="@idx"))
    flat.columns.name = "=names"
    render.write_csv(flat, tmp_path / "flat.csv")
    render.write_csv(flat, tmp_path / "noindex.csv", index=False)
    for name in ("t.csv", "flat.csv", "noindex.csv"):
        assert_no_formula(tmp_path / name)
    fields = fields_of(tmp_path / "t.csv")
    for text in ("'=top", "'-level", "'+i", "'-j", "'=a", "'@b", "'-k", "'=c", "'+d", "'@e",
                 "'=1+2", "'@x", "['=list']", "-0.5", "-"):
        assert text in fields, text
    assert fields_of(tmp_path / "flat.csv")[:3] == ["'@idx", "'=col", "ok"]
    assert "+1" in fields_of(tmp_path / "flat.csv")  # a number with a sign stays a number


@pytest.mark.parametrize("text, want", [
    ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"), ("@SUM(A1)", "'@SUM(A1)"), ("=", "'="),
    ("+", "'+"), ("\tx", "'\tx"), ("\r=1", "'\r=1"), (" =1+1", "' =1+1"), ("-inf", "'-inf"),
    ("-0.5", "-0.5"), ("+1e-05", "+1e-05"), ("-", "-"), ("", ""), ("a=b", "a=b"),
    ("41.00 ± 1.41", "41.00 ± 1.41")])
def test_csv_text(text, want):
    assert render.csv_text(text) == want
