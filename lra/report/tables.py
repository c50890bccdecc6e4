"""Comparison tables built from the results DataFrame (LRA Table 1 / Table 2 layouts and the
report's other tables); lra.report.render writes them, lra.report.papers holds the published
values they can sit beside."""

from __future__ import annotations

import math
import os

import pandas as pd

from lra.reference import caption as reference_caption
from lra.report.papers import LRA_LENGTHS, LRA_TABLE1, LRA_TABLE2, LRA_TABLE2_LENS
from lra.labels import SPT, label_tasks, task_config

BASELINE = "transformer"
# The memory-efficient exact baseline: every efficiency ratio is also given against it, so a
# speed-up is never only a speed-up over a slow dense form.
FLASH = "flash"


def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{100 * values.iloc[0]:.2f}"
    return f"{100 * values.mean():.2f} ± {100 * values.std(ddof=1):.2f}"


# Table 1 styling travels in `table.attrs`, never in the cell strings (so no marker can leak into
# CSV or any other format): "bold" = {(row label, column label)}, "chance" = [row labels] (the
# chance row), "reference" = [row labels] (values reported in papers). Writers render each.
LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
CHANCE = "chance"
RUN_KEY = ["model", "task", "seq_len", "preset", "seed", "tuning"]  # tuning: labels.select_tuned


