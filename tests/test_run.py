"""End to end: lra.run on ListOps writes an honest result.json; same seed -> same numbers."""

from __future__ import annotations

import json
import re

from conftest import compose, run_cli
from lra.tasks.listops import generate, ListOpsConfig, write_tsv

REQUIRED = ("task", "model", "seq_len", "seed", "preset", "status", "val_accuracy", "test_accuracy",
            "steps", "train_time_s", "compile_time_s", "steps_per_s", "examples_per_s",
            "tokens_per_s", "peak_memory_bytes", "memory_source", "xla_estimate_bytes",
            "flops_per_step", "param_count", "env", "config")


def test_cli_run_writes_result_and_prints_its_path_last(tmp_path):
    proc = run_cli("lra.run", "model=bigbird", "task=listops", "preset=tiny",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = tmp_path / "result.json"
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(path.resolve())
    # The run says what it does: data, compile, progress as plain lines (stdout is a pipe, not
    # a terminal), each val evaluation, and a rounded summary; TensorBoard events beside it.
    for said in ("256/64/64 train/val/test examples", "compiled the train step in",
                 "step 10/20 loss=", "step 20/20 val_acc="):
        assert said in proc.stdout, said
    assert re.fullmatch(r"bigbird on listops L=512: status=ok test_acc=\d+\.\d% val_acc=\d+\.\d% "
                        r"steps/s=\d+\.?\d* peak=\d+(\.\d)? [KMG]iB compile=[\dms.]+ wall=[\dms.]+",
                        lines[-2]), lines[-2]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    result = json.loads(path.read_text())
    for key in REQUIRED:
        assert key in result, key
    assert result["status"] == "ok" and result["model"] == "bigbird" and result["steps"] == 20
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["steps_per_s"] > 0 and result["compile_time_s"] > 0
    assert 0 < result["lower_time_s"] < result["compile_time_s"]
    assert result["num_devices"] == 1 and result["resumed_from_step"] is None
    assert result["peak_memory_bytes"] > 0 and result["memory_source"] == "process_rss"
    assert result["flops_per_step"] > 0 and result["param_count"] > 0
    assert result["param_ratio"] == 1.0  # bigbird has exactly the transformer's parameters
    assert result["env"]["jax_version"] and result["config"]["model"]["attention"]["kind"] == "bigbird"
    curve = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert curve[-1]["step"] == 20 and "val_accuracy" in curve[-1]
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


def test_trains_on_lra_format_files(tmp_path):
    data = tmp_path / "lra"
    data.mkdir()
    rows = generate(ListOpsConfig(min_length=10, max_length=100), 80, seed=7)
    for split in ("train", "val", "test"):
        write_tsv(data / f"myops_{split}.tsv", rows)
    proc = run_cli("lra.run", "model=transformer", "task=listops", f"task.data_dir={data}",
                   "task.file_prefix=myops", "preset=tiny", "train.progress=false",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "ok" and result["config"]["task"]["data_dir"] == str(data)


def test_same_config_and_seed_give_identical_numbers(tmp_path):
    from lra.run import execute

    cfg = compose("model=transformer", "task=listops", "preset=tiny", "train.progress=false",
                  "train.log_every=5")
    runs = []
    for i in range(2):
        out = tmp_path / str(i)
        out.mkdir()
        result = execute(cfg, out)
        assert result.status == "ok", result.error
        curve = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append((result.val_accuracy, result.test_accuracy, result.train_loss,
                     [(r["step"], r["train_loss"], r.get("val_loss")) for r in curve]))
    assert runs[0] == runs[1]
    other = execute(compose("model=transformer", "task=listops", "preset=tiny", "seed=1",
                            "train.progress=false", "train.log_every=5"), tmp_path)
    assert other.train_loss != runs[0][2]
