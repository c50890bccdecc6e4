"""MAD: every scored target recomputed from the unmasked rows by an evaluator of the task's
definition, no answer in the input, MAD's baselines, determinism, independent splits, fresh
streams (memorization refuses them), config errors, a tiny run per task."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import compose
from tiny_runs import tiny_cli_run
from lra.tasks.base import SPLITS
from lra.tasks.mad import BLANK_ID, MAD, OFFSET, MADConfig, generate, resolve

POSED = ("in_context_recall", "fuzzy_in_context_recall", "noisy_in_context_recall",
         "selective_copying", "memorization")
FRESH = tuple(t for t in POSED if t != "memorization")


def cfg(task: str, **kw) -> MADConfig:
    return MADConfig(task=task, **{"num_train": 64, "num_val": 32, "num_test": 32, **kw})


def unmasked(data: dict) -> np.ndarray:
    """The rows in MAD's token ids with every answer put back in place."""
    return np.where(data["weights"] > 0, data["targets"], data["inputs"]) - OFFSET


def recall_answers(row: np.ndarray, vocab: int, noise: int) -> dict[int, int]:
    """{value position: answer}: a pair whose key came in an earlier pair (noise pairs skipped)
    is answered by the value of the key's first pair."""
    symbols = vocab - noise
    first, answers = {}, {}
    for p in range(0, len(row), 2):
        k, v = int(row[p]), int(row[p + 1])
        if k >= symbols:  # a noise pair
            assert noise and symbols <= v < vocab and k < vocab
            continue
        assert 0 <= k < symbols // 2 <= v < symbols
        if k in first:
            answers[p + 1] = first[k]
        else:
            first[k] = v
    return answers


def fuzzy_answers(row: np.ndarray, vocab: int) -> tuple[dict[int, int], list, bool]:
    """({position: answer}, key lengths, whether the last pair's key came before): after the
    left padding (vocab - 1), pairs are a run of key tokens then a run of value tokens; a pair
    whose key came before is answered by that pair's value, token by token; the last pair is
    always asked (MAD), even when its key never came."""
    pad, num_keys = vocab - 1, (vocab - 1) // 2
    p = int(np.argmax(row != pad))
    assert p >= 1 and (row[:p] == pad).all() and (row[p:] != pad).all()
    first, answers, lengths, pairs = {}, {}, [], []
    while p < len(row):
        k_at = p
        while p < len(row) and row[p] < num_keys:
            p += 1
        v_at = p
        while p < len(row) and row[p] >= num_keys:
            p += 1
        key, value = tuple(row[k_at:v_at]), tuple(row[v_at:p])
        assert key and value and len(set(key)) == len(key) and len(set(value)) == len(value)
        lengths.append(len(key))
        pairs.append((key, v_at))
        if key in first:
            assert len(value) == len(first[key])  # a key keeps its value
            answers.update({v_at + i: t for i, t in enumerate(first[key])})
        else:
            first[key] = value
    key, v_at = pairs[-1]
    asked = key in {k for k, _ in pairs[:-1]}
    if not asked:  # the last value is scored with nothing to recall it from
        answers.update({i: int(row[i]) for i in range(v_at, len(row))})
    return answers, lengths, asked


def selective_answers(row: np.ndarray, vocab: int, n: int) -> dict[int, int]:
    """The symbols among the blanks before COPY, in order, at the n positions after it."""
    length, blank, copy = len(row), vocab - 2, vocab - 1
    prefix = row[:length - n - 1]
    symbols = prefix[prefix != blank]
    assert row[length - n - 1] == copy and len(symbols) == n and prefix[-1] != blank
    assert (symbols < blank).all()
    return {length - n + i: int(t) for i, t in enumerate(symbols)}


def check_rows(data: dict, answers_of) -> list:
    """Per row: the scored positions are exactly the evaluator's and hold its answers; scored
    inputs are placeholders. Returns the evaluator's extra results."""
    inputs, targets, weights = data["inputs"], data["targets"], data["weights"]
    assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
    assert (inputs > 0).all() and (targets[weights == 0] == 0).all()
    extras = []
    for x, y, w, row in zip(inputs, targets, weights, unmasked(data)):
        answers, *extra = answers_of(row)
        extras.append(extra)
        scored = np.flatnonzero(w)
        assert sorted(answers) == scored.tolist()
        assert [answers[p] + OFFSET for p in scored] == y[scored].tolist()
        assert (x[scored] != y[scored]).all()  # the answer is never in the input
    return extras


