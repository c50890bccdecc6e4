"""LRA Table 1 (lra.report.tables.accuracy_table and its writers): seeds vs lengths vs repeats, the
cell text, Avg over complete rows, bold per format, the chance row, reference rows, escaping."""

from __future__ import annotations

import os
import re
import statistics

import pandas as pd
import pytest

from lra.report import render, tables
from lra.results import RunResult, load_results, write_result


def write_run(root, model, task, acc, seed=0, seq_len=512, name=None, **task_cfg):
    """One ok training run with a full-looking config; returns its run directory."""
    config = {"seed": seed, "preset": "small", "model": {"pos": "learned"},
              "task": {"name": task, "seq_len": seq_len, **task_cfg}}
    path = root / (name or f"{task}-{len(model)}-{seq_len}-s{seed}-{abs(hash(model))}")
    write_result(RunResult(task=task, model=model, seq_len=seq_len, seed=seed, preset="small",
                           test_accuracy=acc, config=config), path)
    return path


def table_of(root, reference=False):
    return tables.accuracy_table(load_results(root, verbose=False), reference=reference)


def test_runs_at_two_lengths_are_two_columns_never_averaged(tmp_path):
    write_run(tmp_path, "transformer", "copy", 0.90, seq_len=256)
    write_run(tmp_path, "transformer", "copy", 0.50, seq_len=512)
    write_run(tmp_path, "transformer", "listops", 0.40, seq_len=512)
    acc = table_of(tmp_path)
    assert list(acc.columns) == ["listops", "copy L=256", "copy L=512", "Avg"]
    assert acc.attrs["n"] == 1  # one seed in every cell: said once, in the caption
    assert acc.loc["transformer", "copy L=256"] == "90.00"
    assert acc.loc["transformer", "copy L=512"] == "50.00"
    assert acc.loc["transformer", "listops"] == "40.00"  # one length: the plain name


def test_a_repeated_seed_counts_once_and_the_newest_run_wins(tmp_path):
    newer = write_run(tmp_path, "transformer", "listops", 0.20, seed=0, name="a-s0")
    older = write_run(tmp_path, "transformer", "listops", 0.60, seed=0, name="b-s0")
    # Read order is a-s0 then b-s0: the newer file must win although it is read first.
    os.utime(older / "result.json", (1_000_000_000, 1_000_000_000))
    os.utime(newer / "result.json", (2_000_000_000, 2_000_000_000))
    assert table_of(tmp_path).loc["transformer", "listops"] == "20.00"
    write_run(tmp_path, "transformer", "listops", 0.40, seed=1, name="c-s1")
    # Seeds 0 (the newer run only) and 1: not (0.2, 0.6, 0.4) as three seeds.
    assert table_of(tmp_path).loc["transformer", "listops"] == "30.00 ± 14.14"


def test_identical_repeats_of_seed_zero_are_one_seed(tmp_path):
    for name in ("first", "second"):
        write_run(tmp_path, "bigbird", "text", 0.61, seed=0, name=name)
    assert table_of(tmp_path).loc["bigbird", "text"] == "61.00"


def test_three_seeds_give_mean_and_sample_std(tmp_path):
    accs = [0.51, 0.62, 0.70]
    for seed, acc in enumerate(accs):
        write_run(tmp_path, "performer", "retrieval", acc, seed=seed)
    mean, std = 100 * statistics.mean(accs), 100 * statistics.stdev(accs)
    assert table_of(tmp_path).loc["performer", "retrieval"] == f"{mean:.2f} ± {std:.2f}"
    assert f"{std:.2f}" == "9.54"  # the sample (n-1) std, not the population one (7.79)


def test_avg_only_over_complete_rows(tmp_path):
    write_run(tmp_path, "transformer", "listops", 0.36)
    write_run(tmp_path, "transformer", "text", 0.64)
    write_run(tmp_path, "local", "listops", 0.50)  # best listops, but no text run
    acc = table_of(tmp_path)
    assert acc.loc["transformer", "Avg"] == "50.00"
    assert acc.loc["local", "Avg"] == "-"
    assert ("transformer", "Avg") in acc.attrs["bold"]
    assert ("local", "listops") in acc.attrs["bold"]


def best_table(root):
    write_run(root, "transformer", "listops", 0.36, seed=0)
    write_run(root, "transformer", "listops", 0.38, seed=1)
    write_run(root, "transformer", "text", 0.60)
    write_run(root, "linear", "listops", 0.16)
    write_run(root, "linear", "text", 0.66)
    return table_of(root)


