"""Figures for lra.report (matplotlib, Agg), each saved as PNG and SVG.

A builder (`*_figures(df) -> {name: Figure}`) draws; `save_figures` writes and closes; the public
`efficiency_vs_length(df, out)` etc. do both. Every builder styles a model by `model_styles` over
all labels of the frame, so a model looks the same in every figure of a report; log axes carry
plain tick labels (`256 512 1K`, `0.5 1 2 5`); a failed point (OOM, timeout, error, ...) is a
hollow red X with its status in a band kept free at the foot of the axes, never a point on a
line.
"""

from __future__ import annotations

import math
import re
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator  # noqa: E402
from matplotlib.transforms import Bbox, blended_transform_factory  # noqa: E402

from lra.results import read_metrics  # noqa: E402
from lra.report.tables import efficiency_frame, latest_runs, extrapolation_frame  # noqa: E402

# The exact baselines keep one prominent style whatever else is in the report.
BASELINE_STYLES = {"transformer": {"color": "#000000", "marker": "o", "linestyle": "-"},
                   "flash": {"color": "#444444", "marker": "s", "linestyle": "--"}}
# tab10 without its grey (taken by the baselines) plus navy, then a second set chosen to sit
# >= 0.25 (RGB distance) from every colour before it: no light/dark pairs of one hue.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#bcbd22", "#17becf", "#000080",
           "#ff00ff", "#0000ff", "#800000", "#006400", "#ffd700", "#4b0082", "#808000",
           "#ff1493", "#00fa9a", "#8b008b")
# 11 markers against 20 colours (coprime): (colour, marker) pairs repeat only after 220 models.
# No "X"/"x": those mean failure.
MARKERS = ("o", "^", "s", "D", "v", "P", "<", ">", "h", "*", "p")
LINESTYLES = ("-", "--", "-.")
FAILED = "red"
Figures = dict  # name -> matplotlib Figure


def model_styles(labels) -> dict[str, dict]:
    """A (color, marker, linestyle) per model label, from the sorted set of labels: the same
    frame gives every figure the same map. `transformer`/`flash` (or, without the bare label,
    the first of their variants) keep BASELINE_STYLES; the rest cycle PALETTE x MARKERS."""
    labels = sorted({str(label) for label in labels if not pd.isna(label)})
    styles: dict[str, dict] = {}
    for base, style in BASELINE_STYLES.items():
        family = [label for label in labels if label.split(" ", 1)[0] == base]
        if family:
            styles[base if base in family else family[0]] = dict(style)
    for index, label in enumerate(label for label in labels if label not in styles):
        styles[label] = {"color": PALETTE[index % len(PALETTE)],
                         "marker": MARKERS[index % len(MARKERS)],
                         "linestyle": LINESTYLES[index // len(PALETTE) % len(LINESTYLES)]}
    return styles


def length_text(length: float) -> str:
    """256, 512, 1K, 1.5K, 4K, 1M: a sequence length as a tick label."""
    for size, unit in ((2**20, "M"), (2**10, "K")):
        if length >= size and (10 * length / size).is_integer():
            return f"{length / size:g}{unit}"
    return f"{length:g}"


def plain_number(value: float) -> str:
    """0.5, 2, 1500: never 5x10^-1 or 1e+03."""
    return np.format_float_positional(float(value), precision=3, unique=True, fractional=False,
                                      trim="-")


def _length_axis(ax, which: str, lengths) -> None:
    """A log2 length axis (`which`: "x" or "y") labelled at exactly the measured lengths."""
    getattr(ax, f"set_{which}scale")("log", base=2)
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(FixedLocator(sorted({float(v) for v in lengths if v > 0})))
    axis.set_major_formatter(FuncFormatter(lambda v, _: length_text(v)))
    axis.set_minor_locator(NullLocator())


def _log_value_axis(ax, which: str) -> None:
    """Ticks of a log10 value axis (steps/s, MiB; limits final) at 1-2-5 numbers, plain text."""
    axis = getattr(ax, f"{which}axis")
    lo, hi = sorted(axis.get_view_interval())
    ticks: list[float] = []
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 5, 7), (1, 1.5, 2, 3, 4, 5, 6, 7, 8)):
        ticks = [m * 10.0**e for e in decades for m in mantissas if lo <= m * 10.0**e <= hi]
        if len(ticks) >= 3:
            break
    if len(ticks) < 2:  # a view narrower than 1 -> 1.5: evenly spaced plain numbers
        ticks = [t for t in MaxNLocator(4).tick_values(lo, hi) if lo <= t <= hi and t > 0]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: plain_number(v)))
    axis.set_minor_locator(NullLocator())


