"""python -m lra.report [RESULTS_DIR ...] [--out DIR] [--reference lra-paper]: tables + plots."""

from __future__ import annotations

import argparse
import base64
import html
from pathlib import Path

from lra import plots, tables
from lra.results import load_results


def build_report(paths: list[str], out: Path, reference: bool = False, quiet: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    df = load_results(*paths, verbose=not quiet)
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
    sections = []
    for name, caption, table in specs:
        markdown = tables.write_table(table, out, name, caption)
        if not quiet:
            print(f"\n## {caption}\n\n{markdown}")
        sections.append((caption, table))
    figures = plots.all_figures(df, out)
    tables.write_csv(df, out / "runs.csv", index=False)
    _write_html(out / "report.html", df, sections, [p for p in figures if p.suffix == ".png"])
    if not quiet:
        bad_lines = sum(df.attrs.get("skipped_metrics_lines", {}).values())
        print(f"\n{len(df)} runs ({(df['status'] == 'ok').sum()} ok); skipped {len(df.attrs['skipped'])} "
              f"unreadable result file(s) and {bad_lines} unreadable metrics line(s); wrote "
              f"{out.resolve()}/report.html")
    return {"frame": df, "figures": figures, "tables": {n: t for n, _, t in specs}}


def _write_html(path: Path, df, sections, pngs: list[Path]) -> None:
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
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise SystemExit(f"error: no such results directory: {', '.join(missing)}")
    out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
    build_report(args.paths, out, reference=args.reference == "lra-paper")


if __name__ == "__main__":
    main()