def test_best_per_column_is_bold_in_each_format_and_no_marker_leaks(tmp_path):
    acc = best_table(tmp_path / "runs")
    assert acc.attrs["bold"] == {("transformer", "listops"), ("linear", "text"),
                                 ("transformer", "Avg")}
    out = tmp_path / "out"
    out.mkdir()
    markdown = render.write_table(acc, out, "accuracy", "Test accuracy (%)")
    tex = (out / "accuracy.tex").read_text()
    page = render.to_html(acc)
    best = "37.00 ± 1.41 (n=2)"
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in markdown.splitlines()]
    md = pd.DataFrame([r[1:] for r in rows[2:]], index=[r[0] for r in rows[2:]],
                      columns=rows[0][1:])
    assert md.loc["transformer", "listops"] == f"**{best}**"
    assert md.loc["linear", "text"] == "**66.00 (n=1)**"
    assert md.loc["linear", "listops"] == "16.00 (n=1)"  # not the best: plain
    assert markdown.count("**") == 2 * len(acc.attrs["bold"])
    assert r"\textbf{37.00 $\pm$ 1.41 (n=2)}" in tex and r"\textbf{66.00 (n=1)}" in tex
    assert tex.count(r"\textbf{") == 3 and "± " not in tex
    assert f"<td><b>{best}</b></td>" in page and "<td>16.00 (n=1)</td>" in page
    assert page.count("<b>") == 3
    csv = pd.read_csv(out / "accuracy.csv", index_col=0, dtype=str, keep_default_na=False)
    assert csv.loc["transformer", "listops"] == best
    # Every CSV cell and label is the plain table cell.
    assert csv.to_numpy().tolist() == acc.to_numpy().tolist()
    assert list(csv.index) == list(acc.index) and list(csv.columns) == list(acc.columns)
    for text in (tex, page, (out / "accuracy.csv").read_text()):
        assert "*" not in text
    assert all("*" not in cell for cell in acc.to_numpy().ravel())


def test_ties_are_all_bold(tmp_path):
    write_run(tmp_path, "transformer", "image", 0.4244)
    write_run(tmp_path, "flash", "image", 0.4244)
    write_run(tmp_path, "linear", "image", 0.30)
    acc = table_of(tmp_path)
    assert acc.attrs["bold"] == {(m, c) for m in ("transformer", "flash") for c in ("image", "Avg")}
    assert render.to_html(acc).count("<b>42.44</b>") == 4  # image and Avg, both rows
    assert render.to_latex(acc, "c", "tab:t").count(r"\textbf{42.44}") == 4


def test_a_column_where_every_model_ties_has_no_bold(tmp_path):
    for model in ("transformer", "flash", "linear"):  # all at chance: nothing is best
        write_run(tmp_path, model, "pathfinder", 0.5)
    write_run(tmp_path, "linear", "image", 0.30)
    write_run(tmp_path, "transformer", "image", 0.40)
    acc = table_of(tmp_path)
    assert not any(column == "pathfinder" for _, column in acc.attrs["bold"])
    assert ("transformer", "image") in acc.attrs["bold"]


def test_chance_row_comes_from_each_tasks_config(tmp_path):
    write_run(tmp_path, "transformer", "copy", 0.05, seq_len=64, num_symbols=8)
    write_run(tmp_path, "transformer", "mqar", 0.90, seq_len=64, vocab_size=64)
    write_run(tmp_path, "transformer", "listops", 0.40)
    write_run(tmp_path, "transformer", "text", 0.60)
    acc = table_of(tmp_path)
    chance = {"copy": 100 / 8, "mqar": 100 / (64 - 2 - 31), "listops": 10.0, "text": 50.0}
    for task, level in chance.items():
        assert acc.loc["chance", task] == f"{level:.2f}", task
    assert acc.loc["chance", "mqar"] == "3.23"  # 31 value tokens, not the default vocab's 127
    # copy (5% against a chance of 12.5%) ranks nothing: out of every row's Avg, and not bold
    assert list(acc.attrs["unranked"]) == ["copy"]
    ranked = [level for task, level in chance.items() if task != "copy"]
    assert acc.loc["chance", "Avg"] == f"{sum(ranked) / 3:.2f}"  # complete row
    assert ("transformer", "copy") not in acc.attrs["bold"]
    assert ("transformer", "mqar") in acc.attrs["bold"]
    assert not any(row == "chance" for row, _ in acc.attrs["bold"])
    assert "<tr class='chance'" in render.to_html(acc)


