"""Figures for lra.report (matplotlib, Agg): each saved as PNG and SVG."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lra.results import read_metrics  # noqa: E402
from lra.tables import efficiency_frame  # noqa: E402


MARKERS = "os^vD<>ph*X"


def _style(index: int) -> dict:
    """Distinct colour + marker per line: 13+ models outrun matplotlib's 10-colour cycle."""
    return {"color": plt.get_cmap("tab20")(index % 20), "marker": MARKERS[index % len(MARKERS)],
            "linestyle": "-" if index % 2 == 0 else "--"}


def slug(name: str) -> str:
    """A file-name-safe form of `name` (task and model names are user input: "a/b" must not
    become a directory)."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("._") or "_"


def _save(fig, out: Path, name: str) -> list[Path]:
    name = slug(name)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=130)
    plt.close(fig)
    return paths


def efficiency_vs_length(df: pd.DataFrame, out: Path) -> list[Path]:
    """Steps/s and peak memory vs seq_len, log-log, one line per model, failures marked x."""
    eff = efficiency_frame(df)
    if eff.empty or eff["seq_len"].nunique() < 1:
        return []
    written = []
    for column, label, name in (("steps_per_s", "train steps / s", "speed_vs_seq_len"),
                                ("peak_memory_bytes", "peak memory (MiB)", "memory_vs_seq_len")):
        if not (pd.to_numeric(eff[column], errors="coerce") > 0).any():
            continue  # nothing measured to draw on a log axis (e.g. rows without timings)
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for index, ((task, model), group) in enumerate(eff.groupby(["task", "model"])):
            group = group.sort_values("seq_len")
            values = group[column] / (2**20 if column == "peak_memory_bytes" else 1)
            line, = ax.plot(group["seq_len"], values, label=f"{model} ({task})", **_style(index))
            failed = group[group["status"] != "ok"]
            if not failed.empty:
                top = values.max() if values.notna().any() else 1.0
                ax.scatter(failed["seq_len"], [top] * len(failed), marker="x", s=80,
                           color=line.get_color(), zorder=5)
                for length, status in zip(failed["seq_len"], failed["status"]):
                    ax.annotate(status.upper(), (length, top), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs sequence length (x = OOM/timeout/error)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        written += _save(fig, out, name)
    return written


def accuracy_vs_speed(df: pd.DataFrame, out: Path) -> list[Path]:
    """LRA Figure 3: test accuracy vs steps/s, marker area proportional to peak memory."""
    runs = df[(df["kind"] == "run") & (df["status"] == "ok")]
    if runs.empty:
        return []
    points = runs.groupby("model").agg(acc=("test_accuracy", "mean"), speed=("steps_per_s", "median"),
                                       memory=("peak_memory_bytes", "median")).dropna()
    if points.empty:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    area = 1500 * points["memory"] / points["memory"].max()
    ax.scatter(points["speed"], 100 * points["acc"], s=area, alpha=0.5)
    for model, row in points.iterrows():
        ax.annotate(model, (row["speed"], 100 * row["acc"]), fontsize=8, ha="center")
    ax.set_xlabel("train steps / s")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs speed (marker area ~ peak memory)")
    ax.grid(True, alpha=0.3)
    return _save(fig, out, "accuracy_vs_speed")


def eval_curves(df: pd.DataFrame, out: Path) -> list[Path]:
    """Validation accuracy vs step per (task, seq_len) group, one line per model/seed."""
    runs = df[df["kind"] == "run"]
    written = []
    skipped = df.attrs.setdefault("skipped_metrics_lines", {})
    for (task, length), group in runs.groupby(["task", "seq_len"]):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        drawn = 0
        for _, row in group.iterrows():
            path = Path(row["path"]) / "metrics.jsonl"
            if not path.is_file():
                continue
            curve, bad = read_metrics(path)
            if bad:
                skipped[str(path)] = bad
                warnings.warn(f"{path}: skipped {bad} unreadable line(s)", stacklevel=1)
            curve = [r for r in curve if isinstance(r.get("val_accuracy"), (int, float))
                     and isinstance(r.get("step"), (int, float))]
            if curve:
                ax.plot([r["step"] for r in curve], [100 * r["val_accuracy"] for r in curve],
                        marker=".", label=f"{row['model']} s{int(row['seed'])}")
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("training step")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"{task}, L={int(length)}: eval curves")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        written += _save(fig, out, f"eval_curve_{task}_L{int(length)}")
    return written


def _accuracy_lines(group: pd.DataFrame, x: str, lines: list[str], label, out: Path, name: str,
                    xlabel: str, title: str, train_len: int | None = None) -> list[Path]:
    """Test accuracy (mean ± std over seeds, %) vs `x` on a log2 axis, one line per `lines`
    group labelled `label(key)`; `train_len` marked by a vertical line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    stats = group.groupby([*lines, x])["test_accuracy"].agg(["mean", "std"]).reset_index()
    for index, (key, rows) in enumerate(stats.groupby(lines)):
        ax.errorbar(rows[x], 100 * rows["mean"], yerr=100 * rows["std"].fillna(0),
                    capsize=3, label=label(key), **_style(index))
    if train_len is not None:
        ax.axvline(train_len, color="gray", linestyle=":", label=f"train L={train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, name)


def accuracy_vs_length(df: pd.DataFrame, out: Path) -> list[Path]:
    runs = df[(df["kind"] == "run") & (df["status"] == "ok")]
    written = []
    for task, group in runs.groupby("task"):
        if group["seq_len"].nunique() < 2:
            continue
        written += _accuracy_lines(
            group, "seq_len", ["model"], lambda key: key[0], out, f"accuracy_vs_seq_len_{task}",
            "sequence length L", f"{task}: accuracy vs sequence length (mean ± std over seeds)")
    return written


def accuracy_vs_eval_length(df: pd.DataFrame, out: Path) -> list[Path]:
    """Length extrapolation: test accuracy at each eval length, one line per model and position
    encoding, the training length marked."""
    from lra.tables import extrapolation_frame

    long = extrapolation_frame(df)
    written = []
    if long.empty:
        return written
    long = long[long["status"] == "ok"].copy()
    long["test_accuracy"] = pd.to_numeric(long["test_accuracy"])
    for (task, train_len), group in long.groupby(["task", "train_len"]):
        written += _accuracy_lines(
            group, "eval_len", ["model", "pos"], lambda key: f"{key[0]} pos={key[1]}", out,
            f"extrapolation_{task}_L{train_len}", "evaluation sequence length L",
            f"{task}: length extrapolation (trained at L={train_len})", train_len=train_len)
    return written


def all_figures(df: pd.DataFrame, out: Path) -> list[Path]:
    """Every figure; one that cannot be drawn from these rows (degenerate data) is skipped with a
    warning naming it, so the tables and the other figures are still written."""
    written = []
    for figure in (efficiency_vs_length, accuracy_vs_speed, eval_curves, accuracy_vs_length,
                   accuracy_vs_eval_length):
        try:
            written += figure(df, out)
        except Exception as err:  # noqa: BLE001 - a report never dies on one figure
            plt.close("all")
            warnings.warn(f"figure {figure.__name__} skipped: {type(err).__name__}: "
                          f"{' '.join(str(err).split())[:200]}", stacklevel=1)
    return written
