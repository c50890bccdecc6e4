"""Report figures fit for a paper: one style per model everywhere, plain log ticks, failures
drawn as failures, LRA Figure 3 from bench speed at 4K with a size legend and labels apart."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from matplotlib.colors import to_rgb

from lra.report import plots
from lra.results import RunResult, load_results, write_result

MODELS = ("transformer", "flash", "bigbird", "performer", "linformer")


def bench(root, model, length, speed=None, mib=None, status="ok", task="text"):
    write_result(RunResult(task=task, model=model, seq_len=length, seed=0, preset="paper",
                           kind="bench", status=status, batch_size=1, steps_per_s=speed,
                           peak_memory_bytes=None if mib is None else int(mib * 2**20)),
                 root / "bench" / f"{model}-{task}-{length}")


def run(root, model, task, length, seed, acc, status="ok", eval_lengths=None):
    write_result(RunResult(task=task, model=model, seq_len=length, seed=seed, preset="small",
                           status=status, test_accuracy=acc, steps_per_s=3.0 + seed,
                           peak_memory_bytes=2**30, eval_lengths=eval_lengths,
                           config={"seed": seed, "preset": "small", "model": {"pos": "rope"}}),
                 root / "runs" / f"{model}-{task}-{length}-s{seed}")


def tree(root):
    """Bench at 256..4K (bigbird OOM at 1K between ok lengths), runs on two tasks x two lengths
    x two seeds (performer times out on text at 1K)."""
    for i, model in enumerate(MODELS):
        for length in (256, 512, 1024, 2048, 4096):
            failed = model == "bigbird" and length == 1024
            bench(root, model, length, None if failed else (20 + i) * 256 / length,
                  None if failed else (100 + 50 * i) * length / 256,
                  status="oom" if failed else "ok")
        for task, length, seed in itertools.product(("listops", "text"), (512, 1024), (0, 1)):
            failed = model == "performer" and task == "text" and length == 1024
            run(root, model, task, length, seed, None if failed else 0.3 + 0.02 * i + 0.01 * seed,
                status="timeout" if failed else "ok")
    return load_results(root, verbose=False)


def lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def by_gid(ax, prefix: str) -> dict:
    return {artist.get_gid(): artist for artist in ax.get_children()
            if isinstance(artist.get_gid(), str) and artist.get_gid().startswith(prefix)}


def tick_texts(fig, axis) -> list[str]:
    fig.canvas.draw()
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plots.plt.close("all")


def test_styles_are_distinct_stable_and_baselines_fixed():
    names = ["transformer", "flash"] + [f"model{i:02d}" for i in range(22)]
    styles = plots.model_styles(reversed(names))
    assert styles == plots.model_styles(names + names[:3])  # order and repeats do not matter
    pairs = {(s["color"], s["marker"]) for s in styles.values()}
    assert len(pairs) == 24
    assert styles["transformer"] == plots.BASELINE_STYLES["transformer"]
    assert styles["flash"] == plots.BASELINE_STYLES["flash"]
    assert all(s["marker"] not in "xX" for s in styles.values())  # X means failure
    first = [to_rgb(styles[f"model{i:02d}"]["color"]) for i in range(10)]
    first += [to_rgb(styles[b]["color"]) for b in ("transformer", "flash")]
    closest = min(np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(first, 2))
    assert closest >= 0.25, closest
    # a variant of a baseline keeps the baseline's look when the bare label is absent
    assert plots.model_styles(["transformer pos=rope", "linear"])["transformer pos=rope"] == \
        plots.BASELINE_STYLES["transformer"]


def test_a_model_has_the_same_style_in_every_figure(tmp_path):
    df = tree(tmp_path)
    expected = plots.model_styles(df["model"])
    speed = plots.speed_memory_figures(df)["speed_vs_seq_len"].axes[0]
    accuracy = plots.accuracy_length_figures(df)["accuracy_vs_seq_len_listops"].axes[0]
    fig3 = plots.accuracy_speed_figures(df)["accuracy_vs_speed"].axes[0]
    for model in MODELS:
        for ax in (speed, accuracy):
            line = lines(ax)[model]
            assert (line.get_color(), line.get_marker(), line.get_linestyle()) == \
                (expected[model]["color"], expected[model]["marker"], expected[model]["linestyle"])
    centres = by_gid(fig3, "centre:")
    assert set(centres) == {f"centre:{m}" for m in MODELS if m != "performer"}  # a timeout
    for gid, centre in centres.items():
        style = expected[gid.split(":", 1)[1]]
        assert np.allclose(centre.get_facecolor()[0][:3], to_rgb(style["color"]))


def test_log_ticks_are_plain_numbers_at_the_measured_lengths(tmp_path):
    df = tree(tmp_path)
    figures = plots.speed_memory_figures(df)
    for name in ("speed_vs_seq_len", "memory_vs_seq_len"):
        fig = figures[name]
        ax = fig.axes[0]
        assert ax.get_xscale() == ax.get_yscale() == "log"
        assert tick_texts(fig, ax.xaxis) == ["256", "512", "1K", "2K", "4K"]
        values = tick_texts(fig, ax.yaxis)
        assert len(values) >= 2
        for text in values:
            assert not re.search(r"\^|\\times|x10|e[+-]", text), text
            float(text)  # a plain number
        assert not [t for t in ax.yaxis.get_minorticklabels() if t.get_text()]
    fig = plots.accuracy_speed_figures(df)["accuracy_vs_speed"]
    assert fig.axes[0].get_xscale() == "log"
    assert all(float(t) > 0 and "^" not in t for t in tick_texts(fig, fig.axes[0].xaxis))
    assert plots.length_text(1536) == "1.5K" and plots.plain_number(0.5) == "0.5"
    assert plots.plain_number(12000) == "12000"


def test_a_failed_point_is_a_failure_mark_not_a_point_on_the_line(tmp_path):
    df = tree(tmp_path)
    ax = plots.speed_memory_figures(df)["speed_vs_seq_len"].axes[0]
    line = lines(ax)["bigbird"]
    xs = line.get_xdata().astype(float)
    assert 1024 not in xs and {256, 512, 2048, 4096} <= set(xs[~np.isnan(xs)])
    assert np.isnan(xs).sum() == 1  # the line is broken at the failure, not drawn across it
    marks = by_gid(ax, "failures")["failures"]
    assert [tuple(p) for p in marks.get_offsets()][0][0] == 1024
    assert marks.get_label() == "failed (OOM)"
    assert "failed (OOM)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert [a.get_text() for a in ax.texts if a.get_gid() == "failure-text"] == ["OOM bigbird"]
    # the marks sit in a band at the bottom that no data point enters
    ax.figure.canvas.draw()
    mark_top = max(y for _, y in marks.get_offsets())
    for other in lines(ax).values():
        points = np.column_stack([other.get_xdata(), other.get_ydata()]).astype(float)
        points = points[~np.isnan(points).any(axis=1)]
        assert (ax.transAxes.inverted().transform(ax.transData.transform(points))[:, 1]
                > mark_top + 0.02).all(), other.get_label()
    # the same on an accuracy figure: performer's text run at 1K timed out
    acc = plots.accuracy_length_figures(df)["accuracy_vs_seq_len_text"].axes[0]
    assert 1024 not in lines(acc)["performer"].get_xdata()
    assert [a.get_text() for a in acc.texts if a.get_gid() == "failure-text"] == \
        ["TIMEOUT performer"]


def test_accuracy_lines_carry_std_over_seeds_as_error_bars(tmp_path):
    for seed, acc in ((0, 0.40), (1, 0.50)):
        run(tmp_path, "linear", "listops", 512, seed, acc)
    run(tmp_path, "linear", "listops", 1024, 0, 0.45)  # one seed: no bar
    df = load_results(tmp_path, verbose=False)
    ax = plots.accuracy_length_figures(df)["accuracy_vs_seq_len_listops"].axes[0]
    assert list(lines(ax)["linear"].get_ydata()) == pytest.approx([45.0, 45.0])
    (bars,) = ax.containers
    (segments,) = bars.lines[2]
    (low, high), = [seg[:, 1] for seg in segments.get_segments()]
    assert high - low == pytest.approx(2 * 100 * np.std([0.40, 0.50], ddof=1))
    assert segments.get_segments()[0][0, 0] == 512
    assert "mean ± std over seeds" in ax.get_title()


def test_extrapolation_marks_failed_eval_lengths_and_the_train_length(tmp_path):
    for seed in (0, 1):
        run(tmp_path, "transformer", "copy", 64, seed, 0.9, eval_lengths={
            "64": {"status": "ok", "test_accuracy": 0.9},
            "128": {"status": "error", "error": "x"},
            "256": {"status": "ok", "test_accuracy": 0.5 + 0.1 * seed}})
    df = load_results(tmp_path, verbose=False)
    ax = plots.extrapolation_figures(df)["extrapolation_copy_L64"].axes[0]
    line = lines(ax)["transformer pos=rope"]
    assert 128 not in line.get_xdata() and line.get_color() == "#000000"
    assert [a.get_text() for a in ax.texts] == ["ERROR transformer pos=rope"]
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"train L=64", "failed (ERROR)"}
    assert tick_texts(ax.figure, ax.xaxis) == ["64", "128", "256"]


def test_many_lines_put_the_legend_outside_the_data(tmp_path):
    for i in range(10):
        bench(tmp_path, f"model{i}", 512, 10 + i, 100)
        bench(tmp_path, f"model{i}", 1024, 5 + i, 200)
    fig = plots.speed_memory_figures(load_results(tmp_path, verbose=False))["speed_vs_seq_len"]
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_figure3_is_avg_accuracy_vs_bench_speed_at_4k(tmp_path):
    bench(tmp_path, "transformer", 1024, 9.0, 500)
    bench(tmp_path, "transformer", 4096, 2.0, 4000)
    bench(tmp_path, "linear", 4096, 6.0, 1000)
    bench(tmp_path, "bigbird", 2048, 3.0, 2000)   # no 4K row: its largest length, said so
    bench(tmp_path, "bigbird", 4096, status="oom")
    bench(tmp_path, "local", 4096, 8.0, 250)
    for seed, acc in enumerate((0.4, 0.6, 0.8)):  # 3 seeds on listops, 1 on text
        run(tmp_path, "transformer", "listops", 512, seed, acc)
    run(tmp_path, "transformer", "text", 1024, 0, 0.2)
    for model, acc in (("linear", 0.5), ("bigbird", 0.45)):
        run(tmp_path, model, "listops", 512, 0, acc)
        run(tmp_path, model, "text", 1024, 0, acc)
    run(tmp_path, "local", "listops", 512, 0, 0.9)  # no text run: not on the Avg figure
    df = load_results(tmp_path, verbose=False)
    ax = plots.accuracy_speed_figures(df)["accuracy_vs_speed"].axes[0]
    centres = {gid.split(":", 1)[1]: tuple(a.get_offsets()[0])
               for gid, a in by_gid(ax, "centre:").items()}
    # seeds averaged per task first: (0.6 + 0.2) / 2, not the pooled 0.5
    assert centres == {"transformer": pytest.approx((2.0, 40.0)),
                       "linear": pytest.approx((6.0, 50.0)),
                       "bigbird": pytest.approx((3.0, 45.0))}
    assert ax.get_xlabel() == "bench steps / s at L=4K"
    title = ax.get_title()
    assert "over 2 tasks" in title and "at L=2K: bigbird" in title
    assert "failed at L=4K: bigbird (OOM)" in title and "not every task): local" in title
    bubbles = {gid.split(":", 1)[1]: a.get_sizes()[0] for gid, a in by_gid(ax, "bubble:").items()}
    memory = {"transformer": 4000, "linear": 1000, "bigbird": 2000}
    area_per_mib = bubbles["transformer"] / 4000
    assert {m: bubbles[m] / memory[m] for m in memory} == pytest.approx(
        dict.fromkeys(memory, area_per_mib))
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == 3 and all(t.endswith(" MiB") for t in texts)
    for text, handle in zip(texts, legend.legend_handles):
        assert handle.get_markersize() ** 2 == pytest.approx(area_per_mib * float(text[:-4]))
    labels = sorted(t.get_text() for t in ax.texts if t.get_gid() == "point-label")
    assert labels == ["bigbird @2K", "linear", "transformer"]


def test_figure3_without_bench_rows_says_it_uses_training_speed(tmp_path):
    for model in ("transformer", "linear"):
        for seed in (0, 1):
            run(tmp_path, model, "listops", 512, seed, 0.5)
    ax = plots.accuracy_speed_figures(load_results(tmp_path, verbose=False))[
        "accuracy_vs_speed"].axes[0]
    assert ax.get_xlabel().startswith("train steps / s") and "no bench rows" in ax.get_xlabel()
    centre = by_gid(ax, "centre:transformer")["centre:transformer"]
    assert centre.get_offsets()[0][0] == pytest.approx(3.5)  # median of 3.0 and 4.0


def test_figure3_labels_do_not_overlap_when_crowded(tmp_path):
    models = [f"attention{i:02d}" for i in range(12)]
    for i, model in enumerate(models):  # all within 1% speed and 0.2 points of accuracy
        bench(tmp_path, model, 4096, 5.0 * (1 + 0.001 * i), 400 + 10 * i)
        run(tmp_path, model, "listops", 512, 0, 0.50 + 0.0002 * i)
    bench(tmp_path, "far", 4096, 50.0, 400)  # stretches the axis so the 12 crowd together
    run(tmp_path, "far", "listops", 512, 0, 0.2)
    fig = plots.accuracy_speed_figures(load_results(tmp_path, verbose=False))["accuracy_vs_speed"]
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_gid() == "point-label"]
    assert sorted(t.get_text() for t in labels) == sorted(models + ["far"])
    boxes = [t.get_window_extent(renderer) for t in labels]
    for a, b in itertools.combinations(range(len(boxes)), 2):
        assert not boxes[a].overlaps(boxes[b]), (labels[a].get_text(), labels[b].get_text())
    assert all(fig.bbox.contains(b.x0, b.y0) and fig.bbox.contains(b.x1, b.y1) for b in boxes)
    legend = ax.get_legend().get_window_extent(renderer)
    assert not any(b.overlaps(legend) for b in boxes)
    assert by_gid(ax, "leader")  # labels pushed off their bubble are tied to it by a line


def test_builders_save_png_and_svg_and_close(tmp_path):
    df = tree(tmp_path)
    paths = plots.accuracy_vs_speed(df, tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_speed.png", "accuracy_vs_speed.svg"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert not plots.plt.get_fignums()
    (tmp_path / "all").mkdir()
    written = plots.all_figures(df, tmp_path / "all")
    assert sorted({p.name for p in written}) == sorted(
        f"{stem}.{ext}" for ext in ("png", "svg") for stem in (
            "speed_vs_seq_len", "memory_vs_seq_len", "accuracy_vs_speed",
            "accuracy_vs_seq_len_listops", "accuracy_vs_seq_len_text"))