@pytest.mark.parametrize("training", [True, False])
def test_in_context_recall_answers_every_repeated_key(training):
    # Every later pair of a key is scored, so nothing right of a scored value shows it.
    data = generate(cfg("in_context_recall"), 200, seed=1, training=training)
    assert data["inputs"].shape == (200, 128)
    check_rows(data, lambda row: (recall_answers(row, 16, 0),))
    assert (data["weights"][:, -1] == 1).all()  # the last pair is a repeated key
    assert (data["inputs"][data["weights"] > 0] == BLANK_ID).all()


def test_noisy_recall_skips_noise_pairs():
    data = generate(cfg("noisy_in_context_recall"), 200, seed=2, training=False)
    check_rows(data, lambda row: (recall_answers(row, 32, 16),))
    noise_pairs = (data["inputs"][:, :-2:2] >= 16 + OFFSET).mean()
    assert 0.15 < noise_pairs < 0.25  # MAD's frac_noise 0.2
    assert (data["inputs"][data["weights"] > 0] == BLANK_ID).all()


@pytest.mark.parametrize("training", [True, False])
def test_fuzzy_recall_answers_every_repeated_key_motif(training):
    data = generate(cfg("fuzzy_in_context_recall"), 300, seed=3, training=training)
    extras = check_rows(data, lambda row: fuzzy_answers(row, 16))
    lengths = {n for key_lengths, _ in extras for n in key_lengths}
    assert lengths == ({1, 2, 3} if training else {3})  # test keys are MAD's full motif
    unanswerable = np.mean([not asked for _, asked in extras])
    assert unanswerable < 0.08  # MAD's never-placed probe: a few percent of rows
    assert (data["inputs"][data["weights"] > 0] == BLANK_ID).all()


def test_selective_copying_asks_for_the_symbols_in_order():
    data = generate(cfg("selective_copying"), 200, seed=4, training=False)
    assert data["inputs"].shape == (200, 256)
    check_rows(data, lambda row: (selective_answers(row, 16, 16),))
    assert (data["inputs"][:, -16:] == 14 + OFFSET).all()  # MAD's blanks hold the answers' place
    first = np.argmax(data["inputs"] < 14 + OFFSET, axis=1)  # symbols are scattered
    assert len(set(first.tolist())) > 10


def test_memorization_recalls_one_fixed_map_in_every_split():
    task = MAD(cfg("memorization", num_train=0))  # MAD's 256 training rows
    mapping = {}
    for split in SPLITS:
        data = task.split(split)
        row = unmasked(data)
        inserts, answers = data["inputs"][:, 1::2], data["targets"][:, 1::2]
        assert (inserts == 255 + OFFSET).all() and (answers != inserts).all()
        assert (data["weights"][:, 1::2] == 1).all() and (data["weights"][:, 0::2] == 0).all()
        for k, v in zip(row[:, 0::2].ravel().tolist(), row[:, 1::2].ravel().tolist()):
            assert 0 <= k < 127 <= v < 255 and mapping.setdefault(k, v) == v  # one value per key
        if split == "train":
            assert len(mapping) == 127 and task.num_examples("train") == 256
    assert len(set(mapping.values())) == 127  # injective: every value answers one key
    other = unmasked(MAD(cfg("memorization", data_seed=1)).split("test"))
    assert any(mapping[k] != v for k, v in zip(other[:, 0].tolist(), other[:, 1].tolist()))


@pytest.mark.parametrize("task", POSED)
def test_splits_are_deterministic_and_independent(task, tmp_path):
    one = MAD(cfg(task, cache_dir=str(tmp_path)))
    assert one.prepare().is_dir()
    again, other = MAD(cfg(task, cache_dir=str(tmp_path))), MAD(cfg(task, data_seed=1))
    for split in SPLITS:
        assert np.array_equal(one.split(split)["inputs"], again.split(split)["inputs"])
        assert not np.array_equal(one.split(split)["inputs"], other.split(split)["inputs"])
    train, val, test = (one.split(s)["inputs"] for s in SPLITS)
    rows = {r.tobytes() for r in train}
    assert not any(r.tobytes() in rows for r in (*val, *test)) and not np.array_equal(val, test)


