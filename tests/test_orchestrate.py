"""orchestrate.py, the running of a study's many runs shared by the sweep and the selectivity
study: the --set check, the configs under runs_dir (the wrong-type line, two runs into one
directory refused), train or resume, and the side-by-side scheduling, tested on the CPU with fake
GPU ids and a stub command that only records what it was given (no GPU, no training)."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

import orchestrate
import phaseguard
from errors import UserError


# ----------------------------------------------------------------------------
# Planning


@pytest.mark.parametrize("study,owned,flags", [
    ("the sweep", ("lam", "seed", "out"), "--lambdas, --seeds, --runs-dir"),
    ("selectivity", ("data", "seed", "max_steps"), "--datasets, --seeds, --max-steps"),
])
def test_the_set_check_names_the_studys_own_flags(study, owned, flags):
    with pytest.raises(UserError) as err:
        orchestrate.check_settings({"limit": 40, "seed": 1}, owned, study, flags)
    assert str(err.value) == f"--set seed: {study} sets seed itself (use {flags})"
    with pytest.raises(UserError) as err:
        orchestrate.check_settings({"nope": 1}, owned, study, flags)
    message = str(err.value)
    assert message.startswith("--set nope: not a training setting (one of: ") and "limit" in message
    listed = message.split("(one of: ")[1].rstrip(")").split(", ")
    assert not set(owned) & set(listed)  # the study's own keys are not offered
    assert set(listed) | set(owned) == {f.name for f in dataclasses.fields(phaseguard.TrainConfig)}
    orchestrate.check_settings({"limit": 40, "lr": 1e-4}, owned, study, flags)  # training settings: accepted


def test_configs_go_under_runs_dir_with_the_settings_and_flags_over_them(tmp_path):
    runs = [("a", {"preset": "tiny", "task": "opswap", "method": "none", "seed": 1}),
            ("b", {"preset": "tiny", "task": "opswap", "method": "kl", "seed": 1, "limit": 7})]
    a, b = orchestrate.plan_configs(runs, {"limit": 40}, tmp_path / "runs")
    assert a.out == str(tmp_path / "runs" / "tiny-opswap-none-lam0-seed1") and a.limit == 40
    assert b.out == str(tmp_path / "runs" / "tiny-opswap-kl-lam0.1-seed1") and b.limit == 7  # the run's own flag wins
    assert not (tmp_path / "runs").exists()  # planning writes nothing


def test_a_value_of_the_wrong_type_is_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        orchestrate.plan_configs([("a", {"preset": "tiny", "task": "opswap", "seed": 1})], {"batch_size": "abc"},
                                 tmp_path)
    assert str(err.value).startswith("--set: a value has the wrong type (")


def test_two_runs_into_one_directory_are_refused(tmp_path):
    flags = {"preset": "tiny", "task": "opswap", "method": "none", "seed": 42}
    with pytest.raises(UserError) as err:
        orchestrate.plan_configs([("first", flags), ("second", {**flags, "limit": 5})], {}, tmp_path)
    assert str(err.value) == (f"second and first (seed 42) would both train into {tmp_path / 'tiny-opswap-none-lam0-seed42'}"
                              ": phaseguard.py's run names do not tell them apart")


# ----------------------------------------------------------------------------
# Train or resume


@pytest.mark.parametrize("started", [False, True])
def test_train_or_resume_resumes_exactly_a_started_run(tmp_path, monkeypatch, started):
    (cfg,) = orchestrate.plan_configs([("a", {"preset": "tiny", "task": "opswap", "seed": 1})], {}, tmp_path)
    if started:
        Path(cfg.out).mkdir()
        (Path(cfg.out) / "config.json").write_text("{}")
    else:
        Path(cfg.out).mkdir()  # a directory without config.json (a failed start) is trained afresh
    trained = []
    monkeypatch.setattr(phaseguard, "train", lambda c, resume=False: trained.append((c, resume)))
    monkeypatch.setattr(orchestrate, "train_with_torchrun", lambda *a: pytest.fail("torchrun with nproc 1"))
    orchestrate.train_or_resume(cfg, 1)
    assert trained == [(cfg, started)]


def test_train_or_resume_goes_through_torchrun_with_nproc(tmp_path, monkeypatch):
    (cfg,) = orchestrate.plan_configs([("a", {"preset": "tiny", "task": "opswap", "seed": 1})], {}, tmp_path)
    Path(cfg.out).mkdir()
    (Path(cfg.out) / "config.json").write_text("{}")
    called = []
    monkeypatch.setattr(phaseguard, "train", lambda *a, **k: pytest.fail("trained in this process"))
    monkeypatch.setattr(orchestrate, "train_with_torchrun", lambda c, resume, nproc: called.append((c, resume, nproc)))
    orchestrate.train_or_resume(cfg, 2)
    assert called == [(cfg, True, 2)]


def test_torchrun_gets_the_config_as_phaseguard_flags(tmp_path, monkeypatch):
    (cfg,) = orchestrate.plan_configs([("a", {"preset": "tiny", "task": "opswap", "seed": 1})], {"limit": 9}, tmp_path)
    commands = []
    monkeypatch.setattr(orchestrate.subprocess, "run", lambda command: commands.append(command) or
                        type("Done", (), {"returncode": 3})())
    with pytest.raises(UserError, match=r"training over 2 processes failed \(torchrun exit 3\)"):
        orchestrate.train_with_torchrun(cfg, True, 2)
    (command,) = commands
    assert command[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(orchestrate.__file__).with_name("phaseguard.py"))]
    assert command[7] == "train" and command[-1] == "--resume"
    flags = dict(zip(command[8:-1:2], command[9:-1:2]))
    assert flags["--limit"] == "9" and flags["--out"] == cfg.out and flags["--seed"] == "1"
    assert "--tiny-model" not in flags


# ----------------------------------------------------------------------------
# The child's command line: the flags that would make a child fan out again, in every spelling


@pytest.mark.parametrize("spelled", [["--gpus", "2"], ["--gpus=3"], ["--gpu", "0,1"], ["--gpu=0,1"], ["--gp", "0"],
                                     ["--g=3"], ["--g", "0"]])
def test_child_command_drops_every_spelling_of_gpus(spelled):
    """argparse reads any unambiguous prefix as --gpus: a child given one would fan out again."""
    command = orchestrate.child_command(["run", *spelled, "--seeds", "42"], "study.py")
    assert command == [sys.executable, "study.py", "run", "--seeds", "42"]


@pytest.mark.parametrize("spelled", [["--jobs", "3"], ["--jobs=3"], ["--job", "3"], ["--jo=3"], ["--j", "2"]])
def test_child_command_drops_every_spelling_of_jobs_when_asked(spelled):
    argv = ["run", "--gp", "0,1", *spelled, "--seeds", "42"]
    assert orchestrate.child_command(argv, "s.py", dropped=("--gpus", "--jobs"))[2:] == ["run", "--seeds", "42"]
    assert orchestrate.child_command(argv, "s.py")[2:] == ["run", *spelled, "--seeds", "42"]  # not asked: kept


def test_child_command_keeps_what_is_not_a_prefix():
    argv = ["--nproc", "2", "--gpus-extra", "x", "--", "--seeds", "42"]  # longer than --gpus; "--" too short
    assert orchestrate.child_command(argv, "s.py")[2:] == argv


# ----------------------------------------------------------------------------
# Side by side


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
    done = orchestrate.run_side_by_side(jobs, ["0,1", "2,3"], poll_s=0.02)
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
        orchestrate.report_failures(done)
    orchestrate.report_failures({n: v for n, v in done.items() if n != "bad"})  # all good: no error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpus_refused_without_cuda():
    with pytest.raises(UserError, match="GPUS=0,1: this machine has no CUDA device"):
        orchestrate.gpu_groups("0,1")
    assert orchestrate.gpu_groups(None) == [] and orchestrate.gpu_groups("") == []


@pytest.mark.parametrize("gpus,nproc,expected", [
    ("0,1,2,3", 1, ["0", "1", "2", "3"]), ("0,1,2,3", 2, ["0,1", "2,3"]), ("3,1", 1, ["3", "1"]),
    ("0,1,2", 2, "cannot be cut into groups of NPROC=2"), ("0,9", 1, "has 4 CUDA device"),
    ("0,x", 1, "distinct GPU indices"), ("1,1", 1, "distinct GPU indices"),
])
def test_gpu_groups(monkeypatch, gpus, nproc, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    if isinstance(expected, list):
        assert orchestrate.gpu_groups(gpus, nproc) == expected
    else:
        with pytest.raises(UserError, match=expected):
            orchestrate.gpu_groups(gpus, nproc)




@pytest.mark.parametrize("item, expected", [
    ("limit=40", ("limit", 40)), ("lora-r=8", ("lora_r", 8)), ("lr=1e-4", ("lr", 1e-4)),
    ("model=some/dir", ("model", "some/dir")), ("persona_layer=null", ("persona_layer", None)),
    ("tokenizer==x", ("tokenizer", "=x")),
])
def test_a_set_value_is_read_as_json_else_kept_as_text(item, expected):
    assert orchestrate.parse_set(item) == expected


@pytest.mark.parametrize("main", ["sweep", "selectivity"])
def test_a_set_without_a_value_is_one_line_from_both_studies(main, capsys):
    import selectivity
    import sweep
    with pytest.raises(SystemExit) as info:
        {"sweep": sweep, "selectivity": selectivity}[main].main(["--set", "limit", "--dry-run"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set expects KEY=VALUE, got 'limit'" in err[0]
