"""RunResult: one row per run, written atomically as result.json; load_results() -> DataFrame."""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any

from lra import tasks
from lra.tasks.base import atomic_file

MARK = "(ref)"  # the report's label suffix for a reference row (lra.reference)


class Status(str, enum.Enum):
    """What a row's status means. A re-run of the sweep (skip_done) skips the `finished` ones and
    resumes the rest from their checkpoint when they have one (lra.run.finished_result)."""

    OK = "ok", ("trained to train.steps, or stopped early once solved or plateaued "
                "(train.early_stop; the row's `convergence` says which)"), True
    DIVERGED = "diverged", "loss became NaN/inf", True
    OOM = "oom", ("out of memory, with evidence: MemoryError, XLA's out-of-memory message, or "
                  "the kernel's OOM-kill counter rising while the point ran"), True
    TIMEOUT = "timeout", ("stopped at a time limit (`time_limit`): train.max_time_s is the run's "
                          "budget (finished); point_timeout_s caps one attempt (resumed)"), None
    KILLED = "killed", ("the point's process died by a signal the sweep did not send and the "
                        "kernel recorded no OOM kill: preemption, a job limit, kill -9"), False
    INTERRUPTED = "interrupted", "SIGINT/SIGTERM: checkpointed", False
    ERROR = "error", ("an exception (the message and traceback.txt say which), a full or "
                      "read-only disk among them"), False

    def __new__(cls, value: str, meaning: str, finished: bool | None):
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        member.finished = finished  # None: depends on the row (a timeout's time_limit)
        return member

    def __str__(self) -> str:
        return self.value


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


# What a result.json row may hold, key by key: its JSON type, whether null is allowed (where
# RunResult's field is Optional), and the range of a number. A key the schema does not know (a
# plugin's, `reference`) is kept unchecked; `check_row` applies it, read_rows calls it.
@dataclasses.dataclass(frozen=True)
class Rule:
    kind: str                          # str | int | number (int or float) | dict
    null: bool = True                  # JSON null allowed
    low: float | None = None           # inclusive bounds of a number
    high: float | None = None
    choices: tuple[str, ...] = ()      # the allowed texts, where they are a closed set
    nan_when: tuple[str, ...] = ()     # statuses whose row may hold NaN / inf here


def _rules(kind: str, names: str, **limits) -> dict[str, Rule]:
    return {name: Rule(kind, **limits) for name in names.split()}


# The keys every table needs; read_rows' own default asks only for model and status (lra.suite
# reads wall times from rows of any shape).
ROW_REQUIRED = ("task", "model", "seq_len", "seed", "status")
ROW_SCHEMA: dict[str, Rule] = {
    **_rules("str", "task model", null=False),
    "seq_len": Rule("int", null=False, low=1),
    "seed": Rule("int", null=False),
    "preset": Rule("str", null=False),
    "status": Rule("str", null=False, choices=tuple(s.value for s in Status)),
    "kind": Rule("str", null=False),
    **_rules("str", "error convergence memory_source time_limit fingerprint"),
    **_rules("number", "val_accuracy test_accuracy", low=0, high=1),
    "train_accuracy": Rule("number", low=0, high=1, nan_when=(Status.DIVERGED.value,)),
    "train_loss": Rule("number", nan_when=(Status.DIVERGED.value,)),
    **_rules("int", "best_step solved_step peak_memory_bytes xla_estimate_bytes param_count "
                    "resumed_from_step", low=0),
    "steps": Rule("int", null=False, low=0),
    **_rules("int", "batch_size num_devices", low=1),
    **_rules("number", "train_time_s eval_time_s wall_time_s compile_time_s lower_time_s "
                       "steps_per_s examples_per_s tokens_per_s flops_per_step "
                       "matmul_flops_per_step achieved_flops_per_s matmul_utilisation "
                       "param_ratio", low=0),
    **_rules("dict", "steps_to eval_lengths model_summary"),
    **_rules("dict", "env config", null=False),
}
# An eval_lengths entry ({"<length>": {...}}, lra.train.extrapolate): these keys are checked in it.
EVAL_LENGTH_SCHEMA = {"status": Rule("str"), "test_accuracy": Rule("number", low=0, high=1)}
MAX_DEPTH = 32  # nesting a row may have (configs nest ~6 deep); deeper is hostile or corrupt


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _check_value(key: str, value: Any, rule: Rule, status: Any) -> str | None:
    """Why `value` breaks `rule`, or None."""
    if value is None:
        return None if rule.null else f"{key} is null"
    if rule.kind == "str":
        if not isinstance(value, str):
            return f"{key} {_shown(value)} is not a string"
        if not value.strip() and not rule.null:
            return f"{key} is empty"
        if rule.choices and value not in rule.choices:
            return f"{key} {_shown(value)} is not one of {', '.join(rule.choices)}"
        return None
    if rule.kind == "dict":
        return None if isinstance(value, dict) else (f"{key} is a {type(value).__name__}, not "
                                                     "an object")
    # int | number: bool is not a number here (JSON true is no count)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{key} {_shown(value)} is not {'an int' if rule.kind == 'int' else 'a number'}"
    if rule.kind == "int" and not isinstance(value, int):
        return f"{key} {_shown(value)} is not an int"
    if isinstance(value, float) and not math.isfinite(value):
        return None if status in rule.nan_when else f"{key} {value} is not finite"
    if (rule.low is not None and value < rule.low) or (rule.high is not None and value > rule.high):
        bounds = (f"[{rule.low:g}, {rule.high:g}]" if rule.high is not None
                  else f">= {rule.low:g}")
        return f"{key} {_shown(value)} is outside {bounds}"
    return None


