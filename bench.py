"""`make bench`: kernels.py against eager PyTorch, torch.compile and Liger-Kernel.

On CUDA (the paper's shapes: Qwen2.5-7B, V = 152,064, H = 3,584, bf16):
  topk_js   24 x V, k = 256 (the monitor, Eq. 2)
  kl_div    N x V, N in {2048, 8192} (the regulariser on materialised logits, Eq. 1)
  fused     fused_linear_ce_kl from N x H hidden states and the V x H lm_head (Eq. 1)
in two modes, forward (under no_grad) and forward + backward. Correctness against float64
first; then median times (triton.testing.do_bench) and peak memory above the inputs
(torch.cuda.max_memory_allocated). Device-to-device copy bandwidth is measured in the same
run: each kernel is reported against its bandwidth bound (bytes it must move / bandwidth),
the fused op against the cuBLAS time of its own GEMMs. The H100 targets are recorded here,
never asserted. Without CUDA: the PyTorch paths at reduced size on the CPU, and the
peak-memory ratio of the chunked path to eager at N = 4,096, V = 152,064.

Results: one markdown table on stdout, and a new bench/results/<date>T<time>-<device>.{json,md} per run.
Liger-Kernel is optional (`pip install -e .[bench]`); without it its columns say so.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels as K

RESULTS_DIR = Path(__file__).resolve().parent / "bench" / "results"
V, H, K_TOP, N_CANARIES, LAMBDA = 152_064, 3_584, 256, 24, 0.1


# ------------------------------------------------------------------ eager PyTorch baselines
def eager_kl(policy_logits, ref_logits):
    """Textbook eager KL(policy || ref): fp32 log-softmax of both, full [N, V] intermediates."""
    logp = torch.log_softmax(policy_logits.float(), -1)
    logq = torch.log_softmax(ref_logits.detach().float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def eager_fused(hidden, ref_hidden, weight, labels, kl_mask, ce_weight, kl_weight):
    """Eager CE + lambda KL from hidden states: whole [N, V] logits, fp32 softmax."""
    logits = (hidden @ weight.T).float()
    ce = F.cross_entropy(logits, labels, ignore_index=K.IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        logq = torch.log_softmax((ref_hidden @ weight.T).float(), -1)
    logp = torch.log_softmax(logits, -1)
    kl = ((logp.exp() * (logp - logq)).sum(-1) * kl_mask).sum()
    return ce_weight * ce + kl_weight * kl


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for dist in ("triton", "liger-kernel"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine_load() -> dict:
    """What else the machine was doing: the 1/5/15-minute load averages and the core count."""
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen, "cpu_count": os.cpu_count()}


def write_results(tag: str, payload: dict, markdown: str) -> Path:
    """bench/results/<date>T<time>-<tag>.{json,md}: a new pair every run, never over a committed one."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    base = f"{now}-{re.sub(r'[^A-Za-z0-9]+', '-', tag).strip('-')}"
    stem, n = RESULTS_DIR / base, 1
    while stem.with_suffix(".json").exists() or stem.with_suffix(".md").exists():
        n += 1
        stem = RESULTS_DIR / f"{base}-{n}"
    payload = {**payload, "machine_load_after": machine_load()}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown + "\n")
    return stem


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ CUDA benchmark
def cuda_main(args) -> None:
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    load_before = machine_load()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(dev)
    liger, liger_note = load_liger()
    correctness = cuda_correctness(dev)
    print("correctness vs float64:", json.dumps(correctness))
    session = CudaSession(bandwidth, liger, no_compile=args.no_compile)
    bench_monitor(session, dev)
    bench_kl_div(session, dev, args.tokens)
    bench_fused(session, dev, args.tokens)
    payload = dict(device="cuda", gpu=gpu, date=datetime.datetime.now().isoformat(timespec="seconds"),
                   versions=versions(), machine_load_before=load_before, copy_bandwidth_GBps=bandwidth / 1e9, correctness=correctness,
                   liger_note=liger_note, records=session.records)
    payload["targets"] = cuda_targets(session.records)
    markdown = cuda_markdown(payload)
    print(markdown)
    print(f"written: {write_results(gpu, payload, markdown)}.{{json,md}}")


def bench_ms(fn, leaves=()) -> dict:
    """min / median / max milliseconds over triton's repetitions."""
    import triton

    lo, mid, hi = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(leaves), quantiles=[0.0, 0.5, 1.0])
    return {"min": lo, "median": mid, "max": hi}


