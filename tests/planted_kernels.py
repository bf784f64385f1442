"""Launches that are wrong on purpose, for tests/test_compile.py: the compile check must reject them.
Loaded by compile_check.py in its own process (real Triton, not the interpreter)."""
import torch
import triton
import triton.language as tl

import compile_check as C


@triton.jit
def _transpose_tile_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # Transposing a register tile goes through shared memory: BLOCK x BLOCK fp32 = 4 BLOCK^2 bytes.
    rows = tl.arange(0, BLOCK)
    offsets = rows[:, None] * BLOCK + rows[None, :]
    tl.store(y_ptr + offsets, tl.trans(tl.load(x_ptr + offsets)))


def planted_launches(V, k):
    """The KL forward as launched at (V, k) but with one warp (4,096 columns of two rows in 32 threads:
    it spills), and a 256 x 256 fp32 tile transposed (256 KB of shared memory, more than any target
    gives a block)."""
    kl_fwd = next(x for x in C.paper_launches(V, k) if x.name == "kl_fwd HAS_MASK=False")
    return [kl_fwd._replace(name="kl_fwd num_warps=1", args={**kl_fwd.args, "num_warps": 1}),
            C.Launch("transpose 256 x 256", _transpose_tile_kernel,
                     dict(x_ptr=torch.float32, y_ptr=torch.float32, BLOCK=256, num_warps=8))]
