"""RunResult: one row per run, written atomically as result.json; load_results() -> DataFrame."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from lra.labels import label_variants, select_tuned
from lra.schema import ROW_REQUIRED, Status, check_row
from lra.tasks.base import atomic_file


def row_finished(row: dict) -> bool:
    """Whether a result row needs no rerun (skip_done keeps it): ok, diverged, oom, and a timeout
    at the run's own budget (train.max_time_s); not killed, interrupted, error, nor a timeout at
    point_timeout_s (one attempt's cap), which are re-run from their checkpoints."""
    status = row.get("status")
    if status in {Status.OK, Status.DIVERGED, Status.OOM}:
        return True
    if status == Status.TIMEOUT:
        limit = row.get("time_limit") or ("point_timeout_s" if "point_timeout_s" in str(row.get("error"))
                                          else "train.max_time_s")  # rows written before time_limit
        return limit == "train.max_time_s"
    return False


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
    convergence: str | None = None            # solved | plateaued | capped (train.record)
    steps_to: dict[str, Any] | None = None    # {"50%": {"step", "examples"}, "90%", "99%"}: first
                                              # evaluation at that fraction of the best val
    solved_step: int | None = None            # first evaluation at val >= train.solve_at
    batch_size: int | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    train_time_s: float | None = None         # steady-state training only, eval excluded
    eval_time_s: float | None = None
    wall_time_s: float | None = None          # whole run, data + compile + eval included
    compile_time_s: float | None = None       # trace + lower + XLA compile of the train step
    lower_time_s: float | None = None         # of which tracing + lowering (not cacheable)
    steps_per_s: float | None = None
    examples_per_s: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_source: str | None = None          # device | process_rss | reused_process (none)
    xla_estimate_bytes: int | None = None
    flops_per_step: float | None = None       # XLA cost analysis (a loop body counted once)
    matmul_flops_per_step: float | None = None  # dot_general FLOPs on the jaxpr (loops unrolled)
    achieved_flops_per_s: float | None = None   # bench: matmul_flops_per_step x steps_per_s
    matmul_utilisation: float | None = None     # bench: achieved / env.matmul_peak_flops_per_s
    param_count: int | None = None
    param_ratio: float | None = None          # param_count / transformer's, same dims and task
    num_devices: int | None = None
    resumed_from_step: int | None = None      # the checkpoint step this run continued from
    time_limit: str | None = None             # status timeout: train.max_time_s | point_timeout_s
    eval_lengths: dict[str, Any] | None = None  # eval.seq_lens: {"L": {status, test_accuracy}}
    model_summary: dict[str, Any] | None = None  # what modules learned (models.summary)
    pretrain: dict[str, Any] | None = None    # train.pretrain's phase (lra.train.pretrain.record)
    fingerprint: str | None = None            # lra.config.row_fingerprint of `config`: skip_done
                                              # keeps a row only under the same one
    env: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False, default=str)


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl and how many lines were unreadable (a half-written last
    line, corruption, non-UTF-8 bytes): those are skipped, never raised."""
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return [], 1
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (lra.tasks.base.atomic_file: temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(text)


def write_result(result: RunResult, directory: str | os.PathLike) -> Path:
    path = Path(directory) / "result.json"
    atomic_write(path, result.to_json())
    return path


class RunDirLock:
    """An advisory lock (flock) on `<run dir>/.lock`, held while a run works there, so a second
    run of the same directory (a duplicated sweep, a requeued job while the first still runs)
    stops at once instead of both writing one checkpoint directory. The file records the
    holder's pid. The lock belongs to the open file: the kernel drops it when the last holder
    exits, whatever kills it."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock: None on success, else who holds it (the pid text in the file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return holder
        self.fd = fd
        self.record(f"pid {os.getpid()}")
        return None

    def record(self, holder: str) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, holder.encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock (children given the fd keep theirs)
            self.fd = None


