"""Reader of LRA's released Pathfinder files: metadata rows, the images they name, and the cache
key that follows the release's content."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from lra.tasks.base import DataError, content_key
from lra.tasks.pathfinder.generator import GENERATOR_VERSION

log = logging.getLogger(__name__)

# LRA's three difficulties = contour length in paddles (drewlinsley/pathfinder `contour_length`).
DIFFICULTY_DIRS = {"baseline": "curv_baseline", "9": "curv_contour_length_9",
                   "14": "curv_contour_length_14"}
NUMPY_MAGIC = b"\x93NUMPY"


def read_metadata(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) per row of a release metadata file.

    The LRA release's `metadata/<k>.npy` are plain text despite the suffix (LRA's own builder
    reads them with tf.io.read_file and splits lines); np.load would treat them as pickles, so
    they are parsed as text. A real NumPy file (magic header) is loaded with allow_pickle=False
    and must hold strings: 1-D = one row per line, 2-D = one row of fields per line.
    """
    with open(path, "rb") as f:
        head = f.read(len(NUMPY_MAGIC))
    if head == NUMPY_MAGIC:
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise DataError(f"{path}:1: unreadable metadata array ({err})") from None
        if array.dtype.kind not in "US":
            raise DataError(f"{path}:1: metadata array has dtype {array.dtype}, expected strings")
        array = np.char.decode(array, "utf-8") if array.dtype.kind == "S" else array
        if array.ndim == 1:
            return [(i, str(row).split()) for i, row in enumerate(array, start=1) if str(row).strip()]
        if array.ndim == 2:
            return [(i, [str(v) for v in row]) for i, row in enumerate(array, start=1)]
        raise DataError(f"{path}:1: metadata array has {array.ndim} dims, expected 1 or 2")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:1: metadata is neither text nor a NumPy string array ({err})") from None
    return [(i, line.split()) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def metadata_files(directory: Path) -> list[Path]:
    """metadata/*.npy in numeric order of their stem (0, 1, ..., 10), as the release numbers them."""
    files = list((directory / "metadata").glob("*.npy"))
    return sorted(files, key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem))


def release_rows(directory: Path) -> list[tuple[Path, int]]:
    """(image path, label) per metadata row of one difficulty directory, in file order; a
    malformed row or a label other than 0/1 raises a DataError naming the file and line."""
    rows: list[tuple[Path, int]] = []
    for meta in metadata_files(directory):
        for line_no, fields in read_metadata(meta):
            try:
                rows.append((directory / fields[0] / fields[1], int(fields[3])))
            except (IndexError, ValueError) as err:
                raise DataError(f"{meta}:{line_no}: malformed Pathfinder metadata row "
                                f"{' '.join(fields)!r} ({err!r})") from None
            if rows[-1][1] not in (0, 1):
                raise DataError(f"{meta}:{line_no}: label {rows[-1][1]} is not 0 or 1")
    return rows


def release_key(directory: Path, resolution: int) -> str:
    """Cache key of a release directory: the full content of its metadata files, plus the
    (relative path, size, mtime_ns) of every image the metadata names, a missing one as such.
    Images are stat'ed, not hashed: a difficulty holds ~200k PNGs (a few hundred MB) and reading
    them all at every start-up would dominate it. So an added, repaired or replaced image is
    seen, except one replaced by a same-size file with its old mtime restored (delete the
    cache's release-* directory then)."""
    metadata = metadata_files(directory)
    digest = hashlib.sha1(f"{directory.resolve()}\0{resolution}\0{GENERATOR_VERSION}\0"
                          f"{content_key(metadata, root=directory)}\n".encode())
    for image_path, _ in release_rows(directory):
        try:
            stat = image_path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        digest.update(f"{os.path.relpath(image_path, directory)}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()[:10]


def read_image(image_path: Path, resolution: int) -> np.ndarray | str:
    """The image's grayscale pixels, or why it is skipped: "missing file", "empty file",
    "unreadable (...)" (LRA's filter drops those), or "decompression bomb (...)": a header that
    claims more than PIL.Image.MAX_IMAGE_PIXELS pixels (PIL raises past twice that and only
    warns below; both are refused here, undecoded). An image of another size than
    resolution x resolution raises a DataError naming it (a wrong task.resolution), read from
    the header before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        if image_path.stat().st_size == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(image_path) as img:
                if img.size != (resolution, resolution):
                    raise DataError(f"{image_path}: image is {img.size[0]}x{img.size[1]}, "
                                    f"expected {resolution}x{resolution}; check task.resolution")
                return np.asarray(img.convert("L"), np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"decompression bomb ({' '.join(str(err).split())})"
    except FileNotFoundError:
        return "missing file"
    except (OSError, UnidentifiedImageError, ValueError) as err:
        return f"unreadable ({' '.join(str(err).split()) or type(err).__name__})"


def read_release(directory: Path, resolution: int) -> dict[str, dict[str, np.ndarray]]:
    """Images and labels of one difficulty directory, split 80/10/10 in file order as LRA
    (split over metadata rows first, then empty/unreadable images dropped, as LRA's filter).
    A split left without images raises a one-line DataError naming the directory."""
    rows = release_rows(directory)
    n = len(rows)
    bounds = {"train": (0, int(0.8 * n)), "val": (int(0.8 * n), int(0.9 * n)), "test": (int(0.9 * n), n)}
    out, skipped = {}, {}  # kind of skip -> [count, first file, its detail]
    for split, (lo, hi) in bounds.items():
        images, labels = [], []
        for image_path, label in rows[lo:hi]:
            pixels = read_image(image_path, resolution)
            if isinstance(pixels, str):
                kind, _, detail = pixels.partition(" (")  # "decompression bomb", "(Image size ...)"
                skipped.setdefault(kind, [0, image_path, f" ({detail}" if detail else ""])[0] += 1
                continue
            images.append(pixels)
            labels.append(label)
        if not images:
            why = (f"{hi - lo} metadata rows, all missing/empty/unreadable images" if hi > lo else
                   f"none of the {n} metadata rows falls in it (80/10/10 in file order)")
            raise DataError(f"no readable images for the {split} split under {directory} ({why}): "
                            f"restore the imgs/ files that metadata/*.npy names (re-extract the "
                            f"LRA release) or point task.data_dir at a complete release")
        out[split] = {"images": np.asarray(images, np.uint8).reshape(-1, resolution, resolution),
                      "labels": np.asarray(labels, np.int32)}
    if skipped:
        kinds = "; ".join(f"{kind}: {count}, first {os.path.relpath(first, directory)}{detail}"
                          for kind, (count, first, detail) in skipped.items())
        log.warning("pathfinder: skipped %d empty or unreadable images in %s (%s)",
                    sum(count for count, _, _ in skipped.values()), directory, kinds)
    return out