def latest_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with repeats of one (model, task, seq_len, preset, seed) counted once: the most
    recent by its result.json's mtime (rows without a readable file count as older, and among
    equals the one read last wins)."""
    if runs.empty:
        return runs

    def mtime(directory) -> float:
        try:
            return os.stat(os.path.join(str(directory), "result.json")).st_mtime_ns
        except (OSError, TypeError, ValueError):
            return math.nan

    paths = runs["path"] if "path" in runs else pd.Series(math.nan, index=runs.index)
    keys = [k for k in RUN_KEY if k in runs]
    # The key columns only: assigning to the whole (wide, fragmented) frame copies it and warns.
    order = runs[keys].assign(_mtime=[mtime(p) for p in paths], _read=range(len(runs)))
    order = order.sort_values(["_mtime", "_read"], na_position="first", kind="stable")
    kept = order.drop_duplicates(keys, keep="last")
    return runs[runs.index.isin(kept.index)]


def _bare(runs: pd.DataFrame) -> dict[str, str]:
    """Task column label -> the registered task name (labels.label_tasks)."""
    return dict(zip(runs["task"].astype(str),
                    runs["task_name" if "task_name" in runs else "task"].astype(str)))


def _task_columns(runs: pd.DataFrame) -> list[tuple[str, int, str]]:
    """(task label, seq_len, column name): one column per task label and length, LRA's tasks
    first; a task run at one length keeps its label, else `label L=length`."""
    bare = _bare(runs)
    order = sorted(bare, key=lambda t: (LRA_TASKS.index(bare[t]) if bare[t] in LRA_TASKS
                                        else len(LRA_TASKS), t))
    columns = []
    for task in order:
        lengths = sorted(int(n) for n in runs.loc[runs["task"] == task, "seq_len"].unique())
        columns += [(task, n, task if len(lengths) == 1 else f"{task} L={n}") for n in lengths]
    return columns


def chance_accuracy(run: pd.Series) -> float:
    """Accuracy of uniform guessing for a run's task at its config (the task class's
    `chance_accuracy`); NaN for a task that does not say (an unimported plugin's)."""
    from lra import tasks  # lra.report loads without JAX

    try:
        name = str(run.get("task_name", run["task"]))
        return tasks.task_class(name).chance_accuracy(task_config(run))
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return math.nan


def _chance(runs: pd.DataFrame, columns) -> tuple[dict[str, float], dict[str, str]]:
    """The chance level (%) per column; a column whose runs differ in the task config that
    sets it gets its levels as text ("6.25 / 12.50") instead."""
    chance, texts = {}, {}
    for task, length, name in columns:
        column_runs = runs[(runs["task"] == task) & (runs["seq_len"] == length)]
        levels = {}  # as shown -> exact, in percent
        for _, run in column_runs.iterrows():
            level = 100 * chance_accuracy(run)
            if not math.isnan(level):
                levels.setdefault(round(level, 2), level)
        if len(levels) == 1:
            chance[name] = next(iter(levels.values()))
        elif levels:
            texts[name] = " / ".join(f"{c:.2f}" for c in sorted(levels))
    return chance, texts


CAPPED = "†"  # Table 1: a cell with a seed still improving at its step / time cap


def _cell_text(accuracy: pd.Series, capped: int = 0) -> str:
    """"mean ± std (n=k)" in percent over k seeds (sample std); one seed: "mean (n=1)"; a
    trailing † when `capped` of the seeds ended still improving (train.convergence)."""
    mean = f"{100 * accuracy.mean():.2f}"
    if len(accuracy) > 1:
        mean += f" ± {100 * accuracy.std(ddof=1):.2f}"
    return f"{mean} (n={len(accuracy)})" + (f" {CAPPED}" if capped else "")


def _capped(group: pd.DataFrame) -> int:
    """How many runs of `group` ended capped (rows written before convergence was recorded
    count as unknown, not capped)."""
    return int((group["convergence"] == "capped").sum()) if "convergence" in group else 0


# A column counts in Table 1's Avg only where it ranks: some model above chance by more than
# this (in points), and local attention with the smallest window not within it of dense.
RANKS_MARGIN = 2.0


def unranked_columns(values: pd.DataFrame, chance: dict[str, float],
                     local: pd.DataFrame | None = None) -> dict[str, str]:
    """Table 1 columns that do not test long-range ability, with why: every model within
    RANKS_MARGIN points of chance, or (given the locality table's runs) `local` at its smallest
    window within RANKS_MARGIN of dense attention (the task is local)."""
    out = {}
    for column in values.columns:
        best = values[column].max()
        if column in chance and not math.isnan(best) and best <= chance[column] + RANKS_MARGIN:
            out[column] = f"every model within {RANKS_MARGIN:g} points of chance"
    if local is not None and not local.empty:
        for column, (window, local_acc, dense_acc) in local_vs_dense(local).items():
            if column in values.columns and column not in out \
                    and local_acc >= dense_acc - RANKS_MARGIN:
                out[column] = (f"local w={window} {local_acc:.1f} vs dense {dense_acc:.1f}: the "
                               f"task is local")
    return out


def local_vs_dense(both: pd.DataFrame) -> dict[str, tuple[int, float, float]]:
    """Per locality column: (smallest window, its mean test accuracy %, dense's), from the frame
    locality_table builds (rows `local w=..`, `dense (...)`, a `_order` window column)."""
    out = {}
    for (task, length), group in both.groupby(["task", "seq_len"]):
        name = group["_column"].iloc[0]
        windows = group[group["_order"] < math.inf]
        dense = group[group["_order"] == math.inf]
        if windows.empty or dense.empty:
            continue
        window = windows["_order"].min()
        smallest = windows[windows["_order"] == window]
        out[name] = (int(window), 100 * smallest["test_accuracy"].mean(),
                     100 * dense["test_accuracy"].mean())
    return out


def _best(values: pd.DataFrame, spread: pd.DataFrame | None = None) -> set[tuple[str, str]]:
    """(row, column) of each column's best value as shown (two decimals), ties all included;
    none in a column where every shown value ties (nothing is best: e.g. all at chance), nor
    where the best is within the seeds' spread of the runner-up (`spread`: the cells' sample
    std; the larger of the two, where known)."""
    shown = values.round(2)
    best = set()
    for column in shown.columns:
        col = shown[column].dropna()
        if col.empty or (col.nunique() == 1 and len(col) > 1):
            continue
        top = col.max()
        rows = list(col.index[col == top])
        rest = col[col < top]
        if spread is not None and len(rest) and column in spread:
            runner = rest.idxmax()
            width = max(spread.at[r, column] if r in spread.index else math.nan
                        for r in (*rows, runner))
            if not math.isnan(width) and top - col[runner] <= width:
                continue
        best |= {(row, column) for row in rows}
    return best


def _paper_columns(runs: pd.DataFrame, columns) -> dict[str, tuple[int, str]]:
    """Per task, the column nearest the LRA paper's length among those of the task's own settings
    (not "pathfinder (64x64)" or a variant: another experiment than the paper's): task ->
    (length, column name)."""
    bare, nearest = _bare(runs), {}
    for task, length, name in columns:
        best = nearest.get(task)
        paper = LRA_LENGTHS.get(task, 0)
        if task == bare[task] and (best is None or (abs(length - paper), -length)
                                   < (abs(best[0] - paper), -best[0])):
            nearest[task] = (length, name)
    return nearest


def accuracy_table(df: pd.DataFrame, reference: bool = False,
                   local: pd.DataFrame | None = None) -> pd.DataFrame:
    """LRA Table 1: model x task (x length) test accuracy (%), "mean ± std (n=seeds)" over
    distinct seeds (a † where a seed ended capped: still improving at its budget), an Avg over
    complete rows, best per column bold (`attrs["bold"]`; none at or near chance), a chance row
    and, with `reference`, the LRA paper's rows (`attrs["reference"]`) last. Runs differing in
    anything but the seed are never averaged: other lengths are other columns, other configs
    other rows (labels.label_variants).

    Avg averages tasks, not columns (a task's lengths are averaged first), over the columns
    that rank (`unranked_columns`; `local`: locality_frame's runs): `attrs["unranked"]` names
    the others and why; `attrs["capped"]` counts the capped cells."""
    runs = df[(df["kind"] == "run") & (df["status"] == "ok") & df["test_accuracy"].notna()]
    if runs.empty:
        return pd.DataFrame()
    runs = latest_runs(runs)
    columns = _task_columns(runs)
    names = [name for _, _, name in columns]
    task_of = {name: task for task, _, name in columns}
    models = sorted(runs["model"].astype(str).unique())
    cells = pd.DataFrame("-", index=models, columns=[*names, "Avg"], dtype=object)
    values = pd.DataFrame(math.nan, index=models, columns=[*names, "Avg"])
    spread = pd.DataFrame(math.nan, index=models, columns=[*names, "Avg"])
    capped, seeds = 0, set()
    for (model, task, length), group in runs.groupby(["model", "task", "seq_len"]):
        name = next(n for t, L, n in columns if t == task and L == length)
        cells.loc[str(model), name] = _cell_text(group["test_accuracy"], _capped(group))
        capped += bool(_capped(group))
        seeds.add(len(group))
        values.loc[str(model), name] = 100 * group["test_accuracy"].mean()
        if len(group) > 1:
            spread.loc[str(model), name] = 100 * group["test_accuracy"].std(ddof=1)
    if len(seeds) == 1:  # n once, in attrs["n"] (the caption), not in every cell
        n = next(iter(seeds))
        cells = cells.map(lambda text: text.replace(f" (n={n})", ""))
    chance, texts = _chance(runs, columns)
    unranked = unranked_columns(values.loc[models, names], chance, local)
    ranked = [n for n in names if n not in unranked]

    def add_row(label: str, row_values: dict[str, float], texts: dict[str, str] | None = None):
        row = pd.Series(row_values, index=names, dtype=float)
        cells.loc[label] = [(texts or {}).get(n, "-" if pd.isna(v) else f"{v:.2f}")
                            for n, v in row.items()] + ["-"]
        values.loc[label] = [*row, math.nan]

    def fill_avg(labels) -> None:
        for label in labels:
            row = values.loc[label, ranked]
            if ranked and row.notna().all():  # a task's lengths first, then the tasks
                per_task = row.groupby([task_of[n] for n in ranked]).mean()
                values.loc[label, "Avg"] = per_task.mean()
                cells.loc[label, "Avg"] = f"{values.loc[label, 'Avg']:.2f}"

    fill_avg(models)
    if ranked:  # Avg's spread: the mean of the row's per-task spreads, where any is known
        spread["Avg"] = spread[ranked].mean(axis=1)
    above = values.loc[models].copy()
    for name, level in chance.items():  # nothing at or near chance is "best"
        above.loc[above[name] <= level + RANKS_MARGIN, name] = math.nan
    bold = _best(above, spread)
    chance_label = CHANCE if CHANCE not in models else f"{CHANCE} (uniform guess)"
    add_row(chance_label, chance, texts)
    fill_avg([chance_label])
    references = []
    if reference:
        nearest = _paper_columns(runs, columns)
        for model, reported in LRA_TABLE1.items():
            label = f"{model} (LRA paper)"
            add_row(label, {name: reported.get(task, math.nan) for task, (_, name) in nearest.items()})
            references.append(label)
        fill_avg(references)
    cells.index.name = "model"
    cells.attrs = {"bold": bold, "chance": [chance_label], "reference": references,
                   "unranked": unranked, "capped": capped,
                   "n": next(iter(seeds)) if len(seeds) == 1 else None,
                   "ref_rows": reference_caption(runs)}
    return cells


def accuracy_caption(table: pd.DataFrame) -> str:
    """Table 1's caption: what a cell is, then what this table's attrs say (capped cells, the
    columns left out of Avg and why)."""
    attrs = getattr(table, "attrs", {}) or {}
    n = attrs.get("n")
    seeds = (f"n = {n} seed{'s' * (n != 1)} in every cell" if n
             else "n = seeds, given per cell")
    text = (f"Test accuracy (%) by model and task: mean ± sample std over seeds ({seeds}); best "
            "per column in bold (none at or near chance, nor within the seeds' spread of the "
            "runner-up); Avg over complete rows, a task's lengths averaged first")
    if attrs.get("capped"):
        text += (f"; {CAPPED} marks {attrs['capped']} capped cell(s): a seed still improving at "
                 f"its step / time cap, a claim about the budget, not the model")
    if attrs.get("unranked"):
        text += "; not in Avg: " + "; ".join(f"{c} ({why})" for c, why in attrs["unranked"].items())
    if attrs.get("ref_rows"):
        text += "; " + attrs["ref_rows"]
    return text


def _from_scratch(label: str) -> str:
    """The label of a self-pretrained row's counterpart from scratch (labels.label_variants
    adds "+spt(<objective>)" and any varying pretrain.* keys)."""
    return " ".join(p for p in label.split() if not p.startswith((SPT, "pretrain.")))


def spt_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Self-pretraining against training from scratch (Amos et al., ICLR 2024), from Table 1:
    for each model with both rows, each row's Avg with its rank among the rows of its kind
    (1 = best; from scratch among those from scratch, pretrained among the pretrained) and the
    change in Avg and in rank (positive: up). Empty without a self-pretrained row."""
    attrs = getattr(accuracy, "attrs", {}) or {}
    if accuracy.empty or "Avg" not in accuracy:
        return pd.DataFrame()
    others = set(attrs.get("chance", [])) | set(attrs.get("reference", []))
    avg = {label: float(text) for label, text in accuracy["Avg"].items()
           if label not in others and text != "-"}
    pretrained = {label: _from_scratch(label) for label in avg if SPT in label}
    if not pretrained:
        return pd.DataFrame()

    def ranks(labels) -> dict[str, int]:
        order = sorted(labels, key=lambda label: -avg[label])
        return {label: 1 + sum(avg[o] > avg[label] for o in order) for label in order}

    scratch_rank = ranks([label for label in avg if label not in pretrained])
    spt_rank = ranks(list(pretrained))
    rows = {}
    for label, base in sorted(pretrained.items(), key=lambda item: item[1]):
        if base not in scratch_rank:
            continue
        rows[base] = {"from scratch: Avg (rank)": f"{avg[base]:.2f} ({scratch_rank[base]})",
                      "self-pretrained: Avg (rank)": f"{avg[label]:.2f} ({spt_rank[label]})",
                      "Avg change": f"{avg[label] - avg[base]:+.2f}",
                      "rank change": f"{scratch_rank[base] - spt_rank[label]:+d}",
                      "pretrained row": label}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table


def steps_table(df: pd.DataFrame) -> pd.DataFrame:
    """Sample efficiency, named as such: model x Table 1 column, the mean step (examples seen)
    at which val accuracy first reached train.solve_at ("1500 (192k)"), or how the cell ended
    otherwise ("plateau 41.2", "capped 82.8": its best val %). Rows without convergence data
    (written before it was recorded) are left out."""
    runs = df[(df["kind"] == "run") & (df["status"] == "ok")]
    if "convergence" not in runs or runs["convergence"].isna().all():
        return pd.DataFrame()
    runs = latest_runs(runs[runs["convergence"].notna()])
    columns = _task_columns(runs)
    cells = pd.DataFrame("-", index=sorted(runs["model"].astype(str).unique()),
                         columns=[n for _, _, n in columns], dtype=object)
    for (model, task, length), group in runs.groupby(["model", "task", "seq_len"]):
        name = next(n for t, L, n in columns if t == task and L == length)
        solved = group["convergence"] == "solved"
        if solved.all():
            step = group["solved_step"].mean()
            examples = (group["solved_step"] * group["batch_size"]).mean()
            cells.loc[str(model), name] = f"{step:.0f} ({examples / 1e3:.0f}k)"
        else:
            how = "capped" if (group["convergence"] == "capped").any() else "plateau"
            text = f"{how} {100 * group['val_accuracy'].mean():.1f}"
            cells.loc[str(model), name] = text + (f" ({solved.sum()}/{len(group)} solved)"
                                                  if solved.any() else "")
    cells.index.name = "model"
    return cells


def tuning_table(df: pd.DataFrame) -> pd.DataFrame:
    """The tuning grid (labels.select_tuned) where one ran: model x Table 1 column, each
    candidate's mean val accuracy (%) or status, the chosen one marked *: "lr=0.0001 12.3 |
    lr=0.001 73.4*". `df` from load_results(tuned="all")."""
    if "tuning" not in df or "chosen" not in df:
        return pd.DataFrame()
    runs = df[df["kind"] == "run"]
    if runs.empty:
        return pd.DataFrame()
    runs = runs[runs.groupby(["model", "task", "seq_len", "preset"], dropna=False)["tuning"]
                .transform("nunique") > 1]
    if runs.empty:
        return pd.DataFrame()
    ok = runs["status"] == "ok"
    runs = pd.concat([latest_runs(runs[ok]), runs[~ok]])
    columns = _task_columns(runs)
    cells = pd.DataFrame("-", index=sorted(runs["model"].astype(str).unique()),
                         columns=[n for _, _, n in columns], dtype=object)
    for (model, task, length), group in runs.groupby(["model", "task", "seq_len"]):
        name = next(n for t, L, n in columns if t == task and L == length)
        parts = []
        shared = set.intersection(*(set(t.split()) for t in group["tuning"].unique()))
        for tuning, cand in group.groupby("tuning", sort=False):
            good = cand[cand["status"] == "ok"]
            value = (f"{100 * good['val_accuracy'].mean():.1f}" if len(good)
                     else str(cand["status"].iloc[0]).upper())
            what = " ".join(p for p in tuning.split() if p not in shared)  # what varies only
            parts.append((tuning, f"{what} {value}{'*' if cand['chosen'].all() else ''}"))
        cells.loc[str(model), name] = " | ".join(text for _, text in sorted(parts))
    cells.index.name = "model"
    return cells


def locality_frame(local_df: pd.DataFrame, main_df: pd.DataFrame) -> pd.DataFrame:
    """The runs of the locality table, one frame: `local` runs (from `local_df`) as rows `local
    w=16`, ... and main_df's transformer runs as `dense (transformer)`, labelled together so only
    equal task settings share a column (`_column`: its Table 1 name), `_order` the window (inf:
    dense); only columns local ran on. Empty when there are no local runs."""
    from lra.models.attention import config_class  # lra.report loads without JAX
    ok = [frame[(frame["kind"] == "run") & (frame["status"] == "ok")
                & frame["test_accuracy"].notna()] for frame in (local_df, main_df)]
    local = ok[0][ok[0]["model_name"] == "local"]
    dense = ok[1][ok[1]["model_name"] == BASELINE]
    if local.empty:
        return pd.DataFrame()
    width = pd.to_numeric(local.get("config.model.attention.block_size",
                                    pd.Series(math.nan, index=local.index)), errors="coerce")
    width = width.fillna(config_class("local")().block_size).astype(int)
    rows = [f"local w={w}" + "".join(f" {p}" for p in str(m).split(" ")[1:]
                                     if not p.startswith("block_size="))
            for w, m in zip(width, local["model"])]
    both = pd.concat([local.assign(model=rows, _order=width),
                      dense.assign(model=[f"dense ({m})" for m in dense["model"]],
                                   _order=math.inf)], ignore_index=True)
    label_tasks(both)
    both = latest_runs(both)
    windows = both[both["_order"] < math.inf]
    ran = set(zip(windows["task"], windows["seq_len"]))
    columns = {c[:2]: c[2] for c in _task_columns(both) if c[:2] in ran}  # named as all
    both = both[[key in ran for key in zip(both["task"], both["seq_len"])]]
    return both.assign(_column=[columns[k] for k in zip(both["task"], both["seq_len"])])


def locality_table(local_df: pd.DataFrame, main_df: pd.DataFrame) -> pd.DataFrame:
    """How much long context each task needs: test accuracy (%) of `local` attention per window
    w (model.attention.block_size; rows `local w=16`, ... from `local_df`) beside dense attention
    (`dense (transformer)`: main_df's transformer runs), "mean ± std (n=seeds)" per Table 1
    column that local ran on (locality_frame), and a chance row."""
    both = locality_frame(local_df, main_df)
    if both.empty:
        return pd.DataFrame()
    columns = [(t, L, n) for t, L, n in _task_columns(both)
               if ((both["task"] == t) & (both["seq_len"] == L)).any()]
    columns = [(t, L, both.loc[(both["task"] == t) & (both["seq_len"] == L), "_column"].iloc[0])
               for t, L, _ in columns]
    names = [name for _, _, name in columns]
    order = both.sort_values(["_order", "model"])["model"].drop_duplicates().tolist()
    cells = pd.DataFrame("-", index=order, columns=names, dtype=object)
    for (model, task, length), group in both.groupby(["model", "task", "seq_len"]):
        name = next(n for t, L, n in columns if t == task and L == length)
        cells.loc[model, name] = _cell_text(group["test_accuracy"])
    chance, texts = _chance(both, columns)
    cells.loc[CHANCE] = [texts.get(n, f"{chance[n]:.2f}" if n in chance else "-") for n in names]
    cells.index.name = "attention"
    cells.attrs = {"chance": [CHANCE]}
    return cells


def efficiency_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, model, seq_len, batch): bench rows if any, else training runs."""
    rows = df[df["kind"] == "bench"]
    if rows.empty:
        rows = df[df["kind"] == "run"]
    keys = ["task", "model", "seq_len", "batch_size"]
    agg = rows.sort_values("status").groupby(keys, dropna=False).agg(
        status=("status", lambda s: "ok" if (s == "ok").any() else s.iloc[0]),
        steps_per_s=("steps_per_s", "median"),
        peak_memory_bytes=("peak_memory_bytes", "median"),
        achieved_flops_per_s=("achieved_flops_per_s", "median"),
        matmul_utilisation=("matmul_utilisation", "median"),
    ).reset_index()
    agg.loc[agg["status"] != "ok", ["steps_per_s", "peak_memory_bytes", "achieved_flops_per_s",
                                    "matmul_utilisation"]] = math.nan
    for baseline, suffix in ((BASELINE, ""), (FLASH, "_flash")):
        base = agg.loc[agg["model"] == baseline, ["task", "seq_len", "batch_size", "steps_per_s",
                                                  "peak_memory_bytes"]]
        joined = agg.merge(base, on=["task", "seq_len", "batch_size"], how="left",
                           suffixes=("", "_base"))
        agg["speedup" + suffix] = joined["steps_per_s"] / joined["steps_per_s_base"]
        agg["memory_ratio" + suffix] = joined["peak_memory_bytes"] / joined["peak_memory_bytes_base"]
    return agg


def _ratios(status: str, to_transformer: float, to_flash: float) -> str:
    """" (0.25x T, 0.61x F)": ratios to transformer and to flash, those that exist."""
    if status != "ok":
        return ""
    parts = [f"{r:.2f}x {name}" for r, name in ((to_transformer, "T"), (to_flash, "F"))
             if not pd.isna(r)]
    return f" ({', '.join(parts)})" if parts else ""


def _cell(status: str, value: float, fmt: str) -> str:
    if status != "ok":
        return status.upper()
    return "-" if pd.isna(value) else format(value, fmt)


def efficiency_table(df: pd.DataFrame, reference: bool = False) -> pd.DataFrame:
    """Model x seq_len: steps/s (speed-up) and peak memory MiB (ratio), LRA Table 2 layout."""
    eff = efficiency_frame(df)
    if eff.empty:
        return pd.DataFrame()
    eff = eff.copy()
    eff["speed"] = [
        _cell(s, v, ".3g") + _ratios(s, r, rf)
        for s, v, r, rf in zip(eff["status"], eff["steps_per_s"], eff["speedup"],
                               eff["speedup_flash"])]
    eff["memory"] = [
        _cell(s, v / 2**20 if not pd.isna(v) else v, ".0f") + _ratios(s, r, rf)
        for s, v, r, rf in zip(eff["status"], eff["peak_memory_bytes"], eff["memory_ratio"],
                               eff["memory_ratio_flash"])]
    speed = eff.pivot_table(index=["task", "model"], columns="seq_len", values="speed", aggfunc="first")
    memory = eff.pivot_table(index=["task", "model"], columns="seq_len", values="memory", aggfunc="first")
    speed.columns = [f"steps/s L={c}" for c in speed.columns]
    memory.columns = [f"MiB L={c}" for c in memory.columns]
    table = pd.concat([speed, memory], axis=1).fillna("-")
    table.index = [f"{t}/{m}" for t, m in table.index]
    if reference:
        for model, (speeds, mems) in LRA_TABLE2.items():
            row = {}
            for length, s, m in zip(LRA_TABLE2_LENS, speeds, mems):
                if f"steps/s L={length}" in table.columns:
                    row[f"steps/s L={length}"] = f"({s:.1f}x)"
                    row[f"MiB L={length}"] = f"({m:.2f}x)"
            if row:
                table.loc[f"{model} (LRA paper)"] = pd.Series(row)
        table = table.fillna("-")
    table.index.name = "task/model"
    return table


def params_table(df: pd.DataFrame) -> pd.DataFrame:
    """Model (preset) x task column (Table 1's labels): "parameters (ratio to the Transformer
    with the same dims)"; a ratio over LRA's budget (1.10x) is marked OVER."""
    from lra.models import PARAM_BUDGET  # lra.report loads without JAX

    if "param_ratio" not in df or df["param_ratio"].isna().all():
        return pd.DataFrame()
    rows = df[df["param_ratio"].notna()]
    if (rows["kind"] == "run").any():  # the bench's models are those of the runs, at its sizes
        rows = rows[rows["kind"] == "run"]
    columns = _task_columns(rows)
    several = rows["preset"].nunique(dropna=False) > 1
    label = lambda model, preset: f"{model} ({preset})" if several else str(model)
    cells: dict[str, dict[str, str]] = {}
    for (model, preset, task, length), group in rows.groupby(
            ["model", "preset", "task", "seq_len"], dropna=False):
        count, ratio = group["param_count"].iloc[0], group["param_ratio"].iloc[0]
        over = ", OVER" if ratio > PARAM_BUDGET + 1e-9 else ""
        name = next(n for t, L, n in columns if t == task and L == length)
        cells.setdefault(label(model, preset), {})[name] = f"{int(count):,} ({ratio:.2f}x{over})"
    table = pd.DataFrame.from_dict(cells, orient="index")
    table = table[[n for _, _, n in columns if n in table]].sort_index().fillna("-")
    table.index.name = "model (preset)" if several else "model"
    return table


