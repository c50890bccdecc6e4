"""ListOps: labels checked by an independent evaluator, determinism, LRA-format reading."""

from __future__ import annotations

import numpy as np
import pytest

from lra.tasks import DataError
from lra.tasks.base import CLS_ID, data_params
from lra.tasks.listops import VOCAB, ListOps, ListOpsConfig, generate, read_tsv, tokenize, write_tsv


def evaluate_string(source: str) -> int:
    """Stack evaluator over the token stream (parentheses ignored), independent of the tree code."""
    stack: list = []
    for tok in source.split():
        if tok in ("(", ")"):
            continue
        if tok.startswith("["):
            stack.append(tok)
        elif tok == "]":
            args = []
            while not isinstance(stack[-1], str):
                args.append(stack.pop())
            op = stack.pop()
            args = sorted(args)
            if op == "[MIN":
                value = args[0]
            elif op == "[MAX":
                value = args[-1]
            elif op == "[SM":
                value = sum(args) % 10
            else:  # median of digits, floored for even counts
                n = len(args)
                value = args[n // 2] if n % 2 else (args[n // 2 - 1] + args[n // 2]) // 2
            stack.append(value)
        else:
            stack.append(int(tok))
    assert len(stack) == 1
    return stack[0]


def small_cfg(tmp_path, **kw) -> ListOpsConfig:
    base = dict(num_train=200, num_val=50, num_test=50, min_length=20, max_length=200,
                seq_len=256, cache_dir=str(tmp_path))
    return ListOpsConfig(**{**base, **kw})


def test_every_generated_label_is_correct():
    cfg = ListOpsConfig(min_length=10, max_length=400)
    rows = generate(cfg, 400, seed=3)
    assert len({s for s, _ in rows}) > 350  # mostly distinct expressions
    for source, target in rows:
        assert evaluate_string(source) == target
    lengths = [len(tokenize(s)) for s, _ in rows]
    assert min(lengths) >= 10 and max(lengths) <= 400
    counts = np.bincount([t for _, t in rows], minlength=10)
    assert (counts > 0).all() and counts.max() / len(rows) < 0.3


def test_string_format_matches_lra():
    rows = generate(ListOpsConfig(min_length=4, max_length=6), 20, seed=0)
    source = rows[0][0]
    assert source.startswith("( ") and source.endswith(" ] )")
    assert set(source.split()) <= set(VOCAB) | {"(", ")"}
    assert evaluate_string("( ( ( [MAX 2 ) 9 ) ] )") == 9


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = ListOps(small_cfg(tmp_path / "a")).prepare()
    b = ListOps(small_cfg(tmp_path / "b")).prepare()
    c = ListOps(small_cfg(tmp_path / "c", data_seed=1)).prepare()
    for split in ("train", "val", "test"):
        name = f"basic_{split}.tsv"
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "basic_train.tsv").read_bytes() != (c / "basic_train.tsv").read_bytes()


def test_generation_is_cached(tmp_path):
    task = ListOps(small_cfg(tmp_path))
    directory = task.prepare()
    stamp = (directory / "basic_train.tsv").stat().st_mtime_ns
    assert ListOps(small_cfg(tmp_path)).prepare() == directory
    assert (directory / "basic_train.tsv").stat().st_mtime_ns == stamp


def test_cache_key_covers_the_generator_settings_only(tmp_path):
    assert set(data_params(ListOpsConfig())) == {"num_train", "num_val", "num_test", "min_length",
                                                 "max_length", "max_depth", "max_args",
                                                 "leaf_prob", "data_seed"}
    directory = ListOps(small_cfg(tmp_path)).data_dir()
    assert ListOps(small_cfg(tmp_path, seq_len=32)).data_dir() == directory  # only pads / cuts
    assert ListOps(small_cfg(tmp_path, max_depth=3)).data_dir() != directory


def test_reads_lra_release_format(tmp_path):
    rows = [("( ( ( [MAX 2 ) 9 ) ] )", 9), ("( ( ( [SM 5 ) 7 ) ] )", 2), ("3", 3)]
    for split in ("train", "val", "test"):
        write_tsv(tmp_path / f"myprefix_{split}.tsv", rows)
    cfg = ListOpsConfig(data_dir=str(tmp_path), file_prefix="myprefix", seq_len=8)
    data = ListOps(cfg).split("val")
    assert data["targets"].tolist() == [9, 2, 3]
    first = data["inputs"][0].tolist()
    assert first == [CLS_ID, VOCAB["[MAX"], VOCAB["2"], VOCAB["9"], VOCAB["]"], 0, 0, 0]
    assert data["inputs"].shape == (3, 8) and data["inputs"].dtype == np.int32
    short = ListOps(ListOpsConfig(data_dir=str(tmp_path), file_prefix="myprefix", seq_len=3))
    assert short.split("train")["inputs"][0].tolist() == first[:3]  # truncation


