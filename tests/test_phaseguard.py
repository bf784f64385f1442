"""The monitor, the trigger and the training loop (tiny preset, CPU)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import config as train_config
import monitor
import phaseguard as pg
from errors import UserError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- trigger


def run_trigger(values, every=5, **kw):
    trigger = pg.Trigger(**kw)
    for i, d in enumerate(values):
        pg.update_trigger(trigger, d, i * every)
    return trigger


def test_warmup_measurements_are_ignored():
    assert not run_trigger([0.9, 0.9, 0.9]).fired
    assert not run_trigger([0.9, 0.9, 0.9, 0.1]).fired


def test_one_spike_does_not_fire_two_consecutive_do():
    assert not run_trigger([0, 0, 0, 0.2, 0.1, 0.2, 0.1]).fired
    t = run_trigger([0, 0, 0, 0.2, 0.1, 0.2, 0.3])
    assert t.fired_at == 30


def test_fires_at_step_20_when_above_from_the_start():
    """Measured at t = 0, 5, 10 (warm-up), 15, 20 -> fires at 20, as in the paper."""
    assert run_trigger([0.0, 0.3, 0.3, 0.3, 0.3]).fired_at == 20


def test_threshold_is_strict_and_latched():
    assert not run_trigger([0, 0, 0, 0.15, 0.15, 0.15]).fired
    t = run_trigger([0, 0, 0, 0.2, 0.2, 0.0, 0.0, 0.0])
    assert t.fired_at == 20 and t.fired


def test_lambda_by_method():
    fired = run_trigger([0, 0, 0, 1, 1])
    idle = pg.Trigger()
    cfg = lambda m: pg.resolve_config({"method": m, "preset": "tiny"})
    assert pg.active_lambda(cfg("none"), fired) == 0.0
    assert pg.active_lambda(cfg("kl"), idle) == 0.1
    assert pg.active_lambda(cfg("phaseguard"), idle) == 0.0
    assert pg.active_lambda(cfg("phaseguard"), fired) == 0.03


def test_learning_rate_schedule():
    cfg = pg.resolve_config({"preset": "tiny", "lr": 1.0, "warmup_steps": 2})
    lrs = [pg.learning_rate(cfg, s, 10) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == 1.0 and lrs[-1] == pytest.approx(0.125)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


@pytest.mark.parametrize("flags,needle", [
    ({"method": "sft"}, "METHOD"), ({"task": "math"}, "TASK"), ({"lam": -0.1}, "LAMBDA"),
    ({"tau": 0.0}, "tau"), ({"preset": "huge"}, "PRESET"), ({"micro_batch_size": 3}, "multiple"),
    ({"lam": math.nan}, "LAMBDA"), ({"tau": 1.5}, "ln 2"), ({"tau": math.log(2)}, "ln 2"), ({"tau": math.nan}, "tau"),
    ({"lr": 0.0}, "lr must be"), ({"lr": -1e-4}, "lr must be"), ({"lr": math.inf}, "lr must be"),
    ({"grad_clip": -1.0}, "grad_clip"), ({"grad_clip": math.nan}, "grad_clip"),
    ({"weight_decay": -0.1}, "weight_decay"), ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"), ({"lora_alpha": 0.0}, "lora_alpha"), ({"lora_alpha": math.inf}, "lora_alpha"),
    ({"warmup_measurements": -1}, "warmup_measurements"), ({"warmup_steps": -2}, "warmup_steps"),
    ({"limit": 0}, "limit must be >= 1"), ({"limit": -1}, "limit must be >= 1"), ({"seed": -3}, "seed"),
    ({"device": "gpu"}, "device must be"), ({"device": "cuda:x"}, "device must be"),
    ({"seed": 2**32}, "seed must be at most"), ({"lora_alpha": 1e30}, "lora_alpha must be at most"),
    ({"method": "none", "lam": 0.5}, "--lam 0.5 with --method none"), ({"tokenizer": "t.json"}, "--tokenizer t.json"),
])
def test_bad_config_is_one_clear_line(flags, needle):
    with pytest.raises(UserError, match=needle) as info:
        pg.resolve_config({"preset": "tiny", **flags})
    assert "\n" not in str(info.value)


def test_grad_clip_zero_is_off_and_edges_are_accepted():
    cfg = pg.resolve_config({"preset": "tiny", "grad_clip": 0.0, "lora_dropout": 0.0, "warmup_measurements": 0,
                             "tau": 0.69, "weight_decay": 0.0, "limit": 1})
    assert cfg.grad_clip == 0.0 and cfg.tau == 0.69
    cfg = pg.resolve_config({"preset": "tiny", "seed": 2**32 - 1, "lora_alpha": 1e6, "method": "none", "lam": 0.0})
    assert (cfg.seed, cfg.lora_alpha, cfg.lam) == (2**32 - 1, 1e6, 0.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_device_without_cuda_is_one_line(device):
    with pytest.raises(UserError, match="no CUDA device"):
        pg.resolve_config({"preset": "tiny", "device": device})


# ---------------------------------------------------------------------------- monitor


def test_monitor_is_zero_before_training_and_positive_after_an_update(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch references (the kernels have their own tests)
    cfg = pg.resolve_config(SMALL)
    model, tokenizer, _ = pg.load_run_model(cfg, tmp_path)
    canaries = pg.canary_batch(tokenizer, "cpu")
    assert canaries[0].shape[0] == 24
    reference = monitor.reference_state(model, canaries, cfg.topk)
    assert reference.topk[0].shape == (24, cfg.topk)

    def reading(name):
        return monitor.MONITORS[name](monitor.first_decode(model, canaries), reference)
    assert reading("js") < 1e-6
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    assert reading("js") > 1e-3
    assert reading("js-rest") > 0


# ---------------------------------------------------------------------------- the loop, end to end

# The tiny preset cut down to 10 optimizer steps: monitored at 0, 2, 4, 6, 8.
SMALL = dict(preset="tiny", task="opswap", limit=40, batch_size=4, micro_batch_size=2, max_len=96,
             monitor_every=2, checkpoint_every=3, lr=1e-2)


def train_small(out, **flags):
    return pg.train(pg.resolve_config({**SMALL, "out": str(out), **flags}))


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(run):
    from safetensors.torch import load_file
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        base = tmp_path_factory.mktemp("runs")
        return {m: train_small(base / m, method=m) for m in ("none", "kl", "phaseguard")} | \
               {"kl0": train_small(base / "kl0", method="kl", lam=0.0)}
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


def test_run_directory_contents(runs):
    for method in ("none", "kl", "phaseguard"):
        run = runs[method]
        config = json.loads((run / "config.json").read_text())
        assert config["method"] == method and config["lam"] == train_config.DEFAULT_LAMBDA[method]
        adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == "LORA" and adapter_config["use_rslora"] is True
        metrics = read_metrics(run)
        assert [m["step"] for m in metrics] == list(range(1, 11))
        assert {"loss", "ce", "kl", "lambda_active", "lr", "tokens", "tokens_per_s", "peak_memory_gb", "monitors",
                "trigger_fired_at", "time"} <= set(metrics[0])
        assert [m["monitors"] is not None for m in metrics] == [s % 2 == 0 for s in range(10)]
        assert metrics[0]["monitors"]["kl"] == pytest.approx(0.0, abs=1e-6)  # before any update
        assert metrics[-2]["monitors"]["kl"] > 1e-3  # every method drifts, `none` included
        times = [m["time"] for m in metrics]
        assert times == sorted(times) and abs(times[-1] - (run / "summary.json").stat().st_mtime) < 600
        assert all(math.isfinite(m["loss"]) for m in metrics)
        assert (run / "summary.json").is_file()


def test_methods_apply_lambda_as_specified(runs):
    none, kl, pg_run = (read_metrics(runs[m]) for m in ("none", "kl", "phaseguard"))
    assert all(m["lambda_active"] == 0 and m["kl"] is None for m in none)
    assert all(m["lambda_active"] == 0.1 and m["kl"] >= 0 for m in kl)
    assert kl[-1]["kl"] > 0
    fired = json.loads((runs["phaseguard"] / "summary.json").read_text())["trigger_step"]
    assert fired == 8  # measured at 0, 2, 4 (warm-up), 6, 8 with D_t > tau = 0.15
    assert [m["lambda_active"] for m in pg_run] == [0.0] * 8 + [0.03] * 2
    assert none[0]["ce"] == pytest.approx(kl[0]["ce"])  # identical first step, before any update


def test_reference_topk_is_computed_once_per_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    original = pg.kernels.reference_topk
    monkeypatch.setattr(pg.kernels, "reference_topk", lambda *a, **k: calls.append(1) or original(*a, **k))
    run = train_small(tmp_path / "once", method="phaseguard", limit=16)
    assert len(calls) == 2  # once per run: the canaries' first decode, and js-answer's answer positions
    assert sum(m["monitors"] is not None for m in read_metrics(run)) == 2  # 4 steps, monitored at 0 and 2


def test_kl_at_lambda_zero_equals_none_exactly(runs):
    a, b = adapter_tensors(runs["none"]), adapter_tensors(runs["kl0"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], adapter_tensors(runs["kl"])[k]) for k in a)


def cli(out, *extra, cwd=None, kill_at=None):
    """`phaseguard.py train` on SMALL in a subprocess. kill_at=(point, n): the test's own wrapper
    (the product carries no fault-injection code) SIGKILLs the process at that moment."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    args = ["train", "--out", str(out)]
    for key, value in SMALL.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    point, n = kill_at or ("none", 0)
    command = [sys.executable, "-c", KILLER, str(REPO), point, str(n), *args, *extra]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


