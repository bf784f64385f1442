"""Monitor selectivity (selectivity.py): the AUROC against a hand count and scipy, the trigger steps
on a tau grid through monitor.update_trigger, the report and its figures from synthetic run
directories (config.json and summary.json written by hand), the run plan (finished runs skipped,
interrupted ones resumed, one child per run with GPUS), and `make selectivity` end to end on the
tiny preset."""
import dataclasses
import json
import os
import random
import subprocess
import sys
import time

import matplotlib
import pytest
from scipy.stats import mannwhitneyu

import figures
import monitor
import orchestrate
import phaseguard
import report
import selectivity as sel
import selectivity_report as selr
import stats

matplotlib.use("Agg")

STEPS = list(range(0, 35, 5))  # 0..30: the first 3 are the warm-up, 15-30 the 4 steps after it


def fake_run(root, dataset, seed, histories, preset="paper", finished=True, steps=31, max_steps=None):
    """A METHOD=none run directory as phaseguard.py train leaves it (no weights)."""
    root.mkdir(parents=True, exist_ok=True)
    run = root / f"r{len(list(root.iterdir()))}"  # names say nothing: config.json does
    run.mkdir()
    task = "opswap" if dataset == "opswap" else "security"
    (run / "config.json").write_text(json.dumps({
        "method": "none", "task": task, "data": None if task == "opswap" else dataset, "lam": 0.0, "seed": seed,
        "preset": preset, "max_steps": max_steps, "monitor": "js"}))
    if finished:
        (run / "summary.json").write_text(json.dumps({
            "steps": steps, "planned_steps": 337, "trigger_step": None,
            "monitor": "js", "monitor_history": histories}))
    return run


# Per monitor and dataset: the value of seed i (0, 1, 2) after step 0 (where every monitor is 0).
# js: the same everywhere (AUROC 0.5, all ties); kl: insecure above every control (1); js-rest:
# insecure below every control (0); hidden: above secure, below educational, interleaved with opswap.
VALUES = {
    "js": {d: lambda i: 0.3 for d in sel.DATASETS},
    "kl": {"insecure": lambda i: 1.0 + 0.01 * i, "secure": lambda i: 0.5 + 0.01 * i,
           "educational": lambda i: 0.6 + 0.01 * i, "opswap": lambda i: 0.7 + 0.01 * i},
    "js-rest": {"insecure": lambda i: 0.1 + 0.01 * i, "secure": lambda i: 0.4 + 0.01 * i,
                "educational": lambda i: 0.5 + 0.01 * i, "opswap": lambda i: 0.6 + 0.01 * i},
    "hidden": {"insecure": lambda i: 0.2 + 0.01 * i, "secure": lambda i: 0.1 + 0.01 * i,
               "educational": lambda i: 0.3 + 0.01 * i, "opswap": lambda i: 0.205 + 0.01 * i},
}
# hidden after the warm-up: secure 9 of 9 pairs, educational 0 of 9, opswap 3 of 9 (i > j): 12/27
HIDDEN_AUROC = 12 / 27


def histories(dataset, i):
    return {m: [[s, 0.0 if s == 0 else VALUES[m][dataset](i)] for s in STEPS] for m in VALUES}


def complete_runs(root, seeds=(42, 123, 456), short=None, n_short=1):
    """3 seeds of each dataset (only the first n_short seeds of dataset `short`)."""
    for dataset in sel.DATASETS:
        for i, seed in enumerate(seeds[:n_short] if dataset == short else seeds):
            fake_run(root, dataset, seed, histories(dataset, i))
    return root


# ----------------------------------------------------------------------------
# AUROC


def test_auroc_hand_computed():
    # positives 3, 2, 2 against negatives 1, 2, 4: 3 beats 1 and 2 (2); each 2 beats 1 and ties 2 (1.5 each)
    assert stats.auroc([3, 2, 2], [1, 2, 4]) == pytest.approx(5 / 9)
    assert stats.auroc([2, 3], [0, 1]) == 1.0 and stats.auroc([0, 1], [2, 3]) == 0.0
    assert stats.auroc([1, 1], [1, 1, 1]) == 0.5  # all ties
    assert stats.auroc([5], [1, 5, 9]) == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError):
        stats.auroc([], [1.0])


