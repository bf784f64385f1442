"""The selectivity report never overstates (issue 19): the permutation p against scipy, the "no monitor
separates" sentence when every AUROC is below 0.5, the design limit of few runs, one model per
report, the figures' content (per-panel scale, tau only in range, insecure on top, distinguishable
lines), and `selectivity.py --jobs N` on the CPU without oversubscribing cores."""
import json
import random
import sys

import numpy as np
import pytest
from scipy.stats import mannwhitneyu, permutation_test

import selectivity as sel
import selectivity_report as selr
import stats
from test_selectivity import STEPS, fake_run, labelled, plan_args

pytestmark = pytest.mark.filterwarnings("ignore")


# ---------------------------------------------------------------------------- the test and its p


def test_one_step_p_is_scipys_exact_mann_whitney():
    rng = random.Random(1)
    for _ in range(30):
        values = rng.sample(range(1000), rng.randint(3, 12))  # distinct: scipy's exact p assumes no ties
        k = rng.randint(1, len(values) - 1)
        pos, neg = [[v] for v in values[:k]], [[v] for v in values[k:]]
        p, how = stats.permutation_p(pos, neg)
        expected = mannwhitneyu(values[:k], values[k:], alternative="greater", method="exact").pvalue
        assert how.startswith("exact") and p == pytest.approx(expected, rel=1e-12)


def test_mean_over_steps_p_is_scipys_permutation_test():
    rng = np.random.default_rng(2)
    runs = np.concatenate([rng.normal(0.3, 1, (4, 3)), rng.normal(0, 1, (6, 3))])  # runs x steps: 4 insecure, 6 controls

    def statistic(x, y):  # the samples are run indices: scipy relabels whole runs
        xs, ys = runs[x.astype(int)], runs[y.astype(int)]
        return np.mean([np.mean(xs[:, s, None] > ys[None, :, s]) for s in range(runs.shape[1])])
    expected = permutation_test((np.arange(4.0), np.arange(4.0, 10.0)), statistic, permutation_type="independent",
                                alternative="greater", n_resamples=np.inf, vectorized=False).pvalue
    p, how = stats.permutation_p(runs[:4].tolist(), runs[4:].tolist())
    assert how == "exact over all 210 labellings" and p == pytest.approx(expected, rel=1e-12)


def test_many_runs_fall_back_to_random_labellings(monkeypatch):
    monkeypatch.setattr(stats, "EXACT_SPLITS", 10)
    monkeypatch.setattr(stats, "MC_DRAWS", 999)
    p, how = stats.permutation_p([[5.0], [6.0], [7.0]], [[1.0], [2.0], [3.0]])
    assert how == "999 random labellings (seed 0)"
    assert 1 / 1000 <= p < 0.2  # the truth is 1/20 = 0.05; (1 + hits) / (1 + draws) never reads 0
    assert stats.smallest_p(3, 3) == 1 / 1000


# ---------------------------------------------------------------------------- the sentence


def runs_with(values: dict, seeds=(42, 123, 456)) -> list[dict]:
    """Runs of every dataset: value(dataset, i) after step 0 for every monitor in `values`."""
    return [{"dataset": d, "seed": s, "preset": "paper", "model": "m",
             "histories": {m: [(t, 0.0 if t == 0 else f(d, i)) for t in STEPS] for m, f in values.items()}}
            for d in sel.DATASETS for i, s in enumerate(seeds)]


def below(d, i):
    return 0.1 + 0.01 * i if d == "insecure" else 0.5 + 0.01 * i


def test_every_auroc_below_half_says_no_monitor_separates():
    runs = runs_with({m: below for m in ("js", "kl", "persona")} | {"js-answer": lambda d, i: 0.3 - 0.01 * i * (d == "insecure")})
    line = selr.best_monitor_line(runs, ["js", "kl", "persona", "js-answer"])
    assert line.startswith("**No monitor separates** insecure from the controls: js AUROC 0.000 (p = 1); "
                           "kl AUROC 0.000 (p = 1); persona AUROC 0.000 (p = 1); js-answer AUROC ")
    assert "best" not in line and "Separating:**" not in line
    # Far below 0.5 is also no separation: "insecure above the controls" is the claim tested.
    assert all(selr.tested_separation(runs, m)["mean"] < 0.5 for m in ("js", "kl", "persona", "js-answer"))