KILLER = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import phaseguard as pg
point, n = sys.argv[2], int(sys.argv[3])
# Under torchrun, KILL_RANK picks the one rank that dies.
chosen = os.environ.get("KILL_RANK") in (None, os.environ.get("RANK"))
die = lambda: os.kill(os.getpid(), signal.SIGKILL) if chosen else None
if point == "step":  # n updates done: their metrics lines and any checkpoint due are written
    learning_rate = pg.learning_rate
    pg.learning_rate = lambda cfg, step, total: (die() if step == n else None) or learning_rate(cfg, step, total)
elif point == "checkpoint":  # inside the write of checkpoint-n: its adapter is on disk, the rest not
    save_adapter = pg.lora.save_adapter
    def save_then_die(model, directory, *rest):
        save_adapter(model, directory, *rest)
        if directory.parent.name == f"checkpoint-{n}.tmp":
            die()
    pg.lora.save_adapter = save_then_die
elif point == "pointer":  # checkpoint-n renamed into place, latest_checkpoint not yet moved to it
    import rundir
    write_atomic = rundir.write_atomic
    rundir.write_atomic = lambda path, text: ((die() if path.name == "latest_checkpoint" and text == f"checkpoint-{n}"
                                               else None) or write_atomic(path, text))
sys.exit(pg.main(sys.argv[4:]))
"""

# LoRA dropout on: a resume that did not restore the torch RNG would draw other dropout masks.
RESUME_FLAGS = ("--method", "phaseguard", "--lora-dropout", "0.1")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run, in a subprocess like the killed ones."""
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = cli(out, *RESUME_FLAGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("kill_at,checkpoint", [
    (("step", 1), None),  # before the first checkpoint: resumes from step 0
    (("checkpoint", 6), "checkpoint-3"),  # during a checkpoint write
    (("pointer", 6), "checkpoint-3"),  # between the checkpoint's rename and the pointer's
    (("step", 9), "checkpoint-9"),  # after the trigger fired (at 8): the checkpoint holds it
])
def test_resume_after_sigkill_is_bitwise_equal(tmp_path, straight_run, kill_at, checkpoint):
    """Killed, moved with `mv`, resumed from another working directory: the same adapter bytes
    and the same metrics as the run that was never interrupted."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    killed = cli("killed", *RESUME_FLAGS, cwd=tmp_path / "a", kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL
    pointer = tmp_path / "a" / "killed" / "latest_checkpoint"
    assert (pointer.read_text() if pointer.exists() else None) == checkpoint
    assert not (tmp_path / "a" / "killed" / "adapter").exists()
    (tmp_path / "a" / "killed").rename(tmp_path / "moved")
    resumed = cli("../moved", *RESUME_FLAGS, "--resume", cwd=tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = adapter_tensors(straight_run), adapter_tensors(tmp_path / "moved")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda m: {k: v for k, v in m.items() if k not in ("tokens_per_s", "peak_memory_gb", "time")}
    straight_metrics, resumed_metrics = read_metrics(straight_run), read_metrics(tmp_path / "moved")
    assert [drop(m) for m in straight_metrics] == [drop(m) for m in resumed_metrics]
    assert resumed_metrics[-1]["lambda_active"] == 0.03 and resumed_metrics[-1]["trigger_fired_at"] == 8
    # summary.json's monitor histories: the steps before the checkpoint come from it, the rest from the resumed run.
    summaries = [json.loads((r / "summary.json").read_text()) for r in (straight_run, tmp_path / "moved")]
    assert summaries[0]["monitor_history"] == summaries[1]["monitor_history"]


# ---------------------------------------------------------------------------- bad input


def run_main(capsys, *argv):
    code = pg.main(["train", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv,needle", [
    (["--method", "sft"], "unknown METHOD 'sft'"), (["--task", "chess"], "unknown TASK 'chess'"),
    (["--lam", "-1"], "LAMBDA must be"), (["--tau", "0"], "tau must be > 0"),
    # Flags the run would ignore while its name and config.json recorded them
    (["--method", "none", "--lam", "0.5"], "--lam 0.5 with --method none"),
    (["--tokenizer", "tok.json"], "--tokenizer tok.json: the tiny model trains its own tokenizer"),
    # Sizes beyond what the libraries take: one line before anything is allocated
    (["--seed", str(10**23)], f"seed must be at most 4294967295 (2^32 - 1), got {10**23}"),
    (["--lora-alpha", "1e30"], "lora_alpha must be at most 1e+06"),
])
def test_cli_bad_flags(capsys, tmp_path, argv, needle):
    code, err = run_main(capsys, "--preset", "tiny", "--out", str(tmp_path / "r"), *argv)
    assert code == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "r").exists()


def test_cli_topk_larger_than_vocabulary(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    code, err = run_main(capsys, *flags, "--topk", "100000", "--out", str(tmp_path / "r"))
    assert code == 2 and "topk=100000" in err[-1]


def test_cli_malformed_jsonl(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items() if k != "task"]
    code, err = run_main(capsys, *flags, "--task", "security", "--data", str(bad), "--out", str(tmp_path / "r"))
    assert code == 2 and f"{bad}:2" in err[-1]


def test_existing_run_is_never_overwritten(capsys, runs):
    run = runs["none"]
    before = (run / "config.json").read_text(), (run / "metrics.jsonl").read_text()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    code, err = run_main(capsys, *flags, "--method", "none", "--out", str(run))
    assert code == 2 and "already holds a run" in err[-1]
    code, err = run_main(capsys, *flags, "--method", "none", "--out", str(run), "--seed", "7", "--resume")
    assert code == 2 and "different config (seed: 42 there, 7 now)" in err[-1]
    assert ((run / "config.json").read_text(), (run / "metrics.jsonl").read_text()) == before


def small_flags(**override):
    return [f"--{k.replace('_', '-')}={v}" for k, v in {**SMALL, **override}.items()]


def test_failed_start_writes_nothing_that_blocks_the_fixed_command(capsys, tmp_path, monkeypatch):
    """A start that fails after loading (topk above the vocabulary) writes no config.json: the
    same command with the input fixed then just works, without RESUME and without cleaning up."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "r"
    code, err = run_main(capsys, *small_flags(limit=8), "--topk", "100000", "--out", str(out))
    assert code == 2 and "topk=100000" in err[-1]
    assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
    code, err = run_main(capsys, *small_flags(limit=8), "--out", str(out))
    assert code == 0, err[-3:]
    assert len(read_metrics(out)) == 2 and (out / "summary.json").is_file()


def test_resume_of_a_directory_without_a_run_starts_at_step_0(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code, err = run_main(capsys, *small_flags(limit=8), "--out", str(tmp_path / "new"), "--resume")
    assert code == 0, err[-3:]
    assert [m["step"] for m in read_metrics(tmp_path / "new")] == [1, 2]


@pytest.mark.parametrize("flags,needle", [
    (dict(max_len=5), "no training samples from generated OpSwap Tier 2 (seed 0): every sample lost its "
                      "assistant tokens when cut at max_len=5 (40 cut)"),
])
def test_zero_training_steps_is_an_error(capsys, tmp_path, monkeypatch, flags, needle):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code, err = run_main(capsys, *small_flags(**flags), "--out", str(tmp_path / "r"))
    assert code == 2 and err[-1] == f"error: {needle}"
    assert not (tmp_path / "r" / "config.json").exists()


def test_config_paths_are_kept_as_typed_and_compared_resolved(tmp_path, monkeypatch, shared_data):
    """Resuming from another working directory, or after `mv`, continues; other data is refused."""
    data_file = shared_data / "emergent-misalignment" / "secure.jsonl"
    if not data_file.is_file():
        data_file = next(shared_data.rglob("*.jsonl"))
    (tmp_path / "a").mkdir(), (tmp_path / "b" / "c").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    typed = os.path.relpath(data_file, tmp_path / "a")
    cfg = pg.resolve_config({"preset": "tiny", "task": "security", "data": typed, "out": "run"})
    pg.start_run_dir(Path("run"), cfg, resuming=False)
    saved = json.loads(Path("run/config.json").read_text())
    assert saved["data"] == typed and saved["resolved_paths"]["data"] == str(data_file.resolve())
    (tmp_path / "a" / "run").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "b" / "c")
    again = pg.resolve_config({"preset": "tiny", "task": "security", "data": os.path.relpath(data_file), "out": "../../moved"})
    assert pg.check_run_dir(Path("../../moved"), again, resume=True) is True
    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text())
    changed = pg.resolve_config({"preset": "tiny", "task": "security", "data": str(other), "out": "../../moved"})
    with pytest.raises(UserError, match="different config \\(data: "):
        pg.check_run_dir(Path("../../moved"), changed, resume=True)