def test_reference_rows_are_marked_last_and_never_bold(tmp_path):
    write_run(tmp_path, "transformer", "listops", 0.15, seed=0)  # below every paper value
    write_run(tmp_path, "performer", "listops", 0.13, seed=0)
    acc = table_of(tmp_path, reference=True)
    assert acc.loc["bigbird (LRA paper)", "listops"] == "36.05"
    assert acc.attrs["bold"] == {("transformer", "listops"), ("transformer", "Avg")}
    references = acc.attrs["reference"]
    assert "transformer (LRA paper)" in references
    assert list(acc.index[-len(references):]) == references
    tex = render.to_latex(acc, "c", "tab:t")
    lines = tex.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("transformer (LRA paper)"))
    assert lines[first - 2] == r"\midrule" and "Reported in papers" in lines[first - 1]
    assert not any(r"\textbf" in line for line in lines[first:])
    page = render.to_html(acc)
    assert page.index("Reported in papers") < page.index("transformer (LRA paper)")
    assert "<tr class='reference'><th>bigbird (LRA paper)</th><td>36.05</td>" in page


# A LaTeX-free check that a .tex compiles as far as escaping goes.
ESCAPES = re.compile(r"\\text(?:backslash|asciitilde|asciicircum|less|greater|bar)\{\}"
                     r"|\$\\(?:pm|times)\$|\\[%&_#${}]")
COMMANDS = re.compile(r"\\(?:textbf|textit|caption|centering|toprule|midrule|bottomrule|endhead"
                      r"|endfirsthead"
                      r"|begingroup|endgroup|small)\b"
                      r"|\\begin\{(?:table|tabular|longtable)\}(?:\[ht\])?(?:\{(?:[lr]|p\{[0-9.]+em\})+\})?"
                      r"|\\end\{(?:table|tabular|longtable)\}|\\label\{[A-Za-z0-9:._-]*\}"
                      r"|\\multicolumn\{\d+\}\{l\}")


def latex_problems(tex: str, columns: int) -> list[str]:
    """Unescaped specials, unbalanced braces and rows of the wrong width, line by line."""
    problems = []
    for number, line in enumerate(tex.splitlines(), 1):
        text = ESCAPES.sub("", line)
        depth = 0
        for char in text:
            depth += {"{": 1, "}": -1}.get(char, 0)
            if depth < 0:
                break
        if depth:
            problems.append(f"line {number}: unbalanced braces")
        text = COMMANDS.sub("", text)
        if text.endswith(r" \\"):
            text = text[:-3]
            whole_width = "multicolumn" in line or line.startswith(r"\caption")  # longtable caption
            if not whole_width and text.count("&") != columns - 1:
                problems.append(f"line {number}: {text.count('&') + 1} cells, not {columns}")
            text = text.replace("&", "")
        bare = sorted(set(text) & set("\\%&#_^~$±"))
        if bare:
            problems.append(f"line {number}: bare {''.join(bare)} in {line!r}")
    return problems


def test_the_scanner_finds_what_breaks_latex():
    assert latex_problems(r"a & b_1 \\", 2) and latex_problems(r"50% \\", 1)
    assert latex_problems(r"\textbf{x \\", 1) and latex_problems(r"a & b & c \\", 2)
    assert latex_problems(r"\emph{x} \\", 1) and latex_problems("1 ± 2", 1)
    assert not latex_problems(r"a\_b \& 50\% & \textbf{1 $\pm$ 2} \\", 2)


def test_latex_escapes_hostile_labels_and_caption(tmp_path):
    hostile = "my_model 50% & co #1 {x} ~y^z \\ $5 <b>"
    write_run(tmp_path, hostile, "listops", 0.40, seed=0)
    write_run(tmp_path, hostile, "listops", 0.42, seed=1)
    write_run(tmp_path, "transformer", "listops", 0.30)
    acc = table_of(tmp_path, reference=True)
    caption = "Test accuracy (%) & more: a_b #1 {x} ~ ^ \\ $"
    out = tmp_path / "out"
    out.mkdir()
    render.write_table(acc, out, "acc_table", caption)
    tex = (out / "acc_table.tex").read_text()
    assert latex_problems(tex, len(acc.columns) + 1) == []
    assert r"my\_model 50\% \& co \#1 \{x\} \textasciitilde{}y\textasciicircum{}z" in tex
    assert r"\caption{Test accuracy (\%) \& more: a\_b \#1" in tex
    assert r"\textbf{41.00 $\pm$ 1.41 (n=2)}" in tex
    page = render.to_html(acc)
    assert "&lt;b&gt;" in page and "<b>my_model" not in page
    csv = pd.read_csv(out / "acc_table.csv", index_col=0, dtype=str, keep_default_na=False)
    assert hostile in csv.index  # CSV keeps the plain label


