"""Plotting helpers for the reports, drawn with matplotlib (Agg) as PNG beside the report:
pyplot() (None when matplotlib is missing), the D_t curves on the canaries, the warm-up span and
save_pngs() (a link and a caption per figure, a line instead of an empty plot). Figure 2 is drawn
in report.py, where its cells are computed."""
from __future__ import annotations

import math
from pathlib import Path


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


def warmup_span(steps: list[int], warmup: int) -> tuple[float, float]:
    """The steps of the first `warmup` measurements, widened by half a monitoring interval each side."""
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    return steps[0] - half, steps[min(warmup, len(steps)) - 1] + half


def dt_figure(runs, task: str):
    """D_t against step for the task's runs: a marker at each measurement, the trigger step a
    star, the trigger's warm-up measurements shaded, tau dashed, ln 2 (the largest JS) dotted.
    None when no run of the task has a D_t history."""
    plt = pyplot()
    task_runs = sorted((r for r in runs if r["task"] == task and r["monitor_curve"]),
                       key=lambda r: (r["method"], r["lam"], r["seed"]))
    if not task_runs:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups = list(dict.fromkeys((r["method"], r["lam"]) for r in task_runs))  # one colour per method and λ
    labelled: set = set()
    spans = set()
    for r in task_runs:
        steps, d = zip(*r["monitor_curve"])
        g = groups.index((r["method"], r["lam"]))
        name = f"{r['method']} λ={r['lam']:g}"
        ax.plot(steps, d, marker="o", ms=3, lw=1, color=f"C{g % 10}", label=None if name in labelled else name)
        labelled.add(name)
        if r["trigger"] is not None:
            at = dict(map(tuple, r["monitor_curve"])).get(r["trigger"])
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
