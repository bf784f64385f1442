"""Every Triton kernel in kernels.py compiled ahead of time for A100 (sm_80), H100 (sm_90) and B200 (sm_100),
without a GPU, and its resources read back from ptxas and checked against the target's limits.

What is compiled is what the launch code would launch at the paper's shapes: the constexprs and num_warps
come from kernels.launch_config, and Triton's own argument binder specialises the arguments (types, 16-byte
divisibility of pointers and ints) as it does at a real launch. Per kernel and target the table gives
registers per thread, spill bytes (ptxas -v), shared memory per block (Triton's allocation plus any static
shared memory ptxas reports) and the resulting blocks per SM. It says nothing about speed: nothing runs.

Used by tests/test_compile.py (in `make test`) and by `make bench BENCH_ARGS=--static` (bench.py).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parent

# Limits per compute capability, from the CUDA C++ Programming Guide's "Technical Specifications per
# Compute Capability" table (as encoded in CCCL's cuda/__device/arch_traits.h): 64 K 32-bit registers per SM
# and per block, at most 255 per thread, 64 resident warps and 32 resident blocks per SM, 1 KB of shared
# memory reserved by the driver per block (cc >= 8.0). The register allocation unit, 256 registers per warp,
# is the CUDA Occupancy Calculator's.
REGS_PER_SM = 65_536
REGS_PER_THREAD_MAX = 255
REG_ALLOC_UNIT = 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
RESERVED_SMEM_PER_BLOCK = 1024


@dataclass(frozen=True)
class Target:
    name: str               # sm_80
    capability: int         # 80
    gpu: str                # a part of that capability, for the reader
    smem_per_sm: int        # bytes, the largest carve-out
    smem_per_block: int     # bytes, the opt-in maximum for one block (Triton opts in above 48 KB)


TARGETS = (
    Target("sm_80", 80, "A100", 164 * 1024, 163 * 1024),
    Target("sm_90", 90, "H100", 228 * 1024, 227 * 1024),
    Target("sm_100", 100, "B200", 228 * 1024, 227 * 1024),
)


class Launch(NamedTuple):
    """One kernel variant as the launch code calls it: the kernel and its arguments by name (tensors as
    torch dtypes), constexprs and num_warps included."""
    name: str
    kernel: object
    args: dict


def ptxas_for(target: Target) -> str | None:
    """The ptxas Triton's compiler picks for this target (Triton 3.9: ptxas for sm_80, ptxas-blackwell
    from sm_90 on), or None when the installed Triton has none."""
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        return get_ptxas(target.capability).path
    except RuntimeError:  # Triton: "Cannot find ptxas..." when its wheel or TRITON_PTXAS_PATH has none
        return None


def paper_launches(V: int, k: int, module=None) -> list[Launch]:
    """Every kernel variant with the arguments the launch sites in kernels.py pass for bf16 logits / bf16
    lm_head (tests/test_compile.py checks them against recorded launches). module: kernels.py as imported
    (default: import it)."""
    if module is None:
        import kernels as module
    K = module
    bf16, f32, i8, i32, i64 = torch.bfloat16, torch.float32, torch.int8, torch.int32, torch.int64
    stats = dict(kl_ptr=f32, m_p_ptr=f32, log_s_p_ptr=f32, m_q_ptr=f32, log_s_q_ptr=f32)
    pair = dict(p_ptr=bf16, q_ptr=bf16, p_stride=V, q_stride=V)
    out = []
    for rest in (False, True):
        out.append(Launch(f"topk_js REST_BIN={rest}", K._topk_js_kernel, dict(
            logits_ptr=bf16, row_stride=V, ids_ptr=i64, ref_logprobs_ptr=f32, js_ptr=f32, nonfinite_ptr=i32,
            V=V, K=k, REST_BIN=rest, **K.launch_config(V, k))))
    for mask in (False, True):
        mask_ptr = i8 if mask else f32  # no mask: the kl buffer stands in, never read
        out.append(Launch(f"kl_fwd HAS_MASK={mask}", K._kl_fwd_kernel, dict(
            **pair, row_mask_ptr=mask_ptr, **stats, nonfinite_ptr=i32, V=V, HAS_MASK=mask, **K.launch_config(V))))
        out.append(Launch(f"kl_bwd HAS_MASK={mask}", K._kl_bwd_kernel, dict(
            **pair, grad_ptr=bf16, grad_stride=V, grad_kl_ptr=f32, row_mask_ptr=mask_ptr, **stats, V=V,
            HAS_MASK=mask, **K.launch_config(V))))
    for ref in (False, True):
        for grad in (False, True):
            out.append(Launch(f"ce_kl_chunk HAS_REF={ref} COMPUTE_GRAD={grad}", K._ce_kl_chunk_kernel, dict(
                zp_ptr=f32, zq_ptr=f32, grad_ptr=bf16 if grad else f32, stride=V, labels_ptr=i64,
                kl_rows_ptr=i8 if ref else i64, ce_ptr=f32, kl_ptr=f32, V=V, ce_weight=1.0, kl_weight=0.1,
                HAS_REF=ref, COMPUTE_GRAD=grad, **K.launch_config(V))))
    return out


# ------------------------------------------------------------------ compile and read ptxas -v
_PTXAS_KEY = "phaseguard-ptxas-log-v1"


def _keep_ptxas_log(backend=None, stages=None, options=None, language=None, capability=None):
    """Triton stage hook: run its cubin stage with the ptxas -v log captured into the kernel's metadata,
    which Triton caches with the cubin (so a cache hit still has it). Called bare, it returns the
    (key, hash) Triton adds to its cache key."""
    if stages is None:
        return _PTXAS_KEY, _PTXAS_KEY
    from triton import knobs
    make_cubin = stages["cubin"]

    def cubin_with_log(src, metadata):
        log = io.StringIO()
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # Triton prints the log (ptxas runs with -v)
            out = make_cubin(src, metadata)
        metadata["ptxas_log"] = log.getvalue()
        return out
    stages["cubin"] = cubin_with_log


def compile_launch(launch: Launch, target: Target):
    """triton.compile exactly as a launch would: Triton's binder types and specialises the arguments
    (torch dtypes stand for tensors at 16-byte-aligned addresses, as fresh allocations are)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    fn = launch.kernel
    gpu = GPUTarget("cuda", target.capability, 32)
    backend = make_backend(gpu)
    kwargs = {name: MockTensor.wrap_dtype(value) for name, value in launch.args.items()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    with knobs.runtime.scope():
        knobs.runtime.add_stages_inspection_hook = _keep_ptxas_log
        return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)


