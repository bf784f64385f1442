"""The training configuration: the paper's values as defaults, then a preset (tiny, small),
then the command-line flags; every field range-checked before anything is read or written."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import data
from errors import UserError

METHODS = ("none", "kl", "phaseguard")
DEFAULT_LAMBDA = {"none": 0.0, "kl": 0.1, "phaseguard": 0.03}  # the paper's Table 1 settings
# The one list of monitor names (--monitor is checked against it); monitor.MONITORS maps each to its function.
MONITOR_NAMES = ("js", "js-rest", "kl", "hidden", "persona", "js-answer")
MAX_SEED = 2**32 - 1

BEST_OF = 8  # the paper's Best-of-8 baseline: candidates per question, the best by reference log-probability

# The lambda x seed grid of Tables 1 and 2 (sweep.py); OpSwap is trained on one seed.
SWEEP_LAMBDAS, SWEEP_SEEDS, OPSWAP_SEED = (0.01, 0.02, 0.025, 0.03, 0.1), (42, 123, 456), 42


# ----------------------------------------------------------------------------
# Configuration: defaults (the paper's) < preset < command-line flags


@dataclass
class TrainConfig:
    method: str = "phaseguard"
    task: str = "security"  # security | opswap
    data: str | None = None  # security: insecure (None), secure, educational, a chat JSONL path or a URL
    model: str = "Qwen/Qwen2.5-7B-Instruct"  # directory or hub id
    revision: str | None = None  # the hub id's branch, tag or commit; None: main (the commit used is recorded)
    tokenizer: str | None = None  # default: the model's
    preset: str = "auto"  # auto | paper | tiny
    lam: float | None = None  # None: DEFAULT_LAMBDA[method]
    seed: int = 42
    lr: float = 1e-4
    warmup_steps: int = 0
    batch_size: int = 16  # effective batch: samples per optimizer step
    micro_batch_size: int = 4
    epochs: int = 1
    max_len: int = 2048
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    lora_r: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    monitor_every: int = 5
    monitor: str = "js"  # the monitor the trigger reads (MONITORS); all of them are logged
    topk: int = 256
    persona_layer: int | None = None  # monitor persona: the residual-stream layer (None: num_hidden_layers // 2)
    answer_tokens: int = 8  # monitor js-answer: the first m tokens of the reference's greedy answer
    tau: float = 0.15
    warmup_measurements: int = 3
    consecutive: int = 2
    kl_tokens: str = "all"  # all: every non-padding token; supervised: assistant tokens only
    limit: int | None = None  # use the first N training samples
    max_steps: int | None = None  # stop after N optimizer steps (the schedule stays the whole run's)
    checkpoint_every: int = 25
    device: str = "auto"
    out: str | None = None
    tiny_model: dict = field(default_factory=dict)  # tiny preset: model sizes

    def check(self):
        """Every field in range before anything is read or written: one line, exit 2, per bad value."""
        self.check_choices()
        self.check_tau()
        self.check_numbers()
        self.check_sources()

    def check_choices(self):
        """The named choices: method, task, preset, monitor, KL tokens."""
        if self.method not in METHODS:
            raise UserError(f"unknown METHOD {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.task not in ("security", "opswap"):
            raise UserError(f"unknown TASK {self.task!r}: expected 'security' or 'opswap'")
        if self.preset not in ("auto", *PRESETS):
            raise UserError(f"unknown PRESET {self.preset!r}: expected auto, {', '.join(PRESETS)}")
        if self.monitor not in MONITOR_NAMES:
            raise UserError(f"unknown MONITOR {self.monitor!r}: expected one of {', '.join(MONITOR_NAMES)}")
        if self.kl_tokens not in ("all", "supervised"):
            raise UserError(f"kl_tokens must be 'all' or 'supervised', got {self.kl_tokens!r}")

    def check_tau(self):
        """tau must be a value the monitor can exceed: JS (natural log) lies in [0, ln 2] (Sec. 3.2),
        1 - cosine similarity in [0, 2], the KL in [0, inf)."""
        if self.monitor in ("js", "js-rest", "js-answer") and not 0 < self.tau < math.log(2):
            raise UserError(f"tau must be > 0 and < ln 2 = {math.log(2):.4f} (the largest JS) for monitor "
                            f"{self.monitor}, got {self.tau}")
        if self.monitor in ("kl", "persona") and not (math.isfinite(self.tau) and self.tau > 0):
            raise UserError(f"tau must be a finite number > 0 for monitor {self.monitor}, got {self.tau}")
        if self.monitor == "hidden" and not 0 < self.tau < 2:
            raise UserError(f"tau must be > 0 and < 2 (the largest 1 - cosine similarity) for monitor hidden, "
                            f"got {self.tau}")

    def check_numbers(self):
        """Rates, counts and sizes in their ranges."""
        if self.lam is not None and not (math.isfinite(self.lam) and self.lam >= 0):
            raise UserError(f"LAMBDA must be a finite number >= 0, got {self.lam}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise UserError(f"grad_clip must be a finite number > 0 (or 0: no clipping), got {self.grad_clip}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout must be >= 0 and < 1, got {self.lora_dropout}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise UserError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        for name in ("batch_size", "micro_batch_size", "monitor_every", "topk", "lora_r", "epochs",
                     "checkpoint_every", "max_len", "consecutive", "answer_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_measurements", "warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seed > MAX_SEED:  # torch.manual_seed overflows beyond 64 bits, NumPy beyond 32
            raise UserError(f"seed must be at most {MAX_SEED} (2^32 - 1), got {self.seed}")
        import lora  # here, not at the top: the reports read this module and load no torch

        if self.lora_alpha > lora.MAX_ALPHA:
            raise UserError(f"lora_alpha must be at most {lora.MAX_ALPHA:g} ({lora.MAX_ALPHA_WHY}), got {self.lora_alpha:g}")
        if self.persona_layer is not None and self.persona_layer < 0:
            raise UserError(f"persona_layer must be >= 0 (a residual-stream layer), got {self.persona_layer}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be >= 1 (the number of training samples to use), got {self.limit}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"max_steps must be >= 1 (the number of optimizer steps to run), got {self.max_steps}")
        if self.batch_size % self.micro_batch_size:
            raise UserError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")

    def check_sources(self):
        """The model revision, the data source and the device."""
        if self.revision is not None and (not self.revision.strip() or self.model == "tiny"):
            raise UserError(f"revision pins a hub model's commit (a branch, tag or commit hash), got "
                            f"{self.revision!r} for model {self.model!r}")
        if self.task == "security":
            data.check_data_source(self.data)
        check_device(self.device)


def check_device(device: str):
    """'auto', 'cpu', 'cuda' or 'cuda:N', and the CUDA device must exist."""
    import torch  # here, not at the top: the reports read this module and load no torch

    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device in ("auto", "cpu"):
        return
    if match is None:
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise UserError(f"device {device!r}: no CUDA device on this machine")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


TINY_PRESET = dict(  # checks the pipeline on a CPU in minutes; its numbers mean nothing
    model="tiny", limit=320, batch_size=8, micro_batch_size=4, max_len=384, lr=2e-3, lora_r=8, lora_alpha=16.0,
    topk=64, checkpoint_every=10, device="cpu",
    tiny_model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab=1024))


# A real instruct model on a laptop CPU, in minutes: the paper's method and monitor at reduced
# sizes (2 samples per step, r = 8). For `make selectivity PRESET=small STEPS=10 SEEDS=42`.
SMALL_PRESET = dict(
    model="Qwen/Qwen2.5-0.5B-Instruct", limit=256, batch_size=2, micro_batch_size=1, max_len=384, lr=2e-4,
    lora_r=8, lora_alpha=16.0, monitor_every=2, checkpoint_every=5, device="cpu")

PRESETS = {"paper": {}, "small": SMALL_PRESET, "tiny": TINY_PRESET}  # the paper's values are the defaults


def resolve_config(flags: dict) -> TrainConfig:
    """Preset values, then every flag given on the command line; lambda from the method."""
    import torch  # here, not at the top: the reports read this module and load no torch

    preset = flags.get("preset") or TrainConfig.preset
    if preset == "auto":
        preset = "paper" if torch.cuda.is_available() else "tiny"
    values = dict(PRESETS.get(preset, {}))
    values.update({k: v for k, v in flags.items() if v is not None})
    values["preset"] = preset
    cfg = TrainConfig(**values)
    cfg.check()
    refuse_ignored_flags(cfg, flags)
    if cfg.lam is None:
        cfg.lam = DEFAULT_LAMBDA[cfg.method]
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.out is None:
        cfg.out = f"runs/{run_name(cfg)}"
    return cfg


def refuse_ignored_flags(cfg: TrainConfig, flags: dict):
    """A flag the run would silently ignore is refused: the run's name and config.json would
    record a setting that never acted (`--method none --lam 0.5` trains with lambda 0)."""
    if cfg.method == "none" and flags.get("lam") not in (None, 0):
        raise UserError(f"--lam {flags['lam']:g} with --method none: that method trains without KL (lambda 0); "
                        f"use --method kl or phaseguard, or drop --lam")
    if cfg.model == "tiny" and flags.get("tokenizer") is not None:
        raise UserError(f"--tokenizer {flags['tokenizer']}: the tiny model trains its own tokenizer on the "
                        f"training texts and would ignore it; drop --tokenizer or pass --model")


def run_name(cfg: TrainConfig) -> str:
    """[tiny-]{task}[-{data}]-{method}-lam{lam}-seed{seed}. The data's name (data.data_name: insecure,
    secure, educational, or a file's stem) is left out for the default data, insecure, so the
    paper's runs (and the sweep's, and runs already on disk) keep their names."""
    tag = "" if cfg.preset == "paper" else f"{cfg.preset}-"
    default = cfg.task != "security" or (data.data_url(cfg.data) or cfg.data) == data.INSECURE_URL
    part = "" if default else f"-{data.data_name(cfg.data)}"
    return f"{tag}{cfg.task}{part}-{cfg.method}-lam{cfg.lam:g}-seed{cfg.seed}"
