"""Writing a table: Markdown, CSV (formula-safe), LaTeX (booktabs / longtable) and HTML, and the
text escaping each needs."""

from __future__ import annotations

import html
import numbers
import re
from pathlib import Path

import pandas as pd


def _map_text(table: pd.DataFrame, fix) -> pd.DataFrame:
    """`table` with `fix` applied to every string cell, index label and column label."""
    def one(value):
        return fix(value) if isinstance(value, str) else value

    out = table.map(one)
    out.index = out.index.map(one) if out.index.nlevels == 1 else out.index.map(
        lambda key: tuple(one(k) for k in key))
    out.columns = out.columns.map(one) if out.columns.nlevels == 1 else out.columns.map(
        lambda key: tuple(one(k) for k in key))
    out.index.names = [one(n) for n in table.index.names]
    return out


def markdown_text(value: str) -> str:
    """A string safe in a Markdown table cell: HTML escaped (a viewer renders raw HTML), pipes
    and newlines neutralised, `*` literal. Run labels carry raw config strings."""
    text = html.escape(" ".join(value.split()), quote=False)
    return text.replace("|", "\\|").replace("*", "\\*")


# A number as a spreadsheet reads one ("-0.5", "+1e-05"): a leading sign there is no formula.
CSV_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
CSV_FORMULA = "=+-@\t\r"  # what a spreadsheet may run as a formula when a cell starts with it


