"""The registered tasks `pathfinder` and `pathx`: their configs, and generated or released images
as token sequences (pixel + 1, row-major), cached as one .npz per split."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from lra.tasks.base import (SPLITS, ArrayTask, DataError, TaskConfig, cache_root, data_field,
                            fit_length, generated_dir, register_task, save_npz, split_seed)
from lra.tasks.pathfinder.generator import GENERATOR_VERSION, generate, geometry, num_dashes
from lra.tasks.pathfinder.preview import write_preview
from lra.tasks.pathfinder.release import (DIFFICULTY_DIRS, metadata_files, read_release,
                                          release_key)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PathfinderConfig(TaskConfig):
    name: str = "pathfinder"
    seq_len: int = 1024            # resolution^2; other values pad (id 0) or truncate the image
    # data_field: the generated images depend on it (cache key).
    resolution: int = data_field(32)        # 32 | 64 | 128 | 256 (LRA: pathfinder32; Path-X = 128)
    difficulty: str = data_field("14")      # baseline (6 dashes) | 9 | 14 (LRA: 14, the 'hard' set)
    num_train: int = data_field(160000)     # LRA: 80/10/10 of 200k images
    num_val: int = data_field(20000)
    num_test: int = data_field(20000)
    max_turn_deg: float = data_field(45.0)  # bound on the turn between consecutive dashes
    num_distractors: int = data_field(-1)   # -1: GEOMETRY total / distractor length (LRA's rule)
    dash_length: float = data_field(0.0)    # 0 = the resolution's GEOMETRY value (same below)
    dash_gap: float = data_field(0.0)
    line_width: float = data_field(0.0)
    circle_radius: float = data_field(0.0)
    margin: float = data_field(0.0)
    supersample: int = data_field(2)        # render at 2x and average down: anti-aliased edges
    candidates: int = data_field(16)        # headings tried per dash before a path gives up
    lookahead: float = data_field(2.0)      # prefer headings with this many dashes of room ahead
    path_attempts: int = data_field(8)      # fresh starts for a long path before dropping the image
    data_seed: int = data_field(0)          # generator seed (independent of the training seed)


@dataclasses.dataclass
class PathXConfig(PathfinderConfig):
    name: str = "pathx"
    seq_len: int = 16384
    resolution: int = data_field(128)


@register_task(PathfinderConfig)
@register_task(PathXConfig)
class Pathfinder(ArrayTask):
    cfg: PathfinderConfig
    vocab_size = 256 + 1
    num_classes = 2
    default_pool = "mean"
    fixed_length = "task.resolution squared pixels"

    def __init__(self, cfg: PathfinderConfig):
        super().__init__(cfg)
        geometry(cfg), num_dashes(cfg)  # fail early on a bad resolution or difficulty
        self._release_cache: Path | None = None

    @classmethod
    def size_label(cls, cfg: PathfinderConfig) -> tuple[str, str] | None:
        """Images of another resolution than the task's own (Path-X: 128) are "RxR"."""
        r = cfg.resolution
        return None if r == type(cfg)().resolution else ("resolution", f"{r}x{r}")

    def release_dir(self) -> Path:
        root = Path(self.cfg.data_dir).expanduser()
        return root / f"pathfinder{self.cfg.resolution}" / DIFFICULTY_DIRS[str(self.cfg.difficulty)]

    def cache_dir(self) -> Path:
        """Where the split .npz files live: generated data, or the decoded release images (keyed
        on the release's content, see `release_key`)."""
        if not self.cfg.data_dir:
            return generated_dir(self.cfg, difficulty=str(self.cfg.difficulty),
                                 version=GENERATOR_VERSION)
        if self._release_cache is None:  # once per task: the key stats every image
            key = release_key(self.release_dir(), self.cfg.resolution)
            self._release_cache = cache_root(self.cfg) / self.cfg.name / f"release-{key}"
        return self._release_cache

    def prepare(self) -> Path:
        if self.cfg.data_dir:
            directory = self.release_dir()
            if not metadata_files(directory):
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
                save_npz(cache / f"{split}.npz", **arrays)
            return self.release_dir()
        for split in SPLITS:
            size = getattr(self.cfg, f"num_{split}")
            log.info("generating %d %s %s images", size, self.cfg.name, split)
            data = generate(self.cfg, size, seed=split_seed(self.cfg.data_seed, split, flat=True))
            save_npz(cache / f"{split}.npz", images=data["images"], labels=data["labels"])
        return cache

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        self.prepare()
        with np.load(self.cache_dir() / f"{split}.npz", allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
        pixels = images.reshape(len(images), int(np.prod(images.shape[1:])))  # 0 rows too
        if self.cfg.seq_len < pixels.shape[1]:
            log.warning("%s: task.seq_len=%d < %d pixels: the image's last rows are cut off",
                        self.cfg.name, self.cfg.seq_len, pixels.shape[1])
        inputs = fit_length(pixels.astype(np.int32) + 1, self.cfg.seq_len)  # pixel p -> id p+1
        return {"inputs": inputs, "targets": labels.astype(np.int32)}

    def preview(self, directory: Path, count: int = 16) -> Path:
        """A PNG grid of `count` validation images (see `preview.write_preview`)."""
        return write_preview(self, directory, count)
