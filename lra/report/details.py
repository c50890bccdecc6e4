"""The report's run details: where and with what the runs ran (hardware, versions, presets), each
(task, model) row's hyper-parameters, seeds, size and cost, and why each failed run failed."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd

from lra.report import render
from lra.labels import config_text
from lra.results import Status

# result.json `env` key -> column; runs that differ in any of them are rows of their own.
ENV = {"host": "host", "platform": "platform", "device_kind": "device", "num_devices": "devices",
       "cpu_model": "CPU", "cpu_count": "cores", "jax_version": "jax", "flax_version": "flax",
       "optax_version": "optax", "python": "python"}
VERSIONS = ("jax", "flax", "optax")
DIMS = ("emb_dim", "num_heads", "num_layers", "mlp_dim")
MODEL_SETTINGS = ("pos", "dropout", "pool")  # encoder fields beside the dims that change a run
REASON_CHARS = 160
Section = tuple[str, list[str], pd.DataFrame]  # title, lines of text, table


def _text(value) -> str:
    """A value as written (64, not the 64.0 of a column with gaps); "-" where missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return config_text(value)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series(None, index=frame.index, dtype=object)


def _values(texts) -> str:
    """The distinct texts of a group as one cell, numbers in numeric order: "256 / 512"."""
    def key(text: str):
        try:
            return (0, float(text.split()[0].replace(",", "")), text)
        except (ValueError, IndexError):
            return (1, 0.0, text)

    shown = sorted({t for t in texts if t != "-"}, key=key)
    return " / ".join(shown) if shown else "-"


def _counts(series: pd.Series) -> str:
    """"small (12 runs), tiny (3 runs)"."""
    counts = series.map(_text).value_counts()
    return ", ".join(f"{value} ({n} run{'s' * (n != 1)})" for value, n in sorted(counts.items()))


def environment_section(df: pd.DataFrame) -> Section:
    """Hardware and software per distinct environment (result.json `env`), the runs on each,
    whether the versions differ between runs, and the presets."""
    env = pd.DataFrame({name: _column(df, f"env.{key}").map(_text) for key, name in ENV.items()})
    table = env.value_counts(sort=False).rename("runs").reset_index().set_index("host")
    lines = []
    differ = [name for name in VERSIONS if env[name].nunique() > 1]
    if differ:
        lines.append("Versions differ between runs: " + "; ".join(
            f"{name} {_counts(env[name])}" for name in differ) + ".")
    else:
        lines.append("Every run: " + ", ".join(f"{name} {env[name].iloc[0]}" for name in VERSIONS)
                     + ".")
    lines.append(f"Presets: {_counts(df['preset'])}.")
    if "env.cpu_model" not in df:
        lines.append("CPU model and cores: not recorded in these results' env.")
    return "Hardware and software", lines, table


def _non_default(run: pd.Series) -> str:
    """The model's settings beside its dims that differ from their dataclass defaults, e.g.
    "block_size=16, pos=rope" (all of a plugin's attention fields when it is not imported)."""
    from lra import models  # lra.report loads without JAX
    from lra.models.config import ModelConfig  # lra.report loads without JAX

    kind = run.get("config.model.attention.kind")
    try:
        attention = dataclasses.asdict(models.attention.config_class(str(kind))())
    except ValueError:
        attention = {}
    base = dataclasses.asdict(ModelConfig())
    settings = {f"config.model.{k}" for k in MODEL_SETTINGS}
    parts = []
    for key, value in run.items():
        key, text = str(key), _text(value)
        field = key.rsplit(".", 1)[-1]
        if text == "-":
            continue
        if key.startswith("config.model.attention.") and field != "kind":
            named = field not in attention or text != config_text(attention[field])
        else:
            named = key in settings and text != config_text(base[field])
        if named:
            parts.append(f"{field}={text}")
    return ", ".join(sorted(parts)) or "-"


