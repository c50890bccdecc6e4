"""The synthetic Pathfinder generator: two long dashed paths, short distractors, two endpoint
circles, drawn on a supersampled canvas and averaged down; vectorised over a batch of images."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lra.tasks.pathfinder.task import PathfinderConfig

RESOLUTIONS = (32, 64, 128, 256)
NUM_DASHES = {"baseline": 6, "9": 9, "14": 14}  # LRA's difficulties: contour length in paddles
GENERATOR_VERSION = 2  # bump when the generator's output changes (invalidates caches)


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

