"""lra.report on a fixture results tree: columns, ratios, seed aggregation, corrupt files, outputs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from lra.report import tables
from lra.report import build_report, main
from lra.results import RunResult, load_results, write_result


def make_tree(root):
    rows = []
    for model, speed, mem, accs in (("transformer", 2.0, 800e6, (0.30, 0.34)),
                                    ("bigbird", 3.0, 200e6, (0.36, 0.38)),
                                    ("performer", 5.0, 100e6, (0.20, 0.22))):
        for seed, acc in enumerate(accs):
            for length in (512, 1024):
                r = RunResult(task="listops", model=model, seq_len=length, seed=seed, preset="tiny",
                              test_accuracy=acc + (0.01 if length == 1024 else 0), val_accuracy=acc,
                              steps_per_s=speed * 512 / length, peak_memory_bytes=int(mem * length / 512),
                              memory_source="process_rss", batch_size=8, steps=20)
                out = root / "runs" / model / f"L{length}-s{seed}"
                write_result(r, out)
                (out / "metrics.jsonl").write_text(
                    json.dumps({"step": 10, "val_accuracy": acc - 0.05}) + "\n"
                    + json.dumps({"step": 20, "val_accuracy": acc}) + "\n")
                rows.append(r)
    # failures are rows too
    write_result(RunResult(task="listops", model="performer", seq_len=2048, seed=0, preset="tiny",
                           status="oom", error="RESOURCE_EXHAUSTED", batch_size=8), root / "runs" / "oom")
    write_result(RunResult(task="listops", model="transformer", seq_len=2048, seed=0, preset="tiny",
                           status="ok", steps_per_s=0.5, peak_memory_bytes=int(3.2e9), test_accuracy=0.3,
                           batch_size=8), root / "runs" / "t2048")
    (root / "runs" / "corrupt").mkdir()
    (root / "runs" / "corrupt" / "result.json").write_text('{"task": "listops", "model": ')
    (root / "runs" / "empty").mkdir()
    (root / "runs" / "empty" / "result.json").write_text("")
    return rows


def test_load_results_columns_dtypes_and_skips(tmp_path):
    make_tree(tmp_path)
    df = load_results(tmp_path, verbose=False)
    assert len(df) == 14
    assert sorted(df.attrs["skipped"]) == sorted(str(tmp_path / "runs" / d / "result.json")
                                                 for d in ("corrupt", "empty"))
    for column in ("task", "model", "seq_len", "seed", "status", "test_accuracy", "steps_per_s",
                   "peak_memory_bytes", "path"):
        assert column in df.columns
    assert pd.api.types.is_integer_dtype(df["seq_len"])
    assert pd.api.types.is_float_dtype(df["test_accuracy"])
    assert set(df["status"]) == {"ok", "oom"}


def test_ratio_to_transformer(tmp_path):
    make_tree(tmp_path)
    eff = tables.efficiency_frame(load_results(tmp_path, verbose=False)).set_index(["model", "seq_len"])
    assert eff.loc[("bigbird", 512), "speedup"] == pytest.approx(1.5)
    assert eff.loc[("bigbird", 1024), "memory_ratio"] == pytest.approx(0.25)
    assert eff.loc[("performer", 512), "speedup"] == pytest.approx(2.5)
    assert eff.loc[("transformer", 1024), "speedup"] == pytest.approx(1.0)
    assert eff.loc[("performer", 2048), "status"] == "oom"
    assert math.isnan(eff.loc[("performer", 2048), "speedup"])
    table = tables.efficiency_table(load_results(tmp_path, verbose=False))
    assert table.loc["listops/performer", "steps/s L=2048"] == "OOM"
    assert "(1.50x T)" in table.loc["listops/bigbird", "steps/s L=512"]


def test_params_table_marks_models_over_the_lra_budget(tmp_path):
    for model, count, ratio in (("transformer", 1000, 1.0), ("lstm", 1070, 1.07),
                                ("linformer", 3270, 3.27)):
        write_result(RunResult(task="listops", model=model, seq_len=512, seed=0, preset="small",
                               param_count=count, param_ratio=ratio), tmp_path / model)
    write_result(RunResult(task="copy", model="lstm", seq_len=256, seed=0, preset="small",
                           param_count=990, param_ratio=0.99), tmp_path / "copy-lstm")
    table = tables.params_table(load_results(tmp_path, verbose=False))
    # One row per model, one column per task (Table 1's labels).
    assert sorted(table.index) == ["linformer", "lstm", "transformer"]
    assert table.loc["linformer", "listops"] == "3,270 (3.27x, OVER)"
    assert table.loc["lstm", "listops"] == "1,070 (1.07x)"
    assert table.loc["lstm", "copy"] == "990 (0.99x)" and table.loc["transformer", "copy"] == "-"


def test_ratios_to_transformer_and_flash_and_flops_table(tmp_path):
    """Bench rows: each model's ratio to both exact baselines, and achieved FLOP/s vs peak."""
    for model, speed, mem, flops in (("transformer", 2.0, 800e6, 4e9), ("flash", 2.5, 200e6, 5e9),
                                     ("linear", 5.0, 100e6, 1e9)):
        r = RunResult(task="text", model=model, seq_len=4096, seed=0, preset="paper", kind="bench",
                      steps_per_s=speed, peak_memory_bytes=int(mem), batch_size=1,
                      matmul_flops_per_step=flops, achieved_flops_per_s=flops * speed,
                      matmul_utilisation=flops * speed / 200e9,
                      env={"matmul_peak_flops_per_s": 200e9})
        write_result(r, tmp_path / model)
    df = load_results(tmp_path, verbose=False)
    eff = tables.efficiency_frame(df).set_index("model")
    assert eff.loc["linear", "speedup"] == pytest.approx(2.5)
    assert eff.loc["linear", "speedup_flash"] == pytest.approx(2.0)
    assert eff.loc["linear", "memory_ratio_flash"] == pytest.approx(0.5)
    table = tables.efficiency_table(df)
    assert table.loc["text/linear", "steps/s L=4096"] == "5 (2.50x T, 2.00x F)"
    assert table.loc["text/flash", "MiB L=4096"] == "191 (0.25x T, 1.00x F)"
    flops = tables.flops_table(df)
    assert flops.loc["text/transformer", "GFLOP/s L=4096"] == "8.0 (4%)"
    assert flops.loc["text/flash", "GFLOP/s L=4096"] == "12.5 (6%)"


