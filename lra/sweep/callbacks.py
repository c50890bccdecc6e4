"""Hydra callback of every sweep (`hydra.callbacks.sweep_summary` in configs/config.yaml and
configs/bench.yaml): each sweep keeps its own record, `<hydra.sweep.dir>/sweeps/<start>-<pid>.yaml`
(command line, start and end time, one line per point with its dir and status), and ends by
printing a table of its points. Hydra's `multirun.yaml` beside it is only the last sweep's config.

A job appends its points to the record as it ends (in the launcher's worker process for
hydra/launcher=pool or joblib, whose copy of this callback carries the record's path), under a
flock, so the record of a sweep that was stopped still lists the points it finished.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lra.sweep.launch import unwritable
from lra.results import Status, atomic_write

OWN_COLUMNS = ("task", "model", "seed", "task.seq_len")  # overrides the table shows as columns
MTIME_SLACK_S = 0.5  # a file's mtime may lag time.time() by a clock tick: a row this job wrote
                     # is never taken for an older one


class SweepSummary(Callback):
    """Writes the sweep's record and prints its points' table (see the module doc)."""

    def __init__(self) -> None:
        self.record: Path | None = None  # set in MULTIRUN mode only: a plain run records nothing
        self.job_started = 0.0

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        preflight(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not preflight(str(config.hydra.sweep.dir), "hydra.sweep.dir"):
            # Hydra's sweeper writes multirun.yaml there before any point: no point can be
            # skipped on a read-only tree as a single run is.
            print(f"error: cannot sweep in {config.hydra.sweep.dir}: it is read-only (Hydra "
                  f"writes multirun.yaml there first); read its rows with `python -m lra.report "
                  f"{config.hydra.sweep.dir}`, or sweep into a copy (hydra.sweep.dir=DIR)",
                  file=sys.stderr)
            raise SystemExit(1)
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        now = datetime.datetime.now().astimezone()
        self.record = sweep_dir / "sweeps" / f"{now:%Y%m%d-%H%M%S}-{os.getpid()}.yaml"
        head = {"command": shlex.join(["python", *sys.orig_argv[1:]]),
                "overrides": list(config.hydra.overrides.task), "sweep_dir": str(sweep_dir),
                "start": now.isoformat(timespec="seconds"), "end": None, "counts": None}
        # `points:` stays last: each job appends its entries to that list (see _append).
        try:
            atomic_write(self.record, yaml.safe_dump(head, sort_keys=False) + "points:\n")
        except OSError as err:
            print(f"warning: {unwritable(self.record, err, 'this sweep keeps no record')}",
                  file=sys.stderr)
            self.record = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.job_started = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.record is None:
            return
        sweep_dir = self.record.parent.parent
        entries = [point_entry(path, sweep_dir, self.job_started)
                   for path in result_dirs(config, self.job_started)]
        if not entries:  # the job wrote no row (it raised before any): the job is the point
            entries = [{"dir": _relative(Path(config.hydra.runtime.output_dir), sweep_dir),
                        "status": "missing"}]
        # lra.run returns "held by another process (pid N)" for a point whose lock another
        # process holds: that process writes its row.
        held = job_return._return_value if job_return.status == JobStatus.COMPLETED else None
        for entry in entries:
            entry.update(job=int(config.hydra.job.num), overrides=list(job_return.overrides or []))
            if job_return.status == JobStatus.FAILED and entry["status"] == "missing":
                entry.update(status=Status.ERROR.value, error=_one_line(job_return._return_value))
            elif isinstance(held, str) and held.startswith("held") and entry["status"] == "missing":
                entry.update(status="held", error=held)
        try:
            _append(self.record, entries)
        except OSError as err:  # the points' own rows are what counts; the record says it lost them
            print(f"warning: {unwritable(self.record, err, 'the record misses this point')}",
                  file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.record is None:
            return
        record = yaml.safe_load(self.record.read_text())
        points = sorted(record.get("points") or [], key=lambda p: (p["job"], p.get("seq_len") or 0))
        record.update(end=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      counts=counts(points), points=points)
        text = yaml.safe_dump(record, sort_keys=False, width=1000, default_flow_style=None)
        try:
            atomic_write(self.record, text)  # the jobs have ended: no append can be lost
        except OSError as err:
            print(f"warning: {unwritable(self.record, err, 'its points as they ran are kept')}",
                  file=sys.stderr)
        print(summary(points, str(self.record)), flush=True)


def preflight(directory: str, key: str) -> bool:
    """Before Hydra makes the run or sweep directory: an empty `key` or a directory that cannot
    be made stops in one line (exit 2 / 1). An existing directory that cannot be written to
    returns False (a read-only archive: lra.run skips a finished run there)."""
    if not directory.strip():
        print(f"error: {key} is empty; give a directory ({key}=DIR) or leave it at its default",
              file=sys.stderr)
        raise SystemExit(2)
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: {unwritable(path, err, f'or choose another {key}=DIR')}",
              file=sys.stderr)
        raise SystemExit(1) from None
    return os.access(path, os.W_OK) and not _read_only(path)


def _read_only(path: Path) -> bool:
    """Whether `path` is on a read-only mount (os.access says writable there for root)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def result_dirs(config: DictConfig, since: float) -> list[Path]:
    """The directories whose result.json rows a job made: lra.run's run dir; lra.bench's
    L<L>-b<B> dirs under its base whose row this job wrote (a bench rewrites each)."""
    out = Path(config.hydra.runtime.output_dir)
    if config.hydra.job.config_name != "bench":
        return [out]
    base = Path(config.bench.out_dir or out)
    fresh = [p.parent for p in base.glob(f"L*-b{config.bench.batch_size}/result.json")
             if p.stat().st_mtime >= since - MTIME_SLACK_S]
    return sorted(fresh, key=lambda p: int(p.name[1:].partition("-")[0]))


