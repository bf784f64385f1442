"""The lambda x seed sweep of Tables 1 and 2: train each missing run (resuming an interrupted
one), evaluate each unevaluated one, skip finished ones. Run it as `python evaluate.py sweep`."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import phaseguard
from evaluate import (adapter_fingerprint, check_eval_args, conflict, em_questions, eval_settings, evaluate_run,
                      read_json, result_settings, saved_settings)
from model_qwen2 import UserError

SWEEP_LAMBDAS, SWEEP_SEEDS, OPSWAP_SEED = (0.01, 0.02, 0.025, 0.03, 0.1), (42, 123, 456), 42


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
        try:
            cfg = phaseguard.resolve_config({**flags, **args.set})
        except TypeError as err:  # a --set value of the wrong type, e.g. batch_size=abc
            raise UserError(f"--set: a value has the wrong type ({err})") from None
        cfg.out = str(Path(args.runs_dir) / Path(cfg.out).name)  # phaseguard's run name, under --runs-dir
        configs.append(cfg)
    return configs


def sweep_step(run: Path, cfg, args, questions) -> str:
    """What a run needs: 'done', 'evaluate' or 'train + evaluate'. Raises now, before anything
    is trained, what its evaluation would raise later (no --judge, results made otherwise)."""
    trained = (run / "summary.json").is_file()  # train writes it last
    on_disk = read_json(run / "config.json") if trained else dataclasses.asdict(cfg)
    s = eval_settings(run, on_disk, args)
    if not trained:
        if not s["force"] and any((run / "eval" / name).is_file() for name in ("results.json", "answers.json")):
            raise UserError(f"{run / 'eval'} holds results of an adapter that is to be trained again: "
                            "move it away or pass --force")
        return "train + evaluate"
    qs = questions(s) if on_disk["task"] == "security" else None
    record = result_settings(on_disk, s, qs, adapter_fingerprint(run))
    results = run / "eval" / "results.json"
    if results.is_file() and saved_settings(results) == record:
        return "done"
    problem = conflict(run / "eval", record)
    if problem and not s["force"]:
        raise UserError(problem)
    return "evaluate"


def sweep(args) -> list[Path]:
    """Train each missing run (resuming an interrupted one), evaluate each unevaluated one.
    Every run's step is decided (and every flag checked) before the first one starts."""
    check_eval_args(args)
    check_set(args.set, phaseguard.TrainConfig)
    loaded: dict = {}

    def questions(s):  # read once, for all the runs
        if s["question_limit"] not in loaded:
            loaded[s["question_limit"]] = em_questions(s)
        return loaded[s["question_limit"]]

    plan = [(Path(cfg.out), cfg) for cfg in sweep_configs(args)]
    steps = [sweep_step(run, cfg, args, questions) for run, cfg in plan]
    for (run, _), step in zip(plan, steps):
        print(f"[sweep] {run}: {step}", file=sys.stderr)
    if args.dry_run:
        return [run for run, _ in plan]
    for (run, cfg), step in zip(plan, steps):
        if step == "train + evaluate":
            phaseguard.train(cfg, resume=(run / "config.json").is_file())
        if step != "done":
            evaluate_run(run, args)
    return [run for run, _ in plan]
