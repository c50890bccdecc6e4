"""Image (CIFAR-10 grayscale pixels): TF's grayscale arithmetic, the binary release, tfds mock."""

from __future__ import annotations

import numpy as np
import pytest

from tiny_runs import tiny_cli_run, tiny_mock_tfds_run
from lra.tasks import DataError
from lra.tasks.image import TEST_FILE, TRAIN_FILES, Image, ImageConfig, rgb_to_gray


def test_grayscale_follows_tf_rgb_to_grayscale():
    rgb = np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                    [10, 200, 30]], np.uint8)
    # TF: uint8 -> x/255 (float32) -> weights (0.2989, 0.5870, 0.1140) -> * 255.5 -> truncate.
    assert rgb_to_gray(rgb).tolist() == [255, 0, 76, 149, 29, 124]
    many = np.random.default_rng(0).integers(0, 256, (5000, 3)).astype(np.uint8)
    exact = many.astype(np.float64) @ np.array([0.2989, 0.5870, 0.1140])
    gray = rgb_to_gray(many).astype(np.float64)
    assert rgb_to_gray(many).dtype == np.uint8
    assert np.abs(gray - exact).max() < 1.0 and np.mean(gray == np.round(exact)) > 0.5


def write_batches(folder, per_file=20, seed=0):
    """Binary release files; returns labels and rgb images [N, 32, 32, 3] per file name."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in TRAIN_FILES + (TEST_FILE,):
        labels = rng.integers(0, 10, per_file).astype(np.uint8)
        rgb = rng.integers(0, 256, (per_file, 32, 32, 3)).astype(np.uint8)
        planes = rgb.transpose(0, 3, 1, 2).reshape(per_file, 3072)  # R plane, G plane, B plane
        (folder / name).write_bytes(np.concatenate([labels[:, None], planes], 1).tobytes())
        written[name] = (labels.astype(np.int32), rgb)
    return written


def test_reads_cifar_binary_release(tmp_path):
    written = write_batches(tmp_path / "cifar-10-batches-bin")
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-bin"):
        task = Image(ImageConfig(data_dir=str(data_dir)))
        assert task.prepare() == tmp_path / "cifar-10-batches-bin"
    labels = np.concatenate([written[f][0] for f in TRAIN_FILES])
    rgb = np.concatenate([written[f][1] for f in TRAIN_FILES])
    train, val, test = (task.split(s) for s in ("train", "val", "test"))
    assert train["targets"].tolist() == labels[:90].tolist()  # train[:90%] in file order
    assert val["targets"].tolist() == labels[90:].tolist()
    assert test["targets"].tolist() == written[TEST_FILE][0].tolist()
    assert train["inputs"].shape == (90, 1024) and train["inputs"].dtype == np.int32
    row, col = 5, 17  # pixel (row, col) is token row * 32 + col, id = gray + 1
    assert train["inputs"][3, row * 32 + col] == int(rgb_to_gray(rgb[3, row, col])) + 1
    assert np.array_equal(val["inputs"][0], rgb_to_gray(rgb[90]).reshape(-1).astype(np.int32) + 1)
    assert train["inputs"].min() >= 1 and train["inputs"].max() <= 256
    assert task.spec.default_pool == "mean" and task.spec.vocab_size == 257
    short = Image(ImageConfig(data_dir=str(tmp_path), seq_len=512, num_test=7)).split("test")
    assert short["inputs"].shape == (7, 512)


def test_bad_binary_file_and_missing_data(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    folder = tmp_path / "cifar-10-batches-bin"
    write_batches(folder)
    with open(folder / "data_batch_3.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(DataError, match="data_batch_3.bin"):
        Image(ImageConfig(data_dir=str(folder))).split("train")
    for data_dir in (str(tmp_path / "empty"), None):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(DataError, match="task.data_dir=/path/to/cifar-10-batches-bin") as err:
            Image(ImageConfig(data_dir=data_dir)).prepare()
        assert "\n" not in str(err.value) and "tensorflow-datasets" in str(err.value)


def test_run_on_mock_tfds_in_process(tmp_path):
    assert tiny_mock_tfds_run(tmp_path, "image").seq_len == 256


def test_cli_tiny_run_on_binary_release(tmp_path):
    write_batches(tmp_path / "data" / "cifar-10-batches-bin", per_file=8)
    result = tiny_cli_run(tmp_path / "run", "image", f"task.data_dir={tmp_path / 'data'}")
    assert result["seq_len"] == 1024
