"""Self-pretraining (train.pretrain, lra.train.pretrain): the objectives see inputs only, the
corruption is as configured, fine-tuning starts from the pretrained encoder, both phases resume,
and a model that cannot do an objective refuses it at start-up."""

from __future__ import annotations

import json
import signal
import types

import jax
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf

from conftest import compose
from lra import cli
from lra.config import row_fingerprint
from lra.train import pretrain
from lra.train.ends import Interrupted
from lra.train.experiment import build, typed
from lra.train.steps import make_steps

TINY = ("task=listops", "preset=tiny", "train.progress=false", "train.log_every=2",
        "train.eval_every=4", "train.checkpoint_every=4", "train.steps=8")


class FakeTask:
    """Batches of random tokens (id 0 = padding in each row's tail) with labels."""

    def __init__(self, kind: str = "classify", vocab: int = 20, length: int = 256):
        self.spec = types.SimpleNamespace(vocab_size=vocab, seq_len=length)
        self.kind, self.length = kind, length

    def batches(self, split, batch_size, seed=0, start_step=0):
        for step in range(start_step, start_step + 3):
            rng = np.random.default_rng([seed, step])
            tokens = rng.integers(1, self.spec.vocab_size, (batch_size, self.length))
            real = np.arange(self.length)[None] < rng.integers(self.length // 2, self.length,
                                                               (batch_size, 1))
            inputs = np.where(real, tokens, 0).astype(np.int32)
            batch = {"targets": rng.integers(0, 10, batch_size)}
            if self.kind == "match":
                batch.update(inputs1=inputs, inputs2=inputs[::-1].copy())
            else:
                batch["inputs"] = inputs
            if split != "train":
                batch["valid"] = np.ones(batch_size, bool)
            yield batch


def test_masked_corruption_replaces_the_configured_fraction_of_real_tokens_only():
    task = FakeTask()
    problem = next(pretrain.PretrainTask(task, "masked", 0.15, seed=0).batches("train", 64))
    original = next(task.batches("train", 64))["inputs"]
    corrupted = problem["weights"] > 0
    real = original != 0
    assert not (corrupted & ~real).any()  # padding is never corrupted
    rate, n = corrupted.sum() / real.sum(), real.sum()
    assert abs(rate - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n)
    assert (problem["inputs"][corrupted] == task.spec.vocab_size).all()  # [MASK]: a new id
    assert (problem["inputs"][~corrupted] == original[~corrupted]).all()
    assert (problem["targets"] == original).all()
    # Drawn from (seed, split, step): the same on a rerun, a resume; another step differs.
    again = pretrain.PretrainTask(task, "masked", 0.15, seed=0)
    assert (next(again.batches("train", 64))["weights"] == problem["weights"]).all()
    later = next(again.batches("train", 64, start_step=1))
    assert (later["weights"] != problem["weights"]).any()


def test_causal_targets_are_the_next_real_token():
    task = FakeTask()
    problem = next(pretrain.PretrainTask(task, "causal", 0.15, seed=0).batches("train", 8))
    inputs = next(task.batches("train", 8))["inputs"]
    assert (problem["inputs"] == inputs).all()
    assert (problem["targets"][:, :-1] == inputs[:, 1:]).all()
    scored = problem["weights"] > 0
    assert (scored == ((problem["targets"] != 0) & (inputs != 0))).all()
    assert not scored[:, -1].any()


def test_a_match_task_pretrains_on_both_documents_and_keeps_valid():
    task = FakeTask("match")
    problem = next(pretrain.PretrainTask(task, "causal", 0.15, seed=0).batches("val", 4))
    batch = next(task.batches("val", 4))
    assert (problem["inputs"] == np.concatenate([batch["inputs1"], batch["inputs2"]])).all()
    assert problem["valid"].shape == (8,)


def relabelled(task):
    """`task` with every batch's labels replaced by other random ones."""
    def batches(split, batch_size, seed=0, start_step=0):
        for i, batch in enumerate(task.batches(split, batch_size, seed, start_step)):
            targets = np.asarray(batch["targets"])
            noise = np.random.default_rng([99, i]).integers(1, 5, targets.shape)
            yield {**batch, "targets": (targets + noise) % 10}
    return types.SimpleNamespace(spec=task.spec, batches=batches)


