"""bench.py's CUDA half without a GPU: its cases run on the CPU at tiny shapes, with triton's do_bench and the CUDA
memory counters stubbed. What this checks is the call graph (each provider once per mode, in order, the bound or
GEMM time on ours only, no case failing), not speed: `make bench` on a GPU measures that."""
import pytest
import torch

import bench

N, V, H, K_TOP = 16, 512, 32, 8
BANDWIDTH = 1e9  # bytes / s


@pytest.fixture
def session(monkeypatch, one_thread):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch paths: the CUDA half's kernels are not what is tested
    monkeypatch.setattr(bench, "V", V)
    monkeypatch.setattr(bench, "H", H)
    monkeypatch.setattr(bench, "K_TOP", K_TOP)
    monkeypatch.setattr(bench, "bench_ms", lambda fn, leaves=(): (fn(), {"min": 1.0, "median": 2.0, "max": 3.0})[1])
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 1000)
    liger = {"jsd": lambda logp, logq: (logp.exp() * (logp - logq)).sum(),  # stand-ins with Liger's signatures
             "flce": lambda weight, hidden, labels: (hidden @ weight.T).float().sum(),
             "fljsd": lambda hidden, weight, ref_hidden, ref_weight: (hidden @ weight.T).float().sum()}
    return bench.CudaSession(BANDWIDTH, liger, no_compile=True)


def test_cuda_cases_run_each_provider_once_with_the_bound_on_ours(session):
    bench.bench_monitor(session, "cpu")
    bench.bench_kl_div(session, "cpu", [N])
    bench.bench_fused(session, "cpu", [N])
    assert [r for r in session.records if "error" in r] == []
    got = [(r["op"], r["provider"], r["mode"], r["bound_ms"] is not None, r["gemm_ms"] is not None)
           for r in session.records]
    js = [(f"topk_js[{v}]", p, "fwd", p == "ours", False) for v in ("renorm", "rest") for p in ("ours", "eager")]
    kl = [("kl_div", p, m, p == "ours", False) for m in ("fwd", "fwd+bwd") for p in ("ours", "eager", "liger")]
    fused = [("fused_linear_ce_kl", p, m, False, p == "ours") for m in ("fwd", "fwd+bwd") for p in ("ours", "eager", "liger")]
    assert got == js + kl + fused
    kl_fwd, kl_bwd = (r for r in session.records if r["op"] == "kl_div" and r["provider"] == "ours")
    # The bound is the bytes the kernel must move over the copy bandwidth: read p and q (fwd); + again, write grad.
    assert kl_fwd["bound_ms"] == pytest.approx(2 * N * V * 2 / BANDWIDTH * 1e3)
    assert kl_bwd["bound_ms"] == pytest.approx(5 * N * V * 2 / BANDWIDTH * 1e3)
    table = bench.cuda_markdown(dict(gpu="stub", date="", versions={}, copy_bandwidth_GBps=1.0, correctness={},
                                     liger_note="", records=session.records,
                                     targets=bench.cuda_targets(session.records)))
    for op, shape in (("topk_js[renorm]", f"24x{V} k={K_TOP}"), ("kl_div", f"{N}x{V}"), ("fused_linear_ce_kl", f"{N}x{H}->{V}")):
        modes = ("fwd",) if op.startswith("topk_js") else ("fwd", "fwd+bwd")
        for mode in modes:  # one row per op, shape and mode: ours, then its ratios to eager, compile and liger
            assert table.count(f"\n| {op} | {shape} | {mode} | 2.000 |") == 1, (op, mode)


def test_cuda_correctness_passes_on_the_reference_paths(session):
    out = bench.cuda_correctness("cpu")
    assert out.pop("pass") is True
    assert set(out) == {"topk_js[renorm] max abs err", "topk_js[rest] max abs err", "kl_div rel err",
                        "kl_div grad rel err", "fused loss rel err", "fused grad rel err"}
