"""Running a study's many training runs: the lambda x seed sweep (sweep.py) and the selectivity
study (selectivity.py) each plan a list of runs and hand them here to be turned into configs,
trained or resumed, and, with --gpus (or --jobs on the CPU), run side by side.

Side by side: each run is the study's own command restricted to that run (`--only NAME`) in a
child process that sees only its GPUs (CUDA_VISIBLE_DEVICES) and writes its log into the run
directory; a failed run is reported at the end without stopping the others."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import phaseguard
from config import TrainConfig, resolve_config
from errors import UserError

# ----------------------------------------------------------------------------
# Planning: the study's flag sets and the user's --set settings -> TrainConfigs under runs_dir


def parse_set(item: str) -> tuple[str, object]:
    """One --set KEY=VALUE: the value read as JSON (numbers, true, null), else kept as text."""
    key, sep, value = item.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def add_set_flag(parser):
    """The studies' --set flag: (key, value) pairs, dict() them after parsing."""
    parser.add_argument("--set", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                        help="extra training setting for every run, e.g. --set limit=40")


def check_settings(settings: dict, owned, study: str, study_flags: str):
    """--set keys must be training settings that the study does not set itself (`owned`: those
    its plan and flags set; study_flags: the flags that set them, for the error line)."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in settings:
        if key in owned:
            raise UserError(f"--set {key}: {study} sets {key} itself (use {study_flags})")
        if key not in fields:
            raise UserError(f"--set {key}: not a training setting (one of: "
                            f"{', '.join(f for f in fields if f not in owned)})")


def plan_configs(runs: list[tuple[str, dict]], settings: dict, runs_dir) -> list[TrainConfig]:
    """One config per (label, flags) run: the user's --set settings, then the run's own flags over
    them; each run directory is phaseguard's own name for the run, under runs_dir. Two runs with
    one directory are refused (they would overwrite each other); label names a run in that line."""
    configs, labels = [], {}
    for label, flags in runs:
        try:
            cfg = resolve_config({**settings, **flags})
        except TypeError as err:  # a --set value of the wrong type, e.g. batch_size=abc
            raise UserError(f"--set: a value has the wrong type ({err})") from None
        cfg.out = str(Path(runs_dir) / Path(cfg.out).name)
        if cfg.out in labels:
            raise UserError(f"{label} and {labels[cfg.out]} (seed {cfg.seed}) would both train into {cfg.out}: "
                            "phaseguard.py's run names do not tell them apart")
        labels[cfg.out] = label
        configs.append(cfg)
    return configs


# ----------------------------------------------------------------------------
# One run in this process: trained, or resumed when it has started


def train_or_resume(cfg: TrainConfig, nproc: int = 1):
    """Train cfg's run, resuming it when its directory already holds a config.json (training
    started there); over nproc processes through torchrun when nproc > 1."""
    resume = (Path(cfg.out) / "config.json").is_file()
    if nproc > 1:
        train_with_torchrun(cfg, resume, nproc)
    else:
        phaseguard.train(cfg, resume=resume)


def train_with_torchrun(cfg: TrainConfig, resume: bool, nproc: int):
    """One run over nproc processes (torchrun, data parallel): its config as phaseguard flags."""
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name != "tiny_model" and value is not None:
            flags += [f"--{f.name.replace('_', '-')}", str(value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(Path(__file__).with_name("phaseguard.py")), "train", *flags, *(["--resume"] if resume else [])]
    code = subprocess.run(command).returncode
    if code != 0:
        raise UserError(f"{cfg.out}: training over {nproc} processes failed (torchrun exit {code})")


# ----------------------------------------------------------------------------
# Several runs side by side: one per GPU (or per group of nproc GPUs), or per CPU job


def gpu_groups(gpus: str | None, nproc: int = 1) -> list[str]:
    """'0,1,2,3' with nproc 2 -> ['0,1', '2,3']: the CUDA_VISIBLE_DEVICES of each concurrent run.
    Refused (one line) on a machine without those CUDA devices."""
    if not gpus:
        return []
    ids = [g.strip() for g in gpus.split(",")]
    if not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise UserError(f"GPUS={gpus}: expected distinct GPU indices separated by commas, e.g. 0,1,2,3")
    import torch
    if not torch.cuda.is_available():
        raise UserError(f"GPUS={gpus}: this machine has no CUDA device (run without GPUS)")
    if max(map(int, ids)) >= torch.cuda.device_count():
        raise UserError(f"GPUS={gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if nproc < 1 or len(ids) % nproc:
        raise UserError(f"GPUS={gpus}: {len(ids)} GPUs cannot be cut into groups of NPROC={nproc}")
    return [",".join(ids[i:i + nproc]) for i in range(0, len(ids), nproc)]


def run_side_by_side(jobs: list[tuple[str, list[str], Path]], groups: list[str], poll_s: float = 0.2) -> dict:
    """Run each (name, command, log file) job with CUDA_VISIBLE_DEVICES set to a free group (""
    hides every GPU: a CPU job), at most one job per group at a time, until all are done.
    {name: (exit code, log file)}."""
    pending, running, done = list(jobs), {}, {}
    free = list(groups)
    while pending or running:
        while pending and free:
            name, command, log_path = pending.pop(0)
            group = free.pop(0)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": group}
            print(f"[runs] {name}: started on {f'GPU {group}' if group else 'the CPU'}, log {log_path}",
                  file=sys.stderr)
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            running[name] = (proc, group, log, log_path)
        time.sleep(poll_s)
        for name, (proc, group, log, log_path) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                free.append(group)
                done[name] = (proc.returncode, log_path)
                del running[name]
                print(f"[runs] {name}: {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}",
                      file=sys.stderr)
    return done


def report_failures(done: dict):
    failed = [f"{name} (exit {code}, log {log})" for name, (code, log) in done.items() if code != 0]
    if failed:
        raise UserError(f"{len(failed)} of {len(done)} runs failed: {'; '.join(failed)}")


def child_command(argv: list[str], script, dropped=("--gpus",)) -> list[str]:
    """The study's command line (argv, run by `script`) without the flags in `dropped`: what each
    run's child process runs (with --only NAME added by the study). argparse takes any unambiguous
    prefix of a flag (--gpu, --gp, --g for --gpus), so each prefix of three or more characters is
    dropped too, with its value (the next argument, unless given as --flag=value); a child that
    kept --gpus would fan out again."""
    kept, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 3 and any(flag.startswith(name) for flag in dropped):
            skip = "=" not in arg
        else:
            kept.append(arg)
    return [sys.executable, str(script), *kept]
