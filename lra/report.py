"""python -m lra.report [RESULTS_DIR ...] [--out DIR] [--reference lra-paper] [--locality DIR ...]:
tables, figures and run details in DIR/report.html."""

from __future__ import annotations

import argparse
import base64
import html
from pathlib import Path

from lra import details, plots, tables
from lra.results import load_results

LOCALITY = ("Locality: how much long context does each task need? Test accuracy (%) of local "
            "attention with block w (a query sees the keys of its own block and one neighbour "
            "block each side: a reach of >= w tokens each way) beside dense attention; mean ± "
            "sample std over seeds (n). A task where small w matches dense is mostly local")


def build_report(paths: list[str], out: Path, reference: bool = False, quiet: bool = False,
                 locality_paths: list[str] = ()) -> dict:
    """Every table, figure and the run details of the runs under `paths` into `out`; with
    `locality_paths`, the locality table of the local runs there (kept out of the others)."""
    out.mkdir(parents=True, exist_ok=True)
    df = load_results(*paths, verbose=not quiet, exclude=locality_paths)
    if df.empty:
        raise SystemExit(f"error: no result.json under {', '.join(paths)}; run `python -m lra.run` first")
    specs = [("accuracy", "Test accuracy (%) by model and task: mean ± sample std over seeds "
              "(n = seeds); best per column in bold; Avg over complete rows only",
              tables.accuracy_table(df, reference)),
             ("efficiency", "Steps/s and peak memory by sequence length (ratio to transformer T "
              "and to flash F, the exact baselines)", tables.efficiency_table(df, reference)),
             ("params", "Parameters and LRA's budget (ratio to transformer with the same dims)",
              tables.params_table(df)),
             ("flops", "Achieved matmul GFLOP/s of the train step (fraction of this machine's "
              "fp32 matmul peak)", tables.flops_table(df)),
             ("seq_len", "Test accuracy (%) by sequence length", tables.seq_len_table(df)),
             ("extrapolation", "Test accuracy (%) at evaluation lengths (length extrapolation)",
              tables.extrapolation_table(df))]
    if locality_paths:
        local = load_results(*locality_paths, verbose=not quiet)
        if local.empty:
            raise SystemExit(f"error: no result.json under --locality {' '.join(locality_paths)}; "
                             f"run `python -m lra.suite` (its locality points) first")
        specs.append(("locality", LOCALITY, tables.locality_table(local, df)))
    sections = []
    for name, caption, table in specs:
        markdown = tables.write_table(table, out, name, caption)
        if not quiet:
            print(f"\n## {caption}\n\n{markdown}")
        sections.append((caption, table))
    run_details = details.write_details(df, out)
    figures = plots.all_figures(df, out)
    tables.write_csv(df, out / "runs.csv", index=False)
    _write_html(out / "report.html", df, sections, run_details,
                [p for p in figures if p.suffix == ".png"])
    if not quiet:
        bad_lines = sum(df.attrs.get("skipped_metrics_lines", {}).values())
        print(f"\n{len(df)} runs ({(df['status'] == 'ok').sum()} ok); skipped {len(df.attrs['skipped'])} "
              f"unreadable result file(s) and {bad_lines} unreadable metrics line(s); wrote "
              f"{out.resolve()}/report.html")
    return {"frame": df, "figures": figures, "tables": {n: t for n, _, t in specs}}


def _write_html(path: Path, df, sections, run_details: list[details.Section],
                pngs: list[Path]) -> None:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>lra-bench report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}"
             "img{max-width:48%;margin:4px}</style></head><body><h1>lra-bench report</h1>",
             f"<p>{len(df)} runs; status counts: "
             + html.escape(", ".join(f"{k}: {v}" for k, v in df["status"].value_counts().items()))
             + "</p>"]
    for caption, table in sections:
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(tables.to_html(table))
    parts.append("<h2>Run details</h2>")
    for title, lines, table in run_details:
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts += [f"<p>{html.escape(line)}</p>" for line in lines]
        parts.append(tables.to_html(table))
    parts.append("<h2>Figures</h2>")
    for png in pngs:
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<img alt='{html.escape(png.stem)}' src='data:image/png;base64,{data}'>")
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


if __name__ == "__main__":
    main()