def test_missing_and_malformed_files_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="task.data_dir"):
        ListOps(ListOpsConfig(data_dir=str(tmp_path), file_prefix="basic")).prepare()
    for split in ("train", "val", "test"):
        (tmp_path / f"bad_{split}.tsv").write_text("Source\tTarget\n( [MAX 2 ] )\t2\n( [FOO 1 ] )\t1\n")
    with pytest.raises(DataError, match=r"bad_train.tsv:3"):
        read_tsv(tmp_path / "bad_train.tsv")


def test_a_huge_field_names_file_line_and_the_fix(tmp_path):
    import csv

    limit = csv.field_size_limit()
    rows = b"( [MAX 2 9 ] )\t9\n" + b"( [MAX " + b"1 " * 5_000_000 + b"] )\t1\n"  # a 10 MB field
    for split in ("train", "val", "test"):
        (tmp_path / f"huge_{split}.tsv").write_bytes(b"Source\tTarget\n" + rows)
    with pytest.raises(DataError) as err:
        ListOps(ListOpsConfig(data_dir=str(tmp_path), file_prefix="huge", seq_len=2000)).split("val")
    message = str(err.value)
    assert "\n" not in message
    assert f"{tmp_path / 'huge_val.tsv'}:3: a field longer than 131072 characters" in message
    assert "raise task.seq_len" in message
    assert csv.field_size_limit() == limit  # the process-wide csv limit is put back
    # A stray quote opens a quoted field running over the rows after it: named where it starts.
    body = "( [MAX 2 9 ] )\t9\n" + '"( [MIN 3 ] )\t3\n' + "( [MIN 4 ] )\t4\n" * 20_000
    (tmp_path / "quote.tsv").write_text("Source\tTarget\n" + body)
    with pytest.raises(DataError, match=r"quote.tsv:3: a field longer than 131072 characters"):
        read_tsv(tmp_path / "quote.tsv")
    # A legitimately long source (here 200k characters) is read when task.seq_len allows it
    # (16 characters per token), and cut to seq_len tokens.
    long_source = "( [MAX " + "1 " * 100_000 + "] )"
    for split in ("train", "val", "test"):
        write_tsv(tmp_path / f"long_{split}.tsv", [(long_source, 1), ("( [MIN 3 4 ] )", 3)])
    with pytest.raises(DataError, match=r"long_val.tsv:2: a field longer than 131072"):
        read_tsv(tmp_path / "long_val.tsv")
    data = ListOps(ListOpsConfig(data_dir=str(tmp_path), file_prefix="long", seq_len=16_000)).split("val")
    assert data["targets"].tolist() == [1, 3] and data["inputs"].shape == (2, 16_000)
    assert data["inputs"][0, -1] == VOCAB["1"]
    assert csv.field_size_limit() == limit


def test_extra_columns_are_refused_naming_file_line_and_count(tmp_path):
    good = "( [MAX 2 9 ] )\t9\n"
    cases = {
        "extra.tsv": ("Source\tTarget\n" + good + "( [MIN 3 4 ] )\t3\tnote\n",
                      r"extra.tsv:3: 3 tab-separated columns, expected 2 \(Source<TAB>Target\)"),
        "trailing.tsv": ("Source\tTarget\n" + "( [MIN 3 4 ] )\t3\t\n",
                         r"trailing.tsv:2: 3 tab-separated columns, expected 2"),
        "header.tsv": ("Source\tTarget\tNote\n" + good,
                       r"header.tsv:1: expected header 'Source<TAB>Target' \(2 columns\)"),
        "one.tsv": ("Source\tTarget\n" + good + "( [MIN 3 4 ] ) 3\n",
                    r"one.tsv:3: 1 tab-separated column, expected 2"),
        "quote.tsv": ("Source\tTarget\n" + good + '"( [MIN 3 ] )\t3\n' + good,
                      r"quote.tsv:3: 1 tab-separated column \(a '\"' opened a quoted field"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message) as err:
            read_tsv(tmp_path / name)
        assert "\n" not in str(err.value)


def test_train_batches_are_deterministic_by_step(tmp_path):
    task = ListOps(small_cfg(tmp_path))
    it = task.batches("train", 16, seed=5)
    first = [next(it)["targets"].tolist() for _ in range(20)]
    resumed = task.batches("train", 16, seed=5, start_step=13)
    assert next(resumed)["targets"].tolist() == first[13]
    evals = list(task.batches("val", 16))
    assert sum(int(b["valid"].sum()) for b in evals) == 50
    assert all(b["inputs"].shape == (16, 256) for b in evals)