def _draw_failures(ax, failures: list[tuple[float, str, str, str]]) -> None:
    """Each (x, line label, status, colour) as a hollow red X at the bottom of the axes (stacked
    where several share an x) with "STATUS label" beside it in the line's colour; one legend
    entry."""
    if not failures:
        return
    rows = max(Counter(failure[0] for failure in failures).values())
    band = 0.06 + 0.07 * rows  # the bottom of the axes is kept free of data for the marks
    scale = ax.yaxis.get_transform()
    lo, hi = scale.transform(np.array([[v] for v in sorted(ax.get_ylim())]))[:, 0]
    ax.set_ylim(scale.inverted().transform([[(lo - band * hi) / (1 - band)]])[0, 0],
                ax.get_ylim()[1])
    at_x = blended_transform_factory(ax.transData, ax.transAxes)
    to_axes, top = ax.transAxes.inverted(), ax.get_ylim()[1]
    stacked: Counter = Counter()
    xs, ys = [], []
    for x, label, status, color in sorted(failures):
        y = 0.04 + 0.07 * stacked[x]
        stacked[x] += 1
        xs.append(x)
        ys.append(y)
        right = to_axes.transform(ax.transData.transform((x, top)))[0] > 0.7
        ax.annotate(f"{status.upper()} {label}", (x, y), xycoords=at_x,
                    xytext=(-6 if right else 6, 0), textcoords="offset points", va="center",
                    ha="right" if right else "left", fontsize=6.5, color=color,
                    gid="failure-text")
    statuses = " / ".join(sorted({failure[2].upper() for failure in failures}))
    ax.scatter(xs, ys, transform=at_x, marker="X", s=60, facecolors="none", edgecolors=FAILED,
               linewidths=1.2, zorder=6, clip_on=False, gid="failures",
               label=f"failed ({statuses})")


def _baselines_first(label) -> tuple:
    """Sort key: transformer, flash (and their variants), then the rest by name."""
    bases = list(BASELINE_STYLES)
    base = str(label).split(" ", 1)[0]
    return (bases.index(base) if base in bases else len(bases), str(label))


def _legend(ax, entries: int) -> None:
    """Inside the axes up to 8 entries; beyond that outside on the right, off the data."""
    if entries > 8:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7)