@pytest.mark.parametrize("task, cls_name, level", [("copy", "Copy", 1 / 16),
                                                   ("mqar", "MQAR", 1 / 127),
                                                   ("pathfinder", "Pathfinder", 1 / 2),
                                                   ("image", "Image", 1 / 10),
                                                   ("mad", "MAD", 1 / 8)])
def test_each_task_class_states_its_chance_level_at_default_config(task, cls_name, level):
    from lra import tasks

    cls = tasks.task_class(task)
    assert cls.__name__ == cls_name
    assert cls.chance_accuracy(tasks.config_class(task)()) == pytest.approx(level)


def test_a_table_taller_than_a_page_is_a_longtable():
    """A float taller than a page does not compile ("Float too large"); past LONGTABLE_ROWS rows
    the table breaks across pages with its header repeated."""
    names = [f"model_{i}" for i in range(render.LONGTABLE_ROWS + 5)]
    table = pd.DataFrame({"acc 50%": [f"{i}.0" for i in range(len(names))]},
                         index=pd.Index(names, name="model"))
    tex = render.to_latex(table, "Long & tall", "tab:long")
    assert tex.startswith("\\begingroup\n\\begin{longtable}{lr}") and r"\endhead" in tex
    assert tex.rstrip().endswith("\\end{longtable}\n\\endgroup") and r"\begin{table}" not in tex
    assert tex.count(r"model\_") == len(names) and latex_problems(tex, 2) == []
    assert tex.count(r"\label{") == 1 and tex.count(r"\endfirsthead") == 1  # one label, not per page
    short = render.to_latex(table.iloc[:3], "Short", "tab:short")
    assert short.startswith(r"\begin{table}[ht]") and "longtable" not in short


def test_long_text_columns_wrap_and_wide_tables_set_small():
    """Settings-like text (> WRAP_CHARS) gets a p{..} column so a wide table stays on the page;
    past 8 columns the table is set \\small."""
    wide = pd.DataFrame({f"c{i}": ["1.0"] for i in range(8)}, index=pd.Index(["m"], name="model"))
    wide["settings"] = ["block_size=32, max_span=64, ramp=16"]
    tex = render.to_latex(wide, "Wide", "tab:wide")
    assert r"\begin{tabular}{l" + "r" * 8 + "p{" in tex and "\\small\n" in tex
    assert latex_problems(tex, 10) == []
    narrow = render.to_latex(wide.iloc[:, :2], "Narrow", "tab:narrow")
    assert r"\begin{tabular}{lrr}" in narrow and r"\small" not in narrow



def test_bold_only_beyond_the_seeds_spread_and_n_per_cell_when_it_varies(tmp_path):
    for seed, acc in enumerate((0.50, 0.70)):  # mean 60, std 14.1
        write_run(tmp_path, "transformer", "listops", acc, seed=seed)
    for seed, acc in enumerate((0.52, 0.58)):  # mean 55: within the spread of 60 +- 14
        write_run(tmp_path, "bigbird", "listops", acc, seed=seed)
    write_run(tmp_path, "linear", "listops", 0.20, seed=0)
    acc = table_of(tmp_path)
    assert acc.attrs["bold"] == set()  # 60 vs 55 is within the seeds' spread: no best
    assert acc.attrs["n"] is None and acc.loc["linear", "listops"] == "20.00 (n=1)"
    assert "n = seeds, given per cell" in tables.accuracy_caption(acc)
    write_run(tmp_path, "bigbird", "listops", 0.21, seed=0, name="bb0")
    write_run(tmp_path, "bigbird", "listops", 0.23, seed=1, name="bb1")
    assert ("transformer", "listops") in table_of(tmp_path).attrs["bold"]  # 60 vs 22: beyond