@pytest.mark.parametrize("task", FRESH)
def test_fresh_train_draws_new_batches_every_step(task):
    stream = MAD(cfg(task, fresh_train=True)).batches("train", 8, seed=0)
    first, second = next(stream), next(stream)
    assert not np.array_equal(first["inputs"], second["inputs"])
    again = MAD(cfg(task, fresh_train=True)).batches("train", 8, seed=0, start_step=1)
    assert np.array_equal(next(again)["inputs"], second["inputs"])  # a resumed run continues


def test_memorization_refuses_fresh_train():
    with pytest.raises(ValueError, match=r"set task\.fresh_train=false"):
        MAD(cfg("memorization", fresh_train=True)).prepare()


@pytest.mark.parametrize("task, seq_len, vocab, num_train, chance", [
    ("in_context_recall", 128, 16, 12800, 1 / 8),
    ("fuzzy_in_context_recall", 128, 16, 12800, 1 / 8),
    ("noisy_in_context_recall", 128, 32, 12800, 1 / 8),
    ("selective_copying", 256, 16, 12800, 1 / 14),
    ("memorization", 32, 256, 256, 1 / 127)])
def test_zeros_take_mads_baseline(task, seq_len, vocab, num_train, chance):
    s = resolve(MADConfig(task=task))
    assert (s.seq_len, s.vocab_size, s.num_train, s.num_test) == (seq_len, vocab, num_train, 1280)
    spec = MAD(MADConfig(task=task)).spec
    assert (spec.seq_len, spec.num_classes, spec.kind) == (seq_len, vocab + OFFSET, "tokens")
    assert MAD.chance_accuracy(MADConfig(task=task)) == pytest.approx(chance)
    explicit = MADConfig(task=task, seq_len=seq_len, vocab_size=vocab, num_train=num_train)
    assert MAD(MADConfig(task=task)).prepare() == MAD(explicit).prepare()  # one cache dir
    assert compose("task=mad", f"task.task={task}").task.seq_len == seq_len  # the CLI's too


@pytest.mark.parametrize("bad, fix", [
    (dict(task="copying"), "use one of in_context_recall"),
    (dict(task="compression"), "not posed here"),
    (dict(task="in_context_recall", seq_len=127), "must be even"),
    (dict(task="in_context_recall", num_tokens_to_copy=8), "applies to task.task=selective"),
    (dict(task="noisy_in_context_recall", frac_noise=1.0), "frac_noise in [0, 1)"),
    (dict(task="noisy_in_context_recall", vocab_size=17), "raise task.vocab_size"),
    (dict(task="fuzzy_in_context_recall", k_motif_size=8), "raise vocab_size"),
    (dict(task="fuzzy_in_context_recall", seq_len=12), "raise task.seq_len"),
    (dict(task="selective_copying", num_tokens_to_copy=128), "lower num_tokens_to_copy"),
    (dict(task="memorization", num_train=-1), "use >= 1")])
def test_bad_settings_name_the_fix(bad, fix):
    with pytest.raises(ValueError, match=re.escape(fix)) as err:
        resolve(MADConfig(**bad))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("task", POSED)
def test_tiny_run(task, tmp_path):
    # One length and vocabulary for all five: the model compiles once (persistent cache).
    extra = {"noisy_in_context_recall": ["task.noise_vocab_size=8"],
             "selective_copying": ["task.num_tokens_to_copy=4"]}.get(task, [])
    result = tiny_cli_run(tmp_path, "mad", f"task.task={task}", "task.seq_len=32",
                          "task.vocab_size=16", "task.num_train=16", "task.num_val=8",
                          "task.num_test=8", "train.steps=2", "train.eval_every=2", *extra)
    assert result["config"]["task"]["task"] == task and result["seq_len"] == 32
