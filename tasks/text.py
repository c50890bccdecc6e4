"""LRA "Text": byte-level IMDB sentiment classification (2 classes).

Two sources, tried in this order:
  * an extracted `aclImdb/` folder (train/{pos,neg}/*.txt, test/{pos,neg}/*.txt; pos = 1) given
    as task.data_dir (the folder itself or its parent);
  * tensorflow-datasets `imdb_reviews` (plain_text) prepared as array_record, read with
    `tfds.data_source(download=False)` from task.data_dir, or from the tfds default data dir
    ($TFDS_DATA_DIR or ~/tensorflow_datasets) when task.data_dir is unset. Never downloads.

Encoding as LRA (ByteTextEncoder on the raw review bytes) but shifted for this harness:
id = byte + 2 (PAD 0, CLS 1), CLS first, then the first seq_len - 1 bytes, padded with 0.
As in LRA, the IMDB test split serves as both val and test; task.val_from_train=F instead holds
out a fraction F of train (a permutation drawn from task.data_seed) as val.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lra.tasks import sources
from lra.tasks.base import ArrayTask, DataError, TaskConfig, register_task
from lra.tasks.sources import BYTE_OFFSET, encode_bytes

VOCAB_SIZE = 256 + BYTE_OFFSET
LABELS = {"neg": 0, "pos": 1}  # tfds imdb_reviews' ClassLabel order


@dataclasses.dataclass
class TextConfig(TaskConfig):
    name: str = "text"
    seq_len: int = 1000          # LRA repo's max_length (base_tc_config.py); the paper says 4K: preset=paper
    val_from_train: float = 0.0  # 0 = LRA: IMDB test is val and test; else this fraction of train
    num_train: int = 0           # 0 = all; else a random subset (data_seed) of this size
    num_val: int = 0             # 0 = all
    num_test: int = 0            # 0 = all
    data_seed: int = 0           # the val_from_train split and the subsets above


def find_acl_imdb(data_dir: str | None) -> Path | None:
    """The aclImdb folder at data_dir or data_dir/aclImdb, if it has the train/test layout."""
    if not data_dir:
        return None
    root = Path(data_dir).expanduser()
    for candidate in (root, root / "aclImdb"):
        if all((candidate / s / c).is_dir() for s in ("train", "test") for c in LABELS):
            return candidate
    return None


def read_acl_imdb(folder: Path, split: str) -> tuple[list[bytes], list[int]]:
    """Raw review bytes (any encoding; empty allowed) and labels from the folder names; a file
    that cannot be read raises a one-line DataError naming it."""
    texts, labels = [], []
    for name, label in LABELS.items():
        for path in sorted((folder / split / name).glob("*.txt")):
            try:
                texts.append(path.read_bytes())
            except OSError as err:
                raise DataError(f"{path}: unreadable review ({err.strerror or err}); fix or "
                                f"remove the file, or re-extract aclImdb_v1.tar.gz") from None
            labels.append(label)
    if not texts:
        raise DataError(f"{folder / split}: no reviews in pos/ or neg/; point task.data_dir "
                        f"at an extracted aclImdb folder")
    return texts, labels


def not_found(detail: str) -> DataError:
    """IMDB is nowhere to be read: the error that says how to get it (nothing downloads here)."""
    return DataError(
        f"IMDB not found ({detail}): download aclImdb_v1.tar.gz from "
        f"https://ai.stanford.edu/~amaas/data/sentiment/, extract it and set "
        f"task.data_dir=/path/to/aclImdb; or set task.data_dir to a directory already "
        f"prepared with tensorflow-datasets (imdb_reviews as array_record); nothing is "
        f"downloaded here")


@register_task(TextConfig)
class Text(ArrayTask):
    cfg: TextConfig
    vocab_size = VOCAB_SIZE
    num_classes = len(LABELS)

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self._raw: dict[str, tuple[list, list[int]]] | None = None
        self._where: Path | None = None

    def prepare(self) -> Path:
        if self._raw is not None:
            return self._where
        if not 0.0 <= self.cfg.val_from_train < 1.0:
            raise DataError(f"task.val_from_train={self.cfg.val_from_train} must be in [0, 1)")
        folder = find_acl_imdb(self.cfg.data_dir)
        if folder is not None:
            self._raw = {s: read_acl_imdb(folder, s) for s in ("train", "test")}
            self._where = folder
            return folder
        if self.cfg.data_dir and not Path(self.cfg.data_dir).expanduser().is_dir():
            raise not_found(f"{self.cfg.data_dir} is not a directory")
        try:
            opened, directory = sources.open_splits("imdb_reviews/plain_text", ["train", "test"],
                                                    self.cfg.data_dir)
        except LookupError as err:
            where = f"no aclImdb folder in {self.cfg.data_dir}; " if self.cfg.data_dir else ""
            raise not_found(f"{where}{err}") from None
        self._raw = {}
        for split, source in zip(("train", "test"), opened):
            rows = sources.read_all(source, ("text", "label"))
            self._raw[split] = ([t for t, _ in rows], [int(l) for _, l in rows])
        self._where = directory
        return directory

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        self.prepare()
        texts, labels = self._raw["test" if split != "train" else "train"]
        fraction = self.cfg.val_from_train
        if fraction and split in ("train", "val"):
            texts, labels = self._raw["train"]
            order = np.random.default_rng(self.cfg.data_seed).permutation(len(texts))
            num_val = max(1, int(round(fraction * len(texts))))
            rows = np.sort(order[:num_val] if split == "val" else order[num_val:])
            texts, labels = [texts[i] for i in rows], [labels[i] for i in rows]
        want = getattr(self.cfg, f"num_{split}")
        rows = sources.subset(len(texts), want, self.cfg.data_seed, split)
        texts, labels = [texts[i] for i in rows], [labels[i] for i in rows]
        return {"inputs": encode_bytes(texts, self.cfg.seq_len),
                "targets": np.asarray(labels, np.int32)}
