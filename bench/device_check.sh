#!/usr/bin/env bash
# One call on a lent GPU machine (its own python3 has torch, triton, transformers, peft; no network).
# Prepared for the device tool; not yet run (no session so far had a GPU). Aim: under 5 minutes.
#   1. the GPU and the versions;
#   1b. the ahead-of-time compile test (tests/test_compile.py: every kernel for sm_80/sm_90/sm_100, spills,
#      shared memory, registers) with this machine's python3 and its Triton, then bench/driver_resources.py
#      (the same kernels launched here: the driver's registers beside ptxas'); a failure is logged, not fatal;
#   2. the whole training loop on CUDA at tiny size (bf16 autocast, activation checkpointing, the
#      Triton kernels inside the loop, the trigger), OpSwap because ../shared/data does not travel;
#   3. make bench with that python (kernels, then one training step vs transformers + PEFT).
# Liger-Kernel: carry it as a wheel in .whl (see the device README) and it is installed first.
set -euo pipefail
export PYTHONUNBUFFERED=1 PHASEGUARD_CACHE=/tmp/pgcache OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# Not the launch-recording test: it runs the kernels in Triton's interpreter, which fails on the machine's
# Triton 3.6 (seen here with triton==3.6.0, as tests/test_kernels.py does: "only 0-dimensional arrays can be
# converted to Python scalars"); make test runs it with the pinned Triton.
python3 -m pytest tests/test_compile.py -q -p no:cacheprovider -rs -k "not launch_code" 2>&1 | tee "$OUT/compile_test.log" \
  || echo "compile test FAILED: see compile_test.log" | tee -a "$OUT/gpu.txt"
# The same kernels launched on this GPU: is the ahead-of-time compile the launched one, and do ptxas' numbers
# match the driver's?
python3 bench/driver_resources.py 2>&1 | tee "$OUT/driver_resources.log" \
  || echo "driver_resources: a difference or a failure: see driver_resources.log" | tee -a "$OUT/gpu.txt"
python3 phaseguard.py train --preset tiny --device cuda --task opswap --method phaseguard --out /tmp/tiny-cuda 2>&1 \
  | tr '\r' '\n' | grep -v 'it/s' | tee "$OUT/tiny_cuda.log"
cp /tmp/tiny-cuda/summary.json "$OUT/tiny_cuda_summary.json"
python3 bench.py 2>&1 | tee "$OUT/bench.log"
for f in bench/results/*; do  # the GPU results only: at most 8 files come back
  case "$f" in *-cpu*) ;; *) cp "$f" "$OUT/" ;; esac
done
