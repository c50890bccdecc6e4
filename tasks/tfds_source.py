"""Random-access reads of prepared tensorflow-datasets (array_record), never downloading.

`tfds.data_source(..., download=False)` needs no TensorFlow runtime. It is only ever called with
download=False, so a missing dataset fails at once (the caller turns that into a DataError) and
`tfds.testing.mock_data` (which patches the builder in-process) works unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence


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
        sources = tfds.data_source(name, split=list(splits), data_dir=str(directory),
                                   download=False)
    except Exception as err:  # noqa: BLE001 - tfds raises several types for "not prepared"
        reason = " ".join(str(err).split())[:200]
        raise LookupError(f"tfds {name} not prepared as array_record under {directory} "
                          f"({type(err).__name__}: {reason})") from None
    return list(sources), directory


def read_all(source, fields: Sequence[str]) -> list[tuple]:
    """Every record of a data source as tuples of `fields` (single-index reads: works on mocks)."""
    return [tuple(record[f] for f in fields) for record in (source[i] for i in range(len(source)))]