def csv_text(value: str) -> str:
    """A string a spreadsheet will not run as a formula (OWASP's CSV-injection rule: a leading
    = + - @ tab or CR, also after leading blanks, gets a quote), a number ("-0.5") and the '-'
    placeholder left alone."""
    starts = value[:1] or " "  # (the empty string is no formula)
    after_blanks = value.lstrip()[:1] or " "
    if (starts in CSV_FORMULA or after_blanks in CSV_FORMULA) and value != "-" \
            and not CSV_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` as a CSV may show it: csv_text on every text that reaches the file (cells, the
    index and column labels at every MultiIndex level, the index and column names); numbers,
    booleans and missing values untouched, any other object (a list) by its text."""
    def one(value):
        if isinstance(value, str):
            return csv_text(value)
        if value is None or isinstance(value, numbers.Number) or pd.api.types.is_bool(value) \
                or (pd.api.types.is_scalar(value) and pd.isna(value)):
            return value
        return csv_text(str(value))

    def labels(index: pd.Index) -> pd.Index:
        names = [one(n) for n in index.names]
        if index.nlevels == 1:
            return index.map(one).rename(names[0])
        if not len(index):
            return index.set_names(names)
        return pd.MultiIndex.from_tuples([tuple(one(k) for k in key) for key in index], names=names)

    out = frame.map(one)
    out.index, out.columns = labels(frame.index), labels(frame.columns)
    return out


def write_csv(frame: pd.DataFrame, path, **kwargs) -> None:
    """The one CSV writer of the report (every table, runs.csv): csv_safe, then to_csv."""
    for key in ("index_label", "header"):  # labels passed in, as text, are neutralised too
        if isinstance(kwargs.get(key), str):
            kwargs[key] = csv_text(kwargs[key])
        elif isinstance(kwargs.get(key), (list, tuple)):
            kwargs[key] = [csv_text(v) if isinstance(v, str) else v for v in kwargs[key]]
    csv_safe(frame).to_csv(path, **kwargs)


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
                 "|": r"\textbar{}", "±": r"$\pm$", "×": r"$\times$", "\n": " ", "\r": " "}


def latex_text(value) -> str:
    """Text safe in a LaTeX document (a cell, a label, a caption): every special escaped."""
    return "".join(LATEX_SPECIAL.get(c, c) for c in str(value))


def _layout(table: pd.DataFrame) -> tuple[set[tuple[int, int]], set[int], list[int]]:
    """The styling in `table.attrs` (see accuracy_table) as positions: bold (row, column),
    chance rows, reference rows."""
    attrs = table.attrs
    rows = {label: i for i, label in enumerate(table.index)}
    columns = {label: j for j, label in enumerate(table.columns)}
    bold = {(rows[r], columns[c]) for r, c in attrs.get("bold", ()) if r in rows and c in columns}
    chance = {rows[r] for r in attrs.get("chance", ()) if r in rows}
    reference = sorted(rows[r] for r in attrs.get("reference", ()) if r in rows)
    return bold, chance, reference


def to_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown: cells escaped (markdown_text), bold cells in **."""
    if table.empty:
        return "(no rows)"
    bold, _, _ = _layout(table)
    out = _map_text(table, markdown_text).astype(object)
    for i, j in bold:
        out.iat[i, j] = f"**{out.iat[i, j]}**"
    return out.to_markdown()


LONGTABLE_ROWS = 40


WRAP_CHARS = 24


def _latex_column(values: pd.Series, header) -> str:
    """r, or a wrapping p{..} column for long text (settings, schedules) that would run a table
    off the page: its width from the longest cell, at most 14em."""
    longest = max([len(str(v)) for v in values] + [0])
    if longest <= WRAP_CHARS:
        return "r"
    return f"p{{{min(14.0, max(len(str(header)), longest) * 0.5):.1f}em}}"


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table: everything escaped (latex_text), bold cells in \\textbf, the chance
    row in \\textit after a rule, reference rows after a rule and a "Reported in papers" line.
    Longer than LONGTABLE_ROWS rows: a longtable (page breaks, repeated header), not a float."""
    if table.empty:
        return ""
    bold, chance, reference = _layout(table)
    width = len(table.columns) + 1
    caption = rf"\caption{{{latex_text(caption)}}}"
    label = rf"\label{{{re.sub(r'[^A-Za-z0-9:._-]', '-', label)}}}"
    head = " & ".join(latex_text(c) for c in [table.index.name or "", *table.columns]) + r" \\"
    long = len(table) > LONGTABLE_ROWS  # a float taller than a page does not compile
    spec = "l" + "".join(_latex_column(table[c], c) for c in table.columns)
    small = [r"\small"] if width > 8 else []  # wide tables: a size down, as papers set them
    if long:  # needs \usepackage{longtable}: pages break between rows, the header repeats
        # The caption and label once (\endfirsthead); later pages repeat the column heads.
        lines = [r"\begingroup", *small, rf"\begin{{longtable}}{{{spec}}}",
                 caption + label + r" \\", r"\toprule", head, r"\midrule", r"\endfirsthead",
                 r"\toprule", head, r"\midrule", r"\endhead"]
    else:
        lines = [r"\begin{table}[ht]", r"\centering", *small, caption, label,
                 rf"\begin{{tabular}}{{{spec}}}", r"\toprule", head, r"\midrule"]
    for i, (name, row) in enumerate(zip(table.index, table.itertuples(index=False))):
        if i > 0 and (i in chance or (reference and i == reference[0])):
            lines.append(r"\midrule")
        if reference and i == reference[0]:
            lines.append(rf"\multicolumn{{{width}}}{{l}}{{\textit{{Reported in papers}}}} \\")
        cells = [latex_text(name)] + [
            rf"\textbf{{{latex_text(v)}}}" if (i, j) in bold else latex_text(v)
            for j, v in enumerate(row)]
        if i in chance:
            cells = [rf"\textit{{{c}}}" for c in cells]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{longtable}", r"\endgroup"] if long else [
        r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(table: pd.DataFrame) -> str:
    """An HTML <table>: everything escaped, bold cells in <b>, the chance row italic (class
    "chance"), reference rows (class "reference") under a "Reported in papers" header row."""
    if table.empty:
        return "<p>(no rows)</p>"
    bold, chance, reference = _layout(table)

    def esc(value) -> str:
        return html.escape(str(value))

    head = "".join(f"<th>{esc(c)}</th>" for c in [table.index.name or "", *table.columns])
    parts = ["<table class='dataframe'>", f"<thead><tr>{head}</tr></thead>", "<tbody>"]
    for i, (name, row) in enumerate(zip(table.index, table.itertuples(index=False))):
        if reference and i == reference[0]:
            parts.append(f"<tr class='reference-header'><th colspan='{len(table.columns) + 1}' "
                         f"style='text-align:left;font-style:italic'>Reported in papers</th></tr>")
        kind = (" class='chance' style='font-style:italic'" if i in chance
                else " class='reference'" if i in reference else "")
        tds = "".join(f"<td><b>{esc(v)}</b></td>" if (i, j) in bold else f"<td>{esc(v)}</td>"
                      for j, v in enumerate(row))
        parts.append(f"<tr{kind}><th>{esc(name)}</th>{tds}</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def write_table(table: pd.DataFrame, out_dir, name: str, caption: str) -> str:
    """Write NAME.md, NAME.csv (plain values) and NAME.tex (booktabs); return the Markdown."""
    out = Path(out_dir)
    markdown = to_markdown(table)
    (out / f"{name}.md").write_text(f"## {markdown_text(caption)}\n\n{markdown}\n")
    write_csv(table, out / f"{name}.csv")
    (out / f"{name}.tex").write_text(to_latex(table, caption, f"tab:{name}"))
    return markdown