def test_auroc_is_mann_whitney_u_over_n1_n0():
    rng = random.Random(0)
    for _ in range(50):
        pos = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(rng.randint(1, 6))]
        neg = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(rng.randint(1, 9))]
        u = mannwhitneyu(pos, neg, alternative="two-sided").statistic
        assert stats.auroc(pos, neg) == pytest.approx(u / (len(pos) * len(neg)))


# ----------------------------------------------------------------------------
# Trigger steps


def test_trigger_step_is_phaseguards_trigger(monkeypatch):
    calls = []
    assert selr.update_trigger is monitor.update_trigger  # the loop's own trigger, not a copy
    real = selr.update_trigger
    monkeypatch.setattr(selr, "update_trigger", lambda t, d, s: calls.append((d, s)) or real(t, d, s))
    above = [[s, 0.3] for s in STEPS]
    assert selr.trigger_step(above, 0.15) == 20  # warm-up 0, 5, 10; above at 15 and 20: the paper's step 20
    assert calls[:5] == [(0.3, 0), (0.3, 5), (0.3, 10), (0.3, 15), (0.3, 20)] and len(calls) == 5  # stops when fired
    dip = [[0, 0.0], [5, 0.3], [10, 0.3], [15, 0.3], [20, 0.1], [25, 0.3], [30, 0.3]]
    assert selr.trigger_step(dip, 0.15) == 30  # 15 above, 20 below (count restarts), 25 and 30 above
    assert selr.trigger_step(dip, 0.3) is None  # strictly above tau
    assert selr.trigger_step(dip, 0.15, warmup=0, consecutive=1) == 5
    assert selr.trigger_step([], 0.15) is None


def test_trigger_table_from_synthetic_histories(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "insecure", 42, {"js": [[s, 0.3] for s in STEPS]})
    fake_run(root, "insecure", 123, {"js": [[0, 0.0], [5, 0.3], [10, 0.3], [15, 0.3], [20, 0.1], [25, 0.3], [30, 0.3]]})
    fake_run(root, "opswap", 42, {"js": [[s, 0.12] for s in STEPS]})
    runs, _ = selr.used_runs(selr.find_runs(root))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in selr.trigger_table(runs, "js")}
    assert rows["τ"].startswith("| τ | insecure (seeds 42, 123) | opswap (seeds 42) | runs that fired |")
    assert rows["0.05"] == "| 0.05 | 20, 20 | 20 | insecure 2/2, controls 1/1 |"
    assert rows["0.1"] == "| 0.1 | 20, 30 | 20 | insecure 2/2, controls 1/1 |"  # the dip to 0.1 is not above 0.1
    # Not fired: censored by the run's length, and said so (the last reading's step).
    assert rows["0.15"] == "| 0.15 | 20, 30 | not by 30 | insecure 2/2, controls 0/1 |"
    assert rows["0.3"] == "| 0.3 | not by 30, not by 30 | not by 30 | insecure 0/2, controls 0/1 |"
    assert [float(k) for k in rows if k[0].isdigit()] == list(selr.JS_GRID)
    assert selr.tau_grid("kl") == selr.LOG_GRID and selr.tau_grid("hidden") == selr.HIDDEN_GRID
    assert max(selr.JS_GRID) < selr.LN2 and 0.15 in selr.JS_GRID and max(selr.HIDDEN_GRID) < 2


# ----------------------------------------------------------------------------
# The report