def _ptxas_number(log: str, pattern: str) -> int:
    found = re.search(pattern, log)
    return int(found.group(1)) if found else 0


def resources(launch: Launch, target: Target) -> dict:
    """One row of the table: what ptxas and Triton allocated for this kernel on this target."""
    compiled = compile_launch(launch, target)
    log = compiled.metadata.ptxas_log
    if "Used" not in log:
        raise RuntimeError(f"{launch.name} on {target.name}: no ptxas -v log to read:\n{log}")
    num_warps = compiled.metadata.num_warps
    row = dict(kernel=launch.name, target=target.name, num_warps=num_warps,
               BLOCK=launch.args.get("BLOCK"), BLOCK_K=launch.args.get("BLOCK_K"),
               registers=_ptxas_number(log, r"Used (\d+) registers"),
               spill_stores=_ptxas_number(log, r"(\d+) bytes spill stores"),
               spill_loads=_ptxas_number(log, r"(\d+) bytes spill loads"),
               stack_frame=_ptxas_number(log, r"(\d+) bytes stack frame"),
               shared=compiled.metadata.shared + _ptxas_number(log, r"(\d+) bytes smem"))
    row["blocks_per_sm"], row["limited_by"] = blocks_per_sm(row["registers"], row["shared"], num_warps, target)
    return row