def test_seed_aggregation_and_best_marked(tmp_path):
    make_tree(tmp_path)
    df = load_results(tmp_path, verbose=False)
    acc = tables.accuracy_table(df)
    # bigbird: 2 seeds per length, lengths never averaged: (0.36, 0.38) at L=512 = 37.00 ± 1.41
    assert acc.loc["bigbird", "listops L=512"] == "37.00 ± 1.41 (n=2)"
    assert acc.loc["bigbird", "listops L=1024"] == "38.00 ± 1.41 (n=2)"
    assert ("bigbird", "listops L=512") in acc.attrs["bold"]
    assert not any(row == "performer" for row, _ in acc.attrs["bold"])
    by_len = tables.seq_len_table(df)
    assert by_len.loc["listops/performer", "L=2048"] == "OOM"
    assert by_len.loc["listops/bigbird", "L=512"] == "37.00 ± 1.41"
    ref = tables.accuracy_table(df, reference=True)
    # The paper's ListOps is at L=2000: its value sits once, in the nearest column.
    assert ref.loc["bigbird (LRA paper)", "listops L=2048"] == "36.05"
    assert ref.loc["bigbird (LRA paper)", "listops L=512"] == "-"


def test_every_table_and_figure_is_written(tmp_path, capsys):
    make_tree(tmp_path)
    out = tmp_path / "report"
    main([str(tmp_path), "--out", str(out), "--reference", "lra-paper"])
    printed = capsys.readouterr().out
    assert "Test accuracy (%) by model and task" in printed
    # One line names the skipped files and why (results.skipped_text).
    assert "skipped 2 result file(s): " in printed
    assert f"{tmp_path / 'runs' / 'empty' / 'result.json'} (empty file)" in printed
    assert f"{tmp_path / 'runs' / 'corrupt' / 'result.json'} (not JSON: " in printed
    for name in ("accuracy", "efficiency", "seq_len"):
        for ext in ("md", "csv", "tex"):
            assert (out / f"{name}.{ext}").stat().st_size > 0, (name, ext)
    assert "\\toprule" in (out / "accuracy.tex").read_text()
    for fig in ("speed_vs_seq_len", "memory_vs_seq_len", "accuracy_vs_speed",
                "eval_curve_listops_L512", "accuracy_vs_seq_len_listops"):
        for ext in ("png", "svg"):
            assert (out / f"{fig}.{ext}").stat().st_size > 1000, fig
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5 and "<table" in page


def test_empty_or_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no result.json"):
        build_report([str(tmp_path)], tmp_path / "out", quiet=True)
    with pytest.raises(SystemExit, match="no such results directory"):
        main([str(tmp_path / "nope")])


