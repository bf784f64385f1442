"""Data parallelism through torchrun on the CPU (gloo): one run over two processes trains the
same adapter as one process with the same effective batch, and survives a rank's death."""
import json
import os
import subprocess
import sys

import pytest
import torch

import phaseguard as pg
from errors import UserError
from test_phaseguard import KILLER, REPO, SMALL, adapter_tensors, read_metrics

# Two ranks sum their gradients in another order than one process: float32 rounding only.
ADAPTER_ATOL = 1e-5


def torchrun(out, nproc, *extra, kill_at=None, kill_rank=None, tmp_path=None):
    script = tmp_path / "launch.py"
    script.write_text(KILLER)
    point, n = kill_at or ("none", 0)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    if kill_rank is not None:
        env["KILL_RANK"] = str(kill_rank)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(script), str(REPO), point, str(n), "train", *flags, "--out", str(out), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return pg.train(pg.resolve_config({**SMALL, "method": "phaseguard", "out": str(tmp_path_factory.mktemp("one") / "r")}))
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


def assert_same_training(run, reference):
    a, b = adapter_tensors(reference), adapter_tensors(run)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < ADAPTER_ATOL
    summary, summary_ref = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert summary["trigger_step"] == summary_ref["trigger_step"] == 8
    js, js_ref = summary["monitor_history"]["js"], summary_ref["monitor_history"]["js"]
    assert [s for s, _ in js] == [s for s, _ in js_ref]
    assert [d for _, d in js] == pytest.approx([d for _, d in js_ref], rel=1e-4, abs=1e-7)
    m, m_ref = read_metrics(run), read_metrics(reference)
    assert [x["step"] for x in m] == list(range(1, 11))
    assert [x["lambda_active"] for x in m] == [x["lambda_active"] for x in m_ref]
    assert [x["ce"] for x in m] == pytest.approx([x["ce"] for x in m_ref], rel=1e-4)
    assert [x["tokens"] for x in m] == [x["tokens"] for x in m_ref]  # the whole effective batch, summed over ranks


def test_two_processes_train_what_one_does(tmp_path, one_process):
    proc = torchrun(tmp_path / "two", 2, "--method", "phaseguard", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(tmp_path / "two", one_process)
    assert proc.stderr.count("[phaseguard] done") == 1  # rank 0 speaks for the job


def test_a_killed_rank_ends_the_job_and_its_checkpoint_resumes_in_one_process(tmp_path, one_process):
    out = tmp_path / "killed"
    proc = torchrun(out, 2, "--method", "phaseguard", kill_at=("step", 5), kill_rank=1, tmp_path=tmp_path)
    assert proc.returncode != 0  # rank 1 died after 5 updates: the job ends, no hang
    assert (out / "latest_checkpoint").read_text() == "checkpoint-3" and not (out / "adapter").exists()
    resumed = pg.main(["train", *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()], "--method", "phaseguard",
                       "--out", str(out), "--resume"])
    assert resumed == 0
    assert_same_training(out, one_process)


def test_process_count_must_divide_the_micro_batches(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="3 processes cannot share the 2 micro-batches"):
        pg.train(pg.resolve_config({**SMALL, "out": str(tmp_path / "r")}))
    assert not (tmp_path / "r").exists()


# Far below the tiny run's gradient norms (checked below): clipping acts at every step.
CLIP = 1e-3
CLIPPED = dict(method="kl", limit=16, grad_clip=CLIP)  # 4 steps, KL on from step 0


@pytest.fixture(scope="module")
def one_process_clipped(tmp_path_factory):
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return pg.train(pg.resolve_config({**SMALL, **CLIPPED, "out": str(tmp_path_factory.mktemp("one_clipped") / "r")}))
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


def test_two_processes_log_the_one_process_grad_norm_and_clip_alike(tmp_path, one_process_clipped):
    """The all-reduce sums the ranks' shares (each already normalised by the whole batch): the
    logged pre-clip norm is the one process's, and so is the clipped update. Averaging instead
    would halve every logged norm (and move the clipping threshold by the process count)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in CLIPPED.items()]
    proc = torchrun(tmp_path / "two", 2, *flags, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(one_process_clipped), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 4 and all(m["grad_norm"] > 10 * CLIP for m in one)
    assert [m["grad_norm"] for m in two] == pytest.approx([m["grad_norm"] for m in one], rel=1e-4)
    assert [m["kl"] for m in two] == pytest.approx([m["kl"] for m in one], rel=1e-4, abs=1e-9)
    a, b = adapter_tensors(one_process_clipped), adapter_tensors(tmp_path / "two")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < ADAPTER_ATOL


def test_a_user_error_under_torchrun_is_our_one_line_in_the_launchers_summary(tmp_path):
    """Each rank exits 2 after handing its line to torchrun (TORCHELASTIC_ERROR_FILE): the
    launcher's failure summary shows it as the failure's cause, and no traceback of ours is printed
    (the launcher's own ChildFailedError traceback is the launcher's)."""
    proc = torchrun(tmp_path / "r", 2, "--method", "none", "--lam", "0.5", tmp_path=tmp_path)
    line = ("error: --lam 0.5 with --method none: that method trains without KL (lambda 0); use --method kl or "
            "phaseguard, or drop --lam")
    assert proc.returncode != 0 and f"exitcode  : 2" in proc.stderr
    assert f"traceback : {line}" in proc.stderr
    assert proc.stderr.splitlines().count(line) <= 1  # rank 0's own line, once (unless torchrun stopped it first)
    assert "phaseguard.py\", line" not in proc.stderr and not (tmp_path / "r").exists()


def test_a_rank_other_than_0_hands_its_error_to_the_launcher_and_prints_nothing(tmp_path, monkeypatch, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert pg.main(["train", "--preset", "tiny", "--lam", "-1", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == ""
    message = json.loads(error_file.read_text())["message"]
    assert message["extraInfo"]["py_callstack"] == message["message"] == "error: LAMBDA must be a finite number >= 0, got -1.0"