def hyperparameter_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (task column, model row) of the training runs: preset, protocol, lengths, dims,
    batch, steps, lr, schedule, settings that differ from defaults, seeds, run statuses,
    parameters (ratio to the transformer of the same dims) and XLA's FLOPs per train step. A
    value that differs between its runs (a length's FLOPs) is listed as "a / b"."""
    runs = df[df["kind"] == "run"]
    rows = {}
    for (task, model), g in runs.groupby(["task", "model"], sort=True):
        config = {c: _column(g, f"config.{c}").map(_text) for c in (
            "protocol.name", "train.steps", "train.lr", "train.schedule", "train.warmup_steps",
            *(f"model.{d}" for d in DIMS))}
        seeds = sorted({int(s) for s in g["seed"].dropna()})
        params = [f"{int(n):,} ({r:.2f}x)" if not pd.isna(r) else f"{int(n):,}"
                  for n, r in zip(g["param_count"], g["param_ratio"]) if not pd.isna(n)]
        rows[f"{task}/{model}"] = {
            "preset": _values(g["preset"].map(_text)),
            "protocol": _values(config["protocol.name"].replace("-", "paper")),
            "L": _values(g["seq_len"].map(_text)),
            "emb/heads/layers/mlp": _values(
                "/".join(config[f"model.{d}"].loc[i] for d in DIMS) for i in g.index),
            "batch": _values(g["batch_size"].map(_text)),
            "steps": _values(config["train.steps"]),
            "lr": _values(config["train.lr"]),
            "schedule": _values(f"{s}, warm-up {w}" if w != "-" else s for s, w in
                                zip(config["train.schedule"], config["train.warmup_steps"])),
            "non-default settings": _values(_non_default(run) for _, run in g.iterrows()),
            "seeds": f"{', '.join(map(str, seeds))} (n={len(seeds)})" if seeds else "-",
            "runs": ", ".join(f"{n} {s}" for s, n in g["status"].value_counts().items()),
            "parameters": _values(params),
            "GFLOP/step": _values(f"{v / 1e9:.3g}" for v in g["flops_per_step"].dropna()),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "task/model"
    return table


def reason(error, status: str, limit: int = REASON_CHARS) -> str:
    """Why a run did not end ok, on one line: its error message (whitespace collapsed, cut at a
    word boundary past `limit` characters), else what its status means."""
    text = " ".join(str(error).split()) if _text(error) != "-" else ""
    if not text:
        text = Status(status).meaning if status in {s.value for s in Status} else status
    if len(text) > limit:
        text = text[:limit - 4].rsplit(" ", 1)[0] + " ..."
    return text


def failure_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every run whose status is not ok: kind, length, seed, status and the reason."""
    bad = df[df["status"].astype(str) != "ok"].sort_values(["task", "model", "seq_len", "seed"])
    table = pd.DataFrame({
        "kind": bad["kind"].map(_text).tolist(), "L": bad["seq_len"].map(_text).tolist(),
        "seed": bad["seed"].map(_text).tolist(), "status": bad["status"].astype(str).tolist(),
        "reason": [reason(e, str(s)) for e, s in zip(_column(bad, "error"), bad["status"])],
    }, index=[f"{t}/{m}" for t, m in zip(bad["task"], bad["model"])])
    table.index.name = "task/model"
    return table


def sections(df: pd.DataFrame) -> list[Section]:
    """The run-details sections of a report, in order."""
    bench = df[df["kind"] == "bench"]
    hyper = [("One row per task column and model row (the labels of Table 1); FLOPs from XLA's "
              "cost analysis of the train step.")]
    if len(bench):
        hyper.append(f"Bench rows ({len(bench)}): lengths {_values(bench['seq_len'].map(_text))}, "
                     f"batch {_values(bench['batch_size'].map(_text))}, timed steps "
                     f"{_values(_column(bench, 'config.bench.steps').map(_text))}.")
    table = hyperparameter_table(df)
    # A value every row shares is said once, above the table, not in a column of repeats (the
    # suite's table would not fit a page).
    same = [c for c in table.columns if len(table) > 1 and table[c].nunique() == 1]
    if same:
        hyper.append("Every row: " + "; ".join(f"{c} {table[c].iloc[0]}" for c in same) + ".")
        table = table.drop(columns=same)
    failures = failure_table(df)
    return [environment_section(df),
            ("Hyper-parameters, seeds and cost", hyper, table),
            ("Runs that did not end ok", [f"{len(failures)} of {len(df)} runs."], failures)]


def write_details(df: pd.DataFrame, out) -> list[Section]:
    """run_details.md (every section) and hyperparameters.{md,csv,tex}; returns the sections."""
    parts = sections(df)
    text = ["# Run details"]
    for title, lines, table in parts:
        text += [f"\n## {render.markdown_text(title)}\n",
                 *(f"{render.markdown_text(line)}\n" for line in lines), render.to_markdown(table)]
    Path(out, "run_details.md").write_text("\n".join(text) + "\n")
    shared = [line for line in parts[1][1] if line.startswith("Every row: ")]
    render.write_table(parts[1][2], out, "hyperparameters", " ".join(
        ["Hyper-parameters, seeds and cost per task and model.", *shared]))
    return parts
