"""lra.suite: the plan covers every registered model, one cell reproduces with suite=<task>, bad
input dies at start-up, and a tiny suite runs end to end, resumes and writes the report."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose, run_cli
from lra import cli, models, suite
from lra.results import load_results


def test_plan_runs_every_model_on_every_task_and_skips_dense_windows():
    steps, info = suite.build_plan({"seeds": "2"})
    plan = OmegaConf.load(suite.PLAN)
    models = cli.choices("model")
    assert info["models"] == models and len(models) >= 24 and "transformer" in models
    by_name = {s.name: s for s in steps}
    hint = sorted(plan.cost_hint, key=lambda m: -plan.cost_hint[m])
    for task in plan.tasks:
        step = by_name[task]
        listed = next(a for a in step.args if a.startswith("model=")).split("=")[1].split(",")
        # Every model once, the plan's slow ones first (no result yet: its cost_hint), the rest
        # in registry order.
        assert sorted(listed) == sorted(models) and listed[:len(hint)] == hint
        assert listed[len(hint):] == [m for m in models if m not in hint]
        assert "seed=0,1" in step.args and step.points == 2 * len(models)
    # Locality windows shorter than the task only (a window >= L is dense attention).
    for task in plan.tasks:
        length = int(compose(f"suite={task}").task.seq_len)
        windows = [w for w in plan.locality.windows if w < length]
        step = by_name.get(f"locality:{task}")
        assert (step.points if step else 0) == 2 * len(windows)
    bench = by_name["bench"]
    assert bench.module == "lra.bench" and bench.points == len(models) * 2
    assert "bench.seq_lens=[1024,4096]" in bench.args


def test_plugin_models_join_the_suite(monkeypatch, request):
    # The plugin is registered in this process for this test only: a later test that ships
    # Hydra's ConfigStore to a worker (lra.sweep.executor) must not carry a class it cannot import.
    from hydra.core.config_store import ConfigStore

    kinds, store = set(models.attention.REGISTRY), ConfigStore.instance()
    monkeypatch.setattr(store, "repo", copy.deepcopy(store.repo))
    monkeypatch.syspath_prepend(str(ROOT / "examples"))

    def forget() -> None:
        for kind in set(models.attention.REGISTRY) - kinds:
            del models.attention.REGISTRY[kind]
        sys.modules.pop("my_attention", None)

    request.addfinalizer(forget)
    steps, info = suite.build_plan({"plugins": "[my_attention]", "tasks": "[selective]"})
    assert "my_attention" in info["models"]
    assert "plugins=[my_attention]" in steps[0].args


@pytest.mark.parametrize("argv,message", [
    (["model=transformer"], "unknown argument 'model=transformer'"),
    (["seeds=0"], "seeds=0: use an integer >= 1"),
    (["preset=paper"], "preset=paper: lra.suite has presets"),
    (["models=[transformer,nope]"], "unknown model 'nope'"),
    (["tasks=[copy]"], "unknown suite task 'copy'"),
    (["bench=maybe"], "bench=maybe: use bench=true or bench=false"),
])
def test_bad_input_is_one_line_at_start_up(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        suite.main([*argv, "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_a_suite_cell_reproduces_with_one_override():
    cfg = compose("suite=selective", "model=bigbird")
    assert (cfg.task.name, cfg.task.seq_len, cfg.task.variant) == ("copy", 64, "selective")
    assert cfg.model.attention.block_size == 4 and cfg.train.steps == 1200  # patterns=L64, suite
    assert compose("suite=selective", "model=bigbird", "train.steps=7").train.steps == 7


@pytest.mark.parametrize("length", ["L64", "L128", "L256"])
def test_every_variant_pattern_composes_and_a_command_line_override_wins(length):
    """patterns=<L> sets what each variant's `pattern(L)` says (its real config fields, each
    size in 1..L-1: no pattern covers the whole sequence), and model.attention.<key>= wins."""
    seq_len, scaled = int(length[1:]), 0
    for kind in models.attention.REGISTRY:
        sizes = models.attention.config_class(kind)().pattern(seq_len)
        if not sizes:
            continue
        scaled += 1
        cfg = compose(f"patterns={length}", f"model={kind}")
        for key, value in sizes.items():
            assert cfg.model.attention[key] == value and 0 < value < seq_len, (kind, key)
        key = next(iter(sizes))
        cfg = compose(f"patterns={length}", f"model={kind}", f"model.attention.{key}=3")
        assert cfg.model.attention[key] == 3, (kind, key)
    assert scaled >= 10  # bigbird, local, longformer, linformer, flash, nsa, ... scale


def test_dry_run_lists_points_and_estimate(capsys):
    suite.main(["--dry-run", "preset=tiny", "models=[transformer,local]", "tasks=[selective]"])
    out = capsys.readouterr().out
    assert "2 models x 1 tasks x 1 seed(s)" in out and "estimated" in out
    assert "python -m lra.run -m suite=selective model=transformer,local" in out
    assert "locality:selective" in out and "model.attention.block_size=16" in out
    assert "$ python -m lra.bench" in out  # the bench runs alone, with XLA's own threading


def test_points_start_slowest_model_first_by_the_walls_measured_so_far(tmp_path):
    runs = tmp_path / "runs"
    walls = {"copy256": {"a": 100, "b": 300, "c": 200, "d": 50},  # median 150
             "selective": {"a": 10, "b": 90, "c": 5, "d": 30}}    # median 20
    for task, per_model in walls.items():
        for i, (model, wall) in enumerate(per_model.items()):
            point = runs / task / str(i)
            point.mkdir(parents=True)
            (point / "result.json").write_text(json.dumps(
                {"model": model, "status": "ok", "wall_time_s": wall}))
    failed = runs / "copy256" / "9"  # a failed point's wall says nothing about its cost
    failed.mkdir()
    (failed / "result.json").write_text(json.dumps({"model": "d", "status": "oom",
                                                    "wall_time_s": 9999}))
    costs = suite.model_costs(runs, {"b": 0.1, "e": 5.0})
    # b: (300/150 + 90/20) / 2 = 3.25 (measured beats the hint); e: only its hint.
    assert costs["b"] == pytest.approx(3.25) and costs["e"] == 5.0
    assert costs["c"] == pytest.approx((200 / 150 + 5 / 20) / 2)
    step = suite.Step("mqar", "lra.run", ["suite=mqar", "model=a,b,c,d,e,f", "seed=0"],
                      tmp_path, 6, 1.0)
    ordered = suite.slowest_first(step, costs)
    # e 5.0, b 3.25, f unknown = 1 (a median model), d 0.92, c 0.79, a 0.58.
    assert ordered.args == ["suite=mqar", "model=e,b,f,d,c,a", "seed=0"]
    assert step.args[1] == "model=a,b,c,d,e,f"  # the plan's step is left as it was
    assert suite.model_costs(tmp_path / "none", {"x": 2}) == {"x": 2.0}


@pytest.mark.parametrize("cores, workers, single", [(2, 2, True), (8, 2, False), (2, 1, False),
                                                     (1, 2, False)])
def test_training_workers_get_one_xla_thread_when_that_is_a_core_each(monkeypatch, cores,
                                                                      workers, single):
    monkeypatch.setattr(suite.os, "cpu_count", lambda: cores)
    flags = suite.worker_threads(workers)
    assert ("intra_op_parallelism_threads=1" in flags) == single
    step = suite.Step("selective", "lra.run", ["suite=selective"], Path("d"), 1, 1.0, flags)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    env = step.env()["XLA_FLAGS"]
    assert env.startswith("--xla_force_host_platform_device_count=4")  # the user's flags kept
    assert env.endswith(flags) and step.shown().startswith("XLA_FLAGS=" if single else "python")


def test_tiny_suite_end_to_end_and_resume(tmp_path):
    out = tmp_path / "suite"
    args = ["preset=tiny", f"out={out}", "models=[transformer,local]", "tasks=[listops]"]
    proc = run_cli("lra.suite", *args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[suite] 6/6 points" in proc.stdout and "ETA" in proc.stdout  # 2 runs, 2 local, 2 bench
    runs = load_results(out / "runs", verbose=False)
    assert len(runs) == 2 and set(runs["status"]) == {"ok"}
    assert set(runs["model"]) == {"transformer", "local"}
    local = load_results(out / "locality", verbose=False)  # listops L=128: windows 16, 64
    assert sorted(local["config.model.attention.block_size"]) == [16, 64]
    bench = load_results(out / "bench", verbose=False)
    assert len(bench) == 2 and set(bench["seq_len"]) == {256}
    html = (out / "report" / "report.html").read_text()
    assert "transformer" in html and "Locality" in html and "local w=64" in html
    assert "<th>listops L=128</th>" in html  # columns are the suite's tasks with their length
    assert "[suite] listops ended in" in proc.stdout and "report:" in proc.stdout
    # Resume: nothing left to do, so no point is re-run and every result file is unchanged.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    proc = run_cli("lra.suite", *args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps
    assert json.loads(next((out / "runs").rglob("result.json")).read_text())["preset"] == "tiny"
