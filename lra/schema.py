"""What a result row is: its statuses (`Status`) and the schema `check_row` holds every
result.json to before a table reads it (lra.results.read_rows applies it)."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any


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
    **_rules("dict", "steps_to eval_lengths model_summary pretrain"),
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


