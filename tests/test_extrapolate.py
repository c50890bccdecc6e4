"""Length extrapolation (`eval.seq_lens`): per-length test accuracy, honest failures, report table."""

from __future__ import annotations

import json

import pytest

from conftest import compose
from lra.report import tables
from lra.results import load_results, write_result


def test_copy_evaluates_at_every_length_with_data_made_for_it(tmp_path, monkeypatch):
    from lra.train import extrapolate, measure
    from lra.run import execute

    calls = []  # the reported peak is training's: read before the longer-length evals run
    read, evaluate_lengths = measure.PeakMemory.read, extrapolate.evaluate_lengths
    monkeypatch.setattr(measure.PeakMemory, "read",
                        lambda self: calls.append("read") or read(self))
    monkeypatch.setattr(extrapolate, "evaluate_lengths",
                        lambda *a, **k: calls.append("eval_lengths") or evaluate_lengths(*a, **k))
    cfg = compose("model=transformer", "task=copy", "preset=tiny", "task.seq_len=32",
                  "model.pos=sinusoidal", "eval.seq_lens=[32,64,128]", "train.progress=false",
                  "train.checkpoint_every=-1")
    result = execute(cfg, tmp_path)
    assert result.status == "ok", result.error
    lengths = result.eval_lengths
    assert sorted(lengths, key=int) == ["32", "64", "128"]
    assert all(v["status"] == "ok" and 0.0 <= v["test_accuracy"] <= 1.0 for v in lengths.values())
    # At the training length the eval data is the run's own test split: same accuracy.
    assert lengths["32"]["test_accuracy"] == pytest.approx(result.test_accuracy, abs=1e-6)
    assert calls == ["read", "eval_lengths"]


def test_learned_positions_refuse_other_lengths_but_the_run_is_ok(tmp_path):
    from lra.run import execute

    cfg = compose("model=transformer", "task=copy", "preset=tiny", "task.seq_len=32",
                  "eval.seq_lens=[32,64]", "train.progress=false", "train.checkpoint_every=-1")
    result = execute(cfg, tmp_path)
    assert result.status == "ok"
    assert result.eval_lengths["32"]["status"] == "ok"
    failed = result.eval_lengths["64"]
    assert failed["status"] == "error" and "parameters sized by the length" in failed["error"]
    assert "encoder.pos_embed.embedding (32, 32) -> (64, 32)" in failed["error"]
    assert "model.pos=sinusoidal" in failed["error"]


def test_config_at_length():
    from lra import tasks
    from lra.tasks.copy import CopyConfig
    from lra.tasks.listops import ListOpsConfig

    listops = tasks.task_class("listops").config_at_length(
        ListOpsConfig(seq_len=512, min_length=20, max_length=250), 1024)
    assert (listops.seq_len, listops.min_length, listops.max_length) == (1024, 40, 500)
    copy = tasks.task_class("copy").config_at_length(CopyConfig(seq_len=64, num_tokens=10), 128)
    assert (copy.seq_len, copy.num_tokens) == (128, 20)
    assert tasks.task_class("copy").config_at_length(CopyConfig(seq_len=64), 256).num_tokens == 0
    for name in ("image", "pathfinder"):
        with pytest.raises(ValueError, match="fixed length"):
            tasks.task_class(name).config_at_length(tasks.config_class(name)(), 2048)


def test_extrapolation_table_from_results(tmp_path):
    from lra.results import RunResult

    for seed, accs in ((0, (0.9, 0.5)), (1, (0.7, 0.3))):
        result = RunResult(task="copy", model="transformer", seq_len=64, seed=seed, preset="tiny",
                           test_accuracy=accs[0], config={"model": {"pos": "rope"}},
                           eval_lengths={"64": {"status": "ok", "test_accuracy": accs[0]},
                                         "128": {"status": "ok", "test_accuracy": accs[1]},
                                         "256": {"status": "error", "error": "x"}})
        write_result(result, tmp_path / f"s{seed}")
    df = load_results(tmp_path, verbose=False)
    table = tables.extrapolation_table(df)
    row = table.loc["copy/transformer pos=rope train L=64"]
    assert row["eval L=64"] == "80.00 ± 14.14" and row["eval L=128"] == "40.00 ± 14.14"
    assert row["eval L=256"] == "ERROR"
    assert json.loads((tmp_path / "s0" / "result.json").read_text())["eval_lengths"]["128"]
    # A repeat of seed 1 (a second sweep dir) counts once, as its latest run (it was averaged in
    # as a third seed).
    result = RunResult(task="copy", model="transformer", seq_len=64, seed=1, preset="tiny",
                       test_accuracy=0.6, config={"model": {"pos": "rope"}},
                       eval_lengths={"64": {"status": "ok", "test_accuracy": 0.6}})
    write_result(result, tmp_path / "again")
    table = tables.extrapolation_table(load_results(tmp_path, verbose=False))
    assert table.loc["copy/transformer pos=rope train L=64", "eval L=64"] == "75.00 ± 21.21"