def flops_table(df: pd.DataFrame) -> pd.DataFrame:
    """Model x seq_len: achieved matmul GFLOP/s and its fraction of the machine's matmul peak
    (bench rows: `lra.train.measure.matmul_flops` of the train step x steps/s)."""
    eff = efficiency_frame(df)
    eff = eff[eff["achieved_flops_per_s"].notna()] if not eff.empty else eff
    if eff.empty:
        return pd.DataFrame()
    eff = eff.copy()
    # A utilisation above 100% is a peak measured low, not a figure (lra.bench records none).
    eff["cell"] = [f"{g / 1e9:.1f} ({u:.0%})" if 0 <= u <= 1 else f"{g / 1e9:.1f} (n/a)"
                   for g, u in zip(eff["achieved_flops_per_s"], eff["matmul_utilisation"])]
    table = eff.pivot_table(index=["task", "model"], columns="seq_len", values="cell",
                            aggfunc="first").fillna("-")
    table.columns = [f"GFLOP/s L={c}" for c in table.columns]
    table.index = [f"{t}/{m}" for t, m in table.index]
    table.index.name = "task/model"
    return table


def seq_len_table(df: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy (%) by model x seq_len, for each task that was swept over lengths."""
    runs = df[(df["kind"] == "run")]
    ok = runs["status"] == "ok"
    runs = pd.concat([latest_runs(runs[ok]), runs[~ok]])  # a repeated seed counts once
    parts = []
    for task, group in runs.groupby("task"):
        if group["seq_len"].nunique() < 2:
            continue
        cells = group.groupby(["model", "seq_len"]).apply(
            lambda g: _mean_std(g.loc[g["status"] == "ok", "test_accuracy"])
            if (g["status"] == "ok").any() else g["status"].iloc[0].upper(),
            include_groups=False).unstack("seq_len").fillna("-")
        cells.columns = [f"L={c}" for c in cells.columns]
        cells.index = [f"{task}/{m}" for m in cells.index]
        parts.append(cells)
    if not parts:
        return pd.DataFrame()
    table = pd.concat(parts).fillna("-")
    table.index.name = "task/model"
    return table


def extrapolation_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Long form of `eval.seq_lens` results: task, model, pos, train_len, seed, eval_len, status,
    test_accuracy (one row per run and eval length). A repeated run counts once (latest_runs);
    runs that differ beyond the seed have different model labels already (label_variants)."""
    columns = [c for c in df.columns if c.startswith("eval_lengths.") and c.endswith(".status")]
    rows = []
    runs = latest_runs(df[(df["kind"] == "run") & df["status"].isin(["ok", "timeout"])])
    for _, run in runs.iterrows():
        for column in columns:
            status = run[column]
            if not isinstance(status, str):
                continue
            length = int(column.split(".")[1])
            rows.append({"task": run["task"], "model": run["model"],
                         "pos": run.get("config.model.pos", "?"), "train_len": int(run["seq_len"]),
                         "seed": run["seed"], "eval_len": length, "status": status,
                         "test_accuracy": run.get(f"eval_lengths.{length}.test_accuracy")})
    return pd.DataFrame(rows)


def extrapolation_table(df: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy (%) by (task, model, position encoding, train length) x eval length."""
    long = extrapolation_frame(df)
    if long.empty:
        return pd.DataFrame()
    pos = [" pos=" + str(p) if "pos=" not in m else "" for m, p in zip(long["model"], long["pos"])]
    long["row"] = (long["task"] + "/" + long["model"] + pos + " train L="
                   + long["train_len"].astype(str))
    cells = long.groupby(["row", "eval_len"]).apply(
        lambda g: _mean_std(pd.to_numeric(g.loc[g["status"] == "ok", "test_accuracy"]))
        if (g["status"] == "ok").any() else g["status"].iloc[0].upper(),
        include_groups=False).unstack("eval_len").fillna("-")
    cells.columns = [f"eval L={c}" for c in cells.columns]
    cells.index.name = "task/model (train length)"
    return cells
