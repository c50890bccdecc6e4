"""python -m lra.report [RESULTS_DIR ...] [--out DIR] [--reference lra-paper] [--locality DIR ...]:
tables, figures and run details in DIR/report.html."""

from __future__ import annotations

import argparse
import base64
import html
from pathlib import Path

from lra.report import details, plots, render, tables
from lra.results import load_results, skipped_text

LOCALITY = ("How much long context does each task need? Test accuracy (%) of local "
            "attention with block w (a query sees the keys of its own block and one neighbour "
            "block each side: a reach of >= w tokens each way) beside dense attention; mean ± "
            "sample std over seeds (n). A task where small w matches dense is mostly local")


def build_report(paths: list[str], out: Path, reference: bool = False, quiet: bool = False,
                 locality_paths: list[str] = ()) -> dict:
    """Every table, figure and the run details of the runs under `paths` into `out`; with
    `locality_paths`, the locality table of the local runs there (kept out of the others)."""
    out.mkdir(parents=True, exist_ok=True)
    # Files skipped (unreadable or invalid: schema.check_row) are said once, in the summary.
    every = load_results(*paths, verbose=False, exclude=locality_paths, tuned="all")
    skipped = dict(every.attrs["skipped"])
    if every.empty:
        raise SystemExit(f"error: no {'valid ' * bool(skipped)}result.json under {', '.join(paths)}"
                         f"{'; ' + skipped_text(skipped) if skipped else ''}; run `python -m "
                         f"lra.run` first")
    df = every[every["chosen"]].copy()  # a tuning grid's choice on validation (select_tuned)
    df.attrs = every.attrs
    local = None
    if locality_paths:
        local_df = load_results(*locality_paths, verbose=False)
        skipped.update(local_df.attrs["skipped"])
        if local_df.empty:
            raise SystemExit(f"error: no {'valid ' * bool(local_df.attrs['skipped'])}result.json "
                             f"under --locality {' '.join(locality_paths)}; run `python -m "
                             f"lra.suite` (its locality points) first")
        local = tables.locality_frame(local_df, df)
    accuracy = tables.accuracy_table(df, reference, local)
    specs = [("accuracy", "Table 1. Accuracy", tables.accuracy_caption(accuracy), accuracy),
             ("spt", "Self-pretraining", "Table 1's Avg from scratch and with self-"
              "pretraining on the task's own inputs (train.pretrain: the same total steps, the "
              "first ones pretraining), each with its rank among the models trained the same "
              "way, and the changes", tables.spt_table(accuracy)),
             ("steps", "Steps to solve", "Sample efficiency: the mean step (examples seen) at "
              "which val accuracy first reached train.solve_at, else how the cell ended: plateau "
              "or capped, with its best val (%)", tables.steps_table(df)),
             ("tuning", "Tuning grid", "Mean val accuracy (%) of each candidate of the tuning "
              "grid (lr, weight decay); * the one chosen on validation, whose test accuracy "
              "Table 1 reports", tables.tuning_table(every)),
             ("efficiency", "Table 2. Speed and memory", "Steps/s and peak memory of the train "
              "step by sequence length: the bench (lra.bench, synthetic batches of the text "
              "model) where it ran, else the training runs (ratio to transformer T and to flash "
              "F, the exact baselines)",
              tables.efficiency_table(df, reference)),
             ("params", "Parameters", "Parameters by model and task (ratio to transformer with "
              "the same dims; OVER: above LRA's budget of 1.10x)", tables.params_table(df)),
             ("flops", "Matmul throughput", "Achieved matmul GFLOP/s of the train step (fraction "
              "of this machine's fp32 matmul peak)", tables.flops_table(df)),
             ("seq_len", "Accuracy by length", "Test accuracy (%) by sequence length",
              tables.seq_len_table(df)),
             ("extrapolation", "Length extrapolation", "Test accuracy (%) at evaluation lengths",
              tables.extrapolation_table(df))]
    if locality_paths:
        specs.append(("locality", "Locality", LOCALITY, tables.locality_table(local_df, df)))
    sections = []
    for name, title, caption, table in specs:
        markdown = render.write_table(table, out, name, caption)
        if not quiet:
            print(f"\n## {caption}\n\n{markdown}")
        sections.append((title, caption, table))
    run_details = details.write_details(df, out)
    figures = plots.all_figures(df, out)
    render.write_csv(every, out / "runs.csv", index=False)  # every run, the tuning grid's too
    _write_html(out / "report.html", df, sections, run_details,
                [p for p in figures if p.suffix == ".png"])
    if not quiet:
        bad_lines = sum(df.attrs.get("skipped_metrics_lines", {}).values())
        print(f"\n{len(df)} runs ({(df['status'] == 'ok').sum()} ok); skipped {len(skipped)} "
              f"result file(s) and {bad_lines} unreadable metrics line(s); wrote "
              f"{out.resolve()}/report.html")
        if skipped:  # which, and why (the first few)
            print(skipped_text(skipped))
    return {"frame": df, "figures": figures, "tables": {n: t for n, _, _, t in specs}}


