"""Provenance: what produced a result, recorded next to it.

One record (`collect`) holds the project's git commit and whether the checkout had
uncommitted changes, the versions of Python and of the libraries the numbers depend on,
the base model's hub commit, and the sha256 of the data. Training writes it into a run's
config.json; evaluation, the report and the benchmark write it next to their results.

Nothing here raises on a missing tool: outside a git checkout, or without `git`, the
commit and the dirty flag are None; a library that is not installed has version None.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path

PROJECT = Path(__file__).resolve().parent

# The libraries whose versions can change a number; each is a list of distribution names
# to try in order (nightly and ROCm builds of Triton ship under other names).
PACKAGES = {
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton", "pytorch-triton-rocm"),
    "tokenizers": ("tokenizers",),
    "safetensors": ("safetensors",),
    "huggingface_hub": ("huggingface_hub", "huggingface-hub"),
    "numpy": ("numpy",),
}


# ----------------------------------------------------------------------------
# The project's own checkout


def run_git(*args: str, cwd: Path = PROJECT, timeout: float = 10.0) -> str | None:
    """git's stripped stdout, or None when git is missing, fails or hangs."""
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take index.lock, which would make a git
    # command the user runs at the same moment fail.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(project: Path = PROJECT) -> dict:
    """{"commit": the checked-out commit, "dirty": True when a tracked file differs from it}.
    Untracked files do not count: outputs such as bench/results live in the tree. Both None
    when `project` is not the top of a git checkout (an installed copy, a tarball, a copy
    inside another repository, whose commit would not be this code's)."""
    top = run_git("rev-parse", "--show-toplevel", cwd=project)
    if top is None or Path(top).resolve() != Path(project).resolve():
        return {"commit": None, "dirty": None}
    commit = run_git("rev-parse", "--verify", "HEAD", cwd=project)  # None in a repository with no commit yet
    status = run_git("status", "--porcelain", "--untracked-files=no", cwd=project)
    return {"commit": commit, "dirty": None if status is None else status != ""}


# ----------------------------------------------------------------------------
# Versions


def package_version(names) -> str | None:
    """The installed version of the first distribution found among `names`, else None.
    Read from the package metadata: nothing is imported (importing Triton takes seconds)."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    """{"python", "torch", "triton", "tokenizers", "safetensors", "huggingface_hub", "numpy"}."""
    return {"python": platform.python_version(),
            **{key: package_version(names) for key, names in PACKAGES.items()}}


# ----------------------------------------------------------------------------
# Data and model


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_jsonl(rows: list) -> str:
    """sha256 of the rows written as a JSONL file (one compact JSON object per line, UTF-8):
    the fingerprint of generated data, which has no file."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update((json.dumps(row, ensure_ascii=False) + "\n").encode())
    return digest.hexdigest()


COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_commit(model_dir: str | os.PathLike | None) -> str | None:
    """The commit of a Hugging Face cache snapshot: snapshot_download returns
    `.../models--org--name/snapshots/<commit>`, online and offline alike. None for any other
    directory (a local checkpoint has no hub commit)."""
    if model_dir is None:
        return None
    path = Path(model_dir)
    return path.name if path.parent.name == "snapshots" and COMMIT.fullmatch(path.name) else None


def model_record(name: str, revision: str | None, model_dir: str | os.PathLike | None) -> dict:
    """{"name": as given, "revision": as asked (None: the hub's main), "commit": the resolved hub
    commit or None, "source": "hub" or "local"}."""
    commit = hub_commit(model_dir)
    return {"name": str(name), "revision": revision, "commit": commit, "source": "hub" if commit else "local"}


def data_record(source: str, sha256: str | None, sha256_of: str = "file") -> dict:
    """{"source": where the data came from, "sha256", "sha256_of": "file" or what was hashed}."""
    return {"source": source, "sha256": sha256, "sha256_of": sha256_of}


# ----------------------------------------------------------------------------
# The record


def collect(*, model: dict | None = None, data: dict | None = None, **extra) -> dict:
    """{"time" (UTC, ISO 8601), "git": git_state(), "versions": versions(), "model", "data",
    then whatever else the caller passes (e.g. the evaluation questions' data_record)}."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": git_state(),
            "versions": versions(), "model": model, "data": data, **extra}
