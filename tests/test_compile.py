"""The CUDA path without a GPU: every Triton kernel in kernels.py compiled ahead of time by Triton's own
compiler and bundled ptxas for sm_80 (A100), sm_90 (H100) and sm_100 (B200), at the block sizes, num_warps
and argument types the launch code uses for the paper's shapes (bench.V, bench.K_TOP), with its registers,
spills and shared memory checked against each target's limits (compile_check.py states them and their
source). The interpreter that runs the kernels elsewhere in the suite is lenient about types and knows no
hardware limits; the real compiler and ptxas are not, and they are something we did not write.

A target whose ptxas the installed Triton lacks is skipped by name. Compiled kernels are cached by
compile_check for the session (and by Triton on disk across sessions).
"""
import inspect

import pytest
import torch

pytest.importorskip("triton.backends.nvidia")

import bench  # noqa: E402  the paper's shapes: V = 152,064, k = 256
import compile_check as C  # noqa: E402
import kernels as K  # noqa: E402

# The interpreter evaluates both branches of tl.where in numpy (log 0, 0 * inf in discarded lanes).
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")]


@pytest.fixture(scope="session")
def paper_table():
    """All targets compiled once per session, in one clean process (compile_check.static_table)."""
    return C.static_table(bench.V, bench.K_TOP)


@pytest.mark.parametrize("target", C.TARGETS, ids=lambda t: t.name)
def test_kernels_compile_for_each_target_within_limits(target, paper_table, capsys):
    """0 bytes spilled, shared memory within the target's per-block limit, registers within what a block of
    the chosen num_warps may have; the table printed (make test shows it)."""
    all_rows, skipped = paper_table
    if target.name in skipped:
        pytest.skip(skipped[target.name] + "; not compiled")
    rows = [r for r in all_rows if r["target"] == target.name]
    assert len(rows) == len(C.paper_launches(bench.V, bench.K_TOP)) == 10
    with capsys.disabled():
        print("\n" + C.markdown(rows, {}, bench.V, bench.K_TOP))
    config = K.launch_config(bench.V, bench.K_TOP)
    assert {(r["num_warps"], r["BLOCK"]) for r in rows} == {(config["num_warps"], config["BLOCK"])}
    assert all(r["registers"] > 0 for r in rows)  # a ptxas log was read, not defaults
    bad = [line for r in rows for line in C.problems(r)]
    assert not bad, "\n".join(bad)
    assert all(r["blocks_per_sm"] >= 1 for r in rows)


# ------------------------------------------------------------------ planted failures: the checker rejects them
@pytest.fixture(scope="module")
def planted_rows():
    """tests/planted_kernels.py compiled for the first target with a ptxas, in one clean process."""
    target = next((t for t in C.TARGETS if C.ptxas_for(t) is not None), None)
    if target is None:
        pytest.skip("the installed Triton has no ptxas for any of " + ", ".join(t.name for t in C.TARGETS))
    rows, _ = C.static_table(bench.V, bench.K_TOP, (target,), launches="tests/planted_kernels.py:planted_launches")
    return {r["kernel"]: r for r in rows}


@pytest.mark.parametrize("kernel, complaint", [("kl_fwd num_warps=1", "spills"),
                                               ("transpose 256 x 256", "bytes of shared memory >")],
                         ids=["num_warps-forces-spills", "block-overflows-shared-memory"])
def test_planted_spills_and_shared_memory_overflow_fail_the_check(kernel, complaint, planted_rows):
    found = C.problems(planted_rows[kernel])
    assert len(found) == 1 and complaint in found[0], (planted_rows[kernel], found)


def test_register_limit_and_blocks_per_sm_arithmetic():
    """The occupancy arithmetic by hand: 64 K registers per SM in 256-register units per warp."""
    h100 = C.TARGETS[1]
    assert C.register_limit(8) == 255 and C.register_limit(16) == 128 and C.register_limit(32) == 64
    assert C.blocks_per_sm(64, 32, 8, h100) == (4, "registers")      # 2,048 per warp, 16 K per block
    assert C.blocks_per_sm(65, 32, 8, h100) == (3, "registers")      # 65 x 32 rounds up to 2,304
    assert C.blocks_per_sm(33, 32, 8, h100) == (6, "registers")      # 1,056 rounds up to 1,280 (unrounded: 7)
    assert C.blocks_per_sm(32, 77_000, 8, h100) == (2, "shared memory")  # 233,472 // 78,024 (without the 1 KB: 3)
    assert C.blocks_per_sm(32, 0, 8, h100) == (8, "warps")           # 64 warps / 8
    assert C.blocks_per_sm(32, 65_536, 8, h100) == (3, "shared memory")  # 228 K // (64 K + 1 K)
    assert C.blocks_per_sm(32, 0, 1, h100) == (32, "blocks")
    too_many = dict(kernel="k", target="sm_90", num_warps=16, BLOCK=4096, registers=129, spill_stores=0,
                    spill_loads=0, shared=0)
    assert C.problems(too_many) == ["k on sm_90 (num_warps=16, BLOCK=4096): 129 registers per thread > 128"]


