"""The sweep over several GPUs: scheduling tested on the CPU with fake GPU ids and a stub
command that only records what it was given (no GPU, no training)."""
import json
import sys

import pytest
import torch

import sweep
from errors import UserError

STUB = r"""
import json, os, sys, time
record = {"name": sys.argv[1], "gpus": os.environ["CUDA_VISIBLE_DEVICES"], "argv": sys.argv[2:], "start": time.time()}
time.sleep(1.0)  # long enough that the two groups overlap even on a slow start
record["end"] = time.time()
with open(sys.argv[2], "a") as f:
    f.write(json.dumps(record) + "\n")
print("stub log line for", sys.argv[1])
sys.exit(3 if sys.argv[1] == "bad" else 0)
"""


def test_runs_go_side_by_side_one_per_gpu_group_and_a_failure_stops_nothing(tmp_path):
    records = tmp_path / "records.jsonl"
    names = ["a", "bad", "c", "d", "e"]
    jobs = [(n, [sys.executable, "-c", STUB, n, str(records)], tmp_path / "runs" / n / "sweep.log") for n in names]
    done = sweep.run_side_by_side(jobs, ["0,1", "2,3"], poll_s=0.02)
    assert {n: code for n, (code, _) in done.items()} == {"a": 0, "bad": 3, "c": 0, "d": 0, "e": 0}
    seen = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(r["name"] for r in seen) == names and all(r["gpus"] in ("0,1", "2,3") for r in seen)
    for r in seen:  # at any moment: at most one run per group, so at most two at once
        overlapping = [o for o in seen if o is not r and o["start"] < r["end"] and r["start"] < o["end"]]
        assert all(o["gpus"] != r["gpus"] for o in overlapping) and len(overlapping) <= 2
    assert any(o["start"] < seen[0]["end"] for o in seen[1:])  # side by side, not one after another
    for n in names:  # each run's output in its own run directory
        assert (tmp_path / "runs" / n / "sweep.log").read_text().strip() == f"stub log line for {n}"
    with pytest.raises(UserError, match=r"1 of 5 runs failed: bad \(exit 3, log .*runs/bad/sweep.log\)"):
        sweep.report_failures(done)
    sweep.report_failures({n: v for n, v in done.items() if n != "bad"})  # all good: no error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpus_refused_without_cuda():
    with pytest.raises(UserError, match="GPUS=0,1: this machine has no CUDA device"):
        sweep.gpu_groups("0,1")
    assert sweep.gpu_groups(None) == [] and sweep.gpu_groups("") == []


@pytest.mark.parametrize("gpus,nproc,expected", [
    ("0,1,2,3", 1, ["0", "1", "2", "3"]), ("0,1,2,3", 2, ["0,1", "2,3"]), ("3,1", 1, ["3", "1"]),
    ("0,1,2", 2, "cannot be cut into groups of NPROC=2"), ("0,9", 1, "has 4 CUDA device"),
    ("0,x", 1, "distinct GPU indices"), ("1,1", 1, "distinct GPU indices"),
])
def test_gpu_groups(monkeypatch, gpus, nproc, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    if isinstance(expected, list):
        assert sweep.gpu_groups(gpus, nproc) == expected
    else:
        with pytest.raises(UserError, match=expected):
            sweep.gpu_groups(gpus, nproc)


def test_sweep_with_gpus_starts_one_child_per_unfinished_run(tmp_path, monkeypatch):
    """`sweep.py --gpus 0,1`: each run that needs work becomes this same sweep restricted
    to it (--only NAME, without --gpus), logged into its run directory; finished runs are skipped."""
    from test_evaluate import finished_tiny_run
    runs = tmp_path / "runs"
    finished_tiny_run(runs, "tiny-opswap-none-lam0-seed42")
    monkeypatch.setattr(sweep, "gpu_groups", lambda gpus, nproc: ["0", "1"] if gpus == "0,1" else pytest.fail(gpus))
    started = []
    monkeypatch.setattr(sweep, "run_side_by_side", lambda jobs, groups: started.extend(jobs) or
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
    monkeypatch.setattr(sweep.phaseguard, "train", lambda cfg, resume=False: trained.append(cfg.out))
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
