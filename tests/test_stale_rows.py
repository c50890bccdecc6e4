"""skip_done never keeps a row made under another configuration (issue 32, item 2): result.json
carries lra.config.row_fingerprint of its resolved config; a run whose config differs sets the
old row aside (kept, never read by a report or a resume) and runs again."""

from __future__ import annotations

import json

from conftest import compose, run_cli
from lra.config import config_changes, row_fingerprint
from omegaconf import OmegaConf

RUN = ("task=listops", "preset=tiny", "train.steps=5", "train.eval_every=5",
       "train.progress=false", "logger=none")


def _config(*overrides: str) -> dict:
    return OmegaConf.to_container(compose("model=linear", *RUN, *overrides), resolve=True)


def test_the_row_fingerprint_follows_what_changes_the_numbers_only():
    base = _config()
    assert row_fingerprint(base) == row_fingerprint(_config("train.progress=true",
                                                            "point_timeout_s=5", "logger=none",
                                                            "task.cache_dir=/elsewhere"))
    for changed in ("train.patience=9", "model.num_heads=4", "train.lr=0.5", "seed=3",
                    "task.num_train=100", "eval.seq_lens=[1024]"):  # budget, identity, tuned,
        assert row_fingerprint(_config(changed)) != row_fingerprint(base), changed
    assert config_changes(base, _config("train.patience=9")) == \
        f"train.patience: {base['train']['patience']} -> 9"


def test_a_run_dir_holding_another_configs_row_is_rerun_and_the_old_row_kept(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli("lra.run", "model=linear", *RUN, f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    old = json.loads((run_dir / "result.json").read_text())
    # The run wrote Hydra's record of its config itself (after taking the directory's lock).
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml"]
    assert "linear" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert old["fingerprint"] == row_fingerprint(old["config"])

    same = run_cli("lra.run", "model=linear", *RUN, f"hydra.run.dir={run_dir}")
    assert f"skipped: {run_dir} already has a result" in same.stdout

    # The same directory by hand, another model: once skipped as "already ok" with the old numbers.
    other = run_cli("lra.run", "model=local", *RUN, f"hydra.run.dir={run_dir}")
    assert other.returncode == 0, other.stderr[-2000:]
    assert f"re-running {run_dir}: its result.json was made with another configuration" in other.stdout
    assert "model.attention.kind: linear -> local" in other.stdout
    new = json.loads((run_dir / "result.json").read_text())
    assert new["model"] == "local" and new["fingerprint"] != old["fingerprint"]
    (kept,) = (run_dir / "stale").iterdir()
    assert json.loads((kept / "row.json").read_text()) == old
    assert (kept / "checkpoints").is_dir() and not any(kept.rglob("result.json"))


def test_the_report_never_averages_rows_of_other_data_under_one_label(tmp_path):
    """Two runs of one model and task whose configs differ only where the data lives (a key no
    label named) were averaged as seeds of one row: they are two rows now."""
    import dataclasses

    from lra.results import RunResult, load_results, write_result

    for seed, where in ((0, "/data/v1"), (1, "/data/v2"), (2, "/data/v2")):
        config = {"seed": seed, "preset": "small", "task": {"name": "listops", "data_dir": where},
                  "model": {"name": "transformer", "pos": "learned"}}
        row = RunResult(task="listops", model="transformer", seq_len=512, seed=seed,
                        preset="small", test_accuracy=0.3 + seed / 10, steps=10, config=config,
                        fingerprint=row_fingerprint(config))
        write_result(dataclasses.replace(row), tmp_path / f"s{seed}")
    frame = load_results(tmp_path, verbose=False)
    assert sorted(frame["task"]) == ["listops (data_dir=/data/v1)", "listops (data_dir=/data/v2)",
                                     "listops (data_dir=/data/v2)"]
