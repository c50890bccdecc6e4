"""The report's task labels (variants and shrunk sizes are task columns), the locality table and
the run details (hardware, versions, hyper-parameters, seeds, cost, failure reasons)."""

from __future__ import annotations

import statistics

import pandas as pd
import pytest
from test_table1 import latex_problems

from lra.report import details, plots, render, tables
from lra.report import main
from lra.results import RunResult, load_results, write_result


def write_run(root, task, model, acc, seed=0, seq_len=64, preset="small", status="ok",
              error=None, attention=None, env=None, flops=None, params=None, **task_cfg):
    """One run with a full-looking config; returns its directory."""
    config = {"seed": seed, "preset": preset,
              "train": {"steps": 100, "lr": 0.001, "schedule": "cosine", "warmup_steps": 10},
              "model": {"name": model, "emb_dim": 32, "num_heads": 2, "num_layers": 1,
                        "mlp_dim": 64, "pos": "learned", "dropout": 0.1,
                        "attention": {"kind": "local" if model == "local" else "dense",
                                      **(attention or {})}},
              "task": {"name": task, "seq_len": seq_len, **task_cfg}}
    path = root / f"{task}-{model}-{seq_len}-{preset}-s{seed}-{status}-{abs(hash(str(config)))}"
    write_result(RunResult(task=task, model=model, seq_len=seq_len, seed=seed, preset=preset,
                           status=status, error=error, test_accuracy=acc, batch_size=8,
                           steps_per_s=2.0, peak_memory_bytes=2**28, flops_per_step=flops,
                           param_count=params, param_ratio=None if params is None else 1.0,
                           env=env or {}, config=config), path)
    return path


def suite_like(root):
    """copy at L=256 and selective at L=64 with num_val=500, induction at L=64 (and L=128)
    with the default num_val: three task settings of one task, two models."""
    for model in ("transformer", "local"):
        write_run(root, "copy", model, 0.9, seq_len=256, variant="copy", num_val=500)
        write_run(root, "copy", model, 0.4, variant="selective", num_val=500)
        write_run(root, "copy", model, 0.3, variant="induction", num_val=1000)
    write_run(root, "copy", "transformer", 0.5, seed=1, variant="induction", num_val=1000)
    write_run(root, "copy", "transformer", 0.2, seq_len=128, variant="induction", num_val=1000)
    return load_results(root, verbose=False)


def test_task_settings_are_task_columns_and_every_table_and_figure_agrees(tmp_path):
    df = suite_like(tmp_path)
    assert set(df["model"]) == {"transformer", "local"}  # no "transformer variant=induction"
    assert set(df["task_name"]) == {"copy"}
    acc = tables.accuracy_table(df)
    # The num_val that comes with a variant splits nothing further: never named.
    assert list(acc.columns) == ["copy", "copy (induction) L=64", "copy (induction) L=128",
                                 "copy (selective)", "Avg"]
    assert acc.loc["transformer", "copy (induction) L=64"] == "40.00 ± 14.14 (n=2)"
    assert acc.loc["local", "copy (selective)"] == "40.00 (n=1)"
    assert set(tables.efficiency_table(df).index) >= {"copy (induction)/transformer",
                                                      "copy (selective)/local"}
    # Only induction was run at two lengths: copy at L=256 is not a length of it.
    assert list(tables.seq_len_table(df).index) == ["copy (induction)/local",
                                                    "copy (induction)/transformer"]
    assert "accuracy_vs_seq_len_copy (induction)" in plots.accuracy_length_figures(df)
    assert {"copy (selective)/local", "copy/transformer"} <= set(
        details.hyperparameter_table(df).index)


def test_a_value_at_its_default_keeps_the_bare_name_and_each_other_is_named(tmp_path):
    write_run(tmp_path, "mqar", "transformer", 0.5, num_pairs=8)  # MQARConfig's default
    write_run(tmp_path, "mqar", "transformer", 0.4, num_pairs=16)
    write_run(tmp_path, "mqar", "transformer", 0.3, num_pairs=32, vocab_size=512)
    acc = tables.accuracy_table(load_results(tmp_path, verbose=False))
    # Keys in the config's field order; a key a row lacks (an older result) is its default.
    assert list(acc.columns) == ["mqar", "mqar (num_pairs=16)",
                                 "mqar (vocab_size=512, num_pairs=32)", "Avg"]
    # Each column's chance level from its own settings (31 vs 255 value tokens).
    assert acc.loc["chance", "mqar (vocab_size=512, num_pairs=32)"] == f"{100 / 255:.2f}"