def _flatten(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def parse_row(path: Path, required: tuple[str, ...] = ROW_REQUIRED) -> tuple[dict | None, str]:
    """(the parsed result.json, "") or (None, why it is skipped). Never raises on the file's
    content: json's RecursionError on deep nesting, a huge integer, bad UTF-8 all read as
    unreadable."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        return None, f"unreadable: {err.strerror or type(err).__name__}"
    except UnicodeDecodeError:
        return None, "unreadable: not UTF-8"
    if not text.strip():
        return None, "empty file"
    try:
        data = json.loads(text)
    except RecursionError:
        return None, "unreadable: JSON nested too deeply"
    except ValueError as err:  # JSONDecodeError, an integer over the digit limit
        return None, f"not JSON: {str(err).split(':')[0][:60]}"
    except Exception as err:  # noqa: BLE001 - any other failure of json on hostile input
        return None, f"unreadable: {type(err).__name__}"
    why = check_row(data, required)
    return (None, why) if why else (data, "")


def read_rows(paths: list[str | os.PathLike], required: tuple[str, ...] = ("model", "status")
              ) -> tuple[list[dict], dict[Path, str]]:
    """Flat dict per valid result.json under `paths` (check_row: ROW_SCHEMA, with the
    `required` keys); and the files skipped, each with why (unreadable or invalid: never
    raised)."""
    rows, bad = [], {}
    files: list[Path] = []
    for root in map(Path, paths):
        files.extend([root] if root.is_file() else sorted(root.rglob("result.json")))
    for path in files:
        data, why = parse_row(path, required)
        if data is None:
            bad[path] = why
            continue
        row: dict = {}
        for key, value in data.items():
            if key in ("env", "config", "eval_lengths", "model_summary", "steps_to", "reference") \
                    and isinstance(value, dict):
                _flatten(key, value, row)
            else:
                row[key] = value
        row["path"] = str(path.parent)
        rows.append(row)
    return rows, bad


def skipped_text(skipped: dict, shown: int = 3) -> str:
    """One line: "skipped N result file(s): path (reason), ..." naming the first `shown`."""
    items = list(skipped.items())
    text = ", ".join(f"{path} ({why})" for path, why in items[:shown])
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"skipped {len(items)} result file(s): {text}{more}"


NUMERIC = ("seq_len", "seed", "val_accuracy", "test_accuracy", "best_step", "steps", "batch_size",
           "solved_step",
           "train_loss", "train_accuracy", "train_time_s", "eval_time_s", "wall_time_s",
           "compile_time_s", "lower_time_s", "steps_per_s", "examples_per_s", "tokens_per_s",
           "peak_memory_bytes", "xla_estimate_bytes", "flops_per_step", "param_count", "param_ratio",
           "matmul_flops_per_step", "achieved_flops_per_s", "matmul_utilisation")


def load_results(*paths: str | os.PathLike, verbose: bool = True,
                 exclude: list[str | os.PathLike] = (), tuned: str = "best"):
    """Every result.json under `paths` as one pandas DataFrame (one row per run, flat columns),
    but those under `exclude` (another section's runs kept in a sub-folder).

    Runs that differ only in a tuned key (lra.config.TUNED: the learning rate, weight decay) are
    candidates of one experiment (select_tuned): `tuned="best"` keeps the candidate chosen on
    validation, `"all"` keeps every run with the `tuning` and `chosen` columns to tell them.
    Unreadable, half-written or invalid files (check_row) are skipped and reported, never
    raised: `attrs["skipped"]` maps each path to why.
    """
    # pandas only for tables: lra.results stays light for lra.sweep.launch
    import pandas as pd

    rows, bad = read_rows(list(paths) or ["results"], required=ROW_REQUIRED)
    skip = [Path(p).resolve() for p in exclude]
    rows = [r for r in rows if not any(Path(r["path"]).resolve().is_relative_to(s) for s in skip)]
    if bad and verbose:
        print(skipped_text(bad))
    frame = pd.DataFrame(rows)
    for column in NUMERIC:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
        else:
            frame[column] = pd.Series(dtype="float64")
    for column in ("task", "model", "status", "kind", "preset"):
        if column not in frame:
            frame[column] = pd.Series(dtype="object")
    for column in [c for c in frame.columns if c.startswith("eval_lengths.")
                   and c.endswith(("test_accuracy", "test_loss"))]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["task_name"], frame["model_name"] = frame["task"], frame["model"]
    if "config.seed" in frame:
        label_variants(frame)
    select_tuned(frame)
    if tuned == "best":
        frame = frame[frame["chosen"]].copy()
    frame.attrs["skipped"] = {str(p): why for p, why in bad.items()}  # path -> why
    return frame
