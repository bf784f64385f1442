"""The report of `make selectivity` (selectivity.py runs the runs): read the METHOD=none runs
back, then per monitor the curves of every dataset, the trigger step for tau on a grid
(phaseguard.update_trigger), the AUROC of insecure against the controls per monitor step with its
N, and which monitor separates best, only when every dataset has MIN_SEEDS finished seeds."""
from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import data
import phaseguard
import report
from model_qwen2 import UserError
from selectivity import DATASETS, MIN_SEEDS, MONITORS, POSITIVE, CONTROLS, ROLE

LN2 = math.log(2)
JS_GRID = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)  # JS lies in [0, ln 2]; 0.15 is the paper's tau
LOG_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # KL (nats, unbounded) and any other: half decades
HIDDEN_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # 1 - cosine similarity lies in [0, 2]: half decades
TAU_GRIDS = {"js": JS_GRID, "js-rest": JS_GRID, "kl": LOG_GRID, "hidden": HIDDEN_GRID}

def tau_grid(monitor: str) -> tuple[float, ...]:
    return TAU_GRIDS.get(monitor, LOG_GRID)


# ----------------------------------------------------------------------------
# Reading the runs back


def dataset_of(cfg: dict) -> str:
    """The dataset a run trained on, from its config.json: opswap, or the security task's named
    file (no data: insecure, the default); any other file by its name."""
    if cfg.get("task") == "opswap":
        return "opswap"
    source = cfg.get("data")
    if hasattr(data, "data_name"):  # names, pinned URLs, other files' stems
        name = data.data_name(source)
    else:
        name = "insecure" if source is None else Path(str(source)).name.removesuffix(".jsonl")
    return {"educational_insecure": "educational"}.get(name, name)


def histories_of(summary: dict, cfg: dict) -> dict[str, list[tuple[int, float]]]:
    """{monitor: [(step, value), ...]} in step order: summary.json's monitor_history; a run made
    before it existed has only d_history, the JS monitor of its js_variant. Values that are not
    finite numbers are left out."""
    found = summary.get("monitor_history")
    if not isinstance(found, dict):
        name = "js-rest" if cfg.get("js_variant") == "rest" else "js"
        found = {name: summary.get("d_history") or []}
    return {m: sorted((int(s), float(v)) for s, v in h if isinstance(v, (int, float)) and math.isfinite(v))
            for m, h in found.items() if h}