def copy_bandwidth(dev) -> float:
    """Device-to-device copy bandwidth in bytes / s: 1 GiB read + 1 GiB written per copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))["median"]
    return 2 * src.numel() / (copy_ms * 1e-3)


def load_liger() -> tuple[dict, str]:
    """Liger's modules by key (jsd, flce, fljsd), and a note on any that could not be made."""
    liger, liger_note = {}, ""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD, LigerJSD
        for key, make in (("jsd", lambda: LigerJSD(beta=1.0)),
                          ("flce", lambda: LigerFusedLinearCrossEntropyLoss(reduction="sum")),
                          ("fljsd", lambda: LigerFusedLinearJSD(jsd_beta=1.0))):
            try:  # older Liger releases assert 0 < beta < 1
                liger[key] = make()
            except Exception as exc:
                liger_note += f"Liger {key} unavailable: {type(exc).__name__}: {exc}; "
        if "flce" not in liger:
            liger.pop("fljsd", None)  # the fused comparison needs both
    except ImportError:
        liger_note = "liger-kernel not installed (pip install -e .[bench]): Liger columns skipped"
    return liger, liger_note


class CudaSession:
    """What every CUDA case shares: the copy bandwidth, the providers, their compiled functions, and the
    records so far."""

    def __init__(self, bandwidth: float, liger: dict, no_compile: bool):
        self.bandwidth, self.liger, self.no_compile = bandwidth, liger, no_compile
        self.providers = ["ours", "eager"] + ([] if no_compile else ["compile"]) + ["liger"]
        # Static shapes: one compilation per shape, no dynamic-shape graphs (keeps the run short).
        self.compiled_kl = torch.compile(eager_kl, dynamic=False)
        self.compiled_js = torch.compile(K.topk_js_reference, dynamic=False)
        self.compiled_fused = torch.compile(eager_fused, dynamic=False)
        self.records = []

    def run(self, op, shape, provider, mode, fn, leaves=(), bound_s=None, gemm_s=None):
        """Time and measure fn (returns a loss) in one mode; record errors instead of dying."""
        def step():
            if mode == "fwd":
                with torch.no_grad():
                    fn()
            else:
                fn().backward()
        rec = dict(op=op, shape=shape, provider=provider, mode=mode, ms=None, peak_bytes=None,
                   bound_ms=None if bound_s is None else bound_s * 1e3, gemm_ms=None if gemm_s is None else gemm_s * 1e3)
        try:
            step()  # warm-up (and torch.compile's compilation)
            stats = bench_ms(step, leaves)
            rec.update(ms=stats["median"], ms_min=stats["min"], ms_max=stats["max"])
            for t in leaves:
                t.grad = None
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            rec["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        except Exception as exc:  # OOM, a missing Liger feature, a compile failure
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        finally:
            for t in leaves:
                t.grad = None
            gc.collect()
            torch.cuda.empty_cache()
        self.records.append(rec)
        print(json.dumps(rec))

    def run_providers(self, op, shape, mode, fns, leaves, ours_bound_s=None, ours_gemm_s=None):
        """run() each provider that has a function in fns, in the providers' order; the bound or GEMM time
        goes with ours only."""
        for name in self.providers:
            if name in fns:
                ours = name == "ours"
                self.run(op, shape, name, mode, fns[name], leaves, bound_s=ours_bound_s if ours else None,
                         gemm_s=ours_gemm_s if ours else None)


def bench_monitor(session: CudaSession, dev) -> None:
    """The monitor: top-k JS, 24 x V, k = 256 (no gradient: forward only)."""
    logits = torch.randn(N_CANARIES, V, device=dev, dtype=torch.bfloat16) * 3
    ids, lq = K.reference_topk(logits.float() + torch.randn_like(logits, dtype=torch.float32), K_TOP)
    shape = f"{N_CANARIES}x{V} k={K_TOP}"
    js_bound = logits.numel() * logits.element_size() / session.bandwidth
    for variant in K.JS_VARIANTS:
        op = f"topk_js[{variant}]"
        session.run(op, shape, "ours", "fwd", lambda: K.topk_js(logits, ids, lq, variant).sum(), bound_s=js_bound)
        session.run(op, shape, "eager", "fwd", lambda: K.topk_js_reference(logits, ids, lq, variant).sum())
        if not session.no_compile:
            session.run(op, shape, "compile", "fwd", lambda: session.compiled_js(logits, ids, lq, variant).sum())


def bench_kl_div(session: CudaSession, dev, tokens) -> None:
    """The regulariser on materialised logits: KL(policy || ref), N x V bf16."""
    for N in tokens:
        shape = f"{N}x{V}"
        policy = (torch.randn(N, V, device=dev) * 3).to(torch.bfloat16).requires_grad_()
        ref = (policy.detach().float() + torch.randn(N, V, device=dev)).to(torch.bfloat16)
        unit = N * V * 2  # one pass over one bf16 [N, V] tensor
        fns = {"ours": lambda: K.kl_div(policy, ref).sum(), "eager": lambda: eager_kl(policy, ref).sum(),
               "compile": lambda: session.compiled_kl(policy, ref).sum()}
        if "jsd" in session.liger:  # LigerJSD(beta=1) on log-softmax inputs = KL(policy || ref), mean over rows
            fns["liger"] = lambda: session.liger["jsd"](torch.log_softmax(policy, -1), torch.log_softmax(ref, -1))
        for mode, bound in (("fwd", 2 * unit), ("fwd+bwd", 5 * unit)):  # read p, q | + read p, q, write grad
            session.run_providers("kl_div", shape, mode, fns, [policy], ours_bound_s=bound / session.bandwidth)
        del policy, ref
        gc.collect()
        torch.cuda.empty_cache()


def bench_fused(session: CudaSession, dev, tokens) -> None:
    """Fused lm_head + CE + lambda KL from hidden states, against the cuBLAS time of its own GEMMs."""
    weight = (torch.randn(V, H, device=dev) / math.sqrt(H)).to(torch.bfloat16)
    for N in tokens:
        shape = f"{N}x{H}->{V}"
        hidden = torch.randn(N, H, device=dev).to(torch.bfloat16).requires_grad_()
        ref_hidden = (hidden.detach().float() + 0.1 * torch.randn(N, H, device=dev)).to(torch.bfloat16)
        labels = torch.randint(0, V, (N,), device=dev)
        kl_mask = torch.ones(N, dtype=torch.bool, device=dev)
        ce_w, kl_w = 1.0 / N, LAMBDA / N
        # The same GEMMs the fused op issues (bf16 in, fp32 out), on all N tokens at once.
        gemm_fwd = bench_ms(lambda: K._matmul_fp32(hidden.detach(), weight.t()))["median"] * 1e-3
        grad_logits = torch.randn(N, V, device=dev).to(torch.bfloat16)
        gemm_bwd = bench_ms(lambda: K._matmul_fp32(grad_logits, weight))["median"] * 1e-3
        del grad_logits
        fns = {"ours": lambda: K.fused_linear_ce_kl(hidden, ref_hidden, weight, labels, kl_mask, ce_w, kl_w).loss,
               "eager": lambda: eager_fused(hidden, ref_hidden, weight, labels, kl_mask, ce_w, kl_w),
               "compile": lambda: session.compiled_fused(hidden, ref_hidden, weight, labels, kl_mask, ce_w, kl_w)}
        if "fljsd" in session.liger:  # Liger's fused linear CE and fused linear JSD(beta=1) = KL, run separately
            liger = session.liger
            fns["liger"] = lambda: (ce_w * liger["flce"](weight, hidden, labels)
                                    + LAMBDA * liger["fljsd"](hidden, weight, ref_hidden, weight))
        for mode, gemm in (("fwd", 2 * gemm_fwd), ("fwd+bwd", 2 * gemm_fwd + gemm_bwd)):
            session.run_providers("fused_linear_ce_kl", shape, mode, fns, [hidden], ours_gemm_s=gemm)
        del hidden, ref_hidden


def cuda_correctness(dev) -> dict:
    """Each kernel on the GPU against float64 on the same bf16 inputs (small N, full V)."""
    g = torch.Generator(device=dev).manual_seed(1)
    out = {}
    cur = (torch.randn(N_CANARIES, V, device=dev, generator=g) * 3).to(torch.bfloat16)
    ref = (cur.float() + torch.randn(N_CANARIES, V, device=dev, generator=g)).to(torch.bfloat16)
    ids, lq = K.reference_topk(ref, K_TOP)
    for variant in K.JS_VARIANTS:
        want = K.topk_js_reference(cur.double(), ids, lq, variant)
        out[f"topk_js[{variant}] max abs err"] = (K.topk_js(cur, ids, lq, variant) - want).abs().max().item()
    policy = cur[:16].clone().requires_grad_()
    kl = K.kl_div(policy, ref[:16])
    kl.sum().backward()
    p64 = cur[:16].double().requires_grad_()
    want = K.kl_div_reference(p64, ref[:16].double())
    want.sum().backward()
    out["kl_div rel err"] = rel_err(kl, want)
    out["kl_div grad rel err"] = rel_err(policy.grad, p64.grad)
    weight = (torch.randn(V, H, device=dev, generator=g) / math.sqrt(H)).to(torch.bfloat16)
    hidden = torch.randn(64, H, device=dev, generator=g).to(torch.bfloat16)
    ref_hidden = (hidden.float() + 0.1 * torch.randn(64, H, device=dev, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, V, (64,), device=dev, generator=g)
    labels[::5] = K.IGNORE_INDEX
    kl_mask = torch.arange(64, device=dev) % 3 != 0
    h = hidden.clone().requires_grad_()
    ours = K.fused_linear_ce_kl(h, ref_hidden, weight, labels, kl_mask, 1 / 51, LAMBDA / 42, chunk_tokens=24)
    ours.loss.backward()
    h64 = hidden.double().requires_grad_()
    want = eager_fused(h64, ref_hidden.double(), weight.double(), labels, kl_mask, 1 / 51, LAMBDA / 42)
    want.backward()
    out["fused loss rel err"] = rel_err(ours.loss.detach(), want.detach())
    out["fused grad rel err"] = rel_err(h.grad, h64.grad)
    limits = {"topk_js": 1e-5, "kl_div rel": 1e-4, "kl_div grad": 1e-2, "fused loss": 1e-4, "fused grad": 2e-2}
    out["pass"] = all(v <= next(lim for key, lim in limits.items() if k.startswith(key)) for k, v in out.items())
    return out


def _find(records, op, shape, provider, mode):
    for r in records:
        if (r["op"], r["shape"], r["provider"], r["mode"]) == (op, shape, provider, mode) and r.get("ms"):
            return r
    return None


def cuda_targets(records) -> list:
    """The issue's H100 targets, recorded (never asserted)."""
    out = []
    for r in records:
        if r["provider"] != "ours" or r["mode"] != "fwd+bwd" or not r.get("ms"):
            continue
        other = lambda p: _find(records, r["op"], r["shape"], p, r["mode"])  # noqa: E731
        if r["op"] == "kl_div":
            checks = [("<= 1.3x two-pass bandwidth bound", r["ms"] / r["bound_ms"], 1.3),
                      (">= 2x faster than LigerJSD(beta=1): ours/liger time", other("liger"), 0.5),
                      (">= 1.5x faster than torch.compile: ours/compile time", other("compile"), 1 / 1.5)]
        else:
            checks = [("<= 1.25x its GEMMs' cuBLAS time", r["ms"] / r["gemm_ms"], 1.25),
                      (">= 1.5x faster than Liger FLCE + FLJSD: ours/liger time", other("liger"), 1 / 1.5),
                      ("peak memory <= 1/6 of eager: ours/eager memory", ("mem", other("eager")), 1 / 6)]
        for name, value, limit in checks:
            if isinstance(value, tuple):  # memory ratio
                value = (r["peak_bytes"] / value[1]["peak_bytes"]
                         if value[1] and value[1].get("peak_bytes") and r.get("peak_bytes") is not None else None)
            elif isinstance(value, dict):
                value = r["ms"] / value["ms"]
            out.append(dict(op=r["op"], shape=r["shape"], target=name, value=value, limit=limit,
                            met=None if value is None else value <= limit))
    return out


def cuda_markdown(payload) -> str:
    recs = payload["records"]
    lines = [f"# kernels.py benchmark: {payload['gpu']} ({payload['date']})", "",
             f"Versions: {payload['versions']}. Copy bandwidth (D2D): {payload['copy_bandwidth_GBps']:.0f} GB/s.",
             f"Correctness vs float64: {payload['correctness']}.", ""]
    if payload["liger_note"]:
        lines += [f"Note: {payload['liger_note']}", ""]
    lines += ["Ratios are ours / provider (time: below 1 = ours faster; memory: peak above the inputs, "
              "below 1 = ours smaller). `bound` = ours / (bytes moved / copy bandwidth); `gemm` = ours / cuBLAS "
              "time of its own GEMMs (bf16 in, fp32 out, all N tokens at once). Liger's KL is LigerJSD(beta=1) on "
              "torch.log_softmax of both bf16 inputs (the log-softmax counts in its time and memory); Liger's fused op "
              "is LigerFusedLinearCrossEntropyLoss + LigerFusedLinearJSD(jsd_beta=1), run separately.", "",
              "| op | shape | mode | ours ms | ours MB | bound or gemm | eager time / mem | compile time / mem | "
              "liger time / mem |", "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r["provider"] != "ours":
            continue
        if not r.get("ms"):
            lines.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r.get('error')} | | | | | |")
            continue
        ref = f"{r['ms'] / r['bound_ms']:.2f}x bound" if r["bound_ms"] else (
            f"{r['ms'] / r['gemm_ms']:.2f}x gemm" if r["gemm_ms"] else "")
        cells = []
        for p in ("eager", "compile", "liger"):
            o = next((x for x in recs if (x["op"], x["shape"], x["provider"], x["mode"]) ==
                      (r["op"], r["shape"], p, r["mode"])), None)
            if o is None:
                cells.append("n/a")
            elif o.get("error"):
                cells.append(o["error"].split(":")[0])
            else:
                mem = (f"{r['peak_bytes'] / max(o['peak_bytes'], 1):.2f}"
                       if r.get("peak_bytes") is not None and o.get("peak_bytes") is not None else "n/a")
                cells.append(f"{r['ms'] / o['ms']:.2f} / {mem}")
        own_mem = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") is not None else "n/a"
        lines.append(f"| {r['op']} | {r['shape']} | {r['mode']} | {r['ms']:.3f} | {own_mem} | "
                     f"{ref} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (recorded, not asserted):", "", "| op | shape | target | value | met |", "|---|---|---|---|---|"]
    for t in payload["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"| {t['op']} | {t['shape']} | {t['target']} (limit {t['limit']:.3f}) | {value} | {t['met']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ CPU: PyTorch paths, reduced sizes
def cpu_main(args) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # the PyTorch references, never the interpreter
    torch.manual_seed(0)
    out = {"device": "cpu", "date": datetime.datetime.now().isoformat(timespec="seconds"), "versions": versions(),
           "threads": torch.get_num_threads(), "hidden_size": args.cpu_hidden, "machine_load_before": machine_load()}
    lines = ["# kernels.py benchmark: CPU (no CUDA), PyTorch paths only", "",
             f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}. No Triton timing and no GPU number "
             "here: run `make bench` on a CUDA machine for those.", ""]
    cur, ref = torch.randn(N_CANARIES, V), torch.randn(N_CANARIES, V)
    monitor_inputs = (cur, *K.reference_topk(ref, K_TOP))  # current logits, the reference's top-k ids, log-probs
    out["correctness"] = cpu_correctness(*monitor_inputs)
    lines += [f"Correctness vs float64: {out['correctness']}", ""]
    out["cpu_seconds"] = cpu_times(args.cpu_tokens, args.cpu_hidden, *monitor_inputs)
    lines += ["| CPU, PyTorch path | seconds, median of 3 | min | max |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} |" for k, v in out["cpu_seconds"].items()]
    gc.collect()
    out["memory"] = cpu_memory(args.cpu_hidden)
    lines += cpu_memory_lines(out["memory"])
    markdown = "\n".join(lines)
    print(markdown)
    print(f"written: {write_results('cpu', out, markdown)}.{{json,md}}")


def cpu_correctness(cur, ids, lq) -> dict:
    """The PyTorch paths against float64 (small shapes)."""
    hidden, ref_hidden, weight, labels, kl_mask = _fused_inputs(64, 64, 8192, seed=1)
    got = K.fused_linear_ce_kl_reference(hidden, ref_hidden, weight, labels, kl_mask, 1 / 64, LAMBDA / 64, chunk_tokens=24)
    got.loss.backward()
    h64 = hidden.detach().double().requires_grad_()
    want = eager_fused(h64, ref_hidden.double(), weight.double(), labels, kl_mask, 1 / 64, LAMBDA / 64)
    want.backward()
    return {"fused loss rel err": rel_err(got.loss.detach(), want.detach()),
            "fused grad rel err": rel_err(hidden.grad, h64.grad),
            "topk_js max abs err": (K.topk_js(cur, ids, lq) - K.topk_js_reference(cur.double(), ids, lq)).abs().max().item()}


def cpu_times(n_time: int, H_cpu: int, cur, ids, lq) -> dict:
    """Seconds (median of 3) of each PyTorch path and its eager counterpart at reduced size."""
    times = {"topk_js (24 x 152064, k=256), renorm": _time_s(lambda: K.topk_js(cur, ids, lq)),
             "topk_js (24 x 152064, k=256), rest": _time_s(lambda: K.topk_js(cur, ids, lq, "rest"))}
    policy = torch.randn(n_time, V, requires_grad=True)
    refl = torch.randn(n_time, V)
    times[f"kl_div, PyTorch path incl. its non-finite input check, fwd+bwd ({n_time} x {V})"] = _time_s(lambda: K.kl_div(policy, refl).sum().backward())
    times[f"eager KL fwd+bwd ({n_time} x {V})"] = _time_s(lambda: eager_kl(policy, refl).sum().backward())
    f_in = _fused_inputs(n_time, H_cpu, V, seed=2)
    times[f"fused chunked fwd+bwd ({n_time} x {H_cpu} -> {V})"] = _time_s(lambda: _chunked_loss(*f_in).backward())
    times[f"eager fused fwd+bwd ({n_time} x {H_cpu} -> {V})"] = _time_s(lambda: _eager_loss(*f_in).backward())
    return times


def cpu_memory(H_cpu: int) -> dict:
    """Peak memory of the fused loss, fwd+bwd, at N = 4096, V = 152,064: chunked against eager."""
    N_mem = 4096
    chunked = _fused_peak(_chunked_loss, N_mem, H_cpu, V, "cpu")
    eager_meta = _fused_peak(_eager_loss, N_mem, H_cpu, V, "meta")
    # The eager count on the meta device equals the count of a real CPU run (checked at small N).
    check_n = 256
    eager_real_small, eager_meta_small = (_fused_peak(_eager_loss, check_n, H_cpu, V, d) for d in ("cpu", "meta"))
    return {"N": N_mem, "V": V, "H": H_cpu, "chunk_tokens": K.chunk_tokens_for_budget(V, 1 << 30, "torch"),
            "chunked_peak_bytes": chunked, "eager_peak_bytes": eager_meta, "ratio": chunked / eager_meta, "target": 0.25,
            "check_N": check_n, "eager_real_bytes_at_check_N": eager_real_small,
            "eager_meta_bytes_at_check_N": eager_meta_small,
            "method": "live tensor-storage bytes per aten op (TorchDispatchMode), inputs excluded; "
                      "chunked path run for real on the CPU, eager on the meta device"}


def cpu_memory_lines(memory: dict) -> list[str]:
    ratio = memory["ratio"]
    return ["", f"Peak memory, CE + lambda KL fwd+bwd, N = {memory['N']}, V = {V}, H = {memory['H']} (H reduced from 3,584 to "
            "keep the CPU run short; the logits dominate either way), default 1 GiB budget "
            f"({memory['chunk_tokens']} tokens per chunk):", "",
            "| path | peak MB above inputs |", "|---|---|",
            f"| chunked (fused_linear_ce_kl_reference, run on CPU) | {memory['chunked_peak_bytes'] / 2**20:.0f} |",
            f"| eager (whole fp32 logits, counted on the meta device) | {memory['eager_peak_bytes'] / 2**20:.0f} |",
            f"| **ratio chunked / eager** | **{ratio:.3f}** (target <= 0.25: {'met' if ratio <= 0.25 else 'NOT met'}) |",
            "", f"Method: {memory['method']}. The meta count is checked against a real CPU run at N = "
            f"{memory['check_N']}: {memory['eager_meta_bytes_at_check_N']} vs {memory['eager_real_bytes_at_check_N']} bytes."]


def _chunked_loss(h, r, w, lab, m):
    """Ours (the chunked PyTorch path) with the loop's weights: CE mean + lambda KL mean."""
    return K.fused_linear_ce_kl_reference(h, r, w, lab, m, 1.0 / len(lab), LAMBDA / len(lab)).loss


def _eager_loss(h, r, w, lab, m):
    return eager_fused(h, r, w, lab, m, 1.0 / len(lab), LAMBDA / len(lab))


def _time_s(fn, reps=3) -> dict:
    """min / median / max seconds over reps calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"min": min(times), "median": statistics.median(times), "max": max(times)}


def _fused_inputs(N, H_, V_, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = (lambda *s: torch.randn(*s, generator=g)) if device == "cpu" else (lambda *s: torch.empty(*s, device=device))
    weight = make(V_, H_) / math.sqrt(H_)
    hidden = make(N, H_).requires_grad_()
    ref_hidden = make(N, H_)
    labels = torch.randint(0, V_, (N,), generator=g).to(device)
    return hidden, ref_hidden, weight, labels, torch.ones(N, dtype=torch.bool, device=device)


def _fused_peak(fn, N, H_, V_, device):
    hidden, ref_hidden, weight, labels, kl_mask = _fused_inputs(N, H_, V_, device)
    with LiveTensorBytes(hidden, ref_hidden, weight, labels, kl_mask) as tracker:
        loss = fn(hidden, ref_hidden, weight, labels, kl_mask)
        loss.backward()
        del loss
    return tracker.peak


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the block (inputs excluded).

    Every aten op's outputs are recorded by storage; after each op the storages that died are
    dropped and the running total is compared to the peak. This is what a caching allocator
    would be asked for, without its rounding, caching or fragmentation, and without workspace
    an op allocates and frees internally. It works on the meta device too (no data at all)."""

    def __init__(self, *inputs):
        super().__init__()
        self.inputs = {t.untyped_storage()._cdata for t in inputs}
        self.live, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st._cdata not in self.live and st._cdata not in self.inputs:
                    self.live[st._cdata] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


# ------------------------------------------------------------------ one training step (issue: make bench, step)
TRAIN_SHAPES = {  # Qwen2.5-7B layer shapes, a few layers (the same on both sides); tiny ones on a CPU
    "cuda": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                 vocab_size=152064, num_hidden_layers=2, seq=512, micro=4, r=32, alpha=64.0),
    "cpu": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=4096, num_hidden_layers=2, seq=128, micro=4, r=8, alpha=16.0),
}


def train_step_bench(device: str, reps: int) -> tuple[dict, list[str]]:
    """Tokens/s and peak memory of one micro-batch step (forward, backward, AdamW) for methods
    `none` and `kl`, ours against transformers + PEFT on the same random weights, and the
    monitor's cost as a fraction of training time (it runs once per 5 optimizer steps of 4
    micro-batches). With only a few layers the lm_head and the loss weigh more than in the
    28-layer model: the ratios are indicative, not the full model's."""
    os.environ.setdefault("TRITON_INTERPRET", "0")
    shape = dict(TRAIN_SHAPES["cuda" if device == "cuda" else "cpu"])
    seq, micro, r, alpha = (shape.pop(k) for k in ("seq", "micro", "r", "alpha"))
    torch.manual_seed(0)
    ours, theirs = _train_models(device, shape, r, alpha)
    batch = _train_batch(device, shape["vocab_size"], micro, seq)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else (lambda: torch.autocast("cpu", enabled=False))
    ours.train()
    theirs.train()
    out = {"device": device, "shapes": {**shape, "seq": seq, "micro": micro, "r": r}, "reps": reps, "results": {},
           "machine_load_before": machine_load()}
    for method, lam in (("none", 0.0), ("kl", LAMBDA)):
        for name, make_step in (("ours", lambda: _ours_step(ours, batch, lam, device, autocast)),
                                ("transformers+peft", lambda: _theirs_step(theirs, batch, lam, autocast))):
            sec, peak = _measure(make_step(), reps, device)
            out["results"][f"{name}/{method}"] = {"seconds": sec["median"], "seconds_min": sec["min"],
                                                  "seconds_max": sec["max"], "tokens_per_s": micro * seq / sec["median"],
                                                  "peak_bytes": peak}
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    out["monitor"] = _monitor_cost(ours, device, shape["vocab_size"], reps, autocast, out["results"]["ours/kl"]["seconds"])
    res = out["results"]
    ratio = lambda m: res[f"ours/{m}"]["tokens_per_s"] / res[f"transformers+peft/{m}"]["tokens_per_s"]  # noqa: E731
    out["ratios"] = {"ours/theirs tokens/s none": ratio("none"), "ours/theirs tokens/s kl": ratio("kl"),
                     "kl step / none step (ours)": res["ours/kl"]["seconds"] / res["ours/none"]["seconds"]}
    if device == "cuda":
        out["ratios"]["ours/theirs peak memory kl"] = res["ours/kl"]["peak_bytes"] / res["transformers+peft/kl"]["peak_bytes"]
    return out, _train_step_lines(out, device, shape, seq, micro, r, reps)


def _train_models(device: str, shape: dict, r: int, alpha: float):
    """Ours and transformers + PEFT on the same random base weights, stored once, LoRA on both."""
    import transformers
    import peft
    import lora
    import model_qwen2 as mq
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf_config = transformers.Qwen2Config(**shape, tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6)
    hf = transformers.Qwen2ForCausalLM(hf_config).to(device=device, dtype=dtype)
    hf.config.use_cache = False
    # Ours shares the same base tensors (assign=True): both models see identical weights, stored once.
    with torch.device("meta"):
        ours = mq.Qwen2(mq.Qwen2Config.from_dict(hf_config.to_dict()))
    ours.load_state_dict(hf.state_dict(), assign=True)
    ours.requires_grad_(False)
    lora.inject(ours, r, alpha, dtype=torch.float32)
    ours.activation_checkpointing = True
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, lora_dropout=0.0,
                                                     target_modules=list(lora.QWEN2_TARGETS), task_type="CAUSAL_LM"))
    for p in theirs.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.enable_input_require_grads()
    return ours, theirs


