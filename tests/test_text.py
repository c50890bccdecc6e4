"""Text (IMDB bytes): encoding, the aclImdb folder reader, tfds via mock_data, missing data."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tiny_runs import tiny_cli_run, tiny_mock_tfds_run
from lra.tasks import DataError
from lra.tasks.base import CLS_ID
from lra.tasks.sources import encode_bytes
from lra.tasks.text import Text, TextConfig

REVIEWS = {
    ("train", "pos"): ["A wonderful film.", "Loved it <br />truly", "caf\u00e9 cr\u00e8me, great",
                       "10/10", "best of the year", "brilliant acting"],
    ("train", "neg"): ["Awful.", "a waste of time", "boring plot", "bad", "I left early", "meh"],
    ("test", "pos"): ["superb", "really good", "fine work", "charming"],
    ("test", "neg"): ["terrible", "dull", "poor", "weak"],
}


def write_acl_imdb(root):
    for (split, label), texts in REVIEWS.items():
        folder = root / "aclImdb" / split / label
        folder.mkdir(parents=True)
        for i, text in enumerate(texts):
            (folder / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(text, encoding="utf-8")
    (root / "aclImdb" / "train" / "unsup").mkdir()  # present in the release, ignored
    return root / "aclImdb"


def test_encode_bytes_is_cls_then_byte_plus_two():
    out = encode_bytes([b"ab", "\u00e9".encode(), b"xyz" * 10], 6)
    assert out.dtype == np.int32 and out.shape == (3, 6)
    assert out[0].tolist() == [CLS_ID, ord("a") + 2, ord("b") + 2, 0, 0, 0]
    assert out[1].tolist() == [CLS_ID, 0xC3 + 2, 0xA9 + 2, 0, 0, 0]  # UTF-8 bytes, not chars
    assert out[2].tolist() == [CLS_ID] + [c + 2 for c in b"xyzxy"]     # truncated to seq_len
    assert out.max() <= 257


def test_reads_acl_imdb_folder_like_lra(tmp_path):
    folder = write_acl_imdb(tmp_path)
    for data_dir in (folder, tmp_path):  # the folder itself or its parent
        task = Text(TextConfig(data_dir=str(data_dir), seq_len=32))
        assert task.prepare() == folder
        train, val, test = (task.split(s) for s in ("train", "val", "test"))
        assert train["targets"].tolist() == [0] * 6 + [1] * 6
        assert np.array_equal(val["inputs"], test["inputs"])  # LRA: IMDB test is val and test
        assert sorted(test["targets"].tolist()) == [0] * 4 + [1] * 4
    first = sorted((folder / "train" / "neg").glob("*.txt"))[0].read_bytes()
    assert train["inputs"][0].tolist()[: len(first) + 2] == [CLS_ID] + [b + 2 for b in first] + [0]


def test_val_from_train_is_a_deterministic_disjoint_split(tmp_path):
    folder = write_acl_imdb(tmp_path)
    a = Text(TextConfig(data_dir=str(folder), val_from_train=0.25, seq_len=32))
    b = Text(TextConfig(data_dir=str(folder), val_from_train=0.25, seq_len=32))
    assert a.num_examples("val") == 3 and a.num_examples("train") == 9
    assert np.array_equal(a.split("val")["inputs"], b.split("val")["inputs"])
    rows = {tuple(r) for split in ("train", "val") for r in a.split(split)["inputs"]}
    assert len(rows) == 12  # disjoint and together all of train
    assert a.num_examples("test") == 8
    capped = Text(TextConfig(data_dir=str(folder), num_train=5, seq_len=32))
    assert capped.num_examples("train") == 5


def test_tfds_source_via_mock_data():
    with tfds.testing.mock_data(num_examples=10):
        task = Text(TextConfig(seq_len=40))
        task.prepare()
        train = task.split("train")
    assert train["inputs"].shape == (10, 40) and (train["inputs"][:, 0] == CLS_ID).all()
    assert set(train["targets"].tolist()) <= {0, 1}
    assert (train["inputs"][:, 1:3] >= 2).all()


def test_missing_data_names_both_ways_and_never_downloads(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    for data_dir in (None, str(tmp_path), str(tmp_path / "nowhere")):
        with pytest.raises(DataError) as err:
            Text(TextConfig(data_dir=data_dir)).prepare()
        message = str(err.value)
        assert "\n" not in message
        assert "task.data_dir=/path/to/aclImdb" in message and "tensorflow-datasets" in message


def test_run_on_mock_tfds_in_process(tmp_path):
    assert tiny_mock_tfds_run(tmp_path, "text").seq_len == 256


def test_cli_tiny_run_on_acl_imdb_folder(tmp_path):
    folder = write_acl_imdb(tmp_path / "data")
    assert tiny_cli_run(tmp_path / "run", "text", f"task.data_dir={folder}")["seq_len"] == 512
