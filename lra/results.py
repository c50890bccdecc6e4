"""RunResult: one row per run, written atomically as result.json; load_results() -> DataFrame."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

STATUSES = ("ok", "oom", "diverged", "timeout", "error")


@dataclasses.dataclass
class RunResult:
    task: str
    model: str
    seq_len: int
    seed: int
    preset: str
    status: str = "ok"
    kind: str = "run"                         # run | bench
    error: str | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    best_step: int | None = None
    steps: int = 0
    batch_size: int | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    train_time_s: float | None = None         # steady-state training only, eval excluded
    eval_time_s: float | None = None
    wall_time_s: float | None = None          # whole run, data + compile + eval included
    compile_time_s: float | None = None
    steps_per_s: float | None = None
    examples_per_s: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_source: str | None = None          # device | process_rss
    xla_estimate_bytes: int | None = None
    flops_per_step: float | None = None
    param_count: int | None = None
    env: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False, default=str)


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_result(result: RunResult, directory: str | os.PathLike) -> Path:
    path = Path(directory) / "result.json"
    atomic_write(path, result.to_json())
    return path