def _train_batch(device: str, vocab_size: int, micro: int, seq: int) -> dict:
    ids = torch.randint(0, vocab_size, (micro, seq), device=device)
    mask = torch.ones_like(ids)
    mask[1::2, -seq // 4:] = 0  # half the rows right-padded by a quarter, as in real batches
    labels = ids.roll(-1, dims=1).masked_fill(mask.roll(-1, dims=1) == 0, K.IGNORE_INDEX)
    labels[:, -1] = K.IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _ours_step(ours, batch: dict, lam: float, device: str, autocast):
    import phaseguard as pg
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)

    def step():
        pg.train_step(ours, [batch], lam, "all", device, autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _theirs_step(theirs, batch: dict, lam: float, autocast):
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def step():
        with autocast():
            logits = theirs(input_ids=ids, attention_mask=mask).logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=K.IGNORE_INDEX)
            if lam > 0:  # the usual transformers + PEFT recipe: KL over every real token
                with torch.no_grad(), theirs.disable_adapter():
                    ref = theirs(input_ids=ids, attention_mask=mask).logits
                loss = loss + lam * eager_kl(logits, ref)[mask.bool()].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _measure(step, reps: int, device: str):
    """min / median / max seconds of step over reps (after one warm-up), and its peak memory on CUDA."""
    step()  # warm-up (allocations, autotuning)
    base = 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # weights (shared by both sides) and optimizer state
    seconds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return {"min": min(seconds), "median": statistics.median(seconds), "max": max(seconds)}, peak