def _cells(rows: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Per `keys` cell: mean and std (>= 2 ok values) of `value` over ok rows, and the status of
    a cell with no ok row (its failure)."""
    out = []
    for key, group in rows.groupby(keys, dropna=False, sort=True):
        ok = pd.to_numeric(group.loc[group["status"] == "ok", value], errors="coerce").dropna()
        failed = group.loc[group["status"] != "ok", "status"].astype(str)
        out.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                    "mean": ok.mean() if len(ok) else math.nan,
                    "std": ok.std(ddof=1) if len(ok) >= 2 else math.nan,
                    "failed": None if len(ok) or failed.empty else failed.value_counts().index[0]})
    return pd.DataFrame(out)


def _lines(ax, cells: pd.DataFrame, line: str, x: str, styles: dict, scale: float = 1.0,
           style_of=None) -> list[tuple[float, str, str, str]]:
    """One line per `line` value through its ok cells, broken (NaN) at failed cells, error bars
    where a cell has a std; returns the failures to draw."""
    failures = []
    for label in sorted(cells[line].unique(), key=_baselines_first):
        group = cells[cells[line] == label].sort_values(x)
        style = styles.get(style_of(group) if style_of else label, {})
        ok = group["failed"].isna() & group["mean"].notna()
        broken = group["failed"].notna()
        failures += [(v, label, s, style.get("color", FAILED))
                     for v, s in zip(group.loc[broken, x], group.loc[broken, "failed"])]
        kept = group[ok | broken]  # a failure breaks the line; a missing value just isn't drawn
        if not ok.any():
            continue
        xs = np.where(ok[kept.index], kept[x], np.nan).astype(float)
        ys = np.where(ok[kept.index], kept["mean"] * scale, np.nan).astype(float)
        ax.plot(xs, ys, label=label, **style)
        bars = group[ok & group["std"].notna()]
        if len(bars):
            ax.errorbar(bars[x], bars["mean"] * scale, yerr=bars["std"] * scale, fmt="none",
                        ecolor=style.get("color"), capsize=3, elinewidth=1)
    return failures


# ------------------------------------------------------------------ speed / memory vs length

def speed_memory_figures(df: pd.DataFrame) -> Figures:
    """Steps/s and peak memory vs seq_len (log-log), one line per model, per task: bench rows
    if any, else training runs (lra.report.tables.efficiency_frame)."""
    eff = efficiency_frame(df)
    if eff.empty:
        return {}
    source = "bench" if (df["kind"] == "bench").any() else "train"
    styles = model_styles(df["model"])
    tasks = sorted(eff["task"].dropna().astype(str).unique())
    figures = {}
    for column, ylabel, stem, scale in (
            ("steps_per_s", f"{source} steps / s", "speed_vs_seq_len", 1.0),
            ("peak_memory_bytes", "peak memory (MiB)", "memory_vs_seq_len", 2.0**-20)):
        for task in tasks:
            rows = eff[eff["task"] == task].copy()
            rows[column] = pd.to_numeric(rows[column], errors="coerce")
            if not (rows[column] > 0).any():
                continue  # nothing measured to draw on a log axis
            rows.loc[~(rows[column] > 0) & (rows["status"] == "ok"), column] = math.nan
            cells = _cells(rows, ["model", "seq_len"], column)
            lines = cells.loc[cells["mean"].notna(), "model"].nunique()
            fig, ax = plt.subplots(figsize=(9.0 if lines > 8 else 6.4, 4.4))
            failures = _lines(ax, cells, "model", "seq_len", styles, scale)
            _length_axis(ax, "x", cells["seq_len"])
            ax.set_yscale("log")
            _draw_failures(ax, failures)
            _log_value_axis(ax, "y")
            ax.set_xlabel("sequence length L")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{task}: {ylabel} vs sequence length")
            ax.grid(True, alpha=0.3)
            _legend(ax, lines + bool(failures))
            fig.tight_layout()
            figures[stem if len(tasks) == 1 else f"{stem}_{task}"] = fig
    return figures


# ------------------------------------------------------------------ LRA Figure 3

def _average_accuracy(df: pd.DataFrame) -> tuple[pd.Series, list, list[str]]:
    """Each model's Avg test accuracy over the (task, seq_len) columns of the ok training runs,
    seeds averaged first; only models with every column. Returns (avg, columns, left out)."""
    runs = df[(df["kind"] == "run") & (df["status"] == "ok")].copy()
    runs["test_accuracy"] = pd.to_numeric(runs["test_accuracy"], errors="coerce")
    runs = runs.dropna(subset=["test_accuracy"])
    if runs.empty:
        return pd.Series(dtype=float), [], []
    runs = latest_runs(runs)  # a repeated seed counts once, as in Table 1
    cells = runs.groupby(["model", "task", "seq_len"])["test_accuracy"].mean()
    columns = sorted(set(zip(cells.index.get_level_values("task"),
                             cells.index.get_level_values("seq_len"))))
    counts = cells.groupby(level="model").size()
    complete = counts[counts == len(columns)].index
    avg = cells[cells.index.get_level_values("model").isin(complete)].groupby(level="model").mean()
    return avg, columns, sorted(set(counts.index) - set(complete))


def _speed_points(df: pd.DataFrame, models) -> tuple[pd.DataFrame, str, list[str]]:
    """Per model: (speed, memory MiB, length) from its bench rows at L=4096, else at its largest
    ok bench length; without any bench row, its training runs' medians. Returns the points,
    the x-axis text and notes."""
    def num(frame, column):
        return pd.to_numeric(frame[column], errors="coerce")

    all_bench = df[df["kind"] == "bench"]
    bench = all_bench[(all_bench["status"] == "ok") & (num(all_bench, "steps_per_s") > 0)]
    notes, rows = [], {}
    if bench.empty:
        runs = df[(df["kind"] == "run") & (df["status"] == "ok")]
        for model in models:
            own = runs[runs["model"] == model]
            rows[model] = (num(own, "steps_per_s").median(),
                           num(own, "peak_memory_bytes").median() / 2**20, None)
        return (pd.DataFrame.from_dict(rows, orient="index", columns=["speed", "memory", "length"]),
                "train steps / s (median over its runs: no bench rows)", notes)
    name_of = dict(zip(df["model"], df["model_name"] if "model_name" in df else df["model"]))
    missing, borrowed, failed = [], [], []
    for model in models:
        key = model
        if not (bench["model"] == model).any() and (bench["model"] == name_of.get(model)).any():
            key = name_of[model]  # a variant label of the runs: the bare model's bench
            borrowed.append(model)
        own = bench[bench["model"] == key]
        if own.empty:
            missing.append(model)
            continue
        lengths = num(own, "seq_len")
        length = 4096 if (lengths == 4096).any() else lengths.max()
        at_4k = all_bench[(all_bench["model"] == key) & (num(all_bench, "seq_len") == 4096)]
        if length != 4096 and len(at_4k):
            failed.append(f"{model} ({str(at_4k['status'].iloc[0]).upper()})")
        at = own[lengths == length]
        rows[model] = (num(at, "steps_per_s").median(),
                       num(at, "peak_memory_bytes").median() / 2**20, int(length))
    points = pd.DataFrame.from_dict(rows, orient="index", columns=["speed", "memory", "length"])
    main = 4096 if (points["length"] == 4096).any() else (
        int(points["length"].mode().iloc[0]) if len(points) else 4096)
    for length, group in points[points["length"] != main].groupby("length"):
        notes.append(f"at L={length_text(length)}: {', '.join(group.index)}")
    notes += [f"failed at L=4K: {', '.join(failed)}"] if failed else []
    notes += [f"no bench row: {', '.join(missing)}"] if missing else []
    notes += [f"bench of the bare model: {', '.join(borrowed)}"] if borrowed else []
    return points, f"bench steps / s at L={length_text(main)}", notes


def _nice(value: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above `value`."""
    exponent = math.floor(math.log10(value) + 1e-9)
    return max(m * 10.0**e for e in (exponent - 1, exponent) for m in (1, 2, 5)
               if m * 10.0**e <= value * (1 + 1e-9))


def _size_values(memory: pd.Series) -> list[float]:
    """Three round reference memories (MiB) within the drawn ones' range (none bigger than the
    biggest bubble)."""
    lo, hi = float(memory.min()), float(memory.max())
    values = {_nice(v) for v in (lo, math.sqrt(lo * hi), hi)}
    while len(values) < 3:  # a narrow range: the next round numbers below
        values.add(_nice(min(values) * 0.99))
    return sorted(values)


def _place_labels(ax, points: list[tuple[str, float, float, float]]) -> list:
    """Label each (text, x, y, radius in points) without overlapping another label, another
    point's centre or a legend: candidate offsets nearest first (deterministic), inside the
    axes if possible, else inside the figure; a label set off from its marker gets a leader."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    centres = [ax.transData.transform((x, y)) for _, x, y, _ in points]
    blocked = [Bbox.from_bounds(cx - 4, cy - 4, 8, 8) for cx, cy in centres]
    blocked += [legend.get_window_extent(renderer) for legend in [ax.get_legend(), *fig.legends]
                if legend is not None and legend.get_visible()]
    placed, labels = [], []
    order = sorted(range(len(points)), key=lambda i: (-centres[i][1], centres[i][0], points[i][0]))
    for i in order:
        text, x, y, radius = points[i]
        label = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=8,
                            ha="left", va="center", color="#222222", gid="point-label",
                            annotation_clip=False)
        size = label.get_window_extent(renderer)
        width, height = size.width + 2, size.height + 2
        others = [b for j, b in enumerate(blocked) if j != i]

        def box(dx, dy):  # the label's box for a left-anchored (dx > 0) or right-anchored one
            left = centres[i][0] + dx * px - (width if dx < 0 else 0)
            return Bbox.from_bounds(left, centres[i][1] + dy * px - height / 2, width, height)

        r, step = radius + 2, height / px
        candidates = sorted({(sx * (r + 12 * kx), sy * step * ky) for kx in range(12)
                             for ky in range(40) for sx in (1, -1) for sy in (1, -1)},
                            key=lambda d: (math.hypot(abs(d[0]) - r, d[1]), d[0] < 0, -d[1]))
        chosen = None
        for inside in (ax.bbox, fig.bbox):
            for dx, dy in candidates:
                b = box(dx, dy)
                if (b.x0 >= inside.x0 and b.x1 <= inside.x1 and b.y0 >= inside.y0
                        and b.y1 <= inside.y1 and not any(b.overlaps(o) for o in placed + others)):
                    chosen = (dx, dy)
                    break
            if chosen:
                break
        dx, dy = chosen or (r, 0)
        label.xyann = (dx, dy)
        label.set_ha("left" if dx > 0 else "right")
        placed.append(box(dx, dy))
        labels.append(label)
        if abs(dy) > step or abs(dx) > r + 1:
            ax.annotate("", (x, y), xytext=(dx, dy), textcoords="offset points", gid="leader",
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "#666666",
                                    "shrinkA": 0, "shrinkB": radius})
    return labels


def accuracy_speed_figures(df: pd.DataFrame) -> Figures:
    """LRA Figure 3: Avg test accuracy over tasks vs bench steps/s at L=4096, marker area
    proportional to that bench point's peak memory, with a size legend."""
    avg, columns, left_out = _average_accuracy(df)
    if avg.empty:
        return {}
    points, xlabel, notes = _speed_points(df, list(avg.index))
    points = points[points["speed"] > 0].join(avg.rename("acc"))
    if points.empty:
        return {}
    styles = model_styles(df["model"])
    fig, ax = plt.subplots(figsize=(7.6, 5.0))
    memory = points["memory"].where(points["memory"] > 0)
    scale = 1200.0 / memory.max() if memory.notna().any() else 0.0
    for model, row in points.iterrows():
        style = styles.get(model, {})
        if scale and not pd.isna(memory[model]):
            # circles: a marker's s is its true area only for "o"; the model's marker is the centre
            ax.scatter([row["speed"]], [100 * row["acc"]], s=scale * memory[model],
                       color=style.get("color"), marker="o", alpha=0.3,
                       edgecolors=style.get("color"), linewidths=1.0, gid=f"bubble:{model}")
        ax.scatter([row["speed"]], [100 * row["acc"]], s=24, color=style.get("color"),
                   marker=style.get("marker", "o"), zorder=4, gid=f"centre:{model}")
    ax.margins(x=0.15, y=0.15)
    ax.set_xscale("log")
    _log_value_axis(ax, "x")
    if scale:
        handles = [Line2D([], [], linestyle="none", marker="o", markersize=math.sqrt(scale * v),
                          markerfacecolor="#bbbbbb", markeredgecolor="#666666", alpha=0.6,
                          label=f"{plain_number(v)} MiB") for v in _size_values(memory.dropna())]
        ax.legend(handles=handles, title="peak memory", loc="upper left", fontsize=8,
                  bbox_to_anchor=(1.02, 1.0), borderaxespad=0, labelspacing=2.2, borderpad=1.2,
                  handlelength=4.5, handletextpad=1.0, frameon=False)
    per_task = len({task for task, _ in columns}) == len(columns)
    what = f"{len(columns)} task{'s' * (len(columns) != 1)}" if per_task else \
        f"{len(columns)} task/length columns"
    if left_out:
        notes.append(f"left out (not every task): {', '.join(left_out)}")
    ax.set_title("\n".join([f"Avg test accuracy over {what} vs {xlabel.split(' (')[0]}; "
                            "area ~ peak memory"]
                           + textwrap.wrap("; ".join(notes), 95)), fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"Avg test accuracy over {what} (%)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    radius = {m: math.sqrt(scale * memory[m]) / 2 if scale and not pd.isna(memory[m]) else 3
              for m in points.index}
    main = xlabel.rsplit("L=", 1)[-1] if "L=" in xlabel else None
    _place_labels(ax, [(model if pd.isna(row["length"]) or length_text(row["length"]) == main
                        else f"{model} @{length_text(row['length'])}",
                        row["speed"], 100 * row["acc"], max(radius[model], 3))
                       for model, row in points.iterrows()])
    return {"accuracy_vs_speed": fig}


# ------------------------------------------------------------------ accuracy figures

def eval_curve_figures(df: pd.DataFrame) -> Figures:
    """Validation accuracy vs step per (task, seq_len), one line per model/seed."""
    runs = df[df["kind"] == "run"]
    styles = model_styles(df["model"])
    figures = {}
    skipped = df.attrs.setdefault("skipped_metrics_lines", {})
    for (task, length), group in runs.groupby(["task", "seq_len"]):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        drawn = 0
        for _, row in group.sort_values(["model", "seed"]).iterrows():
            path = Path(row["path"]) / "metrics.jsonl"
            if not path.is_file():
                continue
            curve, bad = read_metrics(path)
            if bad:
                skipped[str(path)] = bad
                warnings.warn(f"{path}: skipped {bad} unreadable line(s)", stacklevel=1)
            curve = [r for r in curve if isinstance(r.get("val_accuracy"), (int, float))
                     and isinstance(r.get("step"), (int, float))]
            if len(curve) > 1:  # one evaluation is a point, not a curve (its value is Table 1's)
                style = dict(styles.get(row["model"], {}))
                style["linestyle"] = LINESTYLES[int(row["seed"]) % len(LINESTYLES)] \
                    if not pd.isna(row["seed"]) else "-"
                ax.plot([r["step"] for r in curve], [100 * r["val_accuracy"] for r in curve],
                        markersize=4, label=f"{row['model']} s{row['seed']:.0f}", **style)
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("training step")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"{task}, L={length_text(length)}: eval curves")
        ax.grid(True, alpha=0.3)
        if drawn > 8:
            fig.set_size_inches(9.0, 4.4)  # room for the legend outside
        _legend(ax, drawn)
        fig.tight_layout()
        figures[f"eval_curve_{task}_L{int(length)}"] = fig
    return figures


