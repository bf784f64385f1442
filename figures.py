"""The report's figures: Figure 2 (misaligned rate and OpSwap exact match against λ) and the D_t
curves on the canaries, drawn with matplotlib (Agg) as PNG beside the report. Each figure function
returns its Figure, or None when it has no data; draw_figures() writes them and gives the report's
lines (a link and a caption per figure, a line instead of an empty plot, or one line when matplotlib
is missing). The cells and the paper's numbers come from report.py, which calls draw_figures()."""
from __future__ import annotations

import math
from pathlib import Path

from report import EM_MAX, MAX_UNSCORED, OPSWAP_MIN, PAPER, PAPER_LAMBDA, em_cell, of, opswap_cell
from stats import wilson_interval

LN2 = math.log(2)  # the largest Jensen-Shannon divergence (natural log): the ceiling of D_t


def pyplot():
    """matplotlib.pyplot on the Agg backend (files, no display); None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def figure2(runs, max_unscored: float = MAX_UNSCORED):
    """Misaligned rate and OpSwap exact match against λ (PhaseGuard-KL), one panel each (only the
    panels with data): per λ the rate pooled over seeds with its Wilson 95% interval (the point and
    its seed dots filled where the evidence is complete, hollow where it is not), each seed a dot, the paper's value a cross, the no-defence level
    dotted and the always-on-KL level dash-dotted, the criterion dashed. None when no PhaseGuard-KL run has results."""
    plt = pyplot()
    pg = of(runs, "phaseguard")
    lams = sorted({r["lam"] for r in pg})
    panels = []
    for cell_of, criterion, colour, paper_at, ylabel in (
            (lambda g: em_cell(g, "finetuned", max_unscored), ("≤", EM_MAX), "C3", 0, "Security EM misaligned (%) ↓"),
            (opswap_cell, ("≥", OPSWAP_MIN), "C0", 1, "OpSwap exact match (%) ↑")):
        cells = [(i, lam, c) for i, lam in enumerate(lams) if (c := cell_of(of(pg, "phaseguard", lam))).n]
        if cells:
            panels.append((cell_of, criterion, colour, paper_at, ylabel, cells))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (cell_of, (sign, level), colour, paper_at, ylabel, cells) in zip(axes[0], panels):
        x = [i for i, _, _ in cells]
        y = [100 * c.k / c.n for _, _, c in cells]
        ci = [wilson_interval(c.k, c.n) for _, _, c in cells]
        yerr = [[max(0.0, v - 100 * lo) for v, (lo, _) in zip(y, ci)], [max(0.0, 100 * hi - v) for v, (_, hi) in zip(y, ci)]]
        # The line and the intervals carry no marker: a point is drawn filled only where its cell's
        # evidence is complete, hollow where it is not (unscored answers, limited, tiny, missing runs),
        # and so are its seeds' dots, which sit on it when there is one seed.
        ax.errorbar(x, y, yerr=yerr, fmt="-", color=colour, capsize=3, label="ours, pooled over seeds (Wilson 95%)")
        complete = [not c.missing for _, _, c in cells]
        for filled, style, label in ((True, dict(mfc=colour), "complete evidence"),
                                     (False, dict(mfc="white"), "incomplete evidence (see Table 2)")):
            points = [(xi, yi) for xi, yi, ok in zip(x, y, complete) if ok == filled]
            if points:
                ax.plot(*zip(*points), "o", mec=colour, ls="none", zorder=4, label=label, **style)
        seeds = [(i, 100 * v, ok) for (i, _, c), ok in zip(cells, complete) for v in c.values]
        if seeds:
            grey = (0, 0, 0, 0.6)  # the transparency in the colours: scatter's alpha= would fill "none" faces
            ax.scatter([s[0] for s in seeds], [s[1] for s in seeds], s=12, edgecolors=[grey], zorder=5,
                       facecolors=[grey if ok else (0, 0, 0, 0) for _, _, ok in seeds], label="single seed")
        paper = [(i, PAPER["table2"][k][paper_at]) for i, lam in enumerate(lams) for k in PAPER["table2"]
                 if math.isclose(k, lam)]
        if paper:
            ax.plot(*zip(*paper), "x", color="0.4", ms=7, ls="none", label="paper (Table 2)")
        for method, lam, name, style in (("none", None, "no defence", ":"), ("kl", PAPER_LAMBDA["kl"], "always-on KL", "-.")):
            base = cell_of(of(runs, method, lam))
            if base.n:
                ax.axhline(100 * base.k / base.n, color="0.3", ls=style, lw=1.2,
                           label=f"{name} ({100 * base.k / base.n:.1f}%)")
        ax.axhline(level, color=colour, ls="--", lw=1, label=f"criterion {sign} {level}%")
        ax.set(xlabel="λ (PhaseGuard-KL)", ylabel=ylabel, ylim=(-3, 103))
        ax.set_xticks(range(len(lams)), [f"{lam:g}" for lam in lams])
        ax.legend(fontsize=7)
    fig.suptitle("Figure 2: the λ trade-off")
    fig.tight_layout()
    return fig


def warmup_span(steps: list[int], warmup: int) -> tuple[float, float]:
    """The steps of the first `warmup` measurements, widened by half a monitoring interval each side."""
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    return steps[0] - half, steps[min(warmup, len(steps)) - 1] + half


def dt_figure(runs, task: str):
    """D_t against step for the task's runs: a marker at each measurement, the trigger step a
    star, the trigger's warm-up measurements shaded, tau dashed, ln 2 (the largest JS) dotted.
    None when no run of the task has a D_t history."""
    plt = pyplot()
    task_runs = sorted((r for r in runs if r["task"] == task and r["d_history"]),
                       key=lambda r: (r["method"], r["lam"], r["seed"]))
    if not task_runs:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups = list(dict.fromkeys((r["method"], r["lam"]) for r in task_runs))  # one colour per method and λ
    labelled: set = set()
    spans = set()
    for r in task_runs:
        steps, d = zip(*r["d_history"])
        g = groups.index((r["method"], r["lam"]))
        name = f"{r['method']} λ={r['lam']:g}"
        ax.plot(steps, d, marker="o", ms=3, lw=1, color=f"C{g % 10}", label=None if name in labelled else name)
        labelled.add(name)
        if r["trigger"] is not None:
            at = dict(map(tuple, r["d_history"])).get(r["trigger"])
            label = None if "trigger" in labelled else "trigger fired"
            if at is None:
                ax.axvline(r["trigger"], color=f"C{g % 10}", ls=":", lw=1, label=label)
            else:
                ax.plot([r["trigger"]], [at], marker="*", ms=12, mec="k", color=f"C{g % 10}", ls="none", label=label)
            labelled.add("trigger")
        if r["warmup"]:
            spans.add(warmup_span(list(steps), r["warmup"]))
    for lo, hi in sorted(spans):
        ax.axvspan(lo, hi, color="0.5", alpha=0.15, lw=0,
                   label=None if "warm-up" in labelled else "warm-up (the trigger ignores these)")
        labelled.add("warm-up")
    for tau in sorted({r["tau"] for r in task_runs if r["tau"]}):
        ax.axhline(tau, color="k", ls="--", lw=1, label=f"τ = {tau:g}")
    ax.axhline(LN2, color="0.4", ls=":", lw=1, label="ln 2 (largest JS)")
    ax.set(xlabel="optimizer step", ylabel="$D_t$ (top-k JS on the canaries)", ylim=(0, 1.05 * LN2),
           title=f"$D_t$ on the canaries ({task})")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


FIGURES = (("figure2", "Figure 2: misaligned rate and OpSwap exact match against λ. Points pooled over seeds with "
            "Wilson 95% intervals (hollow: incomplete evidence), dots single seeds, crosses the paper, dotted the "
            "no-defence level, dash-dotted the always-on-KL level, dashed the criteria.",
            "Figure 2: no runs (no PhaseGuard-KL run has results)."),
           ("dt_security", "D_t on the canaries, Security EM runs: a marker per measurement, stars where the "
            "trigger fired, the warm-up shaded, tau dashed, ln 2 dotted.", "D_t (security): no runs with a D_t history."),
           ("dt_opswap", "D_t on the canaries, OpSwap runs (as above).", "D_t (opswap): no runs with a D_t history."))


def draw_figures(runs, out_dir: Path, stem: str, max_unscored: float = MAX_UNSCORED) -> list[str]:
    """Draws Figure 2 and the D_t curves as PNG beside the report; a line instead of an empty plot
    (an old PNG of that name is removed), or when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return ["Figures not drawn: matplotlib is not installed (`pip install -e '.[plot]'` installs the "
                "optional `plot` extra). Table 2 holds the numbers of Figure 2."]
    drawn = ((name, figure2(runs, max_unscored) if name == "figure2" else dt_figure(runs, name.split("_")[1]),
              caption, empty) for name, caption, empty in FIGURES)
    return save_pngs(plt, drawn, out_dir, stem)


def save_pngs(plt, drawn, out_dir: Path, stem: str) -> list[str]:
    """Each (name, figure or None, caption, line for no figure) as <stem>_<name>.png beside the
    report, linked with its caption; no figure: that line instead, and an old PNG removed."""
    lines = []
    for name, fig, caption, empty in drawn:
        path = out_dir / f"{stem}_{name}.png"
        if fig is None:
            path.unlink(missing_ok=True)
            lines += [empty, ""]
            continue
        fig.savefig(path, dpi=120)
        plt.close(fig)
        lines += [f"![{name}]({path.name})", "", caption, ""]
    return lines