def _monitor_cost(ours, device: str, vocab_size: int, reps: int, autocast, step_s: float) -> dict:
    """The monitor's seconds on the 24 canaries, and its share of training (once per 5 steps of 4 micro-batches)."""
    import monitor
    canaries = (torch.randint(0, vocab_size, (N_CANARIES, 48), device=device),
                torch.ones(N_CANARIES, 48, dtype=torch.long, device=device))
    reference = monitor.reference_state(ours, canaries, min(K_TOP, vocab_size))
    with autocast():  # Eq. 2 alone, from its own forward
        monitor_s = _measure(lambda: monitor.js(monitor.first_decode(ours, canaries), reference), reps, device)[0]["median"]
    return {"seconds": monitor_s, "fraction_of_training": monitor_s / (5 * 4 * step_s + monitor_s), "target": 0.01}


def _train_step_lines(out: dict, device: str, shape: dict, seq: int, micro: int, r: int, reps: int) -> list[str]:
    fmt_mem = lambda b: "n/a (CPU)" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = [f"Peak memory is above the memory allocated before the step (weights and optimizer state excluded).", "",
             f"## One training step, {device}: {shape['num_hidden_layers']} layers at hidden {shape['hidden_size']}, "
             f"vocab {shape['vocab_size']}, micro-batch {micro} x {seq}, r = {r}, median of {reps}", "",
             "| provider / method | tokens/s (median) | step seconds min / median / max | peak memory |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['tokens_per_s']:.0f} | {v['seconds_min']:.4f} / {v['seconds']:.4f} / {v['seconds_max']:.4f} | "
              f"{fmt_mem(v['peak_bytes'])} |" for k, v in out["results"].items()]
    target_head = "target (H100)" if device == "cuda" else "GPU target (not comparable: CPU, tiny shapes)"
    lines += ["", f"| ratio | value | {target_head} |", "|---|---|---|"]
    targets = {"ours/theirs tokens/s none": ">= 1.3", "ours/theirs tokens/s kl": ">= 1.3",
               "kl step / none step (ours)": "<= 1.45", "ours/theirs peak memory kl": "<= 0.8"}
    lines += [f"| {k} | {v:.3f} | {targets[k]} |" for k, v in out["ratios"].items()]
    lines += [f"| monitor / training time (every 5 steps of 4 micro-batches) | {out['monitor']['fraction_of_training']:.4f} | <= 0.01 |"]
    return lines