def pretrained(objective: str, perturb_labels: bool = False, model: str = "transformer"):
    cfg = compose(f"model={model}", *TINY, f"train.pretrain.objective={objective}",
                  "train.pretrain.steps=4", "train.checkpoint_every=-1",
                  *(["model.attention.bidirectional=false"] if model == "mamba" else []))
    task_cfg, model_cfg, train_cfg = typed(cfg, "task", "model", "train")
    task, net = build(task_cfg, model_cfg, 0, extra_tokens=pretrain.extra_tokens(objective))
    initial = nnx.state(net, nnx.Param)
    initial = jax.tree.map(np.array, initial)
    fitted, _ = pretrain.run(net, relabelled(task) if perturb_labels else task, train_cfg, 0,
                             None, None, None)
    return net, initial, fitted, train_cfg


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.mark.parametrize("objective", ["masked", "causal"])
def test_pretraining_never_reads_the_labels(objective):
    model = "transformer" if objective == "masked" else "mamba"
    a = pretrained(objective, model=model)
    b = pretrained(objective, perturb_labels=True, model=model)
    assert a[2].status == b[2].status == "ok"
    assert [r["train_loss"] for r in a[2].curve] == [r["train_loss"] for r in b[2].curve]
    for x, y in zip(leaves(nnx.state(a[0], nnx.Param)), leaves(nnx.state(b[0], nnx.Param))):
        np.testing.assert_array_equal(x, y)


def test_fine_tuning_starts_from_the_pretrained_encoder_and_a_fresh_head():
    net, initial, fitted, train_cfg = pretrained("masked")
    now = nnx.state(net, nnx.Param)
    # The encoder holds the phase's best-val parameters, changed from its initialisation...
    for x, y in zip(leaves(nnx.state(net.encoder, nnx.Param)), leaves(fitted.params)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in
               zip(leaves(initial["encoder"]), leaves(now["encoder"])))
    # ...the task's head is as initialised (pretraining has no gradient for it, no decay)...
    for x, y in zip(leaves(initial["head"]), leaves(now["head"])):
        np.testing.assert_array_equal(x, y)
    # ...and the fine-tuning state starts there.
    start = make_steps(net, train_cfg).init(jax.random.key(0)).params
    for x, y in zip(leaves(start), leaves(now)):
        np.testing.assert_array_equal(x, y)


