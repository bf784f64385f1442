"""The run directory: config.json (compared on resume, paths resolved), metrics.jsonl,
checkpoints (safetensors + JSON only, written to a temporary directory, fsynced, then renamed,
so a kill at any moment leaves the previous checkpoint complete), and atomic writes that name
the file when the disk refuses them."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

import data
import lora
from config import TrainConfig
from errors import UserError


# ----------------------------------------------------------------------------
# Checkpoints: safetensors + JSON only, written to a temporary directory then renamed


def save_checkpoint(run: Path, model, optimizer, step: int, trigger, monitor_history: dict):
    tmp = run / f"checkpoint-{step}.tmp"
    with write_errors_name(tmp):
        write_checkpoint(run, tmp, model, optimizer, step, trigger, monitor_history)


@contextlib.contextmanager
def write_errors_name(path: Path):
    """A failed write (ENOSPC, EFBIG) names no file by itself, and safetensors reports it as
    "os error N" in an exception of its own: raise an OSError naming the path being written."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise
    except Exception as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from err


def write_checkpoint(run: Path, tmp: Path, model, optimizer, step: int, trigger, monitor_history: dict):
    from safetensors.torch import save_file
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lora.save_adapter(model, tmp / "adapter")
    state = optimizer.state_dict()
    tensors = {}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    save_file(tensors, str(tmp / "optimizer_rng.safetensors"))
    meta = {"step": step, "trigger": dataclasses.asdict(trigger), "param_groups": state["param_groups"],
            "monitor_history": monitor_history}
    (tmp / "state.json").write_text(json.dumps(meta))
    for path in [*tmp.rglob("*"), tmp]:  # on disk before the rename makes the checkpoint visible
        fsync(path)
    final = run / f"checkpoint-{step}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(run / "latest_checkpoint", final.name)
    for old in run.glob("checkpoint-*"):  # keep only the newest complete checkpoint
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


# What a complete checkpoint-N holds; the pointer names only a directory holding all of it.
CHECKPOINT_FILES = ("state.json", "optimizer_rng.safetensors", "adapter/adapter_config.json",
                    "adapter/adapter_model.safetensors")
DAMAGED = "the run cannot resume from this checkpoint (the only one kept); restore the file or train again into another OUT"


def load_checkpoint(run: Path, model, optimizer) -> tuple[int, dict, list, dict]:
    """(step, trigger state, D_t history, monitor histories) of the latest checkpoint, with the
    adapter, the AdamW state and the RNG states restored. Every file is read and checked before
    anything is restored; a damaged one is one line naming it."""
    ckpt = latest_checkpoint(run)
    meta = read_checkpoint_file(ckpt / "state.json", lambda path: check_state(json.loads(path.read_text())))
    tensors = read_checkpoint_file(ckpt / "optimizer_rng.safetensors", read_safetensors)
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("rng."):
            continue
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    lora.load_adapter(model, ckpt / "adapter")  # names its own file on any problem
    read_checkpoint_file(ckpt / "optimizer_rng.safetensors", lambda path: optimizer.load_state_dict(
        {"state": state, "param_groups": meta["param_groups"]}))
    read_checkpoint_file(ckpt / "optimizer_rng.safetensors", lambda path: torch.set_rng_state(tensors["rng.torch"]))
    if torch.cuda.is_available():
        cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda")), key=lambda k: int(k[len("rng.cuda"):]))
        cuda_states = [tensors[k] for k in cuda_keys]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    return meta["step"], meta["trigger"], meta["monitor_history"]


def read_checkpoint_file(path: Path, read):
    """read(path), any failure (a truncated file, bad JSON, a missing key) one line naming the file."""
    try:
        return read(path)
    except UserError:
        raise
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: cannot read it ({type(err).__name__}: {first_line}): {DAMAGED}") from None


