"""The monitor, the trigger and the training loop (tiny preset, CPU)."""
import json
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