def register_limit(num_warps: int) -> int:
    """Most registers per thread a block of num_warps can be given (256-register units per warp)."""
    units_per_warp = REGS_PER_SM // (num_warps * REG_ALLOC_UNIT)
    return min(REGS_PER_THREAD_MAX, units_per_warp * REG_ALLOC_UNIT // 32)


def blocks_per_sm(registers: int, shared: int, num_warps: int, target: Target) -> tuple[int, str]:
    """Resident blocks per SM, the least of four bounds (as the CUDA Occupancy Calculator): warps,
    blocks, registers (per-warp allocation rounded up to 256) and shared memory (the block's plus the
    driver's reserved 1 KB, against the largest carve-out). 0 means the launch would fail."""
    regs_per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    bounds = {"warps": MAX_WARPS_PER_SM // num_warps, "blocks": MAX_BLOCKS_PER_SM,
              "registers": REGS_PER_SM // max(1, regs_per_warp * num_warps),
              "shared memory": target.smem_per_sm // (shared + RESERVED_SMEM_PER_BLOCK)}
    limiter = min(bounds, key=bounds.get)
    return bounds[limiter], limiter


def problems(row: dict) -> list[str]:
    """What would make this kernel fail or crawl on the target: each line names the kernel and the limit."""
    target = next(t for t in TARGETS if t.name == row["target"])
    where = f"{row['kernel']} on {row['target']} (num_warps={row['num_warps']}, BLOCK={row['BLOCK']})"
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"{where}: spills {row['spill_stores']} bytes stored, {row['spill_loads']} loaded (0 allowed)")
    if row["shared"] > target.smem_per_block:
        out.append(f"{where}: {row['shared']} bytes of shared memory > the {target.smem_per_block} a block may have")
    if row["registers"] > register_limit(row["num_warps"]):
        out.append(f"{where}: {row['registers']} registers per thread > {register_limit(row['num_warps'])}")
    return out


# ------------------------------------------------------------------ the table (test and bench)
_rows: dict = {}  # (kernel variant, target, arguments) -> row: each compiled once per process


def resource_table(V: int, k: int, targets=TARGETS, make_launches=paper_launches) -> tuple[list[dict], dict]:
    """Rows for every kernel variant make_launches(V, k) gives, on every target whose ptxas is installed,
    and {target name: why skipped} for the others. Needs real (not interpreted) Triton kernels: see
    static_table."""
    rows, skipped = [], {}
    for target in targets:
        if ptxas_for(target) is None:
            skipped[target.name] = f"{target.name} ({target.gpu}): the installed Triton has no ptxas for it"
            continue
        for launch in make_launches(V, k):
            key = (launch.name, target.name, repr(sorted(launch.args.items(), key=lambda kv: kv[0])))
            if key not in _rows:
                _rows[key] = resources(launch, target)
            rows.append(_rows[key])
    return rows, skipped


def markdown(rows: list[dict], skipped: dict, V: int, k: int) -> str:
    """The table, with what it rests on; 'compiled, not run' in its title."""
    import triton
    limits = "; ".join(f"{t.name} ({t.gpu}) {t.smem_per_block // 1024} KB shared memory per block, "
                       f"{t.smem_per_sm // 1024} KB per SM" for t in TARGETS)
    lines = [f"# Triton kernels compiled, not run (V = {V:,}, k = {k}, bf16 logits / lm_head; Triton {triton.__version__})",
             "",
             "Compiled ahead of time by Triton and its bundled ptxas, without a GPU, with the block sizes and num_warps",
             "of kernels.launch_config: registers per thread, spill bytes and stack frame from ptxas -v, shared memory",
             "per block from Triton's allocation. Nothing here ran: it says nothing about speed.",
             "",
             f"Limits (CUDA C++ Programming Guide, technical specifications per compute capability): {limits};",
             f"{REGS_PER_THREAD_MAX} registers per thread and {REGS_PER_SM // 1024} K per SM and per block; "
             f"{MAX_WARPS_PER_SM} warps and {MAX_BLOCKS_PER_SM} blocks per SM.",
             "Blocks per SM = the least of 64 warps / num_warps, 32 blocks, 64 K registers / (registers per warp rounded",
             "up to 256, times num_warps) and shared memory per SM / (the block's + 1 KB the driver reserves).",
             "",
             "| kernel | target | num_warps | BLOCK | registers | spills (stores / loads, bytes) | stack frame | "
             "shared memory (bytes) | blocks per SM (limited by) | within limits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        block = f"{r['BLOCK']}" + (f", BLOCK_K {r['BLOCK_K']}" if r["BLOCK_K"] else "")
        ok = "yes" if not problems(r) else "NO"
        lines.append(f"| {r['kernel']} | {r['target']} | {r['num_warps']} | {block} | {r['registers']} | "
                     f"{r['spill_stores']} / {r['spill_loads']} | {r['stack_frame']} | {r['shared']} | "
                     f"{r['blocks_per_sm']} ({r['limited_by']}) | {ok} |")
    lines += [f"\nSkipped: {why}" for why in skipped.values()]
    return "\n".join(lines)


def static_table(V: int, k: int, targets=TARGETS, launches: str | None = None) -> tuple[list[dict], dict]:
    """resource_table in a fresh process without TRITON_INTERPRET: under the interpreter triton.language's
    own jit functions (tl.sum, ...) are interpreted ones, which the compiler cannot use. launches:
    "file.py:function" giving the Launch list (default: paper_launches)."""
    command = [sys.executable, str(REPO / "compile_check.py"), "--V", str(V), "--k", str(k),
               "--targets", *[t.name for t in targets]] + (["--launches", launches] if launches else [])
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"compile_check.py failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["rows"], result["skipped"]


def _load_launches(spec: str):
    path, function = spec.rsplit(":", 1)
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return getattr(module, function)


def main() -> None:
    import argparse
    parser = argparse.ArgumentParser(description="compile kernels.py ahead of time; print the rows as JSON")
    parser.add_argument("--V", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--targets", nargs="+", choices=[t.name for t in TARGETS], default=[t.name for t in TARGETS])
    parser.add_argument("--launches", help="file.py:function(V, k) -> [Launch] (default: paper_launches)")
    args = parser.parse_args()
    targets = [t for t in TARGETS if t.name in args.targets]
    make_launches = _load_launches(args.launches) if args.launches else paper_launches
    rows, skipped = resource_table(args.V, args.k, targets, make_launches)
    print(json.dumps({"rows": rows, "skipped": skipped}))


if __name__ == "__main__":
    main()