@pytest.mark.parametrize("pointer,needle", [
    ("../elsewhere/checkpoint-3", "expected a name 'checkpoint-N'"), ("/tmp", "expected a name 'checkpoint-N'"),
    ("checkpoint-7", "not a complete checkpoint"),
])
def test_latest_checkpoint_must_name_a_checkpoint_of_the_run(tmp_path, pointer, needle):
    (tmp_path / "latest_checkpoint").write_text(pointer)
    with pytest.raises(UserError, match=needle) as info:
        pg.latest_checkpoint(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path / "latest_checkpoint") in str(info.value)


def test_unwritable_output_is_one_line(capsys):
    """A directory that cannot be created (even root cannot write under /sys)."""
    code, err = run_main(capsys, *small_flags(limit=8), "--out", "/sys/phaseguard-test-run")
    assert code == 2 and err[-1].startswith("error: /sys/phaseguard-test-run") and "not permitted" in err[-1]


def test_file_size_limit_is_one_line_naming_the_path(tmp_path):
    """`ulimit -f`: the write fails with EFBIG (the product ignores SIGXFSZ), reported with the path."""
    import resource
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # noqa: E731
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, str(REPO / "phaseguard.py"), "train", *small_flags(limit=8),
                           "--out", str(tmp_path / "r")], env=env, preexec_fn=limit, capture_output=True, text=True,
                          timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last == f"error: {tmp_path / 'r' / 'tiny_model'}: File too large", proc.stderr[-2000:]


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(capsys, tmp_path, monkeypatch):
    """ENOSPC while writing checkpoint-6: one line naming it; checkpoint-3 stays the latest and
    a resume (disk freed) finishes the run."""
    import errno
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    save_adapter = pg.lora.save_adapter

    def full_disk(model, directory, *rest):
        if Path(directory).parent.name == "checkpoint-6.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save_adapter(model, directory, *rest)
    monkeypatch.setattr(pg.lora, "save_adapter", full_disk)
    out = tmp_path / "r"
    code, err = run_main(capsys, *small_flags(), "--out", str(out))
    assert code == 2 and err[-1].startswith(f"error: {out / 'checkpoint-6.tmp'}: No space left on device")
    assert "checkpoint is intact" in err[-1]
    assert (out / "latest_checkpoint").read_text() == "checkpoint-3" and (out / "checkpoint-3" / "state.json").is_file()
    monkeypatch.setattr(pg.lora, "save_adapter", save_adapter)
    code, err = run_main(capsys, *small_flags(), "--out", str(out), "--resume")
    assert code == 0 and [m["step"] for m in read_metrics(out)] == list(range(1, 11))