def _accuracy_figure(cells: pd.DataFrame, x: str, styles: dict, xlabel: str, title: str,
                     style_of=None, train_len: int | None = None):
    fig, ax = plt.subplots(figsize=(9.0 if cells["line"].nunique() > 8 else 6.4, 4.4))
    failures = _lines(ax, cells, "line", x, styles, 100.0, style_of)
    if train_len is not None:
        ax.axvline(train_len, color="gray", linestyle=":",
                   label=f"train L={length_text(train_len)}")
    _length_axis(ax, "x", cells[x])
    _draw_failures(ax, failures)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    seeds = " (mean ± std over seeds)" if cells["std"].notna().any() else ""
    ax.set_title(title + seeds, fontsize=10)
    ax.grid(True, alpha=0.3)
    _legend(ax, cells["line"].nunique() + bool(failures) + (train_len is not None))
    fig.tight_layout()
    return fig


def accuracy_length_figures(df: pd.DataFrame) -> Figures:
    """Test accuracy vs training length per task swept over lengths, one line per model."""
    runs = df[df["kind"] == "run"]
    styles = model_styles(df["model"])
    figures = {}
    for task, group in runs.groupby("task"):
        if group["seq_len"].nunique() < 2:
            continue
        cells = _cells(group, ["model", "seq_len"], "test_accuracy")
        cells = cells.rename(columns={"model": "line"})
        figures[f"accuracy_vs_seq_len_{task}"] = _accuracy_figure(
            cells, "seq_len", styles, "sequence length L", f"{task}: accuracy vs sequence length")
    return figures