def test_error_rows_never_rename_good_task_columns(tmp_path):
    write_run(tmp_path, "copy", "transformer", 0.9, seed=0)
    write_run(tmp_path, "copy", "transformer", 0.7, seed=1)
    write_run(tmp_path, "copy", "transformer", None, seed=2, status="error",
              error="ValueError: task.variant='bogus'", variant="bogus")
    write_run(tmp_path, "copy", "transformer", None, seed=3, status="error",
              error="ValueError: bad", num_symbols=8)
    df = load_results(tmp_path, verbose=False)
    labels = dict(zip(df["seed"].astype(int), df["task"]))
    assert labels == {0: "copy", 1: "copy", 2: "copy (bogus)", 3: "copy (num_symbols=8)"}
    assert set(df["model"]) == {"transformer"}
    acc = tables.accuracy_table(df)
    assert list(acc.columns) == ["copy", "Avg"]
    assert acc.loc["transformer", "copy"] == "80.00 ± 14.14"


def test_a_shrunk_task_is_labelled_from_its_config_not_its_preset(tmp_path):
    write_run(tmp_path, "pathx", "transformer", 0.50, seq_len=1024, preset="tiny", resolution=32)
    write_run(tmp_path, "pathx", "transformer", 0.51, seq_len=16384, preset="paper",
              resolution=128)
    write_run(tmp_path, "pathx", "transformer", 0.52, seq_len=1024, preset="paper", seed=1,
              resolution=32)  # a paper run overridden to 32x32 is still 32x32
    write_run(tmp_path, "pathfinder", "transformer", 0.70, seq_len=1024, resolution=32)
    write_run(tmp_path, "pathfinder", "transformer", 0.60, seq_len=4096, resolution=64)
    df = load_results(tmp_path, verbose=False)
    labels = dict(zip(zip(df["task_name"], df["seq_len"], df["preset"], df["seed"]), df["task"]))
    assert labels == {("pathx", 1024, "tiny", 0): "pathx (32x32)",
                      ("pathx", 16384, "paper", 0): "pathx",
                      ("pathx", 1024, "paper", 1): "pathx (32x32)",
                      ("pathfinder", 1024, "small", 0): "pathfinder",
                      ("pathfinder", 4096, "small", 0): "pathfinder (64x64)"}
    acc = tables.accuracy_table(df, reference=True)
    assert {"pathx (32x32)", "pathx", "pathfinder (64x64)"} <= set(acc.columns)
    # LRA's Pathfinder value belongs to the task at its own size only.
    assert acc.loc["transformer (LRA paper)", "pathfinder"] == "71.40"
    assert acc.loc["transformer (LRA paper)", "pathfinder (64x64)"] == "-"


def locality_tree(root):
    """Main runs (transformer, and a local with its own block size) and, under root/locality,
    local runs at w = 256, 16, 64 on two tasks (w=256 only on listops), two seeds each."""
    accs = {}
    for seed in (0, 1):
        for task, kw in (("listops", {}), ("copy", {"variant": "induction"})):
            write_run(root / "main", task, "transformer", 0.6 + 0.1 * seed, seed=seed, **kw)
            for w in (256, 16, 64):
                if w == 256 and task == "copy":
                    continue
                acc = 0.1 + w / 1000 + 0.05 * seed
                accs.setdefault((task, w), []).append(acc)
                write_run(root / "locality", task, "local", acc, seed=seed,
                          attention={"block_size": w}, **kw)
        write_run(root / "main", "listops", "local", 0.99, seed=seed, attention={"block_size": 8})
    write_run(root / "main", "listops", "transformer", 0.8, seq_len=128)  # no local run there
    return accs


def test_locality_table_rows_windows_then_dense_in_table1_columns(tmp_path):
    accs = locality_tree(tmp_path)
    main_df = load_results(tmp_path / "main", verbose=False)
    table = tables.locality_table(load_results(tmp_path / "locality", verbose=False), main_df)
    assert list(table.index) == ["local w=16", "local w=64", "local w=256",
                                 "dense (transformer)", "chance"]
    # Table 1's names, for the columns local ran on.
    assert list(table.columns) == ["listops L=64", "copy (induction)"]
    assert set(table.columns) < set(tables.accuracy_table(main_df).columns)
    for (task, w), values in accs.items():
        column = "copy (induction)" if task == "copy" else "listops L=64"
        mean, std = 100 * statistics.mean(values), 100 * statistics.stdev(values)
        assert table.loc[f"local w={w}", column] == f"{mean:.2f} ± {std:.2f} (n=2)"
    assert table.loc["local w=256", "copy (induction)"] == "-"
    assert table.loc["dense (transformer)", "listops L=64"] == "65.00 ± 7.07 (n=2)"
    assert table.loc["chance", "listops L=64"] == "10.00"