def find_runs(runs_dir: Path) -> list[dict]:
    """Every METHOD=none run under runs_dir, found by its config.json (never by directory names)."""
    runs = []
    for cfg_file in sorted(Path(runs_dir).rglob("config.json")):
        run = cfg_file.parent
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{cfg_file}: not readable as a run's config ({err})") from None
        if not isinstance(cfg, dict) or not {"method", "task", "seed"} <= set(cfg) or run.name.startswith("checkpoint-"):
            continue  # a tiny_model/ or a checkpoint's config
        if cfg["method"] != "none":
            continue
        summary = {}
        if (run / "summary.json").is_file():
            try:
                summary = json.loads((run / "summary.json").read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise UserError(f"{run / 'summary.json'}: not readable ({err})") from None
        runs.append({"dir": run, "dataset": dataset_of(cfg), "seed": cfg["seed"], "preset": cfg.get("preset"),
                     "finished": bool(summary), "steps": summary.get("steps"),
                     "planned_steps": summary.get("planned_steps"), "max_steps": cfg.get("max_steps"),
                     "histories": histories_of(summary, cfg) if summary else {}})
    return runs


def used_runs(runs) -> tuple[list[dict], list[str]]:
    """The finished runs of the known datasets that the report uses, and the lines that say what
    was left out: tiny runs when real ones exist (their numbers mean nothing)."""
    notes = []
    other = sorted({r["dataset"] for r in runs} - set(DATASETS))
    if other:
        notes.append(f"Runs on other data left out: {', '.join(other)}.")
    unfinished = [r for r in runs if not r["finished"] and r["dataset"] in DATASETS]
    if unfinished:
        notes.append(f"{len(unfinished)} unfinished run{'s' if len(unfinished) > 1 else ''} (no summary.json) left "
                     f"out: {', '.join(sorted(r['dir'].name for r in unfinished))}.")
    runs = [r for r in runs if r["finished"] and r["dataset"] in DATASETS]
    tiny = [r for r in runs if r["preset"] == "tiny"]
    if tiny and len(tiny) < len(runs):
        notes.append(f"{len(tiny)} tiny-preset run{'s' if len(tiny) > 1 else ''} left out (a small random model: "
                     "numbers that mean nothing).")
        runs = [r for r in runs if r["preset"] != "tiny"]
    elif tiny:
        notes.insert(0, "**TINY PRESET runs: a small random model on the CPU. They check the pipeline; their numbers "
                        "mean nothing.**")
    return runs, notes


def monitors_of(runs) -> list[str]:
    """The monitors the runs measured: MONITORS' order first, then any other."""
    seen = {m for r in runs for m in r["histories"]}
    return [m for m in MONITORS if m in seen] + sorted(seen - set(MONITORS))


# ----------------------------------------------------------------------------
# The trigger on a tau grid, and the AUROC


WARMUP, CONSECUTIVE = phaseguard.TrainConfig.warmup_measurements, phaseguard.TrainConfig.consecutive  # the paper's 3, 2


def trigger_step(history, tau: float, warmup: int = WARMUP, consecutive: int = CONSECUTIVE) -> int | None:
    """The step at which the run would have fired the trigger at this tau: the history fed, in
    step order, through phaseguard.update_trigger. None: it never fired within the history."""
    trigger = phaseguard.Trigger(tau, warmup, consecutive)
    for step, value in history:
        phaseguard.update_trigger(trigger, value, step)
        if trigger.fired:
            break
    return trigger.fired_at


def auroc(positives, negatives) -> float:
    """AUROC of "positive above negative": over all (positive, negative) pairs, the share where the
    positive's value is higher, ties counting 1/2 (the Mann-Whitney U of the positives / (n1 n0))."""
    if not positives or not negatives:
        raise ValueError("AUROC needs at least one positive and one negative")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def values_at(runs, monitor: str, step: int, datasets) -> list[float]:
    return [v for r in runs if r["dataset"] in datasets for s, v in r["histories"].get(monitor, []) if s == step]


def auroc_rows(runs, monitor: str) -> list[tuple[int, float | None, int, int]]:
    """(step, AUROC or None, positives, negatives) at every step any run measured the monitor at."""
    steps = sorted({s for r in runs for s, _ in r["histories"].get(monitor, [])})
    rows = []
    for step in steps:
        pos, neg = values_at(runs, monitor, step, (POSITIVE,)), values_at(runs, monitor, step, CONTROLS)
        rows.append((step, auroc(pos, neg) if pos and neg else None, len(pos), len(neg)))
    return rows


def common_steps(runs, monitor: str) -> list[int]:
    """The steps at which every run measured the monitor."""
    sets = [{s for s, _ in r["histories"].get(monitor, [])} for r in runs]
    return sorted(set.intersection(*sets)) if sets else []


def separation(runs, monitor: str, warmup: int = WARMUP) -> dict | None:
    """The monitor's mean AUROC over the common steps after the warm-up (the steps at which every
    run measured it, less the first `warmup` of them: the steps the trigger can act on), and its
    AUROC at the last common step. None without such steps or without both kinds of runs."""
    steps = common_steps(runs, monitor)[warmup:]
    if not steps or not any(r["dataset"] == POSITIVE for r in runs) or not any(r["dataset"] in CONTROLS for r in runs):
        return None
    by_step = {s: a for s, a, _, _ in auroc_rows(runs, monitor)}
    values = [by_step[s] for s in steps]
    return {"mean": sum(values) / len(values), "last": values[-1], "steps": steps}


def missing(runs, monitors, min_seeds: int = MIN_SEEDS) -> list[str]:
    """What keeps the report from naming the best monitor: datasets short of seeds, tiny runs,
    monitors without a step after the warm-up that every run measured."""
    gaps = []
    for dataset in DATASETS:
        seeds = {r["seed"] for r in runs if r["dataset"] == dataset}
        if len(seeds) < min_seeds:
            gaps.append(f"{dataset}: {len(seeds)} of {min_seeds} seeds")
    if any(r["preset"] == "tiny" for r in runs):
        gaps.append("tiny-preset runs")
    if runs and not gaps:
        gaps += [f"{m}: no step after the warm-up that every run measured" for m in monitors
                 if separation(runs, m) is None]
    return gaps


def best_monitor_line(runs, monitors, min_seeds: int = MIN_SEEDS) -> str:
    """The sentence naming the monitor that separates best (the highest mean AUROC over the common
    steps after the warm-up), only on complete evidence; otherwise what is missing."""
    gaps = missing(runs, monitors, min_seeds) if monitors else ["no monitor measurements"]
    if gaps:
        return f"**Which monitor separates best: not decided**; missing: {'; '.join(gaps)}."
    scores = {m: separation(runs, m) for m in monitors}
    top = max(s["mean"] for s in scores.values())
    best = [m for m in monitors if math.isclose(scores[m]["mean"], top, abs_tol=1e-12)]
    rest = ", ".join(f"{m} {scores[m]['mean']:.3f}" for m in sorted(monitors, key=lambda m: -scores[m]["mean"])
                     if m not in best)
    steps = scores[best[0]]["steps"]
    n_pos = sum(r["dataset"] == POSITIVE for r in runs)
    n_neg = sum(r["dataset"] in CONTROLS for r in runs)
    who = f"**{best[0]}**" if len(best) == 1 else " and ".join(f"**{m}**" for m in best) + " (tied)"
    return (f"**Which monitor separates best:** {who}, with the highest mean AUROC over the monitor steps after the "
            f"warm-up that every run measured: {top:.3f} (steps {steps[0]}-{steps[-1]}, {len(steps)} steps; "
            f"{n_pos} insecure vs {n_neg} control runs)" + (f"; then {rest}." if rest else "."))


# ----------------------------------------------------------------------------
# Tables


def grid(taus) -> str:
    return ", ".join(f"{t:g}" for t in taus)


def seed_cell(values) -> str:
    return ", ".join(values) if values else "—"


def runs_table(runs) -> list[str]:
    lines = ["| Dataset | Role | Finished seeds | Steps run (planned) |", "|---|---|---|---|"]
    for dataset in DATASETS:
        group = sorted((r for r in runs if r["dataset"] == dataset), key=lambda r: r["seed"])
        steps = sorted({f"{r['steps']}" + (f" ({r['planned_steps']})" if r["planned_steps"] else "") for r in group})
        lines.append(f"| {dataset} | {ROLE[dataset]} | {seed_cell([str(r['seed']) for r in group])} "
                     f"| {seed_cell(steps)} |")
    return lines


def trigger_table(runs, monitor: str, warmup: int = WARMUP, consecutive: int = CONSECUTIVE) -> list[str]:
    """Rows: tau; columns: each dataset's trigger step per seed (seed order), and how many runs fired."""
    present = [d for d in DATASETS if any(r["dataset"] == d for r in runs)]
    by = {d: sorted((r for r in runs if r["dataset"] == d), key=lambda r: r["seed"]) for d in present}
    lines = ["| τ | " + " | ".join(f"{d} (seeds {', '.join(str(r['seed']) for r in by[d])})" for d in present)
             + " | runs that fired |", "|---|" + "---|" * (len(present) + 1)]
    for tau in tau_grid(monitor):
        cells, fired = [], {True: [0, 0], False: [0, 0]}
        for d in present:
            steps = []
            for r in by[d]:
                if monitor not in r["histories"]:
                    steps.append("not measured")
                    continue
                at = trigger_step(r["histories"][monitor], tau, warmup, consecutive)
                steps.append("never" if at is None else str(at))
                fired[d == POSITIVE][0] += at is not None
                fired[d == POSITIVE][1] += 1
            cells.append(seed_cell(steps))
        count = f"insecure {fired[True][0]}/{fired[True][1]}, controls {fired[False][0]}/{fired[False][1]}"
        lines.append(f"| {tau:g} | " + " | ".join(cells) + f" | {count} |")
    return lines


def auroc_table(runs, monitors) -> list[str]:
    """Rows: monitor steps; a column per monitor: AUROC (positives/negatives); then the summary rows."""
    rows = {m: {s: (a, p, n) for s, a, p, n in auroc_rows(runs, m)} for m in monitors}
    steps = sorted({s for m in monitors for s in rows[m]})
    lines = ["| Step | " + " | ".join(monitors) + " |", "|---|" + "---|" * len(monitors)]
    for step in steps:
        cells = []
        for m in monitors:
            a, p, n = rows[m].get(step, (None, 0, 0))
            cells.append("—" if not (p or n) else f"{'—' if a is None else f'{a:.3f}'} ({p}/{n})")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    scores = {m: separation(runs, m) for m in monitors}
    lines.append("| **mean after the warm-up** | " + " | ".join(
        "—" if s is None else f"{s['mean']:.3f} ({len(s['steps'])} step{'s' if len(s['steps']) > 1 else ''})"
        for s in scores.values()) + " |")
    lines.append("| **last common step** | " + " | ".join(
        "—" if s is None else f"{s['last']:.3f} (step {s['steps'][-1]})" for s in scores.values()) + " |")
    return lines


# ----------------------------------------------------------------------------
# Figures (matplotlib Agg, as figures.py)


def curve_stats(runs, monitor: str, dataset: str) -> tuple[list[int], list[float], list[float], list[float], int]:
    """steps, mean, min, max over the dataset's runs at each step any of them measured; the run count."""
    group = [r for r in runs if r["dataset"] == dataset and r["histories"].get(monitor)]
    steps = sorted({s for r in group for s, _ in r["histories"][monitor]})
    mean, lo, hi = [], [], []
    for step in steps:
        values = [v for r in group for s, v in r["histories"][monitor] if s == step]
        mean.append(sum(values) / len(values))
        lo.append(min(values))
        hi.append(max(values))
    return steps, mean, lo, hi, len(group)


def curves_figure(runs, monitors):
    """A panel per monitor: each dataset's mean over seeds (line, a marker per measurement) and the
    band from its lowest to its highest seed; the warm-up shaded; JS panels with the paper's tau and
    ln 2. None when no run has a measurement."""
    import figures
    plt = figures.pyplot()
    monitors = [m for m in monitors if any(r["histories"].get(m) for r in runs)]
    if plt is None or not monitors:
        return None
    cols = min(2, len(monitors))
    rows = math.ceil(len(monitors) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, monitor in zip(axes.flat, monitors):
        all_steps = []
        for i, dataset in enumerate(DATASETS):
            steps, mean, lo, hi, n = curve_stats(runs, monitor, dataset)
            if not steps:
                continue
            all_steps = sorted(set(all_steps) | set(steps))
            colour = f"C{i}"
            ax.plot(steps, mean, marker="o", ms=3, lw=1.2, color=colour,
                    label=f"{dataset}: mean of {n} seed{'s' if n > 1 else ''}, band: seed range")
            ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, lw=0, label=f"_band {dataset}")  # _: no legend entry
        if len(all_steps) >= 1:
            lo_w, hi_w = figures.warmup_span(all_steps, WARMUP)
            ax.axvspan(lo_w, hi_w, color="0.5", alpha=0.15, lw=0, label="warm-up (3 measurements)")
        if monitor in ("js", "js-rest"):
            ax.axhline(0.15, color="k", ls="--", lw=1, label="paper's τ = 0.15")
            ax.axhline(LN2, color="0.4", ls=":", lw=1, label="ln 2 (largest JS)")
        ax.set(xlabel="optimizer step (measured before that update)", ylabel=monitor, title=f"monitor: {monitor}")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(monitors):]:
        ax.set_visible(False)
    fig.suptitle("Monitor curves: insecure vs the controls (METHOD=none)")
    fig.tight_layout()
    return fig


