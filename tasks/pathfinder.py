"""Pathfinder and Path-X (Linsley et al. 2018, as used by LRA, Tay et al. 2021).

A grayscale `resolution` x `resolution` image holds two long paths of `num_dashes` short dashes
(bounded turning angle between consecutive dashes), several short distractor paths and two
endpoint circles. Label 1: both circles sit at the two ends of the same long path; label 0: each
circle sits at an end of a different long path. Both labels have the same path statistics, so
only tracing the contour tells them apart. The image is flattened row-major to L = resolution^2
tokens with id = pixel + 1 (0 stays padding; vocab 257), classified with mean pooling (LRA's
classifier_pool='MEAN').

Generated here by default (vectorised over a batch of images; cached as .npz per config), or read
from the LRA release with `task.data_dir=DIR`, DIR holding
`pathfinder{res}/{curv_baseline|curv_contour_length_9|curv_contour_length_14}/` with
`imgs/<k>/sample_<i>.png` and `metadata/<k>.npy` (one text row per image: fields 0-1 the image's
directory and file name relative to the difficulty directory, field 3 the label).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np

from tasks.base import ArrayTask, DataError, TaskConfig, TaskSpec, cache_root, config_key

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RESOLUTIONS = (32, 64, 128, 256)
# LRA's three difficulties = contour length in paddles (drewlinsley/pathfinder `contour_length`).
DIFFICULTY_DIRS = {"baseline": "curv_baseline", "9": "curv_contour_length_9",
                   "14": "curv_contour_length_14"}
NUM_DASHES = {"baseline": 6, "9": 9, "14": 14}
GENERATOR_VERSION = 1  # bump when the generator's output changes (invalidates caches)
NUMPY_MAGIC = b"\x93NUMPY"


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Stimulus geometry in output pixels (the dash = Linsley's 'paddle')."""

    dash_length: float
    dash_gap: float
    line_width: float
    circle_radius: float
    margin: float             # minimum clearance between different paths / circles
    distractor_dashes: int    # total dashes over all distractors (LRA: num_distractor_snakes * len)


# Per resolution, after the generator settings quoted in LRA's lra_benchmarks/data/pathfinder.py
# (marker_radius 1.5/2.5/3/5, paddle_thickness 0.5/1/1.5/2, distractor totals 20/22/35/30);
# dash length and gap are scaled so a 14-dash path spans about the image width, as in LRA.
GEOMETRY = {
    32: Geometry(dash_length=2.0, dash_gap=1.0, line_width=1.0, circle_radius=1.5, margin=1.0,
                 distractor_dashes=20),
    64: Geometry(dash_length=3.0, dash_gap=1.5, line_width=1.0, circle_radius=2.5, margin=1.5,
                 distractor_dashes=22),
    128: Geometry(dash_length=5.0, dash_gap=2.5, line_width=1.5, circle_radius=3.0, margin=2.0,
                  distractor_dashes=35),
    256: Geometry(dash_length=8.0, dash_gap=3.5, line_width=2.0, circle_radius=5.0, margin=3.0,
                  distractor_dashes=30),
}


@dataclasses.dataclass
class PathfinderConfig(TaskConfig):
    name: str = "pathfinder"
    seq_len: int = 1024            # resolution^2; other values pad (id 0) or truncate the image
    resolution: int = 32           # 32 | 64 | 128 | 256 (LRA: pathfinder32; Path-X = 128)
    difficulty: str = "14"         # baseline (6 dashes) | 9 | 14 (LRA: 14, the 'hard' set)
    num_train: int = 160000        # LRA: 80/10/10 of 200k images
    num_val: int = 20000
    num_test: int = 20000
    max_turn_deg: float = 30.0     # bound on the turn between consecutive dashes
    num_distractors: int = -1      # -1: GEOMETRY total / distractor length (LRA's rule)
    dash_length: float = 0.0       # 0 = the resolution's GEOMETRY value (same for the four below)
    dash_gap: float = 0.0
    line_width: float = 0.0
    circle_radius: float = 0.0
    margin: float = 0.0
    supersample: int = 2           # render at 2x and average down: anti-aliased grey edges
    candidates: int = 16           # headings tried per dash before a path gives up
    data_seed: int = 0             # generator seed (independent of the training seed)


@dataclasses.dataclass
class PathXConfig(PathfinderConfig):
    name: str = "pathx"
    seq_len: int = 16384
    resolution: int = 128