def _depth(value: Any) -> int:
    """How deeply `value` nests lists and dicts (iteratively: a hostile file cannot recurse)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            if deepest > MAX_DEPTH:
                return deepest
            inner = item.values() if isinstance(item, dict) else item
            stack.extend((v, depth + 1) for v in inner)
    return deepest


def check_row(data: Any, required: tuple[str, ...] = ROW_REQUIRED) -> str | None:
    """Why a parsed result.json is not a row the tables can use (ROW_SCHEMA), or None: not an
    object, a `required` key missing, a key of the wrong type (bool is no int), a number out of
    range or not finite (but a diverged run's loss), a status not in Status, an eval_lengths
    entry that is not {"<length>": {"status", "test_accuracy" in [0, 1]}}, nesting deeper
    than MAX_DEPTH."""
    if not isinstance(data, dict):
        return f"not a result row: a JSON {type(data).__name__}"
    missing = [key for key in required if key not in data]
    if missing:
        return "missing " + ", ".join(missing)
    status = data.get("status")
    for key, rule in ROW_SCHEMA.items():
        if key in data:
            why = _check_value(key, data[key], rule, status)
            if why:
                return why
    for length, entry in (data.get("eval_lengths") or {}).items():
        if not (length.isascii() and length.isdigit() and int(length) >= 1) \
                or not isinstance(entry, dict):
            return f"eval_lengths {_shown(length)} is not a length with its results"
        for key, rule in EVAL_LENGTH_SCHEMA.items():
            why = _check_value(key, entry.get(key), rule, status)
            if why:
                return f"eval_lengths {length} {why}"
    if _depth(data) > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    return None


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


def select_tuned(frame) -> None:
    """The tuning grid's choice, on validation and never on test: within one cell (kind, task
    label, model label, length, preset), runs differing in a tuned key (lra.config.TUNED) form
    candidates, `tuning` their values as text ("lr=0.001 weight_decay=0.1"); `chosen` is True for
    the candidate with the highest mean val accuracy over its ok runs (ties: the first in the
    values' order), and for every run of a cell with one candidate or none with an ok run (so
    its failures still show)."""
    # lra.config loads JAX: lra.results stays light for lra.sweep.launch and lra.report
    from lra.config import TUNED

    keys = [f"config.{k}" for k in TUNED if f"config.{k}" in frame]
    frame["tuning"] = [" ".join(f"{k.rsplit('.', 1)[-1]}={config_text(run[k])}" for k in keys)
                       for _, run in frame[keys].iterrows()] if keys else ""
    frame["chosen"] = True
    if not keys or frame.empty:
        return
    cell = ["kind", "task", "model", "seq_len", "preset"]
    for _, group in frame.groupby(cell, dropna=False):
        if group["tuning"].nunique() < 2:
            continue
        ok = group[(group["status"] == "ok") & group["val_accuracy"].notna()]
        if ok.empty:
            continue
        scores = ok.groupby("tuning")["val_accuracy"].mean()
        values = {t: tuple(group.loc[group["tuning"] == t, keys].iloc[0]) for t in scores.index}
        best = min(scores.index, key=lambda t: (-scores[t], values[t]))
        frame.loc[group.index, "chosen"] = group["tuning"] == best


def config_text(value) -> str:
    """A config value as written: 64, not the 64.0 of a column with missing entries; "unset"
    where a run's config lacks the key (a result written before the key existed)."""
    if isinstance(value, float):
        if value != value:
            return "unset"
        if value.is_integer():
            return str(int(value))
    return str(value)