def static_main() -> None:
    """--static: every Triton kernel compiled (not run) for sm_80 / sm_90 / sm_100 at the paper's shapes, no
    GPU needed: registers, spills, shared memory and blocks per SM (compile_check.py; the same check as
    tests/test_compile.py). Exits 1 if a kernel breaks a target's limit."""
    import compile_check
    if not K.HAS_TRITON:
        raise SystemExit("error: bench.py --static needs Triton (Linux x86-64)")
    rows, skipped = compile_check.static_table(V, K_TOP)
    markdown = compile_check.markdown(rows, skipped, V, K_TOP)
    problems = [line for row in rows for line in compile_check.problems(row)]
    payload = {"label": "compiled, not run", "V": V, "k": K_TOP, "rows": rows, "skipped": skipped,
               "problems": problems, "versions": versions(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    print(markdown)
    print(f"written: {write_results('static-compiled-not-run', payload, markdown)}.{{json,md}}")
    if problems:
        raise SystemExit("error: over a target's limits:\n" + "\n".join(problems))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="N for kl_div and fused (CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider (CUDA)")
    parser.add_argument("--cpu", action="store_true", help="run the CPU benchmark even when CUDA is available")
    parser.add_argument("--cpu-tokens", type=int, default=256, help="N for the CPU timings")
    parser.add_argument("--cpu-hidden", type=int, default=128, help="H for the CPU runs (reduced from 3,584)")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel benchmark")
    parser.add_argument("--no-train-step", action="store_true", help="skip the training-step benchmark")
    parser.add_argument("--train-reps", type=int, default=5, help="timed repetitions of the training step")
    parser.add_argument("--static", action="store_true",
                        help="only compile the Triton kernels for sm_80/sm_90/sm_100 and write their resources (no GPU)")
    args = parser.parse_args()
    if args.static:
        return static_main()
    cuda = torch.cuda.is_available() and not args.cpu
    if not args.no_kernels:
        cuda_main(args) if cuda else cpu_main(args)
    if not args.no_train_step:
        device = "cuda" if cuda else "cpu"
        payload, lines = train_step_bench(device, args.train_reps)
        name = torch.cuda.get_device_name() if cuda else "cpu"
        payload.update(device_name=name, versions=versions(), date=datetime.datetime.now().isoformat(timespec="seconds"))
        markdown = "\n".join([f"# Training step: ours vs transformers + PEFT ({name})", "",
                              *([] if cuda else ["CPU at tiny shapes: checks the code path; not a performance claim.", ""]),
                              *lines])
        print(markdown)
        print(f"written: {write_results(name + '-train-step', payload, markdown)}.{{json,md}}")


if __name__ == "__main__":
    main()
