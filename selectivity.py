"""Selectivity of the drift monitors (issue 13): does a monitor on the canaries tell the fine-tune that
produces emergent misalignment (Betley et al.'s insecure code) from fine-tunes that do not (their
controls `secure` and `educational`, and the benign OpSwap)? The paper's trigger fires at step 20 on
both of its tasks (Sec. 4.4); this measures, for every monitor, how far apart the curves are.

`python selectivity.py` trains METHOD=none (no KL: the plain fine-tune, which every monitor only
watches) on each dataset x seed, for at most --max-steps optimizer steps (default: the whole epoch).
A run is finished when its summary.json exists and is skipped; an interrupted one is resumed; one made
with another model or other monitor settings is refused (IDENTITY, MODEL_FILE). With --gpus the runs go
side by side as in the sweep (orchestrate.gpu_groups, orchestrate.run_side_by_side: one child process per
run, this command with --only NAME, logged into the run directory); with --jobs N, N at a time on the CPU,
each with cores / N torch threads.

`python selectivity_report.py` writes the markdown report and its PNGs beside it:
- per monitor, every dataset's curve (mean over seeds, min-max band over seeds);
- per monitor and tau on a grid (TAU_GRIDS), the step at which each run would have fired the trigger
  (monitor.update_trigger, the paper's warm-up of 3 measurements and 2 consecutive points);
- per monitor, the AUROC of the insecure runs (positives) against each control and the pooled controls
  (negatives), with its N and a one-sided permutation p;
- whether any monitor separates (selectivity_report.best_monitor_line), only when every dataset has at
  least MIN_SEEDS finished seeds (and no run is a tiny-preset run); otherwise what is missing.
`make selectivity` runs both."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import orchestrate
import rundir
from config import TrainConfig
from errors import ArgumentParser, UserError, exit_status, read_json_object
from selectivity_report import (CONTROLS, DATASETS, MIN_SEEDS, MODEL_FILE, MONITORS, POSITIVE, ROLE, SEEDS,
                                read_identity)

OWNS = ("task", "data", "method", "lam", "seed", "preset", "out", "max_steps")  # set by the plan and its flags
OWN_FLAGS = "--datasets, --seeds, --preset, --max-steps, --runs-dir"  # what sets them, for a refused --set
# What else makes a run this plan's run: a finished or started run that differs in one is refused, so
# runs of two models (or two monitor set-ups) are never mixed or skipped as done.
IDENTITY = ("model", "revision", "tokenizer", "topk", "monitor_every", "persona_layer", "answer_tokens")


# ----------------------------------------------------------------------------
# The runs: METHOD=none on each dataset x seed


def dataset_flags(dataset: str) -> dict:
    """The training flags of a dataset: the security task on a named file, or the OpSwap task."""
    return {"task": "opswap"} if dataset == "opswap" else {"task": "security", "data": dataset}


def check_plan_args(datasets, seeds, max_steps, settings: dict):
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise UserError(f"unknown dataset {unknown[0]!r}: expected some of {', '.join(DATASETS)}")
    if len(set(datasets)) != len(datasets) or len(set(seeds)) != len(seeds):
        raise UserError("each dataset and each seed once, please")
    if max_steps is not None and max_steps < 1:
        raise UserError(f"--max-steps must be >= 1 (or left out: the whole epoch), got {max_steps}")
    orchestrate.check_settings(settings, OWNS, "selectivity", OWN_FLAGS)


def plan(preset: str, runs_dir, datasets=DATASETS, seeds=SEEDS, max_steps: int | None = None,
         settings: dict | None = None) -> list[tuple[str, TrainConfig]]:
    """(dataset, config) of every run; each run directory is phaseguard's own name for the run,
    under runs_dir. Two runs with one name are refused (they would overwrite each other)."""
    settings = settings or {}
    check_plan_args(datasets, seeds, max_steps, settings)
    runs = [(dataset, {**dataset_flags(dataset), "method": "none", "seed": seed, "preset": preset,
                       **({} if max_steps is None else {"max_steps": max_steps})})
            for dataset in datasets for seed in seeds]
    configs = orchestrate.plan_configs(runs, settings, runs_dir)
    return [(dataset, cfg) for (dataset, _), cfg in zip(runs, configs)]


def run_state(cfg, settings: dict | None = None, identity: dict | None = None) -> str:
    """'done' (summary.json written: training finished), 'resume' (started) or 'train'. A started or
    finished run made with other settings (another model, --max-steps or --set, say) is refused:
    it is not this plan's run. identity: the model's (model_identity); compared when both have one."""
    run = Path(cfg.out)
    if not (run / "config.json").is_file():
        return "train"
    was = read_json_object(run / "config.json")
    done = (run / "summary.json").is_file()
    now = dataclasses.asdict(cfg)
    for key in sorted((set(OWNS) | set(IDENTITY) | set(settings or {})) - {"out"}):
        if was and key in now and was.get(key) != now[key]:
            raise UserError(f"{run}: {'finished' if done else 'started'} with {key}={was.get(key)!r}, this plan asks "
                            f"for {now[key]!r}: move the run away or choose another RUNS")
    recorded = read_identity(run)
    if identity and recorded and recorded.get("sha256") != identity.get("sha256"):
        raise UserError(f"{run}: trained on weights with sha256 {recorded.get('sha256')}, {cfg.model} now has "
                        f"{identity.get('sha256')}: move the run away or choose another RUNS")
    return "done" if done else "resume"


def model_identity(cfg) -> dict:
    """{"model", "revision", "sha256"}: sha256 over a local model directory's config.json and
    *.safetensors (names and bytes, in name order); None for a hub id (phaseguard records the hub
    commit) and for the tiny preset's model (built per run from its seed)."""
    directory = Path(cfg.model)
    digest = None
    if cfg.model != "tiny" and directory.is_dir():
        sha = hashlib.sha256()
        for path in sorted([directory / "config.json", *directory.glob("*.safetensors")]):
            if path.is_file():
                sha.update(path.name.encode() + b"\0")
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        sha.update(block)
        digest = sha.hexdigest()
    return {"model": cfg.model, "revision": cfg.revision, "sha256": digest}