def task_config(run):
    """The task's config dataclass rebuilt from a row's `config.task.*` columns (defaults for
    keys the row lacks), at the row's task and seq_len."""
    name = str(run.get("task_name", run["task"]))
    cls = tasks.config_class(name)
    defaults = cls()
    values = {}
    for field in dataclasses.fields(cls):
        value = run.get(f"config.task.{field.name}")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            value = value if isinstance(value, bool) else str(value).lower() in ("true", "1")
        elif isinstance(default, int) and isinstance(value, float) and value.is_integer():
            value = int(value)
        values[field.name] = value
    values.update(name=name, seq_len=int(run["seq_len"]))
    return cls(**values)


def _failed(frame):
    """Rows of status error: a bad value that failed inside the run. They never rename the
    good runs; the keys that vary are found among the others."""
    return frame["status"].astype(str) == "error"


def _size_label(cls, run) -> tuple[str, str] | None:
    """cls.size_label of the row's config; None where it cannot be rebuilt (an odd value)."""
    try:
        return cls.size_label(task_config(run)) if cls else None
    except (TypeError, ValueError):
        return None


def label_tasks(frame) -> None:
    """Runs of one task that differ in its data settings are different columns, not seeds:
    `task` becomes e.g. "copy (induction)", "mqar (num_pairs=16)" or "pathx (32x32)" (a size
    other than the task's own: Task.size_label); `task_name` keeps the bare name. Within one
    kind and preset, a key is named when it splits the good runs' settings further than the
    keys before it (config field order: the num_val that comes with a variant is not named);
    values at the config's default are left out, so default settings keep the bare name, but a
    `variant` field (which task the data poses) is always named. An error row adds its own odd
    values."""
    # lra.config loads JAX: lra.results stays light for lra.sweep.launch and lra.report
    from lra.config import used_for

    if "task_name" not in frame:
        frame["task_name"] = frame["task"]
    keys = [c for c in frame.columns if c.startswith("config.task.")
            and used_for(c.removeprefix("config."), "label")]
    labels = frame["task_name"].astype(str).copy()
    failed = _failed(frame)
    for (_, name, _), group in frame.groupby(["kind", "task_name", "preset"], dropna=False):
        try:
            cls = tasks.task_class(str(name))
            defaults = dataclasses.asdict(tasks.config_class(str(name))())
        except ValueError:  # an unimported plugin's task: its keys, no defaults or size
            cls, defaults = None, {}
        sizes = {i: _size_label(cls, run) for i, run in group.iterrows()}
        own = {f"config.task.{field}" for field, _ in filter(None, sizes.values())}
        order = [f"config.task.{k}" for k in defaults]
        mine = [k for k in keys if k not in own  # this task's fields (other tasks' are NaN)
                and (k in order if order else group[k].notna().any())]
        ordered = sorted(mine, key=lambda k: (order.index(k) if k in order else len(order), k))
        values = group[ordered].astype(object)
        for key in ordered:  # a key a row lacks (written before it existed): its default
            field = key.removeprefix("config.task.")
            if field in defaults:
                values[key] = values[key].where(values[key].notna(), defaults[field])
        text = values.map(config_text)
        good = text[~failed[group.index]]
        base = good if len(good) else text
        named, splits = [], 1
        for key in ordered:
            count = len(base[[*named, key]].drop_duplicates())
            if count > splits:
                named, splits = [*named, key], count
        for index in group.index:
            size = sizes[index]
            parts = [size[1]] if size else []
            for key in ordered:
                field, value = key.removeprefix("config.task."), text.at[index, key]
                odd = failed[index] and len(good) and value not in set(good[key])
                if odd or ((key in named or field == "variant")
                           and value != config_text(defaults.get(field))):
                    parts.append(value if field == "variant" else f"{field}={value}")
            if parts:
                labels[index] = f"{name} ({', '.join(parts)})"
    # A suite cell's column is the suite's task at its length: "induction L=64".
    suite = frame["config.suite_task"] if "config.suite_task" in frame else None
    if suite is not None:
        named = suite.notna() & (suite.astype(str) != "")
        labels[named] = [f"{t} L={config_text(n)}" for t, n in
                         zip(suite[named].astype(str), frame.loc[named, "seq_len"])]
    frame["task"] = labels


