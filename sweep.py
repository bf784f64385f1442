"""The lambda x seed sweep of Tables 1 and 2: train each missing run (resuming an interrupted
one), evaluate each unevaluated one, skip finished ones. Run it as `python sweep.py`.

With `--gpus 0,1,2,3` the runs that need work go side by side, one per GPU (or one per group
of `--nproc` GPUs): each is this same sweep restricted to one run (`--only NAME`) in a child
process that sees only its GPUs (CUDA_VISIBLE_DEVICES) and writes its log into the run
directory; a failed run is reported at the end without stopping the others."""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import phaseguard
from config import OPSWAP_SEED, SWEEP_LAMBDAS, SWEEP_SEEDS, TrainConfig, resolve_config
from evaluate import (EvalConfig, adapter_fingerprint, add_eval_flags, conflict, em_questions, evaluate_run, parse_set,
                      result_settings, saved_settings)
from errors import ArgumentParser, UserError, exit_status, read_json

def sweep_plan(preset: str, lambdas=SWEEP_LAMBDAS, seeds=SWEEP_SEEDS) -> list[dict]:
    plan = []
    for task, task_seeds in (("security", seeds), ("opswap", (OPSWAP_SEED,))):
        for seed in task_seeds:
            plan += [dict(task=task, method="none", seed=seed), dict(task=task, method="kl", seed=seed)]
            plan += [dict(task=task, method="phaseguard", lam=lam, seed=seed) for lam in lambdas]
    return [{**flags, "preset": preset} for flags in plan]


SWEEP_OWNS = ("task", "method", "lam", "seed", "preset", "out")  # set by the plan, --preset and --runs-dir


def check_set(settings: dict, config_class):
    """--set keys must be training settings the sweep does not set itself."""
    fields = [f.name for f in dataclasses.fields(config_class)]
    for key in settings:
        if key in SWEEP_OWNS:
            raise UserError(f"--set {key}: the sweep sets {key} itself (use --lambdas, --seeds, --preset, --runs-dir)")
        if key not in fields:
            raise UserError(f"--set {key}: not a training setting (one of: "
                            f"{', '.join(f for f in fields if f not in SWEEP_OWNS)})")


def sweep_configs(args) -> list:
    configs = []
    for flags in sweep_plan(args.preset, args.lambdas, args.seeds):
        # --set data=... names the Security EM data; OpSwap is generated and takes none.
        settings = {k: v for k, v in args.set.items() if not (k == "data" and flags["task"] == "opswap")}
        try:
            cfg = resolve_config({**flags, **settings})
        except TypeError as err:  # a --set value of the wrong type, e.g. batch_size=abc
            raise UserError(f"--set: a value has the wrong type ({err})") from None
        cfg.out = str(Path(args.runs_dir) / Path(cfg.out).name)  # phaseguard's run name, under --runs-dir
        configs.append(cfg)
    return configs


def sweep_step(run: Path, cfg, eval_config: EvalConfig, questions) -> str:
    """What a run needs: 'done', 'evaluate' or 'train + evaluate'. Raises now, before anything
    is trained, what its evaluation would raise later (no --judge, results made otherwise)."""
    trained = (run / "summary.json").is_file()  # train writes it last
    on_disk = read_json(run / "config.json") if trained else dataclasses.asdict(cfg)
    settings = eval_config.for_run(run, on_disk)
    if not trained:
        if not settings.force and any((run / "eval" / name).is_file() for name in ("results.json", "answers.json")):
            raise UserError(f"{run / 'eval'} holds results of an adapter that is to be trained again: "
                            "move it away or pass --force")
        return "train + evaluate"
    qs = questions(settings) if on_disk["task"] == "security" else None
    record = result_settings(on_disk, settings, qs, adapter_fingerprint(run))
    results = run / "eval" / "results.json"
    if (results.is_file() and saved_settings(results) == record
            and not needs_judging_again(results, settings.rejudge_unscored)):
        return "done"
    problem = conflict(run / "eval", record)
    if problem and not settings.force:
        raise UserError(problem)
    return "evaluate"


def needs_judging_again(results: Path, rejudge_unscored: bool) -> bool:
    """An evaluation that failed (too many unscored judgments) is not done; with
    --rejudge-unscored, neither is one that has any unscored answer."""
    saved = read_json(results)
    if saved.get("failed"):
        return True
    security = saved.get("security") or {}
    return rejudge_unscored and any(isinstance(block, dict) and block.get("unscored") for block in security.values())


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """sweep.py's own flags (its evaluation flags are an EvalConfig)."""
    preset: str = "auto"  # auto | paper | small | tiny (config.resolve_config)
    runs_dir: str = "runs"  # where the runs go, one directory each
    lambdas: tuple[float, ...] = SWEEP_LAMBDAS  # the PhaseGuard-KL lambdas of Table 2
    seeds: tuple[int, ...] = SWEEP_SEEDS  # security seeds (opswap: OPSWAP_SEED)
    set: dict = dataclasses.field(default_factory=dict)  # --set KEY=VALUE: training settings for every run
    dry_run: bool = False  # print the plan only
    gpus: str | None = None  # "0,1,2,3": the runs side by side, one per GPU (or per group of nproc)
    nproc: int = 1  # processes (GPUs) per run, through torchrun
    only: str | None = None  # one run of the sweep, by name: how --gpus starts each run
    child_command: tuple[str, ...] = ()  # this sweep's command line without --gpus (child_command)


