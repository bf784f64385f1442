"""On a CUDA machine: the kernels as the driver loaded them after real launches at the paper's V, beside
compile_check's ahead-of-time compile for this GPU's target. Checks that the ahead-of-time compile is the
launched one (same signature, 16-byte specialisations and constexprs) and prints registers (ptxas -v vs
the driver's) and local memory (ptxas' stack frame vs the driver's); exits 1 on a difference.
Prepared for bench/device_check.sh: `python3 bench/driver_resources.py`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import bench  # noqa: E402
import compile_check as C  # noqa: E402
import kernels as K  # noqa: E402


def launch_every_variant(V: int, k: int, H: int) -> None:
    """The public functions on bf16 CUDA tensors: every kernel variant of compile_check.paper_launches."""
    dev, g = "cuda", torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(4, V, device=dev, generator=g).bfloat16()
    ids, logprobs = K.reference_topk(logits.float(), k)
    for variant in K.JS_VARIANTS:
        K.topk_js(logits, ids, logprobs, variant)
    for mask in (None, torch.tensor([True, False, True, True], device=dev)):
        K.kl_div(logits.clone().requires_grad_(), logits.roll(1, 1), mask).sum().backward()
    hidden = torch.randn(4, H, device=dev, generator=g).bfloat16()
    weight = (0.02 * torch.randn(V, H, device=dev, generator=g)).bfloat16()
    labels = torch.tensor([1, K.IGNORE_INDEX, 5, 7], device=dev)
    for ref in (None, hidden.flip(0)):
        kl_mask = None if ref is None else labels != K.IGNORE_INDEX
        K.fused_linear_ce_kl(hidden.clone().requires_grad_(), ref, weight, labels, kl_mask, 1.0, 0.1).loss.backward()
        with torch.no_grad():
            K.fused_linear_ce_kl(hidden, ref, weight, labels, kl_mask, 1.0, 0.1)
    torch.cuda.synchronize()


def launched(launch: C.Launch):
    """The kernel the JIT cache holds with this launch's constexprs and num_warps, or None."""
    fn = launch.kernel
    want = {p.name: launch.args[p.name] for p in fn.params if p.is_constexpr}
    for caches in fn.device_caches.values():
        for kernel in caches[0].values():
            have = {fn.arg_names[path[0]]: value for path, value in kernel.src.constants.items()}
            if all(have.get(n) == v for n, v in want.items()) and kernel.metadata.num_warps == launch.args["num_warps"]:
                kernel._init_handles()  # loads it: n_regs, n_spills (local bytes per thread) from the driver
                return kernel
    return None


def main() -> int:
    major, minor = torch.cuda.get_device_capability()
    target = next((t for t in C.TARGETS if t.capability == 10 * major + minor), None)
    if target is None:
        print(f"{torch.cuda.get_device_name()}: compute capability {major}.{minor} is not one of compile_check's targets")
        return 0
    launch_every_variant(bench.V, bench.K_TOP, bench.H)
    print(f"# {torch.cuda.get_device_name()} ({target.name}): ahead-of-time compile vs the launched kernel")
    print("| kernel | same specialisation | registers: ptxas / driver | local bytes: ptxas stack / driver |")
    print("|---|---|---|---|")
    bad = 0
    for launch in C.paper_launches(bench.V, bench.K_TOP):
        aot, row, real = C.compile_launch(launch, target), C.resources(launch, target), launched(launch)
        if real is None:
            print(f"| {launch.name} | never launched | | |")
            bad += 1
            continue
        same = (aot.src.signature, aot.src.attrs, aot.src.constants) == (real.src.signature, real.src.attrs, real.src.constants)
        ok = same and row["registers"] == real.n_regs and row["stack_frame"] == real.n_spills
        bad += not ok
        print(f"| {launch.name} | {'yes' if same else 'NO'} | {row['registers']} / {real.n_regs} | "
              f"{row['stack_frame']} / {real.n_spills} |")
    print("all agree" if not bad else f"{bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