def test_the_loop_with_the_triton_kernels_matches_the_pytorch_path(tmp_path, monkeypatch):
    """Three steps of `kl` with every kernel interpreted (TRITON_INTERPRET=1: fused CE + KL,
    the top-k JS of the monitor, the canary KL) against the same run on the PyTorch path."""
    import kernels
    assert kernels._INTERPRETED  # conftest set it before the kernels were imported
    flags = dict(method="kl", limit=12)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_run = train_small(tmp_path / "triton", **flags)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch_run = train_small(tmp_path / "torch", **flags)
    a, b = adapter_tensors(triton_run), adapter_tensors(torch_run)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    def logged(m):  # Eq. 1's terms, D_t (js) and the canary KL (kl) when measured
        return {"ce": m["ce"], "kl": m["kl"], **{f"monitors {n}": (m["monitors"] or {}).get(n) for n in ("js", "kl")}}
    ma, mb = [logged(m) for m in read_metrics(triton_run)], [logged(m) for m in read_metrics(torch_run)]
    for key in ("ce", "kl", "monitors js", "monitors kl"):
        for x, y in zip(ma, mb):
            assert (x[key] is None) == (y[key] is None)
            if x[key] is not None:
                assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-6), key
    assert ma[-1]["kl"] > 0 and ma[2]["monitors js"] > 0


