"""Bring your own attention: registration by decorator, `plugins=[...]` in every process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

EXAMPLES = ROOT / "examples"


def run_outside(cwd, module: str, *args: str):
    """`python -m <module>` from a directory outside the repo, the examples on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": f"{EXAMPLES}{os.pathsep}{ROOT}", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_register_rejects_what_cannot_work():
    from lra.models.attention import REGISTRY, Attention, AttentionConfig, register

    with pytest.raises(TypeError, match="Attention subclass"):
        register(object)

    class NoConfig(Attention):  # inherits the base AttentionConfig
        pass

    with pytest.raises(TypeError, match="its own AttentionConfig dataclass"):
        register(NoConfig)

    @dataclasses.dataclass
    class ClashConfig(AttentionConfig):
        kind: str = "dense"

    class Clash(Attention):
        config_cls = ClashConfig

    with pytest.raises(ValueError, match="already registered by lra.models.attention.dense"):
        register(Clash)
    assert REGISTRY["dense"].__name__ == "DenseAttention"


def test_register_task_rejects_a_non_task():
    from lra.tasks import TaskConfig, register_task

    @dataclasses.dataclass
    class MyTaskConfig(TaskConfig):
        name: str = "my_task_never_registered"

    with pytest.raises(TypeError, match="ArrayTask subclass"):
        register_task(MyTaskConfig)(object)


def test_plugins_are_read_from_the_command_line():
    from lra.plugins import from_argv

    assert from_argv(["model=x", "plugins=[a.b, c]", "+plugins=d"]) == ["a.b", "c", "d"]
    assert from_argv(["plugins=[]"]) == []


def test_a_missing_plugin_is_one_line_at_start_up(tmp_path):
    proc = run_outside(tmp_path, "lra.run", "model=transformer", "plugins=[no_such_module]")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: plugins: cannot import 'no_such_module' (ModuleNotFoundError: No module named "
        "'no_such_module'); put its directory on PYTHONPATH or `pip install` its package"]
    assert not (tmp_path / "results").exists()


def test_example_plugin_runs_in_a_sweep_the_bench_and_the_report_from_outside(tmp_path):
    # model=my_attention has no YAML: its config comes from the dataclass. Sweep points and bench
    # workers are fresh processes that import the plugin from the config they are given.
    sweep = tmp_path / "sweep"
    proc = run_outside(tmp_path, "lra.run", "-m", "model=my_attention,local", "task=listops",
                       "preset=tiny", "plugins=[my_attention]", "train.progress=false",
                       f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {p.parent.parent.name: json.loads(p.read_text())
            for p in sweep.glob("listops/*/*/result.json")}
    assert {m: r["status"] for m, r in rows.items()} == {"my_attention": "ok", "local": "ok"}
    assert rows["my_attention"]["config"]["model"]["attention"]["kind"] == "my_attention"
    bench = tmp_path / "bench"
    proc = run_outside(tmp_path, "lra.bench", "model=my_attention", "task=listops",
                       "plugins=[my_attention]", "bench.seq_lens=[256]", "bench.steps=2",
                       "bench.warmup_steps=1", f"hydra.run.dir={bench}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (point,) = bench.glob("L256-*/result.json")
    assert json.loads(point.read_text())["status"] == "ok"
    proc = run_outside(tmp_path, "lra.report", str(sweep), str(bench), "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "my_attention" in (tmp_path / "r" / "accuracy.md").read_text()


def test_unknown_model_lists_registered_plugin_models(tmp_path):
    proc = run_outside(tmp_path, "lra.run", "model=nope", "plugins=[my_attention]")
    assert proc.returncode == 2 and "my_attention" in proc.stderr.splitlines()[-1]


def test_lra_check_passes_the_example_and_rejects_the_broken_one(tmp_path):
    proc = run_outside(tmp_path, "lra.check", "my_attention", "plugins=[my_attention]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert len(rows) >= 9 and "FAIL" not in proc.stdout and "-> all checks pass" in proc.stdout
    assert any("tiny ListOps run" in " ".join(r) and "PASS" in r for r in rows)
    proc = run_outside(tmp_path, "lra.check", "broken_attention", "plugins=[broken_attention]",
                       "--no-run")
    assert proc.returncode == 1
    failing = [line for line in proc.stdout.splitlines() if " FAIL " in line]
    assert len(failing) == 1 and "padding invariance" in failing[0], proc.stdout
    assert "-> FAIL: padding invariance" in proc.stdout


def test_a_users_hydra_searchpath_configs_count_in_name_checks(tmp_path, capsys):
    from lra import cli

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "myperf.yaml").write_text(
        "defaults:\n  - /schema/model/performer@_here_\n  - _self_\nname: myperf\n"
        "attention:\n  num_features: 32\n")
    cli.setup()
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    assert "myperf" in cli.choices("model", [searchpath])
    cli.check_overrides(["model=myperf", "task=listops", searchpath])  # accepted, no exit
    with pytest.raises(SystemExit):
        cli.check_overrides(["model=myperf", "task=listops"])
    assert "unknown model 'myperf'" in capsys.readouterr().err


def test_an_installed_packages_entry_point_registers_without_plugins(tmp_path):
    # What `pip install` of a package declaring [project.entry-points."lra_bench.plugins"]
    # leaves on sys.path: a dist-info directory with entry_points.txt.
    dist = tmp_path / "site" / "my_attention_pkg-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-attention-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lra_bench.plugins]\nmine = my_attention\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(EXAMPLES), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "lra.run", "model=nope"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "my_attention" in proc.stderr.splitlines()[-1], proc.stderr


@pytest.mark.parametrize("launcher", ["submitit_local", "pool"])
def test_a_launcher_job_imports_the_plugins(tmp_path, launcher):
    # submitit_local runs each job in a process of its own, pool in a worker (lra.suite's way);
    # neither through the fresh-process point.
    if launcher == "submitit_local":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                            reason='pip install -e ".[cluster]"')
    sweep = tmp_path / "sweep"
    proc = run_outside(tmp_path, "lra.run", "-m", f"hydra/launcher={launcher}", "fresh_process=false",
                       "model=my_attention", "task=listops", "preset=tiny",
                       "plugins=[my_attention]", "train.progress=false",
                       "train.checkpoint_every=-1", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(p.read_text()) for p in sweep.glob("**/result.json")]
    assert row["status"] == "ok" and row["model"] == "my_attention"
