"""The sweep's own part of its runs: one child per unfinished run with --gpus (the scheduling
itself, shared with the selectivity study, is tested in test_orchestrate.py), --only, its child's
command line, --set data, and what counts as evaluated. No GPU, no training."""
import sys

import pytest

import orchestrate
import sweep


def test_sweep_with_gpus_starts_one_child_per_unfinished_run(tmp_path, monkeypatch):
    """`sweep.py --gpus 0,1`: each run that needs work becomes this same sweep restricted
    to it (--only NAME, without --gpus), logged into its run directory; finished runs are skipped."""
    from test_evaluate import finished_tiny_run
    runs = tmp_path / "runs"
    finished_tiny_run(runs, "tiny-opswap-none-lam0-seed42")
    monkeypatch.setattr(orchestrate, "gpu_groups", lambda gpus, nproc: ["0", "1"] if gpus == "0,1" else pytest.fail(gpus))
    started = []
    monkeypatch.setattr(orchestrate, "run_side_by_side", lambda jobs, groups: started.extend(jobs) or
                        {name: (0, log) for name, _, log in jobs})
    argv = ["--preset", "tiny", "--runs-dir", str(runs), "--lambdas", "0.03", "--seeds", "42", "--gpus", "0,1"]
    assert sweep.main(argv) == 0
    names = {"tiny-security-none-lam0-seed42", "tiny-security-kl-lam0.1-seed42", "tiny-security-phaseguard-lam0.03-seed42",
             "tiny-opswap-kl-lam0.1-seed42", "tiny-opswap-phaseguard-lam0.03-seed42"}
    assert {name for name, _, _ in started} == names
    for name, command, log in started:
        assert command[:2] == [sys.executable, str(sweep.Path(sweep.__file__).with_name("sweep.py"))]
        assert command[2:] == [*argv[:-2], "--only", name] and log == runs / name / "sweep.log"


def test_only_names_one_run_of_the_sweep(tmp_path, monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(orchestrate.phaseguard, "train", lambda cfg, resume=False: trained.append(cfg.out))
    monkeypatch.setattr(sweep, "evaluate_run", lambda run, args: None)
    argv = ["--preset", "tiny", "--runs-dir", str(tmp_path), "--lambdas", "0.03", "--seeds", "42"]
    assert sweep.main(argv + ["--only", "tiny-opswap-kl-lam0.1-seed42"]) == 0
    assert trained == [str(tmp_path / "tiny-opswap-kl-lam0.1-seed42")]
    assert sweep.main(argv + ["--only", "nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --only nope: not a run of this sweep"


def test_child_command_drops_only_the_gpus_flag():
    assert sweep.child_command(["sweep", "--gpus", "0,1", "--nproc", "2", "--gpus=3"])[2:] == ["sweep", "--nproc", "2"]


def test_set_data_applies_to_the_security_runs_only(tmp_path):
    import argparse
    args = argparse.Namespace(preset="tiny", lambdas=[0.03], seeds=[42], runs_dir=str(tmp_path), set={"data": "secure"})
    configs = sweep.sweep_configs(args)
    assert {c.data for c in configs if c.task == "security"} == {"secure"}
    assert {c.data for c in configs if c.task == "opswap"} == {None}


def test_two_runs_into_one_directory_are_refused(tmp_path, capsys, monkeypatch):
    """A lambda (or seed) given twice plans two runs with one directory: refused before anything
    trains, not trained twice into one run."""
    monkeypatch.setattr(orchestrate.phaseguard, "train", lambda *a, **k: pytest.fail("trained"))
    argv = ["--preset", "tiny", "--runs-dir", str(tmp_path), "--lambdas", "0.03", "0.03", "--seeds", "42"]
    assert sweep.main(argv) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err == (f"error: security phaseguard lam 0.03 and security phaseguard lam 0.03 (seed 42) would both train "
                   f"into {tmp_path / 'tiny-security-phaseguard-lam0.03-seed42'}: phaseguard.py's run names do not "
                   "tell them apart")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("spelled", [["--gpu", "0,1"], ["--gpu=0,1"], ["--gp", "0"], ["--g=3"], ["--gpus", "2"]])
def test_child_command_drops_every_spelling_of_gpus(spelled):
    """argparse reads any unambiguous prefix as --gpus: a child given one would fan out again."""
    assert sweep.child_command(["sweep", *spelled, "--seeds", "42"])[2:] == ["sweep", "--seeds", "42"]


def test_a_failed_or_unscored_evaluation_is_not_done(tmp_path, monkeypatch):
    """results.json of an eval that failed on unscored judgments (it is written, then eval exits 2)
    sends the run back to evaluation; with --rejudge-unscored, so does any unscored answer."""
    import json
    results = tmp_path / "results.json"
    base = {"settings": {}, "security": {"judge": "j", "finetuned": {"answers": 24, "unscored": 3}}}
    results.write_text(json.dumps({**base, "failed": "judge j left 6 of 48 judgments unscored"}))
    assert sweep.needs_judging_again(results, rejudge_unscored=False)
    results.write_text(json.dumps({**base, "failed": None}))
    assert not sweep.needs_judging_again(results, rejudge_unscored=False)
    assert sweep.needs_judging_again(results, rejudge_unscored=True)
    base["security"]["finetuned"]["unscored"] = 0
    results.write_text(json.dumps({**base, "failed": None}))
    assert not sweep.needs_judging_again(results, rejudge_unscored=True)