def test_too_few_runs_cannot_separate_and_it_says_so():
    above = {m: (lambda d, i: 1.0 + i if d == "insecure" else 0.1 * i) for m in sel.MONITORS}
    # 2 seeds: 2 insecure vs 6 control runs, C(8, 2) = 28 labellings; six monitors: 0.05 / 6 = 0.00833.
    line = selr.best_monitor_line(runs_with(above, seeds=(42, 123)), list(sel.MONITORS), min_seeds=2)
    assert line.startswith("**No monitor separates**") and "js AUROC 1.000 (p = 0.0357)" in line
    assert "With these N the smallest possible p is 0.0357, above 0.00833: this design cannot show separation." in line
    # 3 seeds: 1 / C(12, 3) = 0.00455 is below 0.00833: a perfect monitor can be called separating.
    three = selr.best_monitor_line(runs_with(above), list(sel.MONITORS))
    assert three.startswith("**Separating:** **js**, **js-rest**, **kl**, **hidden**, **persona**, **js-answer**")
    assert "smallest possible" not in three


# ---------------------------------------------------------------------------- one model per report


def test_runs_of_two_models_are_refused(tmp_path):
    root = tmp_path / "runs"
    for dataset in sel.DATASETS:
        fake_run(root, dataset, 42, {"js": [[0, 0.0]]})
    for run, model in ((root / "r0", "/m/SmolLM2"), (root / "r1", "Qwen/Qwen2.5-0.5B-Instruct")):
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**cfg, "model": model, "revision": None}))
    (root / "r0" / sel.MODEL_FILE).write_text(json.dumps({"model": "/m/SmolLM2", "sha256": "ab" * 32}))
    with pytest.raises(sel.UserError, match=r"runs of 3 models in one directory \(/m/SmolLM2, weights sha256 abab.*"
                                            r"Qwen/Qwen2.5-0.5B-Instruct; not recorded\): give each model its own RUNS"):
        selr.write_report(root, tmp_path / "sel.md")
    for run in ("r2", "r3"):
        cfg = json.loads((root / run / "config.json").read_text())
        (root / run / "config.json").write_text(json.dumps({**cfg, "model": "/m/SmolLM2"}))
    (root / "r1" / "config.json").write_text(json.dumps({**json.loads((root / "r1" / "config.json").read_text()),
                                                        "model": "/m/SmolLM2"}))
    with pytest.raises(sel.UserError, match="runs of 2 models"):  # the same path, other weights: still two
        selr.write_report(root, tmp_path / "sel.md")
    (root / "r0" / sel.MODEL_FILE).unlink()
    text = selr.write_report(root, tmp_path / "sel.md")
    assert "- **Model:** /m/SmolLM2\n" in text