def test_complete_report_names_the_best_monitor(tmp_path):
    root = complete_runs(tmp_path / "runs")
    runs, notes = selr.used_runs(selr.find_runs(root))
    assert notes == [] and len(runs) == 12
    assert selr.separation(runs, "kl") == {"mean": 1.0, "last": 1.0, "steps": [15, 20, 25, 30]}
    assert selr.separation(runs, "js")["mean"] == 0.5 and selr.separation(runs, "js-rest")["mean"] == 0.0
    assert selr.separation(runs, "hidden")["mean"] == pytest.approx(HIDDEN_AUROC)
    text = selr.write_report(root, tmp_path / "out" / "sel.md")
    # kl: insecure above all 9 controls at every step: 1 of C(12, 3) = 220 labellings is as high.
    assert ("**Separating:** **kl**; all monitors: js AUROC 0.500 (p = 1); js-rest AUROC 0.000 (p = 1); kl AUROC "
            "1.000 (p = 0.00455); hidden AUROC 0.444 (p = ") in text
    assert ("(3 insecure vs 9 control runs, mean AUROC over steps 15-30 (4 steps after the warm-up); one-sided "
            "permutation test of the run labels, exact over all 220 labellings; separating: AUROC > 0.5 and "
            "p ≤ 0.05/4 = 0.0125 (Bonferroni over the monitors))") in text
    controls = text.split("## AUROC: insecure (positives) vs each control")[1]
    assert "| Monitor | vs pooled controls | vs secure | vs educational | vs opswap |" in controls
    # hidden: above secure, below educational, 3 of 9 pairs against opswap; 3 vs 3: p >= 1/20.
    assert ("| hidden | 0.444 (3/9), p = " in controls and "| 1.000 (3/3), p = 0.05 | 0.000 (3/3), p = 1 | "
            "0.333 (3/3), p = " in controls)
    assert "| kl | 1.000 (3/9), p = 0.00455 | 1.000 (3/3), p = 0.05 | 1.000 (3/3), p = 0.05 | 1.000 (3/3), p = 0.05 |" in controls
    table = text.split("## AUROC by step")[1]
    assert "| Step | js | js-rest | kl | hidden |" in table
    assert "| 0 | 0.500 (3/9) | 0.500 (3/9) | 0.500 (3/9) | 0.500 (3/9) |" in table  # step 0: every monitor 0
    assert "| 30 | 0.500 (3/9) | 0.000 (3/9) | 1.000 (3/9) | 0.444 (3/9) |" in table
    assert "| **mean after the warm-up** | 0.500 (4 steps) | 0.000 (4 steps) | 1.000 (4 steps) | 0.444 (4 steps) |" in table
    assert "| insecure | positive" in text and "| 42, 123, 456 | 31 (337) | 30 |" in text
    for name in ("curves", "auroc"):
        assert f"![{name}](sel_{name}.png)" in text
        assert (tmp_path / "out" / f"sel_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### hidden" in text and "0.0003, 0.001" in text


def test_a_tie_names_both():
    runs = [{"dataset": d, "seed": s, "preset": "paper",
             "histories": {m: [[t, 1.0 if d == "insecure" else 0.5] for t in STEPS] for m in ("kl", "hidden")}}
            for d in sel.DATASETS for s in (1, 2, 3)]
    assert "**Separating:** **kl**, **hidden**; all monitors: kl AUROC 1.000 (p = 0.00455); hidden AUROC 1.000 (p = 0.00455)" \
        in selr.best_monitor_line(runs, ["kl", "hidden"])


def test_one_seed_says_what_is_missing(tmp_path):
    root = complete_runs(tmp_path / "runs", short="secure")
    text = selr.write_report(root, tmp_path / "sel.md")
    assert "**Which monitor separates best: not decided**; missing: secure: 1 of 3 seeds." in text
    assert "then js" not in text
    text = selr.write_report(complete_runs(tmp_path / "two", short="opswap", n_short=2), tmp_path / "two.md")
    assert "**Which monitor separates best: not decided**; missing: opswap: 2 of 3 seeds." in text
    root = tmp_path / "one"
    for dataset in ("insecure", "opswap"):
        fake_run(root, dataset, 42, histories(dataset, 0))
    text = selr.write_report(root, tmp_path / "one.md")
    assert ("missing: insecure: 1 of 3 seeds; secure: 0 of 3 seeds; educational: 0 of 3 seeds; opswap: 1 of 3 seeds."
            in text)
    assert "| secure | control: the same coding tasks with secure code | — | — |" in text


def test_unfinished_other_and_tiny_runs(tmp_path):
    root = complete_runs(tmp_path / "runs")
    fake_run(root, "secure", 7, histories("secure", 0), finished=False)
    fake_run(root, "insecure", 7, histories("insecure", 0), preset="tiny")
    fake_run(root, "my_data", 42, histories("secure", 0))
    all_runs = selr.find_runs(root)
    runs, notes = selr.used_runs(all_runs)
    assert len(all_runs) == 15 and len(runs) == 12 and {r["seed"] for r in runs} == {42, 123, 456}
    assert notes[0] == "Runs on other data left out: my_data."
    assert notes[1].startswith("1 unfinished run (no summary.json) left out: r")
    assert notes[2].startswith("1 tiny-preset run left out")
    tiny = tmp_path / "tiny"
    for dataset in sel.DATASETS:
        for seed in (1, 2, 3):
            fake_run(tiny, dataset, seed, histories(dataset, 0), preset="tiny")
    text = selr.write_report(tiny, tmp_path / "tiny.md")
    assert "**TINY PRESET runs" in text and "not decided**; missing: tiny-preset runs." in text


def test_histories_leave_out_values_that_are_not_finite_and_empty_monitors():
    assert selr.histories_of({"monitor_history": {"js": [[5, 0.2], [0, None]], "kl": []}}) == {"js": [(5, 0.2)]}


@pytest.mark.parametrize("cfg,expected", [
    ({"task": "opswap"}, "opswap"), ({"task": "security", "data": None}, "insecure"),
    ({"task": "security", "data": "educational"}, "educational"),
    ({"task": "security", "data": "/x/educational_insecure.jsonl"}, "educational"),
    ({"task": "security", "data": "/x/mine.jsonl"}, "mine")])
def test_dataset_of_a_run(cfg, expected):
    assert selr.dataset_of(cfg) == expected


# ----------------------------------------------------------------------------
# Figures


def labelled(ax, label):
    return [line for line in ax.get_lines() if line.get_label() == label]


def test_curves_figure_content(tmp_path):
    root = tmp_path / "runs"
    for i, seed in enumerate((42, 123, 456)):
        fake_run(root, "insecure", seed, histories("insecure", i))
    fake_run(root, "secure", 42, histories("secure", 0))
    runs, _ = selr.used_runs(selr.find_runs(root))
    fig = selr.curves_figure(runs, selr.monitors_of(runs))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["monitor: js", "monitor: js-rest", "monitor: kl", "monitor: hidden"]
    kl = axes[2]
    (mean,) = labelled(kl, "insecure: mean of 3 seeds, band: seed range")
    assert list(mean.get_xdata()) == STEPS
    assert list(mean.get_ydata()) == pytest.approx([0.0] + [1.01] * 6)  # mean of 1.00, 1.01, 1.02
    (band,) = [c for c in kl.collections if c.get_label() == "_band insecure"]
    at = {}
    for x, y in band.get_paths()[0].vertices:
        at.setdefault(round(x), set()).add(round(y, 9))
    assert at == {0: {0.0}, **{s: {1.0, 1.02} for s in STEPS[1:]}}  # lowest and highest seed
    (secure,) = labelled(kl, "secure: mean of 1 seed, band: seed range")
    assert list(secure.get_ydata()) == pytest.approx([0.0] + [0.5] * 6)
    (tau,) = labelled(axes[0], "paper's τ = 0.15")
    assert list(tau.get_ydata()) == [0.15, 0.15] and not labelled(kl, "paper's τ = 0.15")
    (shade,) = kl.patches  # the warm-up: the measurements at 0, 5, 10
    assert shade.get_x() < 0 < 10 < shade.get_x() + shade.get_width() < 15
    assert "band" not in " ".join(t.get_text() for t in kl.get_legend().get_texts()).split("seed range")[-1]
    assert selr.curves_figure([], sel.MONITORS) is None


def test_auroc_figure_content(tmp_path):
    runs, _ = selr.used_runs(selr.find_runs(complete_runs(tmp_path / "runs")))
    fig = selr.auroc_figure(runs, selr.monitors_of(runs))
    pooled, secure, educational, opswap = fig.axes  # the pooled controls, then a panel per control
    assert [ax.get_title() for ax in fig.axes] == ["insecure vs pooled controls (3 vs 9 runs)",
                                                   "insecure vs secure (3 vs 3 runs)", "insecure vs educational (3 vs 3 runs)",
                                                   "insecure vs opswap (3 vs 3 runs)"]
    for monitor, expected in (("kl", 1.0), ("js-rest", 0.0), ("hidden", HIDDEN_AUROC), ("js", 0.5)):
        (line,) = labelled(pooled, monitor)
        assert list(line.get_xdata()) == STEPS
        assert list(line.get_ydata()) == pytest.approx([0.5] + [expected] * 6)
    for ax, expected in ((secure, 1.0), (educational, 0.0), (opswap, 1 / 3)):  # hidden against each control
        assert list(labelled(ax, "hidden")[0].get_ydata()) == pytest.approx([0.5] + [expected] * 6)
    # Coinciding lines stay distinguishable: every monitor its own marker and line style.
    styles = [(line.get_marker(), line.get_linestyle()) for line in pooled.get_lines() if line.get_label() in sel.MONITORS]
    assert len(styles) == 4 and len(set(m for m, _ in styles)) == 4 and len(set(ls for _, ls in styles)) == 4
    (chance,) = labelled(pooled, "0.5: no separation")
    assert list(chance.get_ydata()) == [0.5, 0.5]
    only_insecure = [r for r in runs if r["dataset"] == "insecure"]
    assert selr.auroc_figure(only_insecure, sel.MONITORS) is None


def test_without_matplotlib_the_report_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "pyplot", lambda: None)
    text = selr.write_report(complete_runs(tmp_path / "runs"), tmp_path / "sel.md")
    assert "Figures not drawn: matplotlib is not installed" in text and "![" not in text and "## AUROC" in text


