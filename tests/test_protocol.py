"""The paper's protocol, value by value, against what `PRESET=paper` (the default on CUDA) resolves to.

Every value below is typed from ../shared/PAPER.md (section and wording quoted), not read from
the code: a reader who runs `make train` trusts that the defaults are the paper's, and this test
is what holds them. Rows marked "README" are the paper's silences, filled by the choices the
README documents ("Choices where the paper is silent"). A changed default fails with the rows it
changed, by name.
"""
import inspect

import pytest
import torch

import config as train_config
import data
import lora
import phaseguard as pg

# (row, the paper's value, where it says so)
PAPER_TABLE = [
    ("base model", "Qwen/Qwen2.5-7B-Instruct", "4.1: 'We use Qwen2.5-7B-Instruct'"),
    ("LoRA rank r", 32, "4.1: 'rank r = 32'"),
    ("LoRA alpha", 64, "4.1: 'alpha = 64'"),
    ("rank-stabilised LoRA (scale alpha / sqrt(r))", True, "4.1: 'rank-stabilized LoRA (rs-LoRA)'"),
    ("optimizer", "AdamW", "4.1: 'Training uses AdamW'"),
    ("learning rate", 1e-4, "4.1: 'learning rate 1x10^-4'"),
    ("schedule", "linear decay to 0, no warm-up", "4.1: 'linear decay schedule' (README: no warm-up)"),
    ("effective batch size", 16, "4.1: 'effective batch size 16'"),
    ("epochs", 1, "4.1: 'for 1 epoch'"),
    ("canary prompts", 24, "3.2: '|P| = 24'"),
    ("top-k of the truncated JS", 256, "3.2: 'default k = 256'"),
    ("monitor cadence (steps)", 5, "3.2: 'We monitor every 5 training steps'"),
    ("monitor", "js", "3.2 Eq. 2: the truncated JS divergence"),
    ("threshold tau", 0.15, "3.2: 'absolute threshold tau = 0.15'"),
    ("warm-up measurements", 3, "3.2: 'a warmup period of 3 measurements'"),
    ("consecutive measurements above tau", 2, "3.2: 'for 2 consecutive monitoring points'"),
    ("lambda, PhaseGuard-KL", 0.03, "4.1: 'PhaseGuard-KL (lambda = 0.03)'"),
    ("lambda, always-on KL", 0.1, "4.1: 'Always-on KL (lambda = 0.1)'"),
    ("lambda, no-defense SFT", 0.0, "4.1: 'standard fine-tuning without regularization'"),
    ("lambda sweep", (0.01, 0.02, 0.025, 0.03, 0.1), "Table 2"),
    ("Security EM seeds", (42, 123, 456), "4.1: 'Security EM experiments use 3 seeds (42, 123, 456)'"),
    ("OpSwap seeds", (42,), "4.1: 'OpSwap uses 1 seed' (README: 42, the first Security EM seed)"),
    ("default seed", 42, "4.1: the first of the seeds"),
    ("LoRA target modules", set(lora.QWEN2_TARGETS) | {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"}, "README: all seven projections"),
    ("weight decay", 0.0, "README: the paper states none"),
    ("LoRA dropout", 0.0, "README: the paper states none"),
    ("gradient clipping (max norm)", 1.0, "README: the paper states none"),
    ("trigger step with D_t above tau from the start", 20, "Table 1: trigger step 20"),
]


def paper_preset_lora_layers(tmp_path, monkeypatch):
    """The rs-LoRA layers load_run_model injects for the resolved paper config, on a tiny
    stand-in for the 7B weights (load_run_model's own code path, not a copy of its arguments)."""
    cfg = pg.resolve_config({"preset": "paper", "device": "cpu"})
    tiny = pg.resolve_config({"preset": "tiny", "task": "opswap"})
    tiny_dir, _ = pg.build_tiny_model(tiny, [s["messages"][1]["content"] for s in data.opswap_split(2)[0][:64]],
                                      tmp_path / "stand-in")
    monkeypatch.setattr(pg.mq, "resolve_model_dir", lambda *a, **k: tiny_dir)
    monkeypatch.setattr(pg.data, "load_task", lambda *a, **k: None)
    model, _, _ = pg.load_run_model(cfg, tmp_path / "run")
    return lora.lora_layers(model)


def one(values: set):
    """The value every layer shares, or the set when they differ."""
    return next(iter(values)) if len(values) == 1 else values


def resolved_protocol(tmp_path, monkeypatch) -> dict:
    cfg = pg.resolve_config({"preset": "paper", "device": "cpu"})
    layers = paper_preset_lora_layers(tmp_path, monkeypatch)
    lr = [pg.learning_rate(cfg, step, 100) for step in range(100)]
    linear_to_zero = all(abs(lr[s] - cfg.lr * (100 - s) / 100) < 1e-12 for s in range(100))
    trigger = pg.Trigger(cfg.tau, cfg.warmup_measurements, cfg.consecutive)
    for step in range(0, 100, cfg.monitor_every):
        pg.update_trigger(trigger, cfg.tau + 0.01, step)
    return {
        "base model": cfg.model,
        "LoRA rank r": one({layer.r for layer in layers.values()}),
        "LoRA alpha": one({layer.alpha for layer in layers.values()}),
        "rank-stabilised LoRA (scale alpha / sqrt(r))": all(
            layer.use_rslora and layer.scale == pytest.approx(cfg.lora_alpha / layer.r ** 0.5) for layer in layers.values()),
        "optimizer": "AdamW" if "torch.optim.AdamW(" in inspect.getsource(pg.setup_run) else "not AdamW",
        "learning rate": cfg.lr,
        "schedule": "linear decay to 0, no warm-up" if linear_to_zero and cfg.warmup_steps == 0 else f"warm-up {cfg.warmup_steps}",
        "effective batch size": cfg.batch_size,
        "epochs": cfg.epochs,
        "canary prompts": len(data.CANARY_PROMPTS),
        "top-k of the truncated JS": cfg.topk,
        "monitor cadence (steps)": cfg.monitor_every,
        "monitor": cfg.monitor,
        "threshold tau": cfg.tau,
        "warm-up measurements": cfg.warmup_measurements,
        "consecutive measurements above tau": cfg.consecutive,
        "lambda, PhaseGuard-KL": pg.resolve_config({"preset": "paper", "method": "phaseguard"}).lam,
        "lambda, always-on KL": pg.resolve_config({"preset": "paper", "method": "kl"}).lam,
        "lambda, no-defense SFT": pg.resolve_config({"preset": "paper", "method": "none"}).lam,
        "lambda sweep": tuple(train_config.SWEEP_LAMBDAS),
        "Security EM seeds": tuple(train_config.SWEEP_SEEDS),
        "OpSwap seeds": (train_config.OPSWAP_SEED,),
        "default seed": cfg.seed,
        "LoRA target modules": {name.rsplit(".", 1)[-1] for name in layers},
        "weight decay": cfg.weight_decay,
        "LoRA dropout": cfg.lora_dropout,
        "gradient clipping (max norm)": cfg.grad_clip,
        "trigger step with D_t above tau from the start": trigger.fired_at,
    }


def test_the_paper_preset_is_the_papers_protocol(tmp_path, monkeypatch):
    resolved = resolved_protocol(tmp_path, monkeypatch)
    assert set(resolved) == {row for row, _, _ in PAPER_TABLE}
    wrong = [f"{row}: the paper says {value!r} ({where}), the paper preset has {resolved[row]!r}"
             for row, value, where in PAPER_TABLE if resolved[row] != value]
    assert not wrong, "the paper preset departs from the paper:\n" + "\n".join(wrong)


def test_the_paper_preset_is_what_cuda_resolves_to(monkeypatch):
    """`make train` on a CUDA machine (PRESET=auto) gets the paper preset; its run names carry no preset tag."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train_config, "check_device", lambda device: None)
    cfg = train_config.resolve_config({"method": "phaseguard"})
    assert cfg.preset == "paper" and cfg.out == "runs/security-phaseguard-lam0.03-seed42"
    assert train_config.PRESETS["paper"] == {}  # the defaults are the paper's values, nothing overrides them