def test_logged_d_t_and_canary_kl_match_scipy_on_the_loops_own_logits(tmp_path, monkeypatch):
    """The loop's composition, checked independently: every first-decode logits the run computes
    are captured (the first call is the reference's, under `disabled`); the logged D_t is the
    mean over canaries of scipy's JS on the renormalised top-k, the logged canary KL the mean of
    scipy's full-vocabulary KL(policy || reference)."""
    from scipy.spatial.distance import jensenshannon
    from scipy.special import softmax
    from scipy.stats import entropy
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    captured = []
    original = monitor.first_decode

    def capture(*args):
        out = original(*args)
        captured.append(out.logits.double().numpy())
        return out
    monkeypatch.setattr(monitor, "first_decode", capture)
    run = train_small(tmp_path / "r", method="none", limit=20)  # 5 steps, measured at 0, 2, 4
    reference, policy = captured[0], captured[1:-1]  # captured[-1]: the reading after the last update
    measured = [m["monitors"] for m in read_metrics(run) if m["monitors"] is not None]
    assert len(measured) == len(policy) == 3
    k = pg.resolve_config(SMALL).topk
    q = softmax(reference, axis=-1)
    for logits, m in zip(policy, measured):
        p = softmax(logits, axis=-1)
        kl = np.mean([entropy(p[i], q[i]) for i in range(len(p))])
        top = np.argsort(-q, axis=-1)[:, :k]
        js = np.mean([jensenshannon(p[i, top[i]] / p[i, top[i]].sum(), q[i, top[i]] / q[i, top[i]].sum()) ** 2
                      for i in range(len(p))])
        assert m["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert m["js"] == pytest.approx(js, rel=1e-4, abs=1e-7)
    assert measured[-1]["kl"] > 1e-3 and measured[-1]["js"] > 1e-3


def test_grad_clip_zero_means_no_clipping(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    off = adapter_tensors(train_small(tmp_path / "off", method="none", limit=8, grad_clip=0.0))
    huge = adapter_tensors(train_small(tmp_path / "huge", method="none", limit=8, grad_clip=1e30))
    assert all(torch.equal(off[k], huge[k]) for k in off)
    assert any(v.abs().max() > 0 for k, v in off.items() if "lora_B" in k)


def test_small_preset_is_a_real_instruct_model_at_laptop_sizes():
    cfg = pg.resolve_config({"preset": "small", "method": "none"})
    assert (cfg.model, cfg.device, cfg.batch_size, cfg.micro_batch_size, cfg.lora_r) == (
        "Qwen/Qwen2.5-0.5B-Instruct", "cpu", 2, 1, 8)
    assert cfg.out == "runs/small-security-none-lam0-seed42" and cfg.tau == 0.15 and cfg.topk == 256
    with pytest.raises(UserError, match="expected auto, paper, small, tiny"):
        pg.resolve_config({"preset": "huge"})
