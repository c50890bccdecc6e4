"""LRA "Retrieval": byte-level document matching on the ACL Anthology Network (AAN), 2 classes.

Reads the LRA release's `tsv_data/new_aan_pairs.{train,eval,test}.tsv` (eval = val) from
task.data_dir (the release root, its tsv_data/ folder, or a folder holding the three files).
Rows have no header and five tab-separated columns: label, id1, id2, text1, text2 (LRA reads
them with field_delim='\\t', no quote handling, label as a float such as 1.0). Each document is
encoded like Text: id = byte + 2 (PAD 0, CLS 1), CLS first, the first seq_len - 1 bytes.
The model is a dual encoder with shared weights and LRA's [u, v, u*v, u-v] head (kind=match).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from lra.tasks.base import ArrayTask, DataError, TaskConfig, register_task
from lra.tasks.sources import encode_bytes, subset
from lra.tasks.text import VOCAB_SIZE

FILES = {"train": "train", "val": "eval", "test": "test"}


@dataclasses.dataclass
class RetrievalConfig(TaskConfig):
    name: str = "retrieval"
    seq_len: int = 4000              # bytes per document incl. CLS (LRA matching/configs/base_match_config.py)
    file_prefix: str = "new_aan_pairs"
    num_train: int = 0               # 0 = all; else a random subset (data_seed) of this size
    num_val: int = 0                 # 0 = all
    num_test: int = 0                # 0 = all
    data_seed: int = 0               # the subsets above


def read_tsv(path: Path, keep: int | None = None) -> tuple[list[bytes], list[bytes], list[int]]:
    """(text1s, text2s, labels), texts cut to `keep` bytes; a malformed row raises DataError
    naming path:line."""
    text1, text2, labels = [], [], []
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            fields = line.split(b"\t")
            try:
                if len(fields) != 5:
                    raise ValueError(f"{len(fields)} tab-separated fields, expected 5 "
                                     f"(label, id1, id2, text1, text2)")
                value = float(fields[0])
                if value not in (0.0, 1.0):
                    raise ValueError(f"label {fields[0].decode(errors='replace')!r} is not 0/1")
            except ValueError as err:
                raise DataError(f"{path}:{line_no}: malformed AAN row ({err})") from None
            labels.append(int(value))
            text1.append(fields[3][:keep])
            text2.append(fields[4][:keep])
    return text1, text2, labels


@register_task(RetrievalConfig)
class Retrieval(ArrayTask):
    cfg: RetrievalConfig
    vocab_size = VOCAB_SIZE
    num_classes = 2
    kind = "match"

    def _path(self, directory: Path, split: str) -> Path:
        return directory / f"{self.cfg.file_prefix}.{FILES[split]}.tsv"

    def prepare(self) -> Path:
        wanted = f"{self.cfg.file_prefix}.{{train,eval,test}}.tsv"
        if not self.cfg.data_dir:
            raise DataError(f"Retrieval needs the LRA release: set task.data_dir=DIR, the "
                            f"lra_release folder (or its tsv_data/) holding {wanted}")
        root = Path(self.cfg.data_dir).expanduser()
        for directory in (root, root / "tsv_data", root / "lra_release" / "tsv_data"):
            if all(self._path(directory, s).is_file() for s in FILES):
                return directory
        raise DataError(f"Retrieval files {wanted} not found in {root} or {root / 'tsv_data'}: "
                        f"set task.data_dir to the LRA release's tsv_data folder")

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        # No array cache: re-reading the TSV costs about what loading int32 arrays would.
        text1, text2, labels = read_tsv(self._path(self.prepare(), split), self.cfg.seq_len)
        rows = subset(len(labels), getattr(self.cfg, f"num_{split}"), self.cfg.data_seed, split)
        text1, text2 = [text1[i] for i in rows], [text2[i] for i in rows]
        labels = [labels[i] for i in rows]
        return {"inputs1": encode_bytes(text1, self.cfg.seq_len),
                "inputs2": encode_bytes(text2, self.cfg.seq_len),
                "targets": np.asarray(labels, np.int32)}
