"""LRA "Image": CIFAR-10 as a sequence of 1024 grayscale pixels, 10 classes.

Sources, tried in this order:
  * the extracted binary release `cifar-10-batches-bin/` given as task.data_dir (the folder or its
    parent): data_batch_{1..5}.bin and test_batch.bin, records of 1 label byte + 3072 pixel bytes
    (1024 R, 1024 G, 1024 B, row-major). Read as raw bytes; the pickled python release is never
    read. train = the first 90% of data_batch_1..5 in file order, val = the last 10%.
  * tensorflow-datasets `cifar10` prepared as array_record, read with
    `tfds.data_source(download=False)` from task.data_dir, or the tfds default data dir when
    task.data_dir is unset; splits as LRA: train[:90%], train[90%:], test. Never downloads.

Grayscale as LRA's tf.image.rgb_to_grayscale on uint8: float32 x/255, weights
(0.2989, 0.5870, 0.1140), back to uint8 as TF's convert_image_dtype does (x * 255.5, truncated;
within 1 of rounding the weighted sum). Token id = pixel + 1 (0 stays padding, so black pixels
are not masked). The default pool is mean over pixels: no CLS token is added (LRA's config pools a
learned CLS prepended inside its model).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lra.tasks import sources
from lra.tasks.base import SPLITS, ArrayTask, DataError, TaskConfig, fit_length, register_task
from lra.tasks.sources import subset

PIXEL_OFFSET = 1
RECORD = 1 + 3 * 1024
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)


@dataclasses.dataclass
class ImageConfig(TaskConfig):
    name: str = "image"
    seq_len: int = 1024          # 32 x 32; shorter truncates (top rows first), longer pads
    num_train: int = 0           # 0 = all 45000; else a random subset (data_seed) this size
    num_val: int = 0             # 0 = all 5000
    num_test: int = 0            # 0 = all 10000
    data_seed: int = 0           # the subsets above


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8[..., 3] -> uint8[...], following tf.image.rgb_to_grayscale's float32 arithmetic."""
    flt = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
    gray = (flt[..., 0] * GRAY_WEIGHTS[0] + flt[..., 1] * GRAY_WEIGHTS[1]
            + flt[..., 2] * GRAY_WEIGHTS[2])
    return (gray * np.float32(255.5)).astype(np.uint8)


def find_binary(data_dir: str | None) -> Path | None:
    if not data_dir:
        return None
    root = Path(data_dir).expanduser()
    for candidate in (root, root / "cifar-10-batches-bin"):
        if all((candidate / f).is_file() for f in TRAIN_FILES + (TEST_FILE,)):
            return candidate
    return None


def read_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch -> (labels int32[N], rgb uint8[N, 32, 32, 3]); an unreadable
    file, a partial record or a label > 9 raises a one-line DataError naming the file."""
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err.strerror or err}); re-extract "
                        f"cifar-10-binary.tar.gz and set task.data_dir to its folder") from None
    if raw.size == 0 or raw.size % RECORD:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {RECORD}-byte "
                        f"CIFAR-10 records; point task.data_dir at cifar-10-batches-bin")
    records = raw.reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int32)
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{path}: record {bad} has label {labels[bad]} > 9; not CIFAR-10 binary, "
                        f"point task.data_dir at an extracted cifar-10-batches-bin")
    rgb = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return labels, rgb


@register_task(ImageConfig)
class Image(ArrayTask):
    cfg: ImageConfig
    vocab_size = 256 + PIXEL_OFFSET
    num_classes = 10
    default_pool = "mean"
    fixed_length = "it is 32x32 = 1024 pixels"

    def __init__(self, cfg: ImageConfig):
        super().__init__(cfg)
        self._where: Path | None = None
        self._binary: Path | None = None
        self._sources: dict | None = None

    def prepare(self) -> Path:
        if self._where is not None:
            return self._where
        self._binary = find_binary(self.cfg.data_dir)
        if self._binary is not None:
            self._where = self._binary
            return self._where
        fix = ("download the binary release cifar-10-binary.tar.gz from "
               "https://www.cs.toronto.edu/~kriz/cifar.html, extract it and set "
               "task.data_dir=/path/to/cifar-10-batches-bin; or set task.data_dir to a directory "
               "already prepared with tensorflow-datasets (cifar10 as array_record); nothing is "
               "downloaded here")
        if self.cfg.data_dir and not Path(self.cfg.data_dir).expanduser().is_dir():
            raise DataError(f"CIFAR-10 not found ({self.cfg.data_dir} is not a directory): {fix}")
        try:
            opened, directory = sources.open_splits(
                "cifar10", ["train[:90%]", "train[90%:]", "test"], self.cfg.data_dir)
        except LookupError as err:
            where = f"no cifar-10-batches-bin in {self.cfg.data_dir}; " if self.cfg.data_dir else ""
            raise DataError(f"CIFAR-10 not found ({where}{err}): {fix}") from None
        self._sources = dict(zip(SPLITS, opened))
        self._where = directory
        return directory

    def _subset(self, split: str, total: int) -> np.ndarray:
        return subset(total, getattr(self.cfg, f"num_{split}"), self.cfg.data_seed, split)

    def _load_rgb(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if self._binary is not None:
            if split == "test":
                labels, rgb = read_binary(self._binary / TEST_FILE)
            else:
                parts = [read_binary(self._binary / f) for f in TRAIN_FILES]
                labels = np.concatenate([p[0] for p in parts])
                rgb = np.concatenate([p[1] for p in parts])
                cut = len(labels) * 9 // 10
                part = slice(None, cut) if split == "train" else slice(cut, None)
                labels, rgb = labels[part], rgb[part]
            rows = self._subset(split, len(labels))
            return labels[rows], rgb[rows]
        source = self._sources[split]
        rows = self._subset(split, len(source))
        records = [source[int(i)] for i in rows]
        labels = np.array([int(r["label"]) for r in records], np.int32)
        rgb = np.stack([np.asarray(r["image"], np.uint8) for r in records])
        return labels, rgb

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        self.prepare()
        labels, rgb = self._load_rgb(split)
        if rgb.shape[1:] != (32, 32, 3):
            raise DataError(f"CIFAR-10 {split}: images of shape {rgb.shape[1:]}, expected 32x32x3")
        pixels = rgb_to_gray(rgb).reshape(len(rgb), -1).astype(np.int32) + PIXEL_OFFSET
        return {"inputs": fit_length(pixels, self.cfg.seq_len), "targets": labels}