def test_runs_that_differ_in_config_are_rows_not_seeds(tmp_path):
    def run(model, seed, acc, preset="small", pos="rope", steps=100, **attention):
        config = {"seed": seed, "preset": preset, "train": {"steps": steps, "progress": False},
                  "model": {"pos": pos, "attention": attention}, "task": {"seq_len": 512}}
        write_result(RunResult(task="copy", model=model, seq_len=512, seed=seed, preset=preset,
                               test_accuracy=acc, config=config),
                     tmp_path / f"{model}-{preset}-{pos}-{steps}-s{seed}-{attention}")

    run("transformer", 0, 0.9)
    run("transformer", 1, 0.7)                 # a second seed of the same experiment
    run("transformer", 0, 0.2, pos="alibi")    # another experiment
    run("performer", 0, 0.5, preset="tiny", steps=5)
    run("performer", 0, 0.6, steps=100)
    run("linformer", 0, 0.3, k=64)  # a key only some models have: a float column with NaNs
    run("linformer", 0, 0.4, k=256)
    run("linformer", 0, 0.1)        # written before the key existed
    df = load_results(tmp_path, verbose=False)
    acc = tables.accuracy_table(df)
    assert acc.loc["transformer pos=rope", "copy"] == "80.00 ± 14.14 (n=2)"
    assert ("transformer pos=rope", "copy") in acc.attrs["bold"]
    assert acc.loc["transformer pos=alibi", "copy"] == "20.00 (n=1)"
    assert acc.loc["linformer k=64", "copy"] == "30.00 (n=1)"
    assert set(acc.index) == {"chance", "transformer pos=rope", "transformer pos=alibi",
                              "performer (small)", "performer (tiny)", "linformer k=64",
                              "linformer k=256", "linformer k=unset"}
    assert set(df["model_name"]) == {"transformer", "performer", "linformer"}


def test_protocol_lra_runs_are_their_own_rows(tmp_path):
    def run(model, seed, acc, protocol=None, **attention):
        config = {"seed": seed, "preset": "small", "model": {"pos": "learned",
                                                             "attention": attention}}
        if protocol:
            config["protocol"] = {"name": protocol, "attention_dropout": 0.1}
        write_result(RunResult(task="listops", model=model, seq_len=512, seed=seed,
                               preset="small", test_accuracy=acc, config=config),
                     tmp_path / f"{model}-{protocol}-s{seed}-{attention}")

    run("performer", 0, 0.30, "paper", kernel="softmax")
    run("performer", 1, 0.32, "paper", kernel="softmax")
    run("performer", 0, 0.40, "lra", kernel="relu")
    run("performer", 1, 0.42, "lra", kernel="relu")
    run("bigbird", 0, 0.35)  # written before protocols existed: the papers' forms
    acc = tables.accuracy_table(load_results(tmp_path, verbose=False))
    # Within a protocol the seeds average; the protocol's own settings are not listed as keys.
    assert set(acc.index) == {"performer", "performer [lra]", "bigbird", "chance"}
    assert acc.loc["performer [lra]", "listops"] == "41.00 ± 1.41 (n=2)"
    assert acc.attrs["bold"] == {("performer [lra]", "listops"), ("performer [lra]", "Avg")}


def test_error_rows_never_rename_the_good_runs(tmp_path):
    # Before: one error row of a bad value made every good row "transformer (tiny) kind=dense".
    def run(seed, acc, status="ok", preset="small", kind="dense", steps=1000):
        config = {"seed": seed, "preset": preset, "train": {"steps": steps},
                  "model": {"attention": {"kind": kind}}}
        write_result(RunResult(task="listops", model="transformer", seq_len=512, seed=seed,
                               preset=preset, status=status, test_accuracy=acc, config=config),
                     tmp_path / f"{seed}-{status}-{preset}-{kind}-{steps}")

    run(0, 0.30)
    run(1, 0.34)
    run(0, None, status="error", preset="tiny", kind="flash")  # failed inside the run
    run(2, None, status="error", steps=5)
    df = load_results(tmp_path, verbose=False)
    labels = dict(zip(df["seed"].astype(int).astype(str) + df["status"], df["model"]))
    assert labels == {"0ok": "transformer", "1ok": "transformer",
                      "0error": "transformer (tiny)", "2error": "transformer steps=5"}
    assert tables.accuracy_table(df).loc["transformer", "listops"] == "32.00 ± 2.83"
