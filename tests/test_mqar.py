"""MQAR: every answer checked by an evaluator that reads only the inputs, the power-law query
placement, the metric counting query positions only, config errors, a tiny run."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tiny_runs import tiny_cli_run
from lra.tasks.mqar import BLANK_ID, FIRST_KEY, MQAR, MQARConfig, check, generate
from lra.train.steps import loss_and_metrics


def cfg(**kw) -> MQARConfig:
    return MQARConfig(**{"seq_len": 64, "vocab_size": 40, "num_pairs": 6, "num_train": 200,
                         "num_val": 50, "num_test": 50, **kw})


def recall(inputs: np.ndarray, num_pairs: int) -> dict[int, int]:
    """The evaluator: for a row, {query position: expected value}, found from the inputs alone
    (each key of the pairs followed by a BLANK after the pairs is a query; its answer is the value
    paired with that key)."""
    pairs = {int(inputs[i]): int(inputs[i + 1]) for i in range(0, 2 * num_pairs, 2)}
    assert len(pairs) == num_pairs  # distinct keys
    return {t: pairs[int(inputs[t])] for t in range(2 * num_pairs, len(inputs) - 1)
            if inputs[t + 1] == BLANK_ID and int(inputs[t]) in pairs}


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_every_answer_is_the_value_paired_with_its_query_key(random_non_queries):
    c = cfg(random_non_queries=random_non_queries)
    data = generate(c, 300, seed=2)
    inputs, targets, weights = data["inputs"], data["targets"], data["weights"]
    assert inputs.shape == targets.shape == weights.shape == (300, 64)
    num_keys = (c.vocab_size - 2) // 2
    for x, y, w in zip(inputs, targets, weights):
        keys, values = x[0:12:2], x[1:12:2]
        assert ((keys >= FIRST_KEY) & (keys < FIRST_KEY + num_keys)).all()
        assert ((values >= FIRST_KEY + num_keys) & (values < c.vocab_size)).all()
        scored = np.flatnonzero(w)
        assert len(scored) == 6 and (x[scored + 1] == BLANK_ID).all()  # the answer is never shown
        assert sorted(x[scored].tolist()) == sorted(keys.tolist())  # every key asked once
        expected = recall(x, 6)
        assert {int(t): int(y[t]) for t in scored} == {t: expected[t] for t in scored}
        assert (y[w == 0] == 0).all() and (x > 0).all()  # no padding
    # Query slots follow the power law: most queries sit near the pairs, a few far away.
    gaps = np.concatenate([(np.flatnonzero(w) - 12) // 2 for w in weights])
    assert np.mean(gaps < 5) > 0.3 and gaps.max() >= 20


def test_accuracy_counts_query_positions_only():
    data = generate(cfg(), 16, seed=0)
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    right = np.eye(40, dtype=np.float32)[data["targets"]]
    _, sums = loss_and_metrics(jnp.asarray(right), batch)
    assert float(sums["correct"]) == float(sums["count"]) == 16 * 6
    wrong_elsewhere = right.copy()
    wrong_elsewhere[data["weights"] == 0] = np.eye(40, dtype=np.float32)[5]
    _, sums = loss_and_metrics(jnp.asarray(wrong_elsewhere), batch)
    assert float(sums["correct"]) == 16 * 6  # non-query positions do not count


def test_splits_are_independent_and_deterministic(tmp_path):
    task = MQAR(cfg(cache_dir=str(tmp_path)))
    task.prepare()
    train, val = task.split("train")["inputs"], task.split("val")["inputs"]
    again = MQAR(cfg(cache_dir=str(tmp_path))).split("train")["inputs"]
    assert (train == again).all() and not (train[:50] == val).all()
    assert task.spec.kind == "tokens" and task.spec.num_classes == 40


@pytest.mark.parametrize("bad, fix", [(dict(num_pairs=30), "task.vocab_size"),
                                      (dict(num_pairs=17), "task.seq_len"),
                                      (dict(power_a=0.0), "power_a")])
def test_bad_settings_name_the_fix(bad, fix):
    with pytest.raises(ValueError, match=fix.replace(".", r"\.")):
        check(cfg(**bad))


def test_tiny_run(tmp_path):
    result = tiny_cli_run(tmp_path, "mqar")
    assert result["config"]["task"]["num_pairs"] == 4
