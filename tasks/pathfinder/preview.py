"""A preview of Pathfinder images: a grid of validation images titled with their labels."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lra.tasks.base import atomic_file

if TYPE_CHECKING:
    from lra.tasks.pathfinder.task import Pathfinder


def write_preview(task: Pathfinder, directory: Path, count: int = 16) -> Path:
    """A grid of `count` validation images of `task` as PNG in `directory` (or the task's cache
    directory when that one is read-only); returns the file's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = task.cfg
    data = task.split("val")
    count = min(count, len(data["targets"]))
    res = cfg.resolution
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
    fig.suptitle(f"{cfg.name} {res}x{res}, difficulty {cfg.difficulty}", fontsize=10)
    fig.tight_layout()
    name = f"preview_{cfg.name}{res}_{cfg.difficulty}.png"
    for target in (Path(directory), task.cache_dir()):
        try:
            target.mkdir(parents=True, exist_ok=True)
            with atomic_file(target / name, "wb") as f:
                fig.savefig(f, format="png", dpi=100)
            break
        except OSError:
            continue
    plt.close(fig)
    return target / name
