"""Copy: layout of every variant checked against its definition, no answer leaks, determinism."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tiny_runs import tiny_cli_run
from lra.tasks.base import data_params
from lra.train.steps import loss_and_metrics
from lra.tasks.copy import (BLANK_ID, DELIM_ID, FIRST_SYMBOL, NOISE_ID, Copy, CopyConfig, generate,
                        resolve_num_tokens)


def cfg(**kw) -> CopyConfig:
    return CopyConfig(**{"seq_len": 64, "num_train": 200, "num_val": 50, "num_test": 50, **kw})


@pytest.mark.parametrize("variant", ["copy", "reverse", "selective"])
def test_every_example_matches_its_variant(variant):
    c = cfg(variant=variant, num_symbols=5)
    n = resolve_num_tokens(c)
    data = generate(c, 300, seed=1)
    inputs, targets, weights = data["inputs"], data["targets"], data["weights"]
    assert inputs.shape == targets.shape == weights.shape == (300, 64)
    assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
    for x, y, w in zip(inputs, targets, weights):
        scored = np.flatnonzero(w)
        assert len(scored) == n and (np.diff(scored) == 1).all()  # one contiguous answer block
        assert (x[scored] == BLANK_ID).all()                       # the answer is never visible
        assert x[scored[0] - 1] == DELIM_ID and (y[w == 0] == 0).all()
        prefix = x[: scored[0] - 1]
        if variant == "selective":
            assert len(prefix) == 64 - 1 - n                       # fills the whole length
            symbols = prefix[prefix != NOISE_ID]
        else:
            assert len(prefix) == n and (x[scored[-1] + 1:] == 0).all()
            symbols = prefix
        assert len(symbols) == n and (symbols >= FIRST_SYMBOL).all()
        assert (symbols < FIRST_SYMBOL + 5).all()
        expected = symbols[::-1] if variant == "reverse" else symbols
        assert y[scored].tolist() == expected.tolist()
    if variant == "selective":  # symbols really are scattered, not a fixed block
        first = np.argmax(inputs >= FIRST_SYMBOL, axis=1)
        assert len(set(first.tolist())) > 5


def test_num_tokens_follows_seq_len_and_can_be_set():
    assert resolve_num_tokens(cfg(seq_len=64)) == 31
    assert resolve_num_tokens(cfg(seq_len=512)) == 255
    assert resolve_num_tokens(cfg(seq_len=4096, variant="selective")) == 16
    assert resolve_num_tokens(cfg(seq_len=20, variant="selective")) == 9
    assert resolve_num_tokens(cfg(num_tokens=10)) == 10
    with pytest.raises(ValueError, match="task.num_tokens"):
        resolve_num_tokens(cfg(num_tokens=32))
    with pytest.raises(ValueError, match="task.variant"):
        resolve_num_tokens(cfg(variant="sort"))


def test_spec_and_determinism(tmp_path):
    task = Copy(cfg(cache_dir=str(tmp_path)))
    assert task.spec.kind == "tokens" and task.spec.vocab_size == task.spec.num_classes == 20
    assert task.prepare().is_dir()
    again = Copy(cfg(cache_dir=str(tmp_path)))
    other = Copy(cfg(cache_dir=str(tmp_path), data_seed=1))
    for split in ("train", "val", "test"):
        assert np.array_equal(task.split(split)["inputs"], again.split(split)["inputs"])
        assert not np.array_equal(task.split(split)["inputs"], other.split(split)["inputs"])
    assert not np.array_equal(task.split("train")["inputs"][:50], task.split("val")["inputs"])
    assert task.num_examples("train") == 200 and task.num_examples("val") == 50


def test_cache_key_covers_the_generator_settings_with_n_resolved():
    assert set(data_params(CopyConfig())) == {"seq_len", "variant", "num_tokens", "num_symbols",
                                              "num_train", "num_val", "num_test", "data_seed",
                                              "fresh_train"}
    auto, explicit = cfg(num_tokens=0), cfg(num_tokens=resolve_num_tokens(cfg()))
    assert Copy(auto).prepare() == Copy(explicit).prepare()  # the same data, one directory
    assert Copy(auto).prepare() != Copy(cfg(num_symbols=5)).prepare()


def test_accuracy_counts_only_answer_positions():
    data = generate(cfg(), 4, seed=0)
    logits = np.full(data["targets"].shape + (20,), -5.0, np.float32)
    # Right on every answer position, wrong (class 0 vs target 0 -> pick 3) everywhere else.
    np.put_along_axis(logits, data["targets"][..., None], 5.0, axis=-1)
    logits[data["weights"] == 0] = 0.0
    logits[..., 3][data["weights"] == 0] = 9.0
    _, sums = loss_and_metrics(jnp.asarray(logits), {k: jnp.asarray(v) for k, v in data.items()})
    assert float(sums["count"]) == 4 * 31
    assert float(sums["correct"]) == 4 * 31


def test_cli_tiny_run(tmp_path):
    assert tiny_cli_run(tmp_path, "copy")["seq_len"] == 512


def test_induction_examples_ask_for_the_token_after_the_trigger():
    c = cfg(variant="induction", num_symbols=5)
    assert resolve_num_tokens(c) == 1
    data = generate(c, 400, seed=3)
    inputs, targets, weights = data["inputs"], data["targets"], data["weights"]
    assert inputs.shape == (400, 64) and inputs.dtype == np.int32
    positions = []
    for x, y, w in zip(inputs, targets, weights):
        assert np.flatnonzero(w).tolist() == [63] and x[63] == BLANK_ID and x[62] == DELIM_ID
        triggers = np.flatnonzero(x == DELIM_ID)
        assert len(triggers) == 2 and triggers[1] == 62 and triggers[0] <= 60
        body = np.delete(x[:62], triggers[0])
        assert ((body >= FIRST_SYMBOL) & (body < FIRST_SYMBOL + 5)).all()
        assert y[63] == x[triggers[0] + 1] and (y[:63] == 0).all()  # recomputed from the inputs
        positions.append(triggers[0])
    assert min(positions) < 10 and max(positions) > 50  # the trigger moves over the whole body
    with pytest.raises(ValueError, match="task.num_tokens=0"):
        resolve_num_tokens(cfg(variant="induction", num_tokens=3))