STYLE = ("body{font-family:Georgia,'Times New Roman',serif;margin:2em auto;max-width:1100px;"
         "color:#111;line-height:1.35}h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em}"
         "h3{font-size:1.05em}p.caption{font-size:.92em;color:#333;margin:.2em 0 .5em}"
         "table{border-collapse:collapse;font-size:12.5px;margin:.3em 0 1em;"
         "border-top:2px solid #111;border-bottom:2px solid #111}"
         "thead th{border-bottom:1px solid #111}td,th{padding:2px 9px;text-align:right;"
         "font-variant-numeric:tabular-nums}td:first-child,th:first-child,tbody th{text-align:left}"
         "tr.chance td,tr.chance th{border-top:1px solid #999}tr.reference td{color:#555}"
         "figure{display:inline-block;width:48%;margin:.5em 1% 1em 0;vertical-align:top}"
         "figure img{width:100%}figcaption{font-size:.88em;color:#333}")

FIGURES = (("accuracy_vs_speed", "Figure 3 as in LRA: Avg accuracy over tasks vs bench steps/s at "
            "the largest bench length; marker area = peak memory"),
           ("speed_vs_seq_len", "Bench steps/s vs sequence length (train step)"),
           ("memory_vs_seq_len", "Bench peak memory vs sequence length (train step)"),
           ("eval_curve_", "Validation accuracy during training"),
           ("accuracy_vs_seq_len", "Test accuracy vs training length"),
           ("extrapolation_", "Test accuracy at evaluation lengths"))


def _figure_caption(stem: str) -> str:
    for prefix, text in FIGURES:
        if stem.startswith(prefix):
            rest = stem.removeprefix(prefix).strip("_").replace("_", " ")
            return f"{text}{': ' + rest if rest else ''}."
    return stem.replace("_", " ") + "."


def _write_html(path: Path, df, sections, run_details: list[details.Section],
                pngs: list[Path]) -> None:
    """A self-contained page laid out like a paper's results section: numbered tables with
    captions (booktabs rules), figures with captions, then the run details. Empty tables are left
    out (their files are still written)."""
    counts = ", ".join(f"{v} {k}" for k, v in df["status"].value_counts().items())
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>lra-bench report</title>",
             f"<style>{STYLE}</style></head><body><h1>lra-bench report</h1>",
             f"<p>{len(df)} runs ({html.escape(counts)}). Tables are also written as Markdown, "
             "CSV and LaTeX beside this page; run details at the end.</p>"]
    for title, caption, table in sections:
        if table.empty:
            continue
        parts.append(f"<h2>{html.escape(title)}</h2><p class='caption'>{html.escape(caption)}.</p>")
        parts.append(render.to_html(table))
    if pngs:
        parts.append("<h2>Figures</h2>")
    for png in pngs:
        data = base64.b64encode(png.read_bytes()).decode()
        caption = html.escape(_figure_caption(png.stem))
        parts.append(f"<figure><img alt='{html.escape(png.stem)}' src='data:image/png;base64,"
                     f"{data}'><figcaption>{caption}</figcaption></figure>")
    parts.append("<h2>Run details</h2>")
    for title, lines, table in run_details:
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts += [f"<p class='caption'>{html.escape(line)}</p>" for line in lines]
        if not table.empty:
            parts.append(render.to_html(table))
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lra.report", description=__doc__)
    parser.add_argument("paths", nargs="*", default=["results"], help="result directories")
    parser.add_argument("--out", default=None, help="output folder (default: <first path>/report)")
    parser.add_argument("--reference", choices=["lra-paper"], default=None,
                        help="add the LRA paper's Table 1 / Table 2 values as labelled rows")
    parser.add_argument("--locality", nargs="+", default=[], metavar="DIR",
                        help="runs of model=local at several model.attention.block_size: the "
                             "locality table (local w=... beside dense), kept out of the others")
    args = parser.parse_args(argv)
    missing = [p for p in [*args.paths, *args.locality] if not Path(p).exists()]
    if missing:
        raise SystemExit(f"error: no such results directory: {', '.join(missing)}")
    out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
    build_report(args.paths, out, reference=args.reference == "lra-paper",
                 locality_paths=args.locality)

