"""How the report names rows: the tuning grid's choice (`select_tuned`), task labels with their
length and variant (`label_tasks`) and model labels with what sets a run apart
(`label_variants`); lra.results.load_results applies them."""

from __future__ import annotations

import dataclasses
import math

from lra import tasks

MARK = "(ref)"  # the report's label suffix for a reference row (lra.reference)
SPT = "+spt"  # the label part of a self-pretrained run (train.pretrain): "transformer +spt(masked)"
PRETRAIN = "config.train.pretrain."


def pretrained(frame):
    """Whether each row's run self-pretrained (train.pretrain.objective other than none; rows
    written before the key existed did not)."""
    import pandas as pd

    objective = frame.get(PRETRAIN + "objective", pd.Series(None, index=frame.index, dtype=object))
    return objective.notna() & (objective.astype(str) != "none")


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
            and not c.startswith(("config.task.", "config.protocol.", PRETRAIN))
            and used_for(c.removeprefix("config."), "label")]
    labels = frame["model"].astype(str).copy()
    spt = pretrained(frame)
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
            on = base[spt[base.index]]  # pretraining keys are named among pretrained runs only
            varying += [k for k in frame.columns if k.startswith(PRETRAIN)
                        and not k.endswith(".objective") and on[k].astype(str).nunique() > 1]
            for index, run in runs.iterrows():
                own = list(varying)
                if failed[index] and len(ok):
                    own += [k for k in keys if k not in varying
                            and str(run[k]) not in set(ok[k].astype(str))]
                parts = [f"({preset})"] if len(presets) > 1 or preset not in presets else []
                parts += [f"[{proto}]"] if proto != "paper" else []
                if spt[index]:
                    parts.append(f"{SPT}({run[PRETRAIN + 'objective']})")
                parts += [f"{_key_name(k)}={config_text(run[k])}" for k in own
                          if spt[index] or not k.startswith(PRETRAIN)]
                if parts:
                    labels[index] = " ".join([str(model), *parts])
    if "reference.file" in frame:
        labels[source != ""] = labels[source != ""] + f" {MARK}"
    frame["model"] = labels


def _key_name(column: str) -> str:
    """A varying key as a label names it: its last part ("pos"), pretraining's as
    "pretrain.steps" (apart from train.steps)."""
    if column.startswith(PRETRAIN):
        return "pretrain." + column.removeprefix(PRETRAIN)
    return column.rsplit(".", 1)[-1]