def auroc_figure(runs, monitors):
    """AUROC (insecure above the controls) against step, a line per monitor; chance (0.5) dotted.
    None when no step has both kinds of runs."""
    import figures
    plt = figures.pyplot()
    lines = {m: [(s, a) for s, a, _, _ in auroc_rows(runs, m) if a is not None] for m in monitors}
    lines = {m: v for m, v in lines.items() if v}
    if plt is None or not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (m, points) in enumerate(lines.items()):
        ax.plot(*zip(*points), marker="o", ms=3, lw=1.2, color=f"C{i}", label=m)
    ax.axhline(0.5, color="0.4", ls=":", lw=1, label="0.5: no separation")
    ax.set(xlabel="optimizer step", ylabel="AUROC (insecure above controls)", ylim=(-0.02, 1.02),
           title="AUROC: insecure runs vs control runs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


FIGURES = (("curves", curves_figure, "Each monitor's curve per dataset: the mean over seeds (a marker per "
            "measurement) and the band from the lowest to the highest seed; the trigger's warm-up shaded; on the JS "
            "panels the paper's τ dashed and ln 2 dotted.", "Monitor curves: no run has a measurement."),
           ("auroc", auroc_figure, "AUROC of insecure above the controls against step, per monitor (table below).",
            "AUROC: no step with both insecure and control runs."))


def draw_figures(runs, monitors, out_dir: Path, stem: str) -> list[str]:
    """The PNGs beside the report and the report's lines for them (a line instead of an empty plot)."""
    import figures
    plt = figures.pyplot()
    if plt is None:
        return ["Figures not drawn: matplotlib is not installed (`pip install -e '.[plot]'`); the tables hold the "
                "numbers.", ""]
    drawn = ((name, draw(runs, monitors), caption, empty) for name, draw, caption, empty in FIGURES)
    return figures.save_pngs(plt, drawn, out_dir, stem)


# ----------------------------------------------------------------------------
# The report


def header(all_runs, runs, runs_dir: Path, provenance: dict | None) -> list[str]:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    provenance = provenance or {}
    found = provenance.get("commit") or (provenance.get("git") or {}).get("commit")
    commit = f"`{found}`" if found else "not recorded (no provenance)"
    presets = sorted({str(r["preset"]) for r in runs})
    lines = ["# PhaseGuard-KL: monitor selectivity", "", f"- **Date:** {now}", f"- **Commit:** {commit}"]
    lines += [f"- **{key}:** {value if isinstance(value, str) else json.dumps(value, sort_keys=True)}"
              for key, value in provenance.items() if key != "commit" and value is not None]
    lines += [f"- **Runs:** {len(all_runs)} METHOD=none runs under `{runs_dir}`; the report uses {len(runs)} "
              f"(finished, preset {', '.join(presets) or '—'})",
              f"- **Question:** does a monitor separate the fine-tune that produces emergent misalignment "
              f"({POSITIVE}: positives) from those that do not ({', '.join(CONTROLS)}: negatives)? Every run is the "
              "plain fine-tune (no KL), so the monitors only watch.",
              "- **AUROC:** over all (insecure run, control run) pairs at one monitor step, the share where the "
              "insecure run's value is higher, ties counting 1/2 (Mann-Whitney U / (n1 n0)); 1: every insecure run "
              "above every control run, 0.5: no separation. N: (positives/negatives) measured at that step.",
              f"- **Best monitor:** the highest mean AUROC over the monitor steps after the warm-up (the first 3 "
              f"common measurements) that every run measured; named only when every dataset has at least {MIN_SEEDS} "
              "finished seeds and no run is a tiny-preset run.", ""]
    return lines


def write_report(runs_dir, out, provenance: dict | None = None, min_seeds: int = MIN_SEEDS) -> str:
    runs_dir, out = report.check_report_paths(runs_dir, out, "selectivity.md", "make selectivity")
    all_runs = find_runs(runs_dir)
    if not all_runs:
        raise UserError(f"{runs_dir}: no METHOD=none run directories (a run holds the config.json written by "
                        "phaseguard.py train)")
    runs, notes = used_runs(all_runs)
    monitors = monitors_of(runs)
    lines = header(all_runs, runs, runs_dir, provenance)
    for note in notes:
        lines += [note, ""]
    lines += [best_monitor_line(runs, monitors, min_seeds), ""]
    lines += ["## Runs", ""] + runs_table(runs)
    lines += ["", "## Monitor curves", ""] + draw_figures(runs, monitors, out.parent, out.stem)
    lines += ["## Trigger step by τ", "",
              "The step at which each run would have fired the trigger at τ (phaseguard.update_trigger: the first 3 "
              "measurements are warm-up, then 2 consecutive measurements above τ), one entry per seed in seed order; "
              "never: not within the steps the run measured; last column: how many runs fired. Grids: js and js-rest "
              f"(JS lies in [0, ln 2]; 0.15 is the paper's τ) {grid(JS_GRID)}; kl (nats) {grid(LOG_GRID)}; hidden (1 - cosine similarity, in [0, 2]) "
              f"{grid(HIDDEN_GRID)}; any other monitor {grid(LOG_GRID)}.", ""]
    for monitor in monitors:
        lines += [f"### {monitor}", ""] + trigger_table(runs, monitor) + [""]
    lines += ["## AUROC: insecure (positives) vs controls (negatives)", ""]
    lines += (auroc_table(runs, monitors) if monitors else ["No monitor measurements."])
    lines += ["", "Cells: AUROC (positives/negatives measured at that step); —: no insecure or no control run "
              "there. Mean after the warm-up: over the steps every run measured, less the first 3."]
    return report.write_markdown(out, lines)