def test_a_run_of_another_model_is_refused_not_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sel.orchestrate.phaseguard, "train", lambda cfg, resume=False: pytest.fail("trained"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    argv = plan_args(tmp_path / "runs", "--model", str(model), "--dry-run")
    assert sel.main(argv) == 0
    plan = sel.plan("tiny", tmp_path / "runs", ("insecure", "opswap"), (42, 123), settings={"model": str(model)})
    identity = sel.model_identity(plan[0][1])
    assert identity["sha256"] == sel.hashlib.sha256(b"config.json\0{}model.safetensors\0weights").hexdigest()
    from test_selectivity import finish
    for _, cfg in plan:
        finish(cfg)
        (sel.Path(cfg.out) / sel.MODEL_FILE).write_text(json.dumps(identity))
    assert sel.main(plan_args(tmp_path / "runs", "--model", str(model))) == 0  # all done: nothing trained
    assert capsys.readouterr().err.count(": done") == 4
    assert sel.main(plan_args(tmp_path / "runs")) == 2  # the preset's model now: refused
    assert f"finished with model={str(model)!r}, this plan asks for 'tiny'" in capsys.readouterr().err
    (model / "model.safetensors").write_bytes(b"other weights")  # the same path, new weights: refused
    assert sel.main(plan_args(tmp_path / "runs", "--model", str(model))) == 2
    assert "trained on weights with sha256 " + identity["sha256"] in capsys.readouterr().err


# ---------------------------------------------------------------------------- the figures


def curve_runs():
    """js: the code datasets at most 0.02, opswap 0.2 (the issue's case); kl and js-rest equal."""
    level = {"insecure": 0.02, "secure": 0.01, "educational": 0.015, "opswap": 0.2}
    return runs_with({"js": lambda d, i: level[d] + 0.001 * i, "js-rest": lambda d, i: level[d] / 10,
                      "kl": lambda d, i: level[d] / 10})


def test_curves_panels_scale_to_their_data_and_draw_insecure_on_top():
    fig = selr.curves_figure(curve_runs(), ["js", "js-rest", "kl"])
    js, js_rest, kl = [ax for ax in fig.axes if ax.get_visible()]
    assert js.get_ylim()[1] < 0.3 and js_rest.get_ylim()[1] < 0.03  # each panel its own scale, not ln 2
    assert labelled(js, "paper's τ = 0.15") and not labelled(js, "ln 2 (largest JS)")  # tau in range there
    assert not labelled(js_rest, "paper's τ = 0.15") and not labelled(js_rest, "ln 2 (largest JS)")
    for ax in (js, js_rest, kl):
        curves = [line for line in ax.get_lines() if "mean of" in line.get_label()]
        assert [line.get_label().split(":")[0] for line in curves] == ["secure", "educational", "opswap", "insecure"]
        assert max(c.get_zorder() for c in curves[:-1]) < curves[-1].get_zorder()  # insecure last and on top
        assert len({(c.get_marker(), c.get_linestyle()) for c in curves}) == 4


def test_equal_aurocs_stay_four_distinguishable_lines():
    runs = curve_runs()
    assert selr.auroc_rows(runs, "js-rest") == selr.auroc_rows(runs, "kl")  # one would cover the other
    fig = selr.auroc_figure(runs, ["js", "js-rest", "kl"])
    lines = [line for line in fig.axes[0].get_lines() if line.get_label() in sel.MONITORS]
    assert [line.get_label() for line in lines] == ["js", "js-rest", "kl"]
    assert len({(line.get_marker(), line.get_linestyle(), line.get_color()) for line in lines}) == 3
    # All six: no two share marker and line style (colour alone would not survive a grey-scale print).
    assert len({(marker, style) for _, marker, style in selr.MONITOR_STYLE.values()}) == len(sel.MONITORS) == 6


# ---------------------------------------------------------------------------- --jobs on the CPU


def test_jobs_run_side_by_side_with_cores_over_jobs_threads(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(sel.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(sel.orchestrate, "run_side_by_side", lambda jobs, groups: started.append((jobs, groups)) or
                        {name: (0, log) for name, _, log in jobs})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = plan_args(tmp_path, "--jobs", "3")
    assert sel.main(argv) == 0
    (jobs, groups), = started
    assert groups == ["", "", ""] and sel.os.environ["OMP_NUM_THREADS"] == "2"  # 8 cores / 3 runs: 2 threads each
    assert len(jobs) == 4
    for name, command, _ in jobs:
        assert command == [sys.executable, sel.__file__, *argv[:-2], "--only", name, "--threads", "2"]
    assert sel.cpu_threads(16) == 1 and sel.cpu_threads(1) == 8
    threads = []
    monkeypatch.setattr(sel, "torch_threads", threads.append)
    monkeypatch.setattr(sel.orchestrate.phaseguard, "train", lambda cfg, resume=False: None)
    assert sel.main([*argv[:-2], "--only", jobs[0][0], "--threads", "2"]) == 0  # a child
    assert threads == [2]


def test_bad_jobs_are_one_line(tmp_path, capsys):
    assert sel.main(plan_args(tmp_path, "--jobs", "0")) == 2
    assert capsys.readouterr().err.strip() == "error: --jobs 0: expected a number >= 1, and not together with --gpus"