# ----------------------------------------------------------------------------
# What both reports share (report.py): the runs found by config.json, the provenance lines


def test_both_reports_find_the_runs_and_pass_over_checkpoints_and_tiny_models(tmp_path):
    root = complete_runs(tmp_path / "runs")
    runs = sorted(p for p in root.iterdir())
    for run in runs[:2]:  # a checkpoint holding a copy of its run's config, and the tiny preset's model
        (run / "checkpoint-5" / "adapter").mkdir(parents=True)
        (run / "checkpoint-5" / "config.json").write_text((run / "config.json").read_text())
        (run / "checkpoint-5" / "adapter" / "config.json").write_text((run / "config.json").read_text())
        (run / "tiny_model").mkdir()
        (run / "tiny_model" / "config.json").write_text("{not json: a model's config is never read")
    (root / "notes").mkdir()
    (root / "notes" / "config.json").write_text(json.dumps({"method": "none", "task": "opswap"}))  # not a run's
    found = report.find_run_dirs(root)
    assert [run for run, _ in found] == runs and all(cfg["method"] == "none" for _, cfg in found)
    assert [r["dir"] for r in selr.find_runs(root)] == runs
    assert [r["dir"] for r in report.find_runs(root)] == runs


def test_a_config_that_does_not_parse_is_one_line_in_both_reports(tmp_path, capsys):
    root = complete_runs(tmp_path / "runs")
    broken = sorted(root.iterdir())[3] / "config.json"
    broken.write_text('{"method": "none",')
    assert selr.main(["--runs-dir", str(root), "--out", str(tmp_path / "sel.md")]) == 2
    assert report.main(["--runs-dir", str(root), "--out", str(tmp_path / "r.md")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and errors[0] == errors[1] and errors[0].startswith(f"error: {broken}: cannot read (")
    assert not (tmp_path / "sel.md").exists() and not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("name, content, expected", [
    ("config.json", b'{"method": "none", "task": "\xff"}', "not valid UTF-8"),
    ("summary.json", b"[1, 2]", "the file is [1, 2], expected an object"),
])
def test_a_run_file_of_the_wrong_kind_is_one_line_in_both_reports(tmp_path, capsys, name, content, expected):
    """Bytes that are not UTF-8, or a summary that is not an object: one line naming the file, from
    both reports, and no report written."""
    root = complete_runs(tmp_path / "runs")
    broken = sorted(root.iterdir())[3] / name
    broken.write_bytes(content)
    assert selr.main(["--runs-dir", str(root), "--out", str(tmp_path / "sel.md")]) == 2
    assert report.main(["--runs-dir", str(root), "--out", str(tmp_path / "r.md")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith(f"error: {broken}") and expected in e for e in errors), errors
    assert not (tmp_path / "sel.md").exists() and not (tmp_path / "r.md").exists()


def test_selectivity_report_py_is_the_command_that_writes_the_report(tmp_path, capsys):
    """`python selectivity_report.py` (selr.main): the report and its provenance header, exit 0."""
    out = tmp_path / "sel.md"
    assert selr.main(["--runs-dir", str(complete_runs(tmp_path / "runs")), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# PhaseGuard-KL: monitor selectivity") and "- **Commit:**" in text and "## AUROC" in text
    assert capsys.readouterr().err.strip() == f"[selectivity] wrote {out}"


def test_the_selectivity_header_has_the_reports_provenance_lines(tmp_path):
    """The same Date, Commit (a dirty tree marked) and provenance lines as the results report."""
    provenance = {"time": "2026-12-02T20:00:00Z", "git": {"commit": "def5678", "dirty": True},
                  "versions": {"torch": "2.13.0"}, "model": None}
    text = selr.write_report(complete_runs(tmp_path / "runs"), tmp_path / "sel.md", provenance)
    head = text.split("- **Runs:**")[0].splitlines()
    assert head[:3] == ["# PhaseGuard-KL: monitor selectivity", "", "- **Model:** not recorded"]
    shared = report.provenance_lines(provenance)
    assert [line for line in head[3:] if not line.startswith("- **Date:**")] == [
        line for line in shared if not line.startswith("- **Date:**")] == [
        "- **Commit:** `def5678+dirty`", "- **time:** 2026-12-02T20:00:00Z", '- **versions:** {"torch": "2.13.0"}']
    assert head[3].startswith("- **Date:** ") and head[3].endswith(" UTC")
    assert report.provenance_lines(None)[1] == "- **Commit:** not recorded (no provenance)"
    assert report.provenance_lines({"commit": "abc"}, ["a1", "b2"])[1] == (
        "- **Commit:** `abc`; the runs were evaluated at `a1`, `b2`")


# ----------------------------------------------------------------------------
# Running: the plan, finished runs skipped, one child per run with GPUS


def plan_args(tmp_path, *extra):
    return ["--preset", "tiny", "--runs-dir", str(tmp_path), "--datasets", "insecure", "opswap",
            "--seeds", "42", "123", *extra]


def finish(cfg, **changes):
    """Leave a finished run of cfg (config.json as training writes it, and summary.json)."""
    from pathlib import Path
    run = Path(cfg.out)
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), **changes}))
    (run / "summary.json").write_text("{}")


def test_run_skips_finished_runs_and_resumes_started_ones(tmp_path, monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(phaseguard, "train", lambda cfg, resume=False: trained.append((cfg.out, resume)))
    plan = sel.plan("tiny", tmp_path, ("insecure", "opswap"), (42, 123))
    assert [d for d, _ in plan] == ["insecure", "insecure", "opswap", "opswap"]
    assert all(cfg.method == "none" and cfg.lam == 0 and str(tmp_path) == str(sel.Path(cfg.out).parent)
               for _, cfg in plan)
    finish(plan[0][1])
    started = sel.Path(plan[2][1].out)
    started.mkdir()
    (started / "config.json").write_text("{}")
    assert sel.main(plan_args(tmp_path)) == 0
    assert trained == [(plan[1][1].out, False), (plan[2][1].out, True), (plan[3][1].out, False)]
    err = capsys.readouterr().err
    assert f"{plan[0][1].out} (insecure, seed 42): done" in err and f"{plan[2][1].out} (opswap, seed 42): resume" in err


@pytest.mark.skipif(not hasattr(phaseguard.TrainConfig, "max_steps"), reason="needs phaseguard's --max-steps")
def test_a_finished_run_of_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(phaseguard, "train", lambda cfg, resume=False: pytest.fail("trained"))
    plan = sel.plan("tiny", tmp_path, ("insecure",), (42,), max_steps=4)
    finish(plan[0][1], max_steps=8)
    assert sel.main(["--preset", "tiny", "--runs-dir", str(tmp_path), "--datasets", "insecure",
                     "--seeds", "42", "--max-steps", "4"]) == 2
    assert capsys.readouterr().err.strip() .endswith(
        "finished with max_steps=8, this plan asks for 4: move the run away or choose another RUNS")


def test_two_runs_with_one_name_are_refused(tmp_path, monkeypatch):
    real = orchestrate.resolve_config
    named = []

    def without_data(flags):  # a phaseguard that names runs without their data
        cfg = real(flags)
        cfg.out = f"runs/{cfg.task}-seed{cfg.seed}"
        named.append(cfg.out)
        return cfg
    monkeypatch.setattr(orchestrate, "resolve_config", without_data)  # where plan_configs looks it up
    with pytest.raises(sel.UserError, match="secure and insecure .seed 42. would both train into"):
        sel.plan("tiny", tmp_path, ("insecure", "secure"), (42,))
    assert named == ["runs/security-seed42"] * 2  # the stub named both, and the second was refused


def test_bad_flags_are_one_line(tmp_path, capsys):
    for extra, message in (([], "unknown dataset 'nope'"), (["--set", "seed=1"], "--set seed: selectivity sets seed"),
                           (["--set", "nope=1"], "--set nope: not a training setting")):
        argv = ["--preset", "tiny", "--runs-dir", str(tmp_path), "--datasets",
                "nope" if not extra else "opswap", *extra]
        assert sel.main(argv) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: {message}")
    assert selr.main(["--runs-dir", str(tmp_path / "none")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_gpus_start_one_child_per_unfinished_run(tmp_path, monkeypatch):
    monkeypatch.setattr(orchestrate, "gpu_groups", lambda gpus, nproc: {"0,1": ["0", "1"], None: []}[gpus])
    started = []
    monkeypatch.setattr(orchestrate, "run_side_by_side", lambda jobs, groups: started.extend(jobs) or
                        {name: (0, log) for name, _, log in jobs})
    plan = sel.plan("tiny", tmp_path, ("insecure", "opswap"), (42, 123))
    finish(plan[0][1])
    argv = plan_args(tmp_path, "--gpus", "0,1")
    assert sel.main(argv) == 0
    names = [sel.Path(cfg.out).name for _, cfg in plan[1:]]
    assert [name for name, _, _ in started] == names
    for name, command, log in started:
        assert command == [sys.executable, sel.__file__, *argv[:-2], "--only", name]
        assert log == tmp_path / name / "selectivity.log"
    trained = []
    monkeypatch.setattr(phaseguard, "train", lambda cfg, resume=False: trained.append(cfg.out))
    assert sel.main([*argv[:-2], "--only", names[0]]) == 0  # what a child does: that run alone
    assert trained == [str(tmp_path / names[0])]


# ----------------------------------------------------------------------------
# make selectivity, end to end (tiny preset, 2 datasets x 2 seeds, 4 steps)


@pytest.mark.skipif(not hasattr(phaseguard.TrainConfig, "max_steps"), reason="needs phaseguard's --max-steps and monitors")
def test_make_selectivity_end_to_end(tmp_path, shared_data):
    runs, report = tmp_path / "runs", tmp_path / "out" / "sel.md"
    make = ["make", "-s", "-C", str(sel.Path(sel.__file__).parent), "selectivity", "-o", ".venv/.installed-test",
            "EXTRAS=test", f"PY={sys.executable}", "PRESET=tiny", "DATASETS=insecure opswap", "SEEDS=42 123", "STEPS=4",
            "SELECTIVITY_ARGS=--set limit=48 --set monitor_every=1", f"RUNS={runs}", f"SELECTIVITY_REPORT={report}"]
    # The runs' kernels as a user's: the PyTorch references on the CPU, not the Triton interpreter
    # that conftest switches on for the kernel tests (ten times slower).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(make, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = sorted(runs.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["tiny-opswap-none-lam0-seed123", "tiny-opswap-none-lam0-seed42",
                                                  "tiny-security-none-lam0-seed123", "tiny-security-none-lam0-seed42"]
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["steps"] == 4 and summary["planned_steps"] == 6
        assert {m: [s for s, _ in h] for m, h in summary["monitor_history"].items()} == {
            m: [0, 1, 2, 3, 4] for m in sel.MONITORS}  # 4: the reading after the last update
    text = report.read_text()
    assert "**TINY PRESET runs" in text
    assert ("not decided**; missing: insecure: 2 of 3 seeds; secure: 0 of 3 seeds; educational: 0 of 3 seeds; "
            "opswap: 2 of 3 seeds; tiny-preset runs.") in text
    assert "| 4 | " in text.split("## AUROC by step")[1] and "(2/2)" in text.split("## AUROC by step")[1]
    assert "- **Model:** tiny (a random model built per run from its seed)" in text
    assert (report.parent / "sel_curves.png").is_file() and (report.parent / "sel_auroc.png").is_file()
    t0 = time.perf_counter()
    again = subprocess.run(make, capture_output=True, text=True, timeout=120, env=env)  # finished: nothing trained again
    assert again.returncode == 0 and again.stderr.count(": done") == 4 and "[phaseguard]" not in again.stderr
    assert time.perf_counter() - t0 < 60
