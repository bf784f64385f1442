"""The lambda x seed sweep of Tables 1 and 2: train each missing run (resuming an interrupted
one), evaluate each unevaluated one, skip finished ones. Run it as `python sweep.py`.

With `--gpus 0,1,2,3` the runs that need work go side by side, one per GPU (or one per group
of `--nproc` GPUs): each is this same sweep restricted to one run (`--only NAME`) in a child
process that sees only its GPUs (CUDA_VISIBLE_DEVICES) and writes its log into the run
directory; a failed run is reported at the end without stopping the others."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import orchestrate
from config import OPSWAP_SEED, SWEEP_LAMBDAS, SWEEP_SEEDS
from evaluate import (EvalConfig, adapter_fingerprint, add_eval_flags, conflict, em_questions, evaluate_run,
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
SWEEP_FLAGS = "--lambdas, --seeds, --preset, --runs-dir"  # what sets them, for a refused --set


def sweep_configs(args) -> list:
    """The config of every run of the plan, under --runs-dir, with the --set settings."""
    runs = []
    for flags in sweep_plan(args.preset, args.lambdas, args.seeds):
        label = " ".join([flags["task"], flags["method"], *([f"lam {flags['lam']:g}"] if "lam" in flags else [])])
        if flags["task"] == "opswap":  # --set data=... names the Security EM data; OpSwap is generated
            flags = {**flags, "data": None}  # and takes none (a None flag is no flag)
        runs.append((label, flags))
    return orchestrate.plan_configs(runs, args.set, args.runs_dir)


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
    orchestrate.check_settings(sweep_config.set, SWEEP_OWNS, "the sweep", SWEEP_FLAGS)
    loaded: dict = {}

    def questions(settings):  # read once, for all the runs
        if settings.question_limit not in loaded:
            loaded[settings.question_limit] = em_questions(settings)
        return loaded[settings.question_limit]

    groups = orchestrate.gpu_groups(sweep_config.gpus, sweep_config.nproc)
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
        orchestrate.report_failures(orchestrate.run_side_by_side(jobs, groups))
        return [run for run, _ in plan]
    for (run, cfg), step in zip(plan, steps):
        if step == "train + evaluate":
            orchestrate.train_or_resume(cfg, sweep_config.nproc)
        if step != "done":
            evaluate_run(run, eval_config)
    return [run for run, _ in plan]


def child_command(argv: list[str]) -> list[str]:
    """This sweep's command line without --gpus: what each run's child process runs (with --only)."""
    return orchestrate.child_command(argv, Path(__file__).with_name("sweep.py"), dropped=("--gpus",))


def main(argv=None) -> int:
    p = ArgumentParser(description="train and evaluate every missing run of Tables 1-2")
    p.add_argument("--preset", default=SweepConfig.preset, choices=("auto", "paper", "small", "tiny"))
    p.add_argument("--runs-dir", default=SweepConfig.runs_dir)
    p.add_argument("--lambdas", type=float, nargs="+", default=SweepConfig.lambdas)
    p.add_argument("--seeds", type=int, nargs="+", default=SweepConfig.seeds, help="security seeds (opswap: 42)")
    orchestrate.add_set_flag(p)
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
