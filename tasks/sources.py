"""Shared by the readers of released data (text, retrieval, image): byte encoding, random
subsets, and random-access reads of prepared tensorflow-datasets that never download.

`tfds.data_source(..., download=False)` needs no TensorFlow runtime. It is only ever called with
download=False, so a missing dataset fails at once (the caller turns that into a DataError) and
`tfds.testing.mock_data` (which patches the builder in-process) works unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lra.tasks.base import CLS_ID, split_seed

BYTE_OFFSET = 2  # byte ids: byte + 2, so 0 stays padding and 1 is CLS


def encode_bytes(texts, length: int) -> np.ndarray:
    """Byte strings (str: UTF-8) -> int32[N, length]: CLS, then byte + 2, truncated, 0-padded."""
    out = np.zeros((len(texts), length), np.int32)
    out[:, 0] = CLS_ID
    for i, text in enumerate(texts):
        if isinstance(text, str):
            text = text.encode("utf-8")
        row = np.frombuffer(text[: length - 1], np.uint8)
        out[i, 1:1 + len(row)] = row.astype(np.int32) + BYTE_OFFSET
    return out


def subset(total: int, want: int, seed: int, split: str) -> np.ndarray:
    """Sorted indices of `want` random rows of `total` (all rows when want is 0 or >= total)."""
    if not want or want >= total:
        return np.arange(total)
    rng = np.random.default_rng(split_seed(seed, split))
    return np.sort(rng.permutation(total)[:want])


def default_data_dir() -> Path:
    """Where tfds looks when no data_dir is given ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def open_splits(name: str, splits: Sequence[str], data_dir: str | Path | None
                ) -> tuple[list[Any], Path]:
    """Data sources for `splits` of a prepared dataset, and the directory searched.

    Raises LookupError (one line) when the dataset is not prepared in array_record form there.
    """
    import tensorflow_datasets as tfds

    directory = Path(data_dir).expanduser() if data_dir else default_data_dir()
    try:
        opened = tfds.data_source(name, split=list(splits), data_dir=str(directory),
                                  download=False)
    except Exception as err:  # noqa: BLE001 - tfds raises several types for "not prepared"
        dataset = name.split("/")[0]
        if (directory / dataset).is_dir():
            raise LookupError(f"{directory / dataset} holds no complete array_record copy of "
                              f"tfds {name} ({type(err).__name__})") from None
        raise LookupError(f"no tfds {dataset} under {directory}") from None
    return list(opened), directory


def read_all(source, fields: Sequence[str]) -> list[tuple]:
    """Every record of a data source as tuples of `fields` (single-index reads: works on mocks)."""
    return [tuple(record[f] for f in fields) for record in (source[i] for i in range(len(source)))]