# ----------------------------------------------------------------------------- generator


def geometry(cfg: PathfinderConfig) -> Geometry:
    if cfg.resolution not in GEOMETRY:
        raise ValueError(f"task.resolution={cfg.resolution}; use one of {RESOLUTIONS}")
    base = GEOMETRY[cfg.resolution]
    overrides = {f: getattr(cfg, f) for f in ("dash_length", "dash_gap", "line_width",
                                              "circle_radius", "margin") if getattr(cfg, f) > 0}
    return dataclasses.replace(base, **overrides)


def num_dashes(cfg: PathfinderConfig) -> int:
    if str(cfg.difficulty) not in NUM_DASHES:
        raise ValueError(f"task.difficulty={cfg.difficulty!r}; use one of {', '.join(NUM_DASHES)}")
    return NUM_DASHES[str(cfg.difficulty)]


def disk_offsets(radius: float) -> np.ndarray:
    """Integer (dy, dx) offsets within `radius` (at least the centre): the stamp for disks/lines."""
    reach = int(math.floor(radius))
    dy, dx = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    keep = dy * dy + dx * dx <= radius * radius + 1e-9
    return np.stack([dy[keep], dx[keep]], axis=-1).astype(np.int32)


class _Canvas:
    """Hi-res occupancy (`blocked`) and ink (`ink`) grids for a batch, with stamp helpers."""

    def __init__(self, batch: int, size: int):
        self.size = size
        self.blocked = np.zeros((batch, size * size), bool)
        self.ink = np.zeros((batch, size * size), np.uint8)
        self.rows = np.arange(batch)

    def footprint(self, points_hi: np.ndarray, stamp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices [..., N*S] of `stamp` placed at each point, and whether all lie inside."""
        base = np.floor(points_hi).astype(np.int32)
        y = base[..., 1, None] + stamp[:, 0]
        x = base[..., 0, None] + stamp[:, 1]
        inside = ((y >= 0) & (y < self.size) & (x >= 0) & (x < self.size))
        flat = np.clip(y, 0, self.size - 1) * self.size + np.clip(x, 0, self.size - 1)
        shape = flat.shape[:-2] + (-1,)
        return flat.reshape(shape), inside.reshape(shape).all(-1)

    def free(self, flat_BxKxN: np.ndarray, inside_BxK: np.ndarray) -> np.ndarray:
        hit = self.blocked[self.rows[:, None, None], flat_BxKxN].any(-1)
        return inside_BxK & ~hit

    def write(self, grid: np.ndarray, flat_BxN: np.ndarray, where_B: np.ndarray, value) -> None:
        rows = np.nonzero(where_B)[0]
        grid[rows[:, None], flat_BxN[rows]] = value


def _generate_batch(cfg: PathfinderConfig, rng: np.random.Generator, batch: int) -> dict:
    """One batch of candidate stimuli (paths and hi-res ink, no circles yet) and `alive`, whether
    both long paths could be completed with every endpoint circle clear of other paths."""
    geo, n_main = geometry(cfg), num_dashes(cfg)
    ss, res, k = cfg.supersample, cfg.resolution, cfg.candidates
    n_distractor_dashes = max(1, n_main // 3)  # LRA: distractor_length = contour_length // 3
    n_distractors = (cfg.num_distractors if cfg.num_distractors >= 0
                     else geo.distractor_dashes // n_distractor_dashes)
    lengths = [n_main, n_main] + [n_distractor_dashes] * n_distractors
    num_paths, max_dashes = len(lengths), n_main

    line_r = geo.line_width * ss / 2
    draw = disk_offsets(line_r)                                   # ink of a line
    block = disk_offsets(line_r + geo.margin * ss)                # what other paths must avoid
    circle = disk_offsets(geo.circle_radius * ss)                 # circle ink / clearance test
    circle_block = disk_offsets((geo.circle_radius + geo.margin) * ss)
    steps = np.linspace(0.0, 1.0, int(math.ceil(geo.dash_length * ss * 2)) + 1)
    max_turn = math.radians(cfg.max_turn_deg)

    canvas = _Canvas(batch, res * ss)
    alive = np.ones(batch, bool)
    starts = np.zeros((batch, num_paths, max_dashes, 2), np.float32)
    ends = np.zeros((batch, num_paths, max_dashes, 2), np.float32)
    placed = np.zeros((batch, num_paths, max_dashes), bool)

    for path, length in enumerate(lengths):
        is_main = path < 2
        active = alive.copy()
        pos_Bx2 = np.zeros((batch, 2))
        heading_B = np.zeros(batch)
        pending = None  # block stamp of the previous dash: added one dash late (see below)
        for dash in range(length):
            if dash == 0:  # K random starts with random headings
                origin_BxKx2 = rng.uniform(0, res, (batch, k, 2))
                angle_BxK = rng.uniform(0, 2 * np.pi, (batch, k))
            else:          # K headings within the turn bound, from one gap past the last dash
                origin_BxKx2 = np.broadcast_to(pos_Bx2[:, None], (batch, k, 2))
                angle_BxK = heading_B[:, None] + rng.uniform(-max_turn, max_turn, (batch, k))
            dir_BxKx2 = np.stack([np.cos(angle_BxK), np.sin(angle_BxK)], -1)
            pts_BxKxMx2 = (origin_BxKx2[:, :, None]
                           + steps[:, None] * geo.dash_length * dir_BxKx2[:, :, None])
            flat, inside = canvas.footprint(pts_BxKxMx2 * ss, draw)
            ok_BxK = canvas.free(flat, inside)
            # A long path's endpoint circles must be clear of everything drawn so far.
            if is_main and dash in (0, length - 1):
                tip = pts_BxKxMx2[:, :, 0 if dash == 0 else -1]
                c_flat, c_inside = canvas.footprint(tip[:, :, None] * ss, circle)
                ok_BxK &= canvas.free(c_flat, c_inside)
            choice_B = np.argmax(ok_BxK, axis=1)
            placed_B = active & ok_BxK[canvas.rows, choice_B]
            if is_main:
                alive &= placed_B | ~active
            active = placed_B  # a distractor that cannot continue just ends here
            chosen = pts_BxKxMx2[canvas.rows, choice_B]
            heading_B = angle_BxK[canvas.rows, choice_B]
            starts[:, path, dash], ends[:, path, dash] = chosen[:, 0], chosen[:, -1]
            placed[:, path, dash] = placed_B
            pos_Bx2 = chosen[:, -1] + geo.dash_gap * dir_BxKx2[canvas.rows, choice_B]
            canvas.write(canvas.ink, flat[canvas.rows, choice_B], placed_B, 255)
            # A dash's clearance zone would cover the next dash one gap away, so each dash is
            # blocked only once its successor is placed; dash k-2 onward stays out of reach.
            if pending is not None:
                canvas.write(canvas.blocked, *pending, True)
            pending = (canvas.footprint(chosen * ss, block)[0], placed_B)
        if pending is not None:
            canvas.write(canvas.blocked, *pending, True)
        if is_main:  # keep later paths away from this path's two circles
            for tip in (starts[:, path, 0], ends[:, path, length - 1]):
                canvas.write(canvas.blocked, canvas.footprint(tip[:, None] * ss, circle_block)[0],
                             alive, True)
    return {"alive": alive, "ink": canvas.ink, "starts": starts, "ends": ends, "placed": placed,
            "circle_stamp": circle}


def generate(cfg: PathfinderConfig, n: int, seed: int, *, keep_geometry: bool = False) -> dict:
    """`n` stimuli: {"images": uint8[n, R, R], "labels": int32[n]}, exactly balanced (+-1 for odd
    n). With keep_geometry, also the dash segments per path ("starts", "ends", "placed":
    [n, paths, dashes]; path 0 and 1 are the long ones), "circles" [n, 2, 2] (x, y) and
    "circle_paths" [n, 2], the path each circle was put on."""
    rng = np.random.default_rng(seed)
    res, ss = cfg.resolution, cfg.supersample
    batch = max(16, (1024 * 32 * 32) // (res * res))  # ~1M hi-res pixels per batch
    labels = rng.permutation(np.arange(n) % 2).astype(np.int32)
    images = np.zeros((n, res, res), np.uint8)
    geo_parts: dict[str, list] = {"starts": [], "ends": [], "placed": [], "circles": [],
                                  "circle_paths": []}
    done = 0
    while done < n:
        out = _generate_batch(cfg, rng, batch)
        keep = np.nonzero(out["alive"])[0][: n - done]
        m = len(keep)
        if m == 0:
            continue
        lab = labels[done:done + m]
        # Endpoints (path, end) for the circles: positive = both ends of long path a;
        # negative = one end of each long path.
        a = rng.integers(0, 2, m)
        end0, end1 = rng.integers(0, 2, m), rng.integers(0, 2, m)
        paths = np.where(lab[:, None] == 1, np.stack([a, a], 1), np.array([[0, 1]]))
        which_end = np.where(lab[:, None] == 1, np.array([[0, 1]]), np.stack([end0, end1], 1))
        n_dashes = num_dashes(cfg)
        first, last = out["starts"][keep, :2, 0], out["ends"][keep, :2, n_dashes - 1]
        tips = np.stack([first, last], axis=2)                       # [m, 2 paths, 2 ends, 2]
        rows = np.arange(m)[:, None]
        circles = tips[rows, paths, which_end]                        # [m, 2, 2]
        ink = out["ink"][keep].copy()
        canvas = _Canvas(m, res * ss)
        canvas.ink = ink
        flat, _ = canvas.footprint(circles * ss, out["circle_stamp"])
        canvas.write(ink, flat, np.ones(m, bool), 255)
        hi = ink.reshape(m, res, ss, res, ss).astype(np.float32).mean(axis=(2, 4))
        images[done:done + m] = np.round(hi).astype(np.uint8)
        if keep_geometry:
            for key in ("starts", "ends", "placed"):
                geo_parts[key].append(out[key][keep])
            geo_parts["circles"].append(circles.astype(np.float32))
            geo_parts["circle_paths"].append(paths.astype(np.int32))
        done += m
    result = {"images": images, "labels": labels}
    if keep_geometry:
        result.update({key: np.concatenate(parts) for key, parts in geo_parts.items()})
    return result


# ----------------------------------------------------------------------------- release reader


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


def _metadata_files(directory: Path) -> list[Path]:
    """metadata/*.npy in numeric order of their stem (0, 1, ..., 10), as the release numbers them."""
    files = list((directory / "metadata").glob("*.npy"))
    return sorted(files, key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem))


def read_release(directory: Path, resolution: int) -> dict[str, dict[str, np.ndarray]]:
    """Images and labels of one difficulty directory, split 80/10/10 in file order as LRA
    (split over metadata rows first, then empty/unreadable images dropped, as LRA's filter)."""
    from PIL import Image, UnidentifiedImageError

    rows: list[tuple[Path, int]] = []
    for meta in _metadata_files(directory):
        for line_no, fields in read_metadata(meta):
            try:
                rows.append((directory / fields[0] / fields[1], int(fields[3])))
            except (IndexError, ValueError) as err:
                raise DataError(f"{meta}:{line_no}: malformed Pathfinder metadata row "
                                f"{' '.join(fields)!r} ({err!r})") from None
            if rows[-1][1] not in (0, 1):
                raise DataError(f"{meta}:{line_no}: label {rows[-1][1]} is not 0 or 1")
    n = len(rows)
    bounds = {"train": (0, int(0.8 * n)), "val": (int(0.8 * n), int(0.9 * n)), "test": (int(0.9 * n), n)}
    out, skipped = {}, 0
    for split, (lo, hi) in bounds.items():
        images, labels = [], []
        for image_path, label in rows[lo:hi]:
            try:
                if image_path.stat().st_size == 0:
                    raise OSError("empty file")
                with Image.open(image_path) as img:
                    pixels = np.asarray(img.convert("L"), np.uint8)
            except (OSError, UnidentifiedImageError, ValueError):
                skipped += 1
                continue
            if pixels.shape != (resolution, resolution):
                raise DataError(f"{image_path}: image is {pixels.shape[1]}x{pixels.shape[0]}, "
                                f"expected {resolution}x{resolution}; check task.resolution")
            images.append(pixels)
            labels.append(label)
        out[split] = {"images": np.asarray(images, np.uint8).reshape(-1, resolution, resolution),
                      "labels": np.asarray(labels, np.int32)}
    if skipped:
        log.warning("pathfinder: skipped %d empty or unreadable images in %s", skipped, directory)
    return out


# ----------------------------------------------------------------------------- task


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


class Pathfinder(ArrayTask):
    cfg: PathfinderConfig

    def __init__(self, cfg: PathfinderConfig):
        super().__init__(cfg)
        geometry(cfg), num_dashes(cfg)  # fail early on a bad resolution or difficulty

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(self.cfg.name, vocab_size=256 + 1, num_classes=2,
                        seq_len=self.cfg.seq_len, kind="classify", default_pool="mean")

    def _generator_params(self) -> dict:
        fields = ("resolution", "difficulty", "num_train", "num_val", "num_test", "max_turn_deg",
                  "num_distractors", "dash_length", "dash_gap", "line_width", "circle_radius",
                  "margin", "supersample", "candidates", "data_seed")
        params = {f: getattr(self.cfg, f) for f in fields}
        params["difficulty"] = str(params["difficulty"])
        return {**params, "version": GENERATOR_VERSION}

    def release_dir(self) -> Path:
        root = Path(self.cfg.data_dir).expanduser()
        return root / f"pathfinder{self.cfg.resolution}" / DIFFICULTY_DIRS[str(self.cfg.difficulty)]

    def cache_dir(self) -> Path:
        """Where the split .npz files live: generated data, or the decoded release images."""
        if not self.cfg.data_dir:
            return cache_root(self.cfg) / self.cfg.name / config_key(self._generator_params())
        directory = self.release_dir()
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _metadata_files(directory)]
        key = config_key({"dir": str(directory.resolve()), "resolution": self.cfg.resolution,
                          "metadata": stamp, "version": GENERATOR_VERSION})
        return cache_root(self.cfg) / self.cfg.name / f"release-{key}"

    def prepare(self) -> Path:
        if self.cfg.data_dir:
            directory = self.release_dir()
            if not _metadata_files(directory):
                raise DataError(
                    f"no Pathfinder metadata/*.npy under {directory}: point task.data_dir at the "
                    f"LRA release folder holding pathfinder{self.cfg.resolution}/, or drop "
                    f"task.data_dir to generate the data")
        cache = self.cache_dir()
        if all((cache / f"{s}.npz").is_file() for s in SPLITS):
            return self.release_dir() if self.cfg.data_dir else cache
        cache.mkdir(parents=True, exist_ok=True)
        if self.cfg.data_dir:
            for split, arrays in read_release(self.release_dir(), self.cfg.resolution).items():
                _save_npz(cache / f"{split}.npz", **arrays)
            return self.release_dir()
        sizes = {"train": self.cfg.num_train, "val": self.cfg.num_val, "test": self.cfg.num_test}
        for index, split in enumerate(SPLITS):
            log.info("generating %d %s %s images", sizes[split], self.cfg.name, split)
            data = generate(self.cfg, sizes[split], seed=self.cfg.data_seed * len(SPLITS) + index)
            _save_npz(cache / f"{split}.npz", images=data["images"], labels=data["labels"])
        return cache

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        self.prepare()
        with np.load(self.cache_dir() / f"{split}.npz", allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
        pixels = images.reshape(len(images), -1)
        length = self.cfg.seq_len
        if length < pixels.shape[1]:
            log.warning("%s: task.seq_len=%d < %d pixels: the image's last rows are cut off",
                        self.cfg.name, length, pixels.shape[1])
        inputs = np.zeros((len(images), length), np.int32)
        keep = min(length, pixels.shape[1])
        inputs[:, :keep] = pixels[:, :keep].astype(np.int32) + 1  # pixel p -> id p+1; 0 = pad
        return {"inputs": inputs, "targets": labels.astype(np.int32)}

    def preview(self, directory: Path, count: int = 16) -> Path:
        """A grid of `count` validation images titled with their labels, as PNG in `directory`
        (or the cache directory when that one is read-only)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        data = self.split("val")
        count = min(count, len(data["targets"]))
        res = self.cfg.resolution
        cols = int(math.ceil(math.sqrt(count)))
        rows = int(math.ceil(count / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < count:
                image = (data["inputs"][i, : res * res] - 1).clip(0, 255)
                image = np.pad(image, (0, res * res - len(image))).reshape(res, res)
                ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                label = int(data["targets"][i])
                ax.set_title(f"{label}: {'connected' if label else 'not connected'}", fontsize=9)
        fig.suptitle(f"{self.cfg.name} {res}x{res}, difficulty {self.cfg.difficulty}", fontsize=10)
        fig.tight_layout()
        name = f"preview_{self.cfg.name}{res}_{self.cfg.difficulty}.png"
        for target in (Path(directory), self.cache_dir()):
            try:
                target.mkdir(parents=True, exist_ok=True)
                fig.savefig(target / name, dpi=100)
                break
            except OSError:
                continue
        plt.close(fig)
        return target / name