def test_report_cli_writes_locality_and_run_details_with_locality_runs_kept_apart(tmp_path):
    locality_tree(tmp_path)
    env = {"jax_version": "0.4.0", "flax_version": "0.8", "optax_version": "0.2",
           "device_kind": "cpu", "host": "laptop"}
    long_error = "RuntimeError: " + "a very long\nmessage " * 40
    write_run(tmp_path / "main", "listops", "performer", None, status="error", error=long_error,
              env=env, flops=2.5e9, params=26292)
    write_run(tmp_path / "main", "listops", "performer", None, seed=1, status="timeout", env=env)
    out = tmp_path / "report"
    main([str(tmp_path), "--locality", str(tmp_path / "locality"), "--out", str(out)])
    acc = pd.read_csv(out / "accuracy.csv", index_col=0, dtype=str, keep_default_na=False)
    assert acc.loc["local", "listops L=64"] == "99.00 ± 0.00 (n=2)"  # only the main local runs
    assert not any(label.startswith("local w") for label in acc.index)
    locality = pd.read_csv(out / "locality.csv", index_col=0, dtype=str, keep_default_na=False)
    assert "local w=16" in locality.index and "dense (transformer)" in locality.index
    for name in ("locality", "hyperparameters"):
        tex = (out / f"{name}.tex").read_text()
        assert latex_problems(tex, len(pd.read_csv(out / f"{name}.csv").columns)) == [], name
    page = (out / "report.html").read_text()
    assert "Run details" in page and "local w=64" in page and "Locality" in page
    text = (out / "run_details.md").read_text()
    assert "Versions differ between runs: jax" in text and "laptop" in text
    failures = details.failure_table(load_results(tmp_path / "main", verbose=False))
    (reason,) = failures.loc[failures["status"] == "error", "reason"]
    assert reason.startswith("RuntimeError: a very long message") and reason.endswith(" ...")
    assert len(reason) <= details.REASON_CHARS and "\n" not in reason
    (timeout,) = failures.loc[failures["status"] == "timeout", "reason"]
    assert timeout.startswith("stopped at a time limit")


def test_hyperparameter_table_lists_settings_seeds_and_cost(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, "listops", "local", 0.3, seed=seed, seq_len=256, flops=1.5e9,
                  params=26292, attention={"block_size": 16, "num_neighbours": 1})
    write_run(tmp_path, "listops", "local", 0.3, seq_len=512, flops=3e9, params=26292,
              attention={"block_size": 16, "num_neighbours": 1})
    row = details.hyperparameter_table(load_results(tmp_path, verbose=False)).loc["listops/local"]
    assert row["L"] == "256 / 512" and row["emb/heads/layers/mlp"] == "32/2/1/64"
    assert row["seeds"] == "0, 1 (n=2)" and row["runs"] == "3 ok"
    assert row["non-default settings"] == "block_size=16"  # num_neighbours=1 is the default
    assert row["parameters"] == "26,292 (1.00x)" and row["GFLOP/step"] == "1.5 / 3"
    assert row["schedule"] == "cosine, warm-up 10" and row["protocol"] == "paper"


def test_values_every_row_shares_are_said_once_above_the_table(tmp_path):
    for model, block in (("local", 16), ("bigbird", 8)):
        write_run(tmp_path, "listops", model, 0.3, seq_len=256, flops=1.5e9, params=26292,
                  attention={"block_size": block})
    title, lines, table = details.sections(load_results(tmp_path, verbose=False))[1]
    assert "non-default settings" in table and "lr" not in table and "preset" not in table
    shared = next(line for line in lines if line.startswith("Every row: "))
    assert "lr 0.001" in shared and "L 256" in shared and "steps 100" in shared


@pytest.mark.parametrize("paths", [["nope"], [".", "--locality", "nope"]])
def test_a_missing_directory_is_a_clear_error(tmp_path, paths):
    with pytest.raises(SystemExit, match="no such results directory: .*nope"):
        main([str(tmp_path / p) if p != "--locality" else p for p in paths])
