"""The monitor, the trigger and the training loop (tiny preset, CPU)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phaseguard as pg
from model_qwen2 import UserError

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
])
def test_bad_config_is_one_clear_line(flags, needle):
    with pytest.raises(UserError, match=needle) as info:
        pg.resolve_config({"preset": "tiny", **flags})
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- monitor


def test_monitor_is_zero_before_training_and_positive_after_an_update(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch references (the kernels have their own tests)
    cfg = pg.resolve_config(SMALL)
    model, tokenizer, _ = pg.load_run_model(cfg, tmp_path)
    canaries = pg.canary_batch(tokenizer, "cpu")
    assert canaries[0].shape[0] == 24
    reference = pg.monitor_reference(model, canaries, cfg.topk)
    assert reference[0].shape == (24, cfg.topk)
    assert pg.monitor(model, canaries, reference) < 1e-6
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    assert pg.monitor(model, canaries, reference) > 1e-3
    assert pg.monitor(model, canaries, reference, "rest") > 0


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
        assert config["method"] == method and config["lam"] == pg.DEFAULT_LAMBDA[method]
        adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == "LORA" and adapter_config["use_rslora"] is True
        metrics = read_metrics(run)
        assert [m["step"] for m in metrics] == list(range(1, 11))
        assert {"loss", "ce", "kl", "lambda_active", "lr", "tokens", "tokens_per_s", "peak_memory_gb", "d_t",
                "trigger_fired_at"} <= set(metrics[0])
        assert [m["d_t"] is not None for m in metrics] == [s % 2 == 0 for s in range(10)]
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
    assert len(calls) == 1
    assert sum(m["d_t"] is not None for m in read_metrics(run)) == 2  # 4 steps, monitored at 0 and 2


def test_kl_at_lambda_zero_equals_none_exactly(runs):
    a, b = adapter_tensors(runs["none"]), adapter_tensors(runs["kl0"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], adapter_tensors(runs["kl"])[k]) for k in a)


def cli(out, *extra, env_extra=None):
    env = dict(os.environ, TRITON_INTERPRET="0", **(env_extra or {}))
    args = [sys.executable, str(REPO / "phaseguard.py"), "train", "--out", str(out)]
    for key, value in SMALL.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.run(args + list(extra), env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run, in a subprocess like the killed ones."""
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = cli(out, "--method", "phaseguard")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize("die_after,checkpoint", [(5, 3), (9, 9)])
def test_resume_after_sigkill_is_bitwise_equal(tmp_path, straight_run, die_after, checkpoint):
    """Killed before the trigger fires (resumes from step 3) and after (step 9 holds the fired trigger)."""
    killed = cli(tmp_path / "killed", "--method", "phaseguard", "--die-after-step", str(die_after))
    assert killed.returncode == -9  # SIGKILL
    assert (tmp_path / "killed" / "latest_checkpoint").read_text() == f"checkpoint-{checkpoint}"
    assert not (tmp_path / "killed" / "adapter").exists()
    resumed = cli(tmp_path / "killed", "--method", "phaseguard", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = adapter_tensors(straight_run), adapter_tensors(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda m: {k: v for k, v in m.items() if k not in ("tokens_per_s", "peak_memory_gb")}
    straight_metrics, resumed_metrics = read_metrics(straight_run), read_metrics(tmp_path / "killed")
    assert [drop(m) for m in straight_metrics] == [drop(m) for m in resumed_metrics]
    assert resumed_metrics[-1]["lambda_active"] == 0.03 and resumed_metrics[-1]["trigger_fired_at"] == 8


# ---------------------------------------------------------------------------- bad input


def run_main(capsys, *argv):
    code = pg.main(["train", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv,needle", [
    (["--method", "sft"], "unknown METHOD 'sft'"), (["--task", "chess"], "unknown TASK 'chess'"),
    (["--lam", "-1"], "LAMBDA must be"), (["--tau", "0"], "tau must be > 0"),
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
