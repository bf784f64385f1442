"""The figures on synthetic run directories (built as in test_report.py): the content of Figure 2
and of the D_t curves (points, intervals, levels, labels), no empty plots, the PNGs the report
links, and the report without matplotlib."""
import math

import matplotlib
import pytest
from scipy.stats import binomtest

import figures
import report
from test_report import JS_HISTORY, PAPER_COUNTS, fake_run, paper_like_runs, write

matplotlib.use("Agg")


def labelled(ax, label):
    return [line for line in ax.get_lines() if line.get_label() == label]


def test_figure2_content(tmp_path):
    root = paper_like_runs(tmp_path / "runs", changes={("phaseguard", 0.1, "opswap"): {"used": 100, "acc": 1}})
    fig = report.figure2(report.find_runs(root))
    em_ax, ops_ax = fig.axes
    assert [t.get_text() for t in em_ax.get_xticklabels()] == ["0.01", "0.02", "0.025", "0.03", "0.1"]
    (bars,) = em_ax.containers
    k = [sum(PAPER_COUNTS[("phaseguard", lam)][0]) for lam in (0.01, 0.02, 0.025, 0.03, 0.1)]
    assert list(bars.lines[0].get_xdata()) == [0, 1, 2, 3, 4]
    assert list(bars.lines[0].get_ydata()) == pytest.approx([100 * x / 72 for x in k])
    for x, segment in zip(k, bars.lines[2][0].get_segments()):  # the error bars: Wilson, as scipy has it
        ci = binomtest(x, 72).proportion_ci(method="wilson")
        assert [segment[0][1], segment[1][1]] == pytest.approx([100 * ci.low, 100 * ci.high])
    seeds = em_ax.collections[-1].get_offsets()  # one dot per seed
    by_lambda = [sorted(y for x, y in seeds.tolist() if x == i) for i in range(5)]
    for i, lam in enumerate((0.01, 0.02, 0.025, 0.03, 0.1)):
        assert by_lambda[i] == pytest.approx(sorted(100 * k / 24 for k in PAPER_COUNTS[("phaseguard", lam)][0]))
    (threshold,) = labelled(em_ax, "criterion ≤ 24.3%")
    assert list(threshold.get_ydata()) == [24.3, 24.3] and threshold.get_linestyle() == "--"
    (none,) = labelled(em_ax, "no defence (48.6%)")
    (kl,) = labelled(em_ax, "always-on KL (0.0%)")
    assert none.get_ydata()[0] == pytest.approx(100 * 35 / 72) and kl.get_ydata()[0] == 0
    (paper,) = labelled(em_ax, "paper (Table 2)")
    assert list(paper.get_ydata()) == [36.11, 30.56, 26.39, 20.83, 0.0]
    assert not labelled(em_ax, "incomplete evidence (see Table 2)")
    (threshold,) = labelled(ops_ax, "criterion ≥ 43.7%")
    assert list(threshold.get_ydata()) == [43.7, 43.7] and threshold.get_linestyle() == "--"
    (bars,) = ops_ax.containers
    assert bars.lines[0].get_ydata()[-1] == pytest.approx(1.0)  # λ 0.1: 1/100
    (hollow,) = labelled(ops_ax, "incomplete evidence (see Table 2)")  # that one is limited
    assert list(hollow.get_xdata()) == [4] and hollow.get_markerfacecolor() == "white"
    assert labelled(ops_ax, "no defence (54.6%)") and "OpSwap" in ops_ax.get_ylabel()


def test_dt_figure_content(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "security", "phaseguard", 0.03, 42, 20, em=4)
    fake_run(root, "security", "none", 0.0, 42, None, em=10, js_history=[[0, 0.0], [5, 0.1], [10, 0.12]])
    fig = figures.dt_figure(report.find_runs(root), "security")
    (ax,) = fig.axes
    (pg,) = labelled(ax, "phaseguard λ=0.03")
    assert [list(pg.get_xdata()), list(pg.get_ydata())] == [list(c) for c in zip(*JS_HISTORY)]
    assert pg.get_marker() == "o" and labelled(ax, "none λ=0")[0].get_marker() == "o"
    (star,) = labelled(ax, "trigger fired")
    assert (list(star.get_xdata()), list(star.get_ydata()), star.get_marker()) == ([20], [0.33], "*")
    (tau,) = labelled(ax, "τ = 0.15")
    assert list(tau.get_ydata()) == [0.15, 0.15] and tau.get_linestyle() == "--"
    (ceiling,) = labelled(ax, "ln 2 (largest JS)")
    assert ceiling.get_ydata()[0] == pytest.approx(math.log(2)) and ax.get_ylim()[1] >= math.log(2)
    (shade,) = ax.patches  # the warm-up: the measurements at steps 0, 5, 10
    lo, hi = shade.get_x(), shade.get_x() + shade.get_width()
    assert lo < 0 and 10 < hi < 15
    assert figures.dt_figure(report.find_runs(root), "opswap") is None


def test_no_empty_plots(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "security", "none", 0.0, 42, em=10, js_history=[])
    out = tmp_path / "out"
    out.mkdir()
    (out / "report_figure2.png").write_bytes(b"stale")
    text = write(root, tmp_path)
    assert report.figure2(report.find_runs(root)) is None
    assert "Figure 2: no runs (no PhaseGuard-KL run has results)." in text
    assert "D_t (security): no runs with a D_t history." in text and "![" not in text
    assert not list(out.glob("*.png"))  # the stale figure is gone


def test_the_report_draws_and_links_the_figures(tmp_path):
    text = write(paper_like_runs(tmp_path / "runs"), tmp_path)
    for name in ("figure2", "dt_security", "dt_opswap"):
        assert f"![{name}](report_{name}.png)" in text
        assert (tmp_path / "out" / f"report_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_report_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "pyplot", lambda: None)
    text = write(paper_like_runs(tmp_path / "runs"), tmp_path)
    assert "Figures not drawn: matplotlib is not installed" in text and "Table 1" in text


def test_figure2_draws_incomplete_evidence_hollow(tmp_path):
    """The tiny chain's case (issue 17): a λ whose 24 answers were all unscored is drawn hollow (its
    point and its seed's dot), never a filled point at 0%; a complete λ is filled. Read from the
    artists' face colours."""
    from matplotlib.colors import to_rgba
    root = tmp_path / "runs"
    fake_run(root, "security", "phaseguard", 0.03, 42, 20, em=0, n=24, unscored=24)  # no scored answers
    fake_run(root, "security", "phaseguard", 0.1, 42, 20, em=2, n=24)  # complete
    fig = report.figure2(report.find_runs(root))
    (ax,) = fig.axes
    (bars,) = ax.containers
    assert bars.lines[0].get_marker() in ("None", "", None)  # no filled marker under the hollow one
    (hollow,) = labelled(ax, "incomplete evidence (see Table 2)")
    (filled,) = labelled(ax, "complete evidence")
    assert list(hollow.get_xdata()) == [0] and list(hollow.get_ydata()) == [0.0]
    assert to_rgba(hollow.get_markerfacecolor()) == to_rgba("white")
    assert list(filled.get_xdata()) == [1] and to_rgba(filled.get_markerfacecolor()) == to_rgba(filled.get_markeredgecolor()) == to_rgba("C3")
    seeds = ax.collections[-1]
    faces = {x: tuple(face) for (x, _), face in zip(seeds.get_offsets().tolist(), seeds.get_facecolors())}
    assert faces[0][3] == 0 and faces[1][3] > 0  # the unscored seed's dot is hollow, the complete one filled