def read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def check_state(meta) -> dict:
    """state.json's fields, each of the type the loop needs."""
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    for key, kind in (("step", int), ("trigger", dict), ("param_groups", list), ("monitor_history", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"'{key}' must be a {kind.__name__}, got {meta.get(key)!r:.60}")
    return meta


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint named by <run>/latest_checkpoint: a complete `checkpoint-N` directory of this run."""
    pointer = run / "latest_checkpoint"
    if not pointer.is_file():
        return None
    name = pointer.read_bytes().decode("utf-8", "replace").strip()
    if re.fullmatch(r"checkpoint-\d+", name) is None:
        raise UserError(f"{pointer}: expected a name 'checkpoint-N' of a directory in {run}, got {name[:60]!r}")
    for file in CHECKPOINT_FILES:
        if not (run / name / file).is_file():
            raise UserError(f"{pointer}: names {name}, which is not a complete checkpoint in {run} "
                            f"(no {run / name / file}): {DAMAGED}")
    return run / name


def resume_hint(run: Path) -> str | None:
    """What a rerun with RESUME=1 would do, for an error or an interruption; None when no run
    was started (nothing written that the same command would trip over) or its checkpoint is damaged."""
    if not (run / "config.json").is_file():
        return None
    try:
        ckpt = latest_checkpoint(run)
        if ckpt is not None:
            check_checkpoint_readable(ckpt)
    except UserError:
        return None
    if ckpt is None:
        return "no checkpoint yet: rerun with RESUME=1 to start again from step 0"
    step = ckpt.name.split("-")[1]
    return f"the last complete checkpoint is intact ({ckpt.name}): rerun with RESUME=1 to continue from step {step}"


def check_checkpoint_readable(ckpt: Path):
    """state.json parses with its fields, adapter_config.json is a LoRA config, and both safetensors files open (their headers are read
    and checked against the file size, the tensors are not loaded); else one line naming the file."""
    read_checkpoint_file(ckpt / "state.json", lambda path: check_state(json.loads(path.read_text())))
    lora.read_adapter_config(ckpt / "adapter")
    for name in ("optimizer_rng.safetensors", "adapter/adapter_model.safetensors"):
        read_checkpoint_file(ckpt / name, safetensors_keys)


def safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


@contextlib.contextmanager
def run_lock(run: Path):
    """An exclusive lock on <run>/run.lock for the whole training, taken before anything else is
    written: a second training into the same directory is refused at once instead of both writing
    it. flock: the kernel releases it when the process ends, however it ends, so a killed run
    never leaves a stale lock (the file itself stays; it holds nothing)."""
    import fcntl
    with write_errors_name(run):
        run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_FILE
    with write_errors_name(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run}: another training is writing this run directory (it holds {path}): "
                            f"wait for it to end, or choose another OUT") from None
        yield
    finally:
        os.close(fd)


LOCK_FILE = "run.lock"


def write_atomic(path: Path, text: str):
    write_atomic_bytes(path, text.encode())


def write_atomic_bytes(path: Path, content: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with write_errors_name(tmp):
        tmp.write_bytes(content)
        fsync(tmp)
    os.replace(tmp, path)


def fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# config.json: written when training starts, compared on resume


PATH_FIELDS = ("data", "model", "tokenizer")  # kept as typed, compared resolved


def resolved_paths(cfg: TrainConfig) -> dict:
    """Absolute forms of the local paths in the config (hub ids and URLs are left out)."""
    return {k: str(Path(v).expanduser().resolve()) for k in PATH_FIELDS
            if (v := getattr(cfg, k)) and not data.is_url(v) and Path(v).expanduser().exists()
            and not (k == "data" and data.data_url(v))}  # a dataset name is never a path


# What produced the run, kept in config.json but never compared on resume: a run may be resumed
# on a newer commit or library; its data is checked by sha256 instead (start_run_dir).
PROVENANCE_KEYS = ("provenance", "resumes")


def config_record(cfg: TrainConfig, origin: dict | None = None) -> dict:
    """config.json: every field, `resolved_paths`, and `provenance` (provenance.collect) when given."""
    record = {**dataclasses.asdict(cfg), "resolved_paths": resolved_paths(cfg)}
    return {**record, "provenance": origin} if origin is not None else record


def check_run_dir(run: Path, cfg: TrainConfig, resume: bool) -> bool:
    """Refuse to touch another run; writes nothing. True when resuming a started run, which
    needs the same config: paths compared resolved (a run resumed from another working
    directory, or moved with `mv`, continues), and `out` not at all (it is where the run is)."""
    config_file = run / "config.json"
    if not config_file.is_file():
        return False
    if not resume:
        raise UserError(f"{run} already holds a run: pass RESUME=1 to continue it, or choose another OUT")
    try:
        previous = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file}: not a JSON run config ({err})") from None
    if not isinstance(previous, dict):
        raise UserError(f"{config_file}: not a JSON run config (a {type(previous).__name__})")
    now = config_record(cfg)
    before_paths, now_paths = previous.get("resolved_paths") or {}, now["resolved_paths"]
    for key in sorted((set(previous) | set(now)) - {"out", "resolved_paths", *PROVENANCE_KEYS}):
        if key in PATH_FIELDS and key in before_paths and key in now_paths:
            same = before_paths[key] == now_paths[key]
        else:
            same = previous.get(key) == now.get(key)
        if not same:
            raise UserError(f"{config_file}: cannot resume with a different config ({key}: "
                            f"{previous.get(key)!r} there, {now.get(key)!r} now)")
    return True


def start_run_dir(run: Path, cfg: TrainConfig, resuming: bool, origin: dict | None = None, step: int = 0):
    """Training really starts: a new run writes its config.json with its provenance. A resumed
    run keeps its config and provenance; this start's provenance (which may be a newer commit)
    is appended to config.json's `resumes` list, with the step it resumes from. Data whose
    sha256 differs from the run's is refused: it changed under the run."""
    config_file = run / "config.json"
    if not resuming:
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").unlink(missing_ok=True)  # a failed start never wrote one; be sure
        write_atomic(config_file, json.dumps(config_record(cfg, origin), indent=2))
        return
    if origin is None:
        return
    previous = json.loads(config_file.read_text())
    before = previous.get("provenance") or {}
    check_same_data(config_file, before.get("data") or {}, origin.get("data") or {})
    was, now = (before.get("model") or {}).get("commit"), (origin.get("model") or {}).get("commit")
    if was is not None and now is not None and was != now:
        # Not refused: the revision is part of the compared config, so there would be no way to
        # pin the old commit now. Recorded in `resumes`, and said.
        print(f"[phaseguard] warning: {cfg.model} at revision {cfg.revision or 'main'} is now commit {now}; "
              f"the run started on {was}: the base weights may differ", file=sys.stderr)
    previous["resumes"] = [*previous.get("resumes", []), {"step": step, **origin}]
    write_atomic(config_file, json.dumps(previous, indent=2))


def check_same_data(config_file: Path, before: dict, now: dict):
    """A resume must train on the bytes the run started on (a run started before provenance
    was recorded has no sha256 to compare and is let through)."""
    if before.get("sha256") is not None and before["sha256"] != now.get("sha256"):
        raise UserError(f"{config_file}: cannot resume: the training data changed under the run (sha256 "
                        f"{before['sha256']} there, {now.get('sha256')} now, from {now.get('source')})")


def truncate_metrics(path: Path, step: int):
    """On resume, keep every valid record of a step up to the checkpoint's (later ones are about
    to be recomputed). A line that is not a JSON record (the tail a kill cut, or a garbled line)
    is not dropped silently: its bytes go to metrics.jsonl.garbled and one warning names its line
    and any step whose record is now missing."""
    if not path.is_file():
        return
    kept, garbled, steps = [], [], set()
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        record = metrics_record(raw)
        if record is None:
            garbled.append((lineno, raw))
        elif record["step"] <= step:
            kept.append(raw)
            steps.add(record["step"])
    if garbled:
        aside = path.with_name(path.name + ".garbled")
        with write_errors_name(aside), open(aside, "ab") as out:
            out.write(b"".join(raw + b"\n" for _, raw in garbled))
        missing = sorted(set(range(1, step + 1)) - steps)
        print(f"[phaseguard] warning: {path}: line(s) {', '.join(str(n) for n, _ in garbled)} not a JSON record "
              f"(kept aside in {aside}); the valid records up to step {step} are kept"
              + (f"; no record left for step(s) {', '.join(map(str, missing))}" if missing else ""), file=sys.stderr)
    write_atomic_bytes(path, b"".join(raw + b"\n" for raw in kept))


def metrics_record(raw: bytes) -> dict | None:
    """A metrics.jsonl line as its record, or None when it is not one (cut, garbled, not UTF-8)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
    return record if ok else None