def extrapolation_figures(df: pd.DataFrame) -> Figures:
    """Length extrapolation: test accuracy at each eval length, one line per model (and position
    encoding where the label does not name it), the training length marked."""
    long = extrapolation_frame(df)
    if long.empty:
        return {}
    styles = model_styles(df["model"])
    long["line"] = [m if "pos=" in str(m) else f"{m} pos={p}"
                    for m, p in zip(long["model"], long["pos"])]
    owner = dict(zip(long["line"], long["model"]))
    figures = {}
    for (task, train_len), group in long.groupby(["task", "train_len"]):
        cells = _cells(group, ["line", "eval_len"], "test_accuracy")
        figures[f"extrapolation_{task}_L{train_len}"] = _accuracy_figure(
            cells, "eval_len", styles, "evaluation sequence length L",
            f"{task}: length extrapolation (trained at L={length_text(train_len)})",
            style_of=lambda g: owner[g["line"].iloc[0]], train_len=int(train_len))
    return figures


# ------------------------------------------------------------------ saving

def slug(name: str) -> str:
    """A file-name-safe form of `name` (task and model names are user input: "a/b" must not
    become a directory)."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("._") or "_"


def save_figures(figures: Figures, out: Path) -> list[Path]:
    """Each figure as <name>.png and <name>.svg under `out` (laid out by its builder), closed."""
    written = []
    for name, fig in figures.items():
        for path in (out / f"{slug(name)}.png", out / f"{slug(name)}.svg"):
            fig.savefig(path, dpi=130)
            written.append(path)
        plt.close(fig)
    return written


def efficiency_vs_length(df: pd.DataFrame, out: Path) -> list[Path]:
    return save_figures(speed_memory_figures(df), out)


def accuracy_vs_speed(df: pd.DataFrame, out: Path) -> list[Path]:
    return save_figures(accuracy_speed_figures(df), out)


def eval_curves(df: pd.DataFrame, out: Path) -> list[Path]:
    return save_figures(eval_curve_figures(df), out)


def accuracy_vs_length(df: pd.DataFrame, out: Path) -> list[Path]:
    return save_figures(accuracy_length_figures(df), out)


def accuracy_vs_eval_length(df: pd.DataFrame, out: Path) -> list[Path]:
    return save_figures(extrapolation_figures(df), out)


BUILDERS = (speed_memory_figures, accuracy_speed_figures, eval_curve_figures,
            accuracy_length_figures, extrapolation_figures)


def all_figures(df: pd.DataFrame, out: Path) -> list[Path]:
    """Every figure; a builder that cannot draw from these rows (degenerate data) is skipped with
    a warning naming it, so the tables and the other figures are still written."""
    written = []
    for builder in BUILDERS:
        try:
            written += save_figures(builder(df), out)
        except Exception as err:  # noqa: BLE001 - a report never dies on one figure
            plt.close("all")
            warnings.warn(f"figure {builder.__name__} skipped: {type(err).__name__}: "
                          f"{' '.join(str(err).split())[:200]}", stacklevel=1)
    return written