def sweep(sweep_config: SweepConfig, eval_config: EvalConfig) -> list[Path]:
    """Train each missing run (resuming an interrupted one), evaluate each unevaluated one.
    Every run's step is decided (and every flag checked) before the first one starts."""
    check_set(sweep_config.set, TrainConfig)
    loaded: dict = {}

    def questions(settings):  # read once, for all the runs
        if settings.question_limit not in loaded:
            loaded[settings.question_limit] = em_questions(settings)
        return loaded[settings.question_limit]

    groups = gpu_groups(sweep_config.gpus, sweep_config.nproc)
    plan = [(Path(cfg.out), cfg) for cfg in sweep_configs(sweep_config)]
    only = sweep_config.only
    if only is not None:
        plan = [(run, cfg) for run, cfg in plan if run.name == only]
        if not plan:
            raise UserError(f"--only {only}: not a run of this sweep")
    steps = [sweep_step(run, cfg, eval_config, questions) for run, cfg in plan]
    for (run, _), step in zip(plan, steps):
        print(f"[sweep] {run}: {step}", file=sys.stderr)
    if sweep_config.dry_run:
        return [run for run, _ in plan]
    if groups:
        jobs = [(run.name, [*sweep_config.child_command, "--only", run.name], run / "sweep.log")
                for (run, _), step in zip(plan, steps) if step != "done"]
        report_failures(run_side_by_side(jobs, groups))
        return [run for run, _ in plan]
    for (run, cfg), step in zip(plan, steps):
        if step == "train + evaluate":
            resume = (run / "config.json").is_file()
            if sweep_config.nproc > 1:
                train_with_torchrun(cfg, resume, sweep_config.nproc)
            else:
                phaseguard.train(cfg, resume=resume)
        if step != "done":
            evaluate_run(run, eval_config)
    return [run for run, _ in plan]


# ----------------------------------------------------------------------------
# Several GPUs: one run per GPU (or per group of nproc GPUs), side by side


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
        raise UserError(f"GPUS={gpus}: this machine has no CUDA device (run the sweep without GPUS)")
    if max(map(int, ids)) >= torch.cuda.device_count():
        raise UserError(f"GPUS={gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if nproc < 1 or len(ids) % nproc:
        raise UserError(f"GPUS={gpus}: {len(ids)} GPUs cannot be cut into groups of NPROC={nproc}")
    return [",".join(ids[i:i + nproc]) for i in range(0, len(ids), nproc)]


def run_side_by_side(jobs: list[tuple[str, list[str], Path]], groups: list[str], poll_s: float = 0.2) -> dict:
    """Run each (name, command, log file) job with CUDA_VISIBLE_DEVICES set to a free group, at
    most one job per group at a time, until all are done. {name: (exit code, log file)}."""
    pending, running, done = list(jobs), {}, {}
    free = list(groups)
    while pending or running:
        while pending and free:
            name, command, log_path = pending.pop(0)
            group = free.pop(0)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": group}
            print(f"[sweep] {name}: started on GPU {group}, log {log_path}", file=sys.stderr)
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            running[name] = (proc, group, log, log_path)
        time.sleep(poll_s)
        for name, (proc, group, log, log_path) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                free.append(group)
                done[name] = (proc.returncode, log_path)
                del running[name]
                print(f"[sweep] {name}: {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}",
                      file=sys.stderr)
    return done


def report_failures(done: dict):
    failed = [f"{name} (exit {code}, log {log})" for name, (code, log) in done.items() if code != 0]
    if failed:
        raise UserError(f"{len(failed)} of {len(done)} runs failed: {'; '.join(failed)}")


def child_command(argv: list[str]) -> list[str]:
    """This sweep's command line without --gpus: what each run's child process runs (with --only)."""
    kept, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 3 and "--gpus".startswith(name):  # argparse takes --gpu, --gp, --g for --gpus too
            skip = "=" not in arg
        else:
            kept.append(arg)
    return [sys.executable, str(Path(__file__).with_name("sweep.py")), *kept]


def train_with_torchrun(cfg, resume: bool, nproc: int):
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


def main(argv=None) -> int:
    p = ArgumentParser(description="train and evaluate every missing run of Tables 1-2")
    p.add_argument("--preset", default=SweepConfig.preset, choices=("auto", "paper", "small", "tiny"))
    p.add_argument("--runs-dir", default=SweepConfig.runs_dir)
    p.add_argument("--lambdas", type=float, nargs="+", default=SweepConfig.lambdas)
    p.add_argument("--seeds", type=int, nargs="+", default=SweepConfig.seeds, help="security seeds (opswap: 42)")
    p.add_argument("--set", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                   help="extra training setting for every run, e.g. --set limit=40")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    p.add_argument("--gpus", help="run the runs side by side, one per GPU, e.g. 0,1,2,3 (CUDA only)")
    p.add_argument("--nproc", type=int, default=SweepConfig.nproc,
                   help="processes (GPUs) per run, through torchrun (default 1)")
    p.add_argument("--only", help=argparse.SUPPRESS)  # one run of the sweep: how --gpus starts each run
    add_eval_flags(p)
    args = p.parse_args(argv)
    sweep_config = SweepConfig(
        preset=args.preset, runs_dir=args.runs_dir, lambdas=tuple(args.lambdas), seeds=tuple(args.seeds),
        set=dict(args.set), dry_run=args.dry_run, gpus=args.gpus, nproc=args.nproc, only=args.only,
        child_command=tuple(child_command(sys.argv[1:] if argv is None else list(argv))))
    return exit_status(lambda: sweep(sweep_config, EvalConfig.from_args(args)))


if __name__ == "__main__":
    sys.exit(main())