def label_variants(frame) -> None:
    """Task labels first (label_tasks); then runs of one model on one task column that differ
    in config beyond seed and length are different experiments, not seeds to average: their
    `model` becomes e.g. "transformer pos=rope" (or "bigbird (tiny)" across presets,
    "performer [lra]" for protocol=lra runs), naming the keys that differ within one preset and
    protocol; `model_name` keeps the bare name."""
    # pandas only for tables: lra.results stays light for lra.sweep.launch
    import pandas as pd

    label_tasks(frame)
    frame["model_name"] = frame["model"]
    # lra.config loads JAX: lra.results stays light for lra.sweep.launch and lra.report
    from lra.config import used_for

    # (task.* keys label the task column, label_tasks; a protocol is labelled by its name)
    keys = [c for c in frame.columns if c.startswith("config.")
            and not c.startswith(("config.task.", "config.protocol."))
            and used_for(c.removeprefix("config."), "label")]
    labels = frame["model"].astype(str).copy()
    # Runs written before protocols existed ran the papers' forms.
    protocol = frame.get("config.protocol.name", pd.Series("paper", index=frame.index))
    protocol = protocol.fillna("paper").astype(str)
    failed = _failed(frame)
    # rows of a reference file (lra.reference) are never seeds of this run's rows of that model
    source = frame.get("reference.file", pd.Series(None, index=frame.index, dtype=object))
    source = source.fillna("").astype(str)
    for (_, _, model, _), group in frame.groupby(["kind", "task", "model", source], dropna=False):
        # Error rows (a bad value that failed inside the run) never rename the good runs: the
        # keys that vary are found among the others; an error row's label adds its odd ones.
        good = group[~failed[group.index]]
        presets = set(good["preset"].astype(str)) if len(good) else set(group["preset"].astype(str))
        for (preset, proto), runs in group.groupby([group["preset"].astype(str),
                                                    protocol[group.index]]):
            ok = runs[~failed[runs.index]]
            base = ok if len(ok) else runs
            varying = [k for k in keys if base[k].astype(str).nunique() > 1]
            for index, run in runs.iterrows():
                own = list(varying)
                if failed[index] and len(ok):
                    own += [k for k in keys if k not in varying
                            and str(run[k]) not in set(ok[k].astype(str))]
                parts = [f"({preset})"] if len(presets) > 1 or preset not in presets else []
                parts += [f"[{proto}]"] if proto != "paper" else []
                parts += [f"{k.rsplit('.', 1)[-1]}={config_text(run[k])}" for k in own]
                if parts:
                    labels[index] = " ".join([str(model), *parts])
    if "reference.file" in frame:
        labels[source != ""] = labels[source != ""] + f" {MARK}"
    frame["model"] = labels