def test_a_target_without_ptxas_is_reported_skipped(monkeypatch):
    """resource_table itself (this process): a target without ptxas compiles nothing and is named."""
    monkeypatch.setattr(C, "ptxas_for", lambda target: None if target.name == "sm_100" else "ptxas")
    rows, skipped = C.resource_table(bench.V, bench.K_TOP, targets=C.TARGETS[2:])
    assert rows == [] and list(skipped) == ["sm_100"] and "sm_100 (B200)" in skipped["sm_100"]
    table = C.markdown(rows, skipped, bench.V, bench.K_TOP)
    assert "compiled, not run" in table.splitlines()[0] and "Skipped: sm_100 (B200)" in table


# ------------------------------------------------------------------ what is compiled is what is launched
class _RecordLaunches:
    """Stands in for a kernel in kernels.py: records each launch's arguments, then runs it (interpreted)."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = inspect.signature(self.kernel.fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                                     if k != "num_warps"}).arguments
            self.calls.append((self.kernel, {**names, "num_warps": kwargs.get("num_warps")}))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _described_by(spec_args: dict, launched: dict) -> bool:
    """A recorded launch matches a compiled variant: tensors of the same dtype, equal ints and flags."""
    if spec_args.keys() != launched.keys():
        return False
    for name, want in spec_args.items():
        got = launched[name]
        if isinstance(want, torch.dtype):
            if not (isinstance(got, torch.Tensor) and got.dtype == want):
                return False
        elif isinstance(want, float):
            if not isinstance(got, float):
                return False
        elif got != want or type(got) is not type(want):
            return False
    return True


def test_compiled_variants_are_what_the_launch_code_launches(monkeypatch):
    """Run the public functions (interpreted) on bf16 inputs at a small V and record every launch: each must
    be one of compile_check's variants at that V (dtypes, ints, constexprs, num_warps), and each variant
    must be launched."""
    V, k, H, g = 300, 8, 16, torch.Generator().manual_seed(0)
    specs = C.paper_launches(V, k, module=K)
    calls = []
    for name in ("_topk_js_kernel", "_kl_fwd_kernel", "_kl_bwd_kernel", "_ce_kl_chunk_kernel"):
        monkeypatch.setattr(K, name, _RecordLaunches(getattr(K, name), calls))
    logits = torch.randn(3, V, generator=g).bfloat16()
    ids, logprobs = K.reference_topk(logits.float(), k)
    for variant in K.JS_VARIANTS:
        K.topk_js(logits, ids, logprobs, variant)
    for mask in (None, torch.tensor([True, False, True])):
        K.kl_div(logits.clone().requires_grad_(), logits.roll(1, 1), mask).sum().backward()
    hidden, weight = torch.randn(3, H, generator=g).bfloat16(), torch.randn(V, H, generator=g).bfloat16()
    labels = torch.tensor([1, -100, 5])
    for ref in (None, hidden.flip(0)):
        kl_mask = None if ref is None else labels != K.IGNORE_INDEX
        K.fused_linear_ce_kl(hidden.clone().requires_grad_(), ref, weight, labels, kl_mask, 1.0, 0.1).loss.backward()
        with torch.no_grad():
            K.fused_linear_ce_kl(hidden, ref, weight, labels, kl_mask, 1.0, 0.1)
    unmatched = [(kernel.fn.__name__, {n: getattr(v, "dtype", v) for n, v in args.items()})
                 for kernel, args in calls
                 if not any(s.kernel is kernel and _described_by(s.args, args) for s in specs)]
    assert not unmatched, "\n".join(map(str, unmatched))
    never = [s.name for s in specs if not any(s.kernel is kernel and _described_by(s.args, args)
                                              for kernel, args in calls)]
    assert not never, never
