"""Retrieval (AAN pairs): the LRA TSV format, byte encoding of both documents, errors, a run."""

from __future__ import annotations

import numpy as np
import pytest

from tiny_runs import tiny_cli_run
from lra.tasks import DataError
from lra.tasks.base import CLS_ID
from lra.tasks.retrieval import Retrieval, RetrievalConfig, read_tsv

PAIRS = [
    ("1.0", "P01-1001", "P02-2002", "We study parsing.", "Parsing with \"quotes\" and caf\u00e9s."),
    ("0.0", "P03-3003", "P04-4004", "Speech recognition.", "Machine translation of text."),
    ("1", "P05-5005", "P06-6006", "Word sense", "Word senses, disambiguated"),
    ("0", "P07-7007", "P08-8008", "Topic models", "Dependency trees"),
] * 3


def write_release(root, rows=PAIRS, prefix="new_aan_pairs"):
    folder = root / "lra_release" / "tsv_data"
    folder.mkdir(parents=True)
    for name in ("train", "eval", "test"):
        text = "".join("\t".join(row) + "\n" for row in rows)
        (folder / f"{prefix}.{name}.tsv").write_bytes(text.encode("utf-8"))
    return folder


def test_reads_lra_tsv_rows(tmp_path):
    folder = write_release(tmp_path)
    text1, text2, labels = read_tsv(folder / "new_aan_pairs.train.tsv")
    assert labels == [1, 0, 1, 0] * 3  # float labels as in the release ("1.0")
    assert text2[0] == "Parsing with \"quotes\" and caf\u00e9s.".encode()  # quotes kept verbatim
    for data_dir in (folder, tmp_path / "lra_release", tmp_path):
        task = Retrieval(RetrievalConfig(data_dir=str(data_dir), seq_len=12))
        assert task.prepare() == folder
    val = task.split("val")
    assert set(val) == {"inputs1", "inputs2", "targets"}
    assert val["inputs1"].shape == val["inputs2"].shape == (12, 12)
    assert val["inputs1"].dtype == np.int32 and val["targets"].tolist() == labels
    assert val["inputs1"][1].tolist() == [CLS_ID] + [b + 2 for b in b"Speech reco"]  # truncated
    assert val["inputs2"][3].tolist()[:4] == [CLS_ID] + [b + 2 for b in b"Dep"]
    short = Retrieval(RetrievalConfig(data_dir=str(folder), seq_len=64)).split("test")
    assert short["inputs1"][3].tolist()[: len("Topic models") + 2] == (
        [CLS_ID] + [b + 2 for b in b"Topic models"] + [0])
    assert task.spec.kind == "match" and task.spec.vocab_size == 258


def test_subsets_are_deterministic(tmp_path):
    folder = write_release(tmp_path)
    a = Retrieval(RetrievalConfig(data_dir=str(folder), num_train=5, seq_len=16)).split("train")
    b = Retrieval(RetrievalConfig(data_dir=str(folder), num_train=5, seq_len=16)).split("train")
    assert len(a["targets"]) == 5 and np.array_equal(a["inputs1"], b["inputs1"])


@pytest.mark.parametrize("bad_row, why", [
    ("1.0\tP1\tP2\tonly four fields", "4 tab-separated fields"),
    ("1.0\tP1\tP2\ta\tb\tsixth", "6 tab-separated fields, expected 5"),
    ("1.0\tP1\tP2\ta\tb\t", "6 tab-separated fields, expected 5"),
    ("yes\tP1\tP2\ta\tb", "malformed"),
    ("2.0\tP1\tP2\ta\tb", "not 0/1"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_row, why):
    rows = ["\t".join(r) for r in PAIRS[:2]] + [bad_row]
    path = tmp_path / "new_aan_pairs.train.tsv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=rf"new_aan_pairs.train.tsv:3: .*{why}"):
        read_tsv(path)


def test_a_huge_document_is_read_and_cut(tmp_path):
    # No csv module here (bytes split on tabs): a 10 MB field has no field limit to hit.
    huge = b"x" * 10_000_000
    path = tmp_path / "new_aan_pairs.train.tsv"
    path.write_bytes(b"1.0\tP1\tP2\t" + huge + b"\tshort\n0\tP3\tP4\ta\tb\n")
    text1, text2, labels = read_tsv(path, keep=16)
    assert labels == [1, 0] and text1 == [b"x" * 16, b"a"] and text2 == [b"short", b"b"]


def test_missing_files_name_task_data_dir(tmp_path):
    for data_dir in (None, str(tmp_path)):
        with pytest.raises(DataError, match="task.data_dir") as err:
            Retrieval(RetrievalConfig(data_dir=data_dir)).prepare()
        assert "\n" not in str(err.value)


def test_cli_tiny_run(tmp_path):
    folder = write_release(tmp_path / "data")
    result = tiny_cli_run(tmp_path / "run", "retrieval", f"task.data_dir={folder}")
    assert result["seq_len"] == 512