def point_entry(path: Path, sweep_dir: Path, since: float) -> dict:
    """A point of the record: its dir (relative to the sweep dir), status and headline numbers;
    `kept` when skip_done kept a row older than this job."""
    entry: dict[str, Any] = {"dir": _relative(path, sweep_dir)}
    try:
        row = json.loads((path / "result.json").read_text())
        mtime = (path / "result.json").stat().st_mtime
    except (OSError, ValueError):
        return {**entry, "status": "missing"}
    peak, speed = row.get("peak_memory_bytes"), row.get("steps_per_s")
    entry.update({k: row.get(k) for k in ("status", "task", "model", "seq_len", "seed",
                                          "test_accuracy")},
                 steps_per_s=float(f"{speed:.4g}") if speed else None,
                 peak_mib=round(peak / 2**20, 1) if peak else None)
    if mtime < since - MTIME_SLACK_S:
        entry["kept"] = True
    if row.get("error") and row.get("status") != Status.OK:
        entry["error"] = str(row["error"])[:300]
    return {k: v for k, v in entry.items() if v is not None}


def counts(points: list[dict]) -> dict[str, int]:
    """Points per status, in Status order (then any other status, e.g. missing)."""
    known = [s.value for s in Status]
    order = known + sorted({p["status"] for p in points} - set(known))
    found = {s: sum(p["status"] == s for p in points) for s in order}
    return {s: n for s, n in found.items() if n}


def summary(points: list[dict], record: str) -> str:
    """The sweep's table: one line per point, then the count line and where the record is."""
    varying = _varying_overrides(points)
    header = ("task", "model", "L", "seed", "status", "test acc %", "steps/s", "peak MiB")
    rows = [header]
    for p in points:
        extra = [o for o in p.get("overrides", []) if o.partition("=")[0].lstrip("+~") in varying]
        rows.append((str(p.get("task") or "-"), " ".join([str(p.get("model") or "-"), *extra]),
                     _fmt(p.get("seq_len"), "d"), _fmt(p.get("seed"), "d"),
                     p["status"] + (" (kept)" if p.get("kept") else ""),
                     _fmt(p.get("test_accuracy") and 100 * p["test_accuracy"], ".2f"),
                     _fmt(p.get("steps_per_s"), ".3g"), _fmt(p.get("peak_mib"), ".0f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {2, 3, 5, 6, 7}  # numbers
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    found = counts(points)
    kept = sum(bool(p.get("kept")) for p in points)
    tally = f"{len(points)} point{'s' * (len(points) != 1)}: " + ", ".join(
        f"{n} {s}" for s, n in found.items())
    if kept:
        tally += f" ({kept} kept from an earlier run: skip_done)"
    return "\n".join(["", *lines, tally, f"record: {record}"])


def _varying_overrides(points: list[dict]) -> set[str]:
    """Override keys whose value differs between points (but those the table has columns for)."""
    given = [dict(o.partition("=")[::2] for o in p.get("overrides", [])) for p in points]
    keys = set().union(*given)
    return {k.lstrip("+~") for k in keys if len({g.get(k) for g in given}) > 1} - set(OWN_COLUMNS)


def _append(record: Path, entries: list[dict]) -> None:
    """Add entries to the record's `points:` list (flow-style lines: JSON is YAML)."""
    with open(record, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("".join(f"- {json.dumps(e)}\n" for e in entries))


def _relative(path: Path, base: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _one_line(err: Any) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]