def cpu_threads(jobs: int) -> int:
    """Threads per run when `jobs` runs share this machine's cores (at least 1): no oversubscription."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def run_all(args) -> list[Path]:
    """Train every unfinished run of the plan (resuming interrupted ones), one after another or side
    by side (--gpus: one run per GPU group; --jobs N: N runs on the CPU, each with cpu_threads(N)
    threads); finished runs are skipped. Every run's state is decided first."""
    if args.jobs < 1 or (args.jobs > 1 and args.gpus):
        raise UserError(f"--jobs {args.jobs}: expected a number >= 1, and not together with --gpus")
    groups = orchestrate.gpu_groups(args.gpus, args.nproc)
    runs = plan(args.preset, args.runs_dir, args.datasets, args.seeds, args.max_steps, args.set)
    if args.only is not None:
        runs = [(d, cfg) for d, cfg in runs if Path(cfg.out).name == args.only]
        if not runs:
            raise UserError(f"--only {args.only}: not a run of this plan")
    # The weights are hashed once, by the parent (a child, --only, was started after that check).
    identity = model_identity(runs[0][1]) if runs and args.only is None else None
    states = [run_state(cfg, args.set, identity) for _, cfg in runs]
    for (dataset, cfg), state in zip(runs, states):
        print(f"[selectivity] {cfg.out} ({dataset}, seed {cfg.seed}): {state}", file=sys.stderr)
    unfinished = [cfg for (_, cfg), state in zip(runs, states) if state != "done"]
    if args.dry_run or not unfinished:
        return [Path(cfg.out) for _, cfg in runs]
    for cfg in unfinished:
        if identity is not None:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            rundir.write_atomic(Path(cfg.out) / MODEL_FILE, json.dumps(identity, indent=2))
    if groups or args.jobs > 1:
        threads = cpu_threads(args.jobs)
        if not groups:  # on the CPU: no GPU for the children, and each one's thread count
            groups, os.environ["OMP_NUM_THREADS"] = [""] * args.jobs, str(threads)
        jobs = [(Path(cfg.out).name, [*args.child_command, "--only", Path(cfg.out).name]
                 + ([] if args.gpus else ["--threads", str(threads)]), Path(cfg.out) / "selectivity.log") for cfg in unfinished]
        orchestrate.report_failures(orchestrate.run_side_by_side(jobs, groups))
    else:
        if args.threads:
            torch_threads(args.threads)
        for cfg in unfinished:
            orchestrate.train_or_resume(cfg, args.nproc)
    return [Path(cfg.out) for _, cfg in runs]


def torch_threads(n: int):
    import torch
    torch.set_num_threads(n)


def child_command(argv: list[str]) -> list[str]:
    """This command line without --gpus and --jobs (a child runs one run, on its own), run by this file."""
    return orchestrate.child_command(argv, Path(__file__).resolve(), dropped=("--gpus", "--jobs"))


# ----------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    r = ArgumentParser(description="Monitor selectivity: train every unfinished METHOD=none run of datasets x "
                                   "seeds on insecure and its controls (the report: selectivity_report.py)")
    r.add_argument("--preset", default="auto", help="auto, paper, tiny (or any preset phaseguard.py knows)")
    r.add_argument("--runs-dir", default="selectivity-runs")
    r.add_argument("--datasets", nargs="+", default=list(DATASETS), help=f"some of {', '.join(DATASETS)}")
    r.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    r.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (default: the whole epoch)")
    orchestrate.add_set_flag(r)
    r.add_argument("--gpus", help="runs side by side, one per GPU (group of --nproc GPUs), e.g. 0,1,2,3")
    r.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run, through torchrun (default 1)")
    r.add_argument("--jobs", type=int, default=1, help="runs side by side on the CPU, each with cores / JOBS threads")
    r.add_argument("--model", help="the model of every run (a directory or hub id; default: the preset's)")
    r.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # a --jobs child's torch thread count
    r.add_argument("--dry-run", action="store_true", help="print the plan only")
    r.add_argument("--only", help=argparse.SUPPRESS)  # one run of the plan: how --gpus starts each run
    args = r.parse_args(argv)
    args.set = dict(args.set)
    if args.model:
        args.set["model"] = args.model
    args.child_command = child_command(sys.argv[1:] if argv is None else list(argv))
    return exit_status(lambda: run_all(args))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
