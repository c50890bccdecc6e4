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
import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np

from lra.tasks.base import (ArrayTask, DataError, TaskConfig, TaskSpec, cache_root, config_key,
                        content_key, register_task, save_npz)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RESOLUTIONS = (32, 64, 128, 256)
# LRA's three difficulties = contour length in paddles (drewlinsley/pathfinder `contour_length`).
DIFFICULTY_DIRS = {"baseline": "curv_baseline", "9": "curv_contour_length_9",
                   "14": "curv_contour_length_14"}
NUM_DASHES = {"baseline": 6, "9": 9, "14": 14}
GENERATOR_VERSION = 2  # bump when the generator's output changes (invalidates caches)
NUMPY_MAGIC = b"\x93NUMPY"


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Stimulus geometry in output pixels (the dash = Linsley's 'paddle')."""

    dash_length: float
    dash_gap: float
    line_width: float
    circle_radius: float
    margin: float             # clearance between different paths / circles (beyond the ink)
    distractor_dashes: int    # total dashes over all distractors (LRA: num_distractor_snakes * len)


# Per resolution, after the generator settings quoted in LRA's lra_benchmarks/data/pathfinder.py
# (marker_radius 1.5/2.5/3/5, paddle_thickness 0.5/1/1.5/2, distractor totals 20/22/35/30; at
# 32: paddle_length 2, paddle_margin 1). Above 32 the dash and gap are ours: scaled so a 14-dash
# path is 1.1-1.3x the image side long, as at 32, with a gap that stays visible at that width.
GEOMETRY = {
    32: Geometry(dash_length=2.0, dash_gap=1.0, line_width=0.5, circle_radius=1.5, margin=1.0,
                 distractor_dashes=20),
    64: Geometry(dash_length=3.5, dash_gap=2.0, line_width=1.0, circle_radius=2.5, margin=1.5,
                 distractor_dashes=22),
    128: Geometry(dash_length=7.0, dash_gap=3.5, line_width=1.5, circle_radius=3.0, margin=2.0,
                  distractor_dashes=35),
    256: Geometry(dash_length=14.0, dash_gap=6.0, line_width=2.0, circle_radius=5.0, margin=3.0,
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
    max_turn_deg: float = 45.0     # bound on the turn between consecutive dashes
    num_distractors: int = -1      # -1: GEOMETRY total / distractor length (LRA's rule)
    dash_length: float = 0.0       # 0 = the resolution's GEOMETRY value (same for the four below)
    dash_gap: float = 0.0
    line_width: float = 0.0
    circle_radius: float = 0.0
    margin: float = 0.0
    supersample: int = 2           # render at 2x and average down: anti-aliased grey edges
    candidates: int = 16           # headings tried per dash before a path gives up
    lookahead: float = 2.0         # prefer headings with this many dashes of room straight ahead
    path_attempts: int = 8         # fresh starts for a long path before the image is dropped
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


@dataclasses.dataclass
class _Plan:
    """Stamps and canvas layout shared by a batch. The hi-res canvas (supersample x the output)
    sits inside a border that counts as blocked, wide enough that every point a dash, a circle or
    a look-ahead can reach lands in it: footprints need no bounds checks."""

    cfg: PathfinderConfig
    geo: Geometry
    size: int            # hi-res image side
    pad: int             # border width
    width: int           # padded side
    draw: np.ndarray     # flat offsets of a line's ink
    block: np.ndarray    # ink + margin: where other paths may not go
    circle: np.ndarray   # circle ink (also the room an endpoint needs)
    circle_block: np.ndarray
    centre: np.ndarray   # one pixel
    steps: np.ndarray    # fractions along a dash where it is sampled (<= 1 hi-res px apart)
    ahead: np.ndarray    # distances past a dash's start checked by the look-ahead

    @classmethod
    def make(cls, cfg: PathfinderConfig) -> "_Plan":
        geo, ss = geometry(cfg), cfg.supersample
        size, line_r = cfg.resolution * ss, geo.line_width * ss / 2
        step = geo.dash_length + geo.dash_gap
        reach = cfg.lookahead * step
        pad = int(math.ceil((step + reach + geo.circle_radius + geo.margin + geo.line_width) * ss)) + 3
        width = size + 2 * pad

        def offsets(radius: float) -> np.ndarray:
            d = disk_offsets(radius)
            return (d[:, 0] * width + d[:, 1]).astype(np.int64)

        # Clearance zones get one extra hi-res pixel: the grid rounds positions down, and the
        # slack keeps the real (continuous) clearance at about `margin` despite that.
        return cls(cfg, geo, size, pad, width, offsets(line_r), offsets(line_r + geo.margin * ss + 1),
                   offsets(geo.circle_radius * ss), offsets((geo.circle_radius + geo.margin) * ss + 1),
                   offsets(0.0), np.linspace(0.0, 1.0, int(math.ceil(geo.dash_length * ss)) + 1),
                   np.linspace(step, geo.dash_length + reach, int(math.ceil(reach * ss)) + 1))

    def footprint(self, points: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Flat canvas indices [..., N*S] of a stamp at each of N (x, y) output-pixel points."""
        base = np.floor(points * self.cfg.supersample).astype(np.int64) + self.pad
        flat = (base[..., 1] * self.width + base[..., 0])[..., None] + offsets
        return flat.reshape(flat.shape[:-2] + (flat.shape[-2] * flat.shape[-1],))

    def blank(self, n: int) -> np.ndarray:
        """n canvases, flat, blocked on the border only."""
        inside = np.zeros((self.width, self.width), bool)
        inside[self.pad:self.pad + self.size, self.pad:self.pad + self.size] = True
        return np.repeat(~inside.reshape(1, -1), n, axis=0)

    def crop(self, canvas: np.ndarray) -> np.ndarray:
        grid = canvas.reshape(len(canvas), self.width, self.width)
        return grid[:, self.pad:self.pad + self.size, self.pad:self.pad + self.size]


def _hits(grid: np.ndarray, rows: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Whether any of `flat` (per row of `rows`, any candidate axes between) is set in grid."""
    base = (rows * grid.shape[1]).reshape(rows.shape + (1,) * (flat.ndim - 1))
    return grid.reshape(-1)[base + flat].any(-1)


def _stamp(grid: np.ndarray, rows: np.ndarray, flat: np.ndarray, value) -> None:
    grid.reshape(-1)[(rows * grid.shape[1])[:, None] + flat] = value


def _draw_path(plan: _Plan, rng: np.random.Generator, blocked: np.ndarray, rows: np.ndarray,
               length: int, is_main: bool) -> dict:
    """Try one path of `length` dashes in each of `rows` (nothing is written to `blocked`).

    Each dash tries K headings within the turn bound (K random starts for the first) and takes a
    random one among those that keep clear of `blocked` and of this path's own earlier dashes,
    preferring headings with room straight ahead; a path with no such heading stops there. A long
    path's first and last dash also need room for an endpoint circle.
    """
    cfg, geo = plan.cfg, plan.geo
    n, k = len(rows), cfg.candidates
    local = np.arange(n)
    grid = blocked[rows]  # + this path's own clearance zones, added one dash late (see below)
    max_turn = math.radians(cfg.max_turn_deg)
    active = np.ones(n, bool)
    starts = np.zeros((n, length, 2), np.float32)
    ends = np.zeros((n, length, 2), np.float32)
    placed = np.zeros((n, length), bool)
    draws, blocks = [], []
    pos_Nx2, heading_N = np.zeros((n, 2)), np.zeros(n)
    for dash in range(length):
        if dash == 0:  # K random starts, random headings
            origin_NxKx2 = rng.uniform(0, cfg.resolution, (n, k, 2))
            angle_NxK = rng.uniform(0, 2 * np.pi, (n, k))
        else:          # K turns within the bound, one gap past the previous dash
            origin_NxKx2 = np.broadcast_to(pos_Nx2[:, None], (n, k, 2))
            angle_NxK = heading_N[:, None] + rng.uniform(-max_turn, max_turn, (n, k))
        dir_NxKx2 = np.stack([np.cos(angle_NxK), np.sin(angle_NxK)], -1)
        pts_NxKxMx2 = (origin_NxKx2[:, :, None]
                       + plan.steps[:, None] * geo.dash_length * dir_NxKx2[:, :, None])
        flat_NxKxF = plan.footprint(pts_NxKxMx2, plan.draw)
        ok_NxK = ~_hits(grid, local, flat_NxKxF)
        if is_main and dash in (0, length - 1):
            tip_NxKx2 = pts_NxKxMx2[:, :, 0 if dash == 0 else -1]
            ok_NxK &= ~_hits(grid, local, plan.footprint(tip_NxKx2[:, :, None], plan.circle))
        score_NxK = ok_NxK.astype(np.int8) * 2
        if cfg.lookahead > 0:  # room to go on straight: fewer dead ends
            ray_NxKxAx2 = origin_NxKx2[:, :, None] + plan.ahead[:, None] * dir_NxKx2[:, :, None]
            score_NxK += ok_NxK & ~_hits(grid, local, plan.footprint(ray_NxKxAx2, plan.centre))
        choice = np.argmax(score_NxK, axis=1)  # candidates are in random order
        active &= ok_NxK[local, choice]
        chosen_NxMx2 = pts_NxKxMx2[local, choice]
        heading_N = angle_NxK[local, choice]
        pos_Nx2 = chosen_NxMx2[:, -1] + geo.dash_gap * dir_NxKx2[local, choice]
        pos_Nx2[~active] = cfg.resolution / 2  # stopped paths: keep their (ignored) tries on the canvas
        starts[:, dash], ends[:, dash] = chosen_NxMx2[:, 0], chosen_NxMx2[:, -1]
        placed[:, dash] = active
        draws.append(flat_NxKxF[local, choice])
        blocks.append(plan.footprint(chosen_NxMx2, plan.block))
        # A dash's clearance zone covers the next dash one gap away, so it is added only once
        # that next dash is placed; dashes k-2 and earlier are then out of reach.
        if dash > 0:
            keep = np.nonzero(placed[:, dash - 1])[0]
            _stamp(grid, keep, blocks[dash - 1][keep], True)
    return {"starts": starts, "ends": ends, "placed": placed, "draws": draws, "blocks": blocks}


def _generate_batch(cfg: PathfinderConfig, rng: np.random.Generator, batch: int) -> dict:
    """One batch of candidate stimuli: dash geometry per path, hi-res ink without the circles,
    and `alive`: both long paths complete with all four endpoint circles clear of other paths."""
    plan, n_main = _Plan.make(cfg), num_dashes(cfg)
    n_short = max(1, n_main // 3)  # LRA: distractor_length = contour_length // 3
    n_distractors = (cfg.num_distractors if cfg.num_distractors >= 0
                     else plan.geo.distractor_dashes // n_short)
    lengths = [n_main, n_main] + [n_short] * n_distractors
    blocked = plan.blank(batch)
    ink = np.zeros(blocked.shape, np.uint8)
    alive = np.ones(batch, bool)
    starts = np.zeros((batch, len(lengths), n_main, 2), np.float32)
    ends = np.zeros_like(starts)
    placed = np.zeros((batch, len(lengths), n_main), bool)
    for path, length in enumerate(lengths):
        is_main = path < 2
        need = alive.copy()
        for _ in range(cfg.path_attempts if is_main else 1):
            rows = np.nonzero(need)[0]
            if len(rows) == 0:
                break
            out = _draw_path(plan, rng, blocked, rows, length, is_main)
            done = out["placed"][:, -1] if is_main else np.ones(len(rows), bool)
            rows, keep = rows[done], np.nonzero(done)[0]
            starts[rows, path, :length] = out["starts"][keep]
            ends[rows, path, :length] = out["ends"][keep]
            placed[rows, path, :length] = out["placed"][keep]
            for dash in range(length):  # commit: ink and clearance zones of the placed dashes
                hit = out["placed"][keep, dash]
                _stamp(ink, rows[hit], out["draws"][dash][keep[hit]], 255)
                _stamp(blocked, rows[hit], out["blocks"][dash][keep[hit]], True)
            if is_main:  # later paths keep clear of this path's two circles
                for tip in (starts[rows, path, 0], ends[rows, path, length - 1]):
                    _stamp(blocked, rows, plan.footprint(tip[:, None], plan.circle_block), True)
            need[rows] = False
        if is_main:
            alive &= ~need
    return {"alive": alive, "ink": ink, "starts": starts, "ends": ends, "placed": placed,
            "plan": plan}


def generate(cfg: PathfinderConfig, n: int, seed: int, *, keep_geometry: bool = False) -> dict:
    """`n` stimuli: {"images": uint8[n, R, R], "labels": int32[n]}, exactly balanced (+-1 for odd
    n). With keep_geometry, also the dash segments per path ("starts", "ends": [n, paths, dashes,
    (x, y)], "placed": [n, paths, dashes]; paths 0 and 1 are the long ones), "circles"
    [n, 2, (x, y)] and "circle_paths" [n, 2], the path each circle was put on."""
    rng = np.random.default_rng(seed)
    res, ss, n_main = cfg.resolution, cfg.supersample, num_dashes(cfg)
    cap = max(16, (1024 * 32 * 32) // (res * res))  # ~1M output pixels per batch
    labels = rng.permutation(np.arange(n) % 2).astype(np.int32)
    images = np.zeros((n, res, res), np.uint8)
    parts: dict[str, list] = {"starts": [], "ends": [], "placed": [], "circles": [],
                              "circle_paths": []}
    done = 0
    tries = 0
    while done < n:
        # Batch size follows the need (so small splits are fast); output is a function of
        # (cfg, n, seed) only.
        out = _generate_batch(cfg, rng, min(cap, 16 + int(1.25 * (n - done))))
        tries += 1
        if done == 0 and tries >= 20 and not out["alive"].any():
            raise RuntimeError("pathfinder: no stimulus fits; shorten the paths (task.difficulty, "
                               "task.dash_length) or allow sharper turns (task.max_turn_deg)")
        keep = np.nonzero(out["alive"])[0][: n - done]
        m = len(keep)
        lab = labels[done:done + m]
        # Circles at path ends: positive = both ends of long path a; negative = one end of each,
        # the pair of ends whose distance is closest to path a's end-to-end distance, so that
        # circle distance says little about the label (a random pair would be a strong cue:
        # a long path's two ends lie farther apart than two random ends).
        rows = np.arange(m)
        tips = np.stack([out["starts"][keep, :2, 0], out["ends"][keep, :2, n_main - 1]], axis=2)
        a = rng.integers(0, 2, m)
        span = np.linalg.norm(tips[rows, a, 0] - tips[rows, a, 1], axis=-1)
        pairs = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
        apart = np.linalg.norm(tips[:, 0, pairs[:, 0]] - tips[:, 1, pairs[:, 1]], axis=-1)
        nearest = pairs[np.argmin(np.abs(apart - span[:, None]), axis=1)]
        paths = np.where(lab[:, None] == 1, np.stack([a, a], 1), np.array([[0, 1]]))
        tip_end = np.where(lab[:, None] == 1, np.array([[0, 1]]), nearest)
        circles = tips[rows[:, None], paths, tip_end]                  # [m, 2, (x, y)]
        ink = out["ink"][keep]
        plan = out["plan"]
        _stamp(ink, np.arange(m), plan.footprint(circles, plan.circle), 255)
        pixels = plan.crop(ink).reshape(m, res, ss, res, ss).astype(np.float32).mean(axis=(2, 4))
        images[done:done + m] = np.round(pixels).astype(np.uint8)
        if keep_geometry:
            for key in ("starts", "ends", "placed"):
                parts[key].append(out[key][keep])
            parts["circles"].append(circles.astype(np.float32))
            parts["circle_paths"].append(paths.astype(np.int32))
        done += m
    result = {"images": images, "labels": labels}
    if keep_geometry:
        result.update({key: np.concatenate(chunks) for key, chunks in parts.items()})
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


def release_rows(directory: Path) -> list[tuple[Path, int]]:
    """(image path, label) per metadata row of one difficulty directory, in file order; a
    malformed row or a label other than 0/1 raises a DataError naming the file and line."""
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
    return rows


def release_key(directory: Path, resolution: int) -> str:
    """Cache key of a release directory: the full content of its metadata files, plus the
    (relative path, size, mtime_ns) of every image the metadata names, a missing one as such.
    Images are stat'ed, not hashed: a difficulty holds ~200k PNGs (a few hundred MB) and reading
    them all at every start-up would dominate it. So an added, repaired or replaced image is
    seen, except one replaced by a same-size file with its old mtime restored (delete the
    cache's release-* directory then)."""
    metadata = _metadata_files(directory)
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


def read_release(directory: Path, resolution: int) -> dict[str, dict[str, np.ndarray]]:
    """Images and labels of one difficulty directory, split 80/10/10 in file order as LRA
    (split over metadata rows first, then empty/unreadable images dropped, as LRA's filter).
    A split left without images raises a one-line DataError naming the directory."""
    from PIL import Image, UnidentifiedImageError

    rows = release_rows(directory)
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
        if not images:
            why = (f"{hi - lo} metadata rows, all missing/empty/unreadable images" if hi > lo else
                   f"none of the {n} metadata rows falls in it (80/10/10 in file order)")
            raise DataError(f"no readable images for the {split} split under {directory} ({why}): "
                            f"restore the imgs/ files that metadata/*.npy names (re-extract the "
                            f"LRA release) or point task.data_dir at a complete release")
        out[split] = {"images": np.asarray(images, np.uint8).reshape(-1, resolution, resolution),
                      "labels": np.asarray(labels, np.int32)}
    if skipped:
        log.warning("pathfinder: skipped %d empty or unreadable images in %s", skipped, directory)
    return out


# ----------------------------------------------------------------------------- task


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    save_npz(path, **arrays)


@register_task(PathfinderConfig)
@register_task(PathXConfig)
class Pathfinder(ArrayTask):
    cfg: PathfinderConfig

    @classmethod
    def config_at_length(cls, cfg: PathfinderConfig, seq_len: int) -> PathfinderConfig:
        raise ValueError(f"task={cfg.name} has a fixed length (task.resolution squared pixels); "
                         f"eval.seq_lens applies to listops, copy, text and retrieval")

    def __init__(self, cfg: PathfinderConfig):
        super().__init__(cfg)
        geometry(cfg), num_dashes(cfg)  # fail early on a bad resolution or difficulty
        self._release_cache: Path | None = None

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(self.cfg.name, vocab_size=256 + 1, num_classes=2,
                        seq_len=self.cfg.seq_len, kind="classify", default_pool="mean")

    def _generator_params(self) -> dict:
        fields = ("resolution", "difficulty", "num_train", "num_val", "num_test", "max_turn_deg",
                  "num_distractors", "dash_length", "dash_gap", "line_width", "circle_radius",
                  "margin", "supersample", "candidates", "lookahead", "path_attempts", "data_seed")
        params = {f: getattr(self.cfg, f) for f in fields}
        params["difficulty"] = str(params["difficulty"])
        return {**params, "version": GENERATOR_VERSION}

    def release_dir(self) -> Path:
        root = Path(self.cfg.data_dir).expanduser()
        return root / f"pathfinder{self.cfg.resolution}" / DIFFICULTY_DIRS[str(self.cfg.difficulty)]

    def cache_dir(self) -> Path:
        """Where the split .npz files live: generated data, or the decoded release images (keyed
        on the release's content, see `release_key`)."""
        if not self.cfg.data_dir:
            return cache_root(self.cfg) / self.cfg.name / config_key(self._generator_params())
        if self._release_cache is None:  # once per task: the key stats every image
            key = release_key(self.release_dir(), self.cfg.resolution)
            self._release_cache = cache_root(self.cfg) / self.cfg.name / f"release-{key}"
        return self._release_cache

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
        pixels = images.reshape(len(images), int(np.prod(images.shape[1:])))  # 0 rows too
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
