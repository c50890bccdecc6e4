"""Reference rows (lra/reference.py, lra.suite compare=reference): a finished suite exported as
one file, written back under a new suite's out/reference/ and reported beside its new runs,
labelled "(ref)", never averaged with them; bad input is one line at start-up."""

from __future__ import annotations

import json

import pytest

from lra import reference, suite
from lra.report import tables
from lra.results import RunResult, load_results, write_result


def write_run(root, section, task, model, acc, seed=0, **extra):
    config = {"seed": seed, "preset": "small", "model": {"pos": "learned"}, "suite_task": task,
              "task": {"name": "copy", "seq_len": 64}}
    path = root / section / task / f"{model}-{seed}"
    write_result(RunResult(task="copy", model=model, seq_len=64, seed=seed, preset="small",
                           test_accuracy=acc, val_accuracy=acc, config=config,
                           env={"cpu_model": "Test CPU", "cpu_count": 2, "platform": "cpu",
                                "commit": "abc123"}, **extra), path)
    return path


def finished_suite(root):
    write_run(root, "runs", "selective", "transformer", 0.9)
    write_run(root, "runs", "selective", "mamba", 0.6)
    write_run(root, "runs", "mqar", "transformer", 0.3)
    write_run(root, "locality", "selective", "local", 0.2)
    bench = root / "bench" / "0"
    write_result(RunResult(task="text", model="transformer", seq_len=1024, seed=0,
                           preset="small", kind="bench"), bench)
    return root


def test_export_keeps_training_and_locality_rows_not_the_bench(tmp_path):
    out = finished_suite(tmp_path / "suite")
    meta = reference.export(out, tmp_path / "ref.json", command="python -m lra.suite out=x")
    data = reference.load(tmp_path / "ref.json")
    assert data["meta"] == meta
    assert meta["runs"] == 4 and meta["preset"] == "small" and meta["commit"] == "abc123"
    assert meta["models"] == ["local", "mamba", "transformer"]
    assert meta["tasks"] == ["mqar", "selective"] and meta["command"] == "python -m lra.suite out=x"
    assert meta["hardware"] == "Test CPU, 2 cores, cpu"
    assert sorted(r["path"] for r in data["runs"]) == [
        "locality/selective/local-0", "runs/mqar/transformer-0", "runs/selective/mamba-0",
        "runs/selective/transformer-0"]


def test_reference_rows_are_labelled_and_never_seeds_of_the_new_runs(tmp_path):
    out = finished_suite(tmp_path / "old")
    reference.export(out, tmp_path / "ref.json")
    new = tmp_path / "new"
    write_run(new, "runs", "selective", "transformer", 0.5, seed=0)  # the same model, trained here
    written = reference.materialise(reference.load(tmp_path / "ref.json"), tmp_path / "ref.json",
                                    new / "reference")
    assert written == 4
    df = load_results(new / "runs", new / "reference" / "runs", verbose=False)
    by_label = {m: sorted(g["test_accuracy"]) for m, g in df.groupby("model")}
    assert by_label["transformer"] == [0.5] and by_label["transformer (ref)"] == [0.3, 0.9]
    assert by_label["mamba (ref)"] == [0.6]
    table = tables.accuracy_table(df)
    assert {"transformer", "transformer (ref)", "mamba (ref)"} <= set(table.index)
    caption = tables.accuracy_caption(table)
    assert "(ref): reference rows from ref.json (commit abc123" in caption
    assert "Test CPU, 2 cores, cpu" in caption


def test_a_hand_edited_path_cannot_write_outside_the_folder(tmp_path):
    data = {"meta": {"commit": "x"}, "runs": [
        {"path": "../../escape", "result": {"model": "m", "status": "ok"}},
        {"path": "/abs/path", "result": {"model": "m", "status": "ok"}},
        {"path": "bench/0", "result": {"model": "m", "status": "ok"}},
        {"path": "runs/t/0", "result": "not a dict"},
        {"path": "runs/t/1", "result": {"model": "m", "status": "ok"}}]}
    assert reference.materialise(data, "f.json", tmp_path / "out") == 1
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("result.json")] == [
        "out/runs/t/1/result.json"]


@pytest.mark.parametrize("content,message", [
    (None, "no reference file"),
    ("{not json", "is not a reference file"),
    ('{"meta": {}}', "is not a reference file (no meta / runs)"),
])
def test_a_bad_reference_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "ref.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        reference.load(path)
    assert message in str(exc.value) and len(str(exc.value).splitlines()) == 1


def shipped_like(tmp_path, preset="small", tasks=("selective",)):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"meta": {"preset": preset, "tasks": list(tasks), "runs": 1,
                                         "models": ["transformer"], "commit": "abc"},
                                "runs": []}))
    return path


def test_compare_trains_only_the_named_models_on_the_references_tasks(tmp_path, capsys):
    ref = shipped_like(tmp_path, tasks=("selective", "mqar"))
    suite.main(["--dry-run", "models=[local]", "compare=reference", f"reference={ref}"])
    out = capsys.readouterr().out
    assert "1 models x 2 tasks" in out and "beside 1 reference rows of 1 models" in out
    assert "model=local seed=0" in out and "locality:" not in out  # the file carries locality
    assert "lra.bench -m model=local,transformer,flash" in out     # baselines benched here


@pytest.mark.parametrize("argv,message", [
    (["compare=reference"], "compare=reference trains only your models: name them"),
    (["compare=best", "models=[local]"], "compare=best: the one comparison is compare=reference"),
    (["reference=x.json", "models=[local]"], "reference=PATH is read only with compare=reference"),
    (["compare=reference", "models=[local]", "reference=/nonexistent/ref.json"],
     "no reference file /nonexistent/ref.json"),
    (["compare=reference", "models=[local]", "preset=tiny", "REF"],
     "holds preset=small runs, not preset=tiny"),
    (["compare=reference", "models=[local]", "tasks=[mqar]", "REF"],
     "tasks mqar: no reference rows in"),
])
def test_bad_compare_input_is_one_line_at_start_up(tmp_path, argv, message, capsys):
    argv = [f"reference={shipped_like(tmp_path)}" if a == "REF" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        suite.main([*argv, "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_the_shipped_tiny_reference_serves_compare(capsys):
    """results/reference/tiny.json: a real export (meta complete, rows readable as result rows)
    that `compare=reference` finds for preset=tiny with no reference= argument."""
    data = reference.load(reference.default_path("tiny"))
    meta = data["meta"]
    assert meta["preset"] == "tiny" and meta["runs"] == len(data["runs"]) > 0
    assert all(meta[k] for k in ("command", "commit", "date", "hardware"))
    assert all(r["result"]["preset"] == "tiny" and r["path"].split("/")[0] in reference.SECTIONS
               for r in data["runs"])
    suite.main(["--dry-run", "preset=tiny", "models=[local]", "compare=reference"])
    out = capsys.readouterr().out
    assert f"beside {meta['runs']} reference rows" in out and "tiny.json" in out