def test_objectives_a_model_cannot_do_are_refused_at_start_up(capsys):
    def refused(*overrides, steps=4):
        return pretrain.problems(compose(*overrides, *TINY, f"train.pretrain.steps={steps}"))

    assert refused("model=transformer", "train.pretrain.objective=masked") == []
    assert refused("model=mamba", "train.pretrain.objective=causal",
                   "model.attention.bidirectional=false") == []
    assert refused("model=transformer", "train.pretrain.objective=causal",
                   "model.attention.causal=true") == []
    [line] = refused("model=transformer", "train.pretrain.objective=causal")
    assert "model.attention.causal=true" in line and "train.pretrain.objective=masked" in line
    [line] = refused("model=linformer", "train.pretrain.objective=causal")
    assert "no causal form" in line and "train.pretrain.objective=masked" in line
    [line] = refused("model=mamba", "train.pretrain.objective=causal")
    assert "model.attention.bidirectional=false" in line
    [line] = refused("model=sparse", "train.pretrain.objective=causal")
    assert "model.attention.causal=true" in line
    [line] = refused("model=transformer", "train.pretrain.objective=masked",
                     steps=8)  # TINY's train.steps=8: nothing left to fine-tune
    assert "leaves no step of train.steps=8" in line
    [line] = refused("model=transformer", "train.pretrain.objective=bert")
    assert "none, causal, masked" in line
    with pytest.raises(SystemExit) as stopped:
        cli.check_overrides(["model=linformer", "train.pretrain.objective=causal",
                             "train.pretrain.steps=10"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no causal form" in err[0]
    with pytest.raises(SystemExit):
        cli.check_overrides(["model=transformer", "train.pretrain.objective=masked",
                             "train.pretrain.mask_rate=1.5"])
    assert "train.pretrain.mask_rate" in capsys.readouterr().err


def test_the_row_and_run_dir_follow_the_pretraining_config_only_when_it_is_on():
    base = OmegaConf.to_container(compose("model=transformer", *TINY), resolve=True)
    older = json.loads(json.dumps(base))
    del older["train"]["pretrain"]  # a row made before train.pretrain existed
    off_other_steps = json.loads(json.dumps(base))
    off_other_steps["train"]["pretrain"]["steps"] = 7
    assert row_fingerprint(base) == row_fingerprint(older) == row_fingerprint(off_other_steps)
    on = compose("model=transformer", *TINY, "train.pretrain.objective=masked")
    on = OmegaConf.to_container(on, resolve=True)
    longer = json.loads(json.dumps(on))
    longer["train"]["pretrain"]["steps"] = 7
    assert len({row_fingerprint(base), row_fingerprint(on), row_fingerprint(longer)}) == 3
    assert cli.tag(["train.pretrain.objective=masked"]) != cli.tag([])


class StopAfter:
    """A Stop whose request comes at the `reads`-th step (the loop reads it once per step)."""

    def __init__(self, reads: int):
        self.reads, self.signum = reads, None

    @property
    def requested(self):
        self.reads -= 1
        if self.reads > 0:
            return None
        self.signum = signal.SIGTERM
        return Interrupted


def run(out_dir, stop=None):
    from lra.run import execute

    cfg = compose("model=transformer", *TINY, "train.pretrain.objective=masked",
                  "train.pretrain.steps=8", "train.steps=16")  # 8 steps, then 8 fine-tuning
    out_dir.mkdir(exist_ok=True)
    return execute(cfg, out_dir, stop)


def curve(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r.get("val_accuracy")) for r in rows]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("whole")
    return run(out_dir), curve(out_dir)


@pytest.mark.parametrize("stop_at, phase", [(3, "pretraining"), (8 + 3, "fine-tuning")])
def test_an_interrupted_run_resumes_in_either_phase_to_the_same_numbers(tmp_path, whole, stop_at,
                                                                        phase):
    whole, whole_curve = whole
    cut = run(tmp_path, StopAfter(stop_at))
    assert cut.status == "interrupted"
    if phase == "pretraining":
        assert cut.pretrain["status"] == "interrupted" and cut.pretrain["steps_done"] == 3
        assert "during self-pretraining at step 3 of 8" in cut.error
        assert not (tmp_path / "checkpoints").exists()
    else:
        assert cut.pretrain["status"] == "ok" and cut.steps == 3
    resumed = run(tmp_path)
    assert whole.status == resumed.status == "ok"
    numbers = lambda curve: [(r["step"], r["train_loss"], r.get("val_accuracy")) for r in curve]  # noqa: E731
    assert numbers(resumed.pretrain["curve"]) == numbers(whole.pretrain["curve"])
    assert resumed.pretrain["objective"] == "masked" and resumed.pretrain["steps_done"] == 8
    assert resumed.resumed_from_step == (3 if phase == "fine-tuning" else None)
    for key in ("val_accuracy", "test_accuracy", "train_loss", "best_step"):
        assert getattr(resumed, key) == getattr(whole, key), key
    assert curve(tmp_path) == whole_curve


def test_the_suite_adds_self_pretrained_points_at_the_same_total_budget(tmp_path):
    from lra import suite

    steps, _ = suite.build_plan({"preset": "tiny", "models": "[transformer,mamba]",
                                 "tasks": "[listops]", "spt": "true", "locality": "false",
                                 "bench": "false", "out": str(tmp_path)})
    assert [s.name for s in steps] == ["listops", "listops+spt"]
    scratch, spt = steps
    assert spt.dir == tmp_path / "spt" / "listops" and spt.points == scratch.points
    added = [a for a in spt.args if a not in scratch.args]
    budget = int(compose("suite=listops", *[a for a in scratch.args if a.startswith(
        ("preset=", "train.steps="))]).train.steps)
    assert added == ["train.pretrain.objective=masked", f"train.pretrain.steps={budget // 2}",
                     f"hydra.sweep.dir={tmp_path / 'spt' / 'listops'}"]
    steps, _ = suite.build_plan({"preset": "tiny", "tasks": "[listops]", "locality": "false",
                                 "bench": "false", "out": str(tmp_path)})
    assert [s.name for s in steps] == ["listops"]  # off unless asked for


def test_the_report_puts_each_pretrained_row_beside_its_row_from_scratch(tmp_path):
    from lra.report import tables
    from lra.results import RunResult, load_results, write_result

    accuracy = {("a", "none"): (0.9, 0.5), ("a", "masked"): (0.8, 0.6),
                ("b", "none"): (0.7, 0.7), ("b", "masked"): (0.9, 0.8), ("c", "none"): (0.1, 0.1)}
    for (model, objective), accs in accuracy.items():
        for task, acc in zip(("listops", "text"), accs):
            pretraining = {"objective": objective, "steps": 5, "lr": 0.0, "mask_rate": 0.15}
            config = {"seed": 0, "preset": "small", "model": {"pos": "learned"},
                      "task": {"name": task, "seq_len": 512},
                      "train": {"steps": 10, "lr": 1e-3, "pretrain": pretraining}}
            write_result(RunResult(task=task, model=model, seq_len=512, seed=0, preset="small",
                                   test_accuracy=acc, config=config),
                         tmp_path / f"{model}-{objective}-{task}")
    table1 = tables.accuracy_table(load_results(tmp_path, verbose=False))
    rows = [r for r in table1.index if r not in table1.attrs["chance"]]
    assert rows == ["a", "a +spt(masked)", "b", "b +spt(masked)", "c"]  # side by side
    spt = tables.spt_table(table1)
    assert list(spt.index) == ["a", "b"]
    # From scratch a 70.00 (1), b 70.00 (1), c 10.00 (3); pretrained b 85.00 (1), a 70.00 (2).
    assert spt.loc["a"].tolist() == ["70.00 (1)", "70.00 (2)", "+0.00", "-1", "a +spt(masked)"]
    assert spt.loc["b"].tolist() == ["70.00 (1)", "85.00 (1)", "+15.00", "+0", "b +spt(masked)"]


@pytest.mark.parametrize("impl", ["explicit", "reference"])
def test_the_causal_transformer_never_sees_later_tokens(impl):
    """Dense attention's causal form (model.attention.causal=true): the causal objective's
    logits at position t are the same whatever tokens come after t, in the explicit form as in
    the reference (which masks the scores of later keys)."""
    cfg = compose("model=transformer", *TINY, "task.seq_len=64", "model.attention.causal=true",
                  f"model.attention.impl={impl}")
    task_cfg, model_cfg, _ = typed(cfg, "task", "model", "train")
    _, net = build(task_cfg, model_cfg, 0, load=None)
    lm = pretrain.LanguageModel(net.encoder)
    rng = np.random.default_rng(0)
    x = rng.integers(1, 17, (2, 64)).astype(np.int32)
    x[1, 50:] = 0  # a padded tail
    y = x.copy()
    y[:, 40:] = np.where(y[:, 40:] > 0, rng.integers(1, 17, (2, 24)), 0)
    a, b = lm({"inputs": x}), lm({"inputs": y})
    np.testing.assert_array_equal(np.asarray(a[:, :40]), np.asarray(b[:, :40]))
    assert not np.allclose(np.asarray(a[0, 40:]), np.asarray(b[0, 40:]))


def test_the_causal_explicit_form_equals_the_reference():
    outputs = []
    for impl in ("explicit", "reference"):
        cfg = compose("model=transformer", *TINY, "task.seq_len=64",
                      "model.attention.causal=true", f"model.attention.impl={impl}")
        task_cfg, model_cfg, _ = typed(cfg, "task", "model", "train")
        _, net = build(task_cfg, model_cfg, 0, load=None)
        x = np.random.default_rng(1).integers(1, 17, (2, 64)).astype(np.int32)
        outputs.append(np.asarray(pretrain.LanguageModel(net.encoder)({"inputs": x})))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=2e-5, atol=2e-5)


def test_a_dead_point_says_where_a_rerun_resumes_its_pretraining(tmp_path):
    from lra.results import RunResult
    from lra.run import resume_note

    (tmp_path / "pretrain" / "checkpoints" / "4").mkdir(parents=True)
    row = RunResult(task="listops", model="transformer", seq_len=512, seed=0, preset="tiny",
                    status="killed", error="killed")
    resume_note(tmp_path)(row)
    assert row.error.endswith("(self-pretraining checkpoint: step 4)")
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    row.error = "killed"
    resume_note(tmp_path)(row)
    assert row.error.endswith("(checkpoint: step 2)") and row.steps == 2
