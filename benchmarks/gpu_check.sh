#!/usr/bin/env bash
# The GPU checks in one short run, for a time-limited lease on a CUDA machine:
#   1. the Triton tests on CUDA tensors (tests/conftest.py picks CUDA when it is there);
#   2. the GPU benchmark, cut to fit: batch 32, bf16 and fp32, channels_last, triton (fused and
#      split mode) vs the eager nn.Conv2d pair (cuDNN), the ten Xception layers and the whole model.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR [PYTHON]   (OUT_DIR gets env.txt, tests.log,
# bench.log and the benchmark's cuda-<gpu>.jsonl/.md). TEST_TIMEOUT / BENCH_TIMEOUT: seconds.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The cpp backend is for CPUs: without a compiler it reports itself unavailable instead of
# spending the lease on its JIT build.
export CXX=/nonexistent/c++

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name(0))"
    echo "cpus: $(nproc)"
} 2>&1 | tee "$out/env.txt"

# Correctness. The shared grid runs each kernel's first tile config (SEPCONV_TRITON_AUTOTUNE=0: one
# compile per kernel size, no timing runs); test_every_gpu_config pins every config in turn.
SEPCONV_REQUIRE_BACKENDS=triton SEPCONV_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" \
    "$py" -m pytest -q -rs -p no:cacheprovider tests/test_triton.py tests/test_separable_conv.py \
    tests/test_triton_split.py tests/test_model.py -k "triton and not aot" 2>&1 | tee "$out/tests.log" | tail -40
echo "tests exit status: ${PIPESTATUS[0]}"

# Speed, autotuned. SIGINT on timeout: the benchmark then writes the report of the cases it finished.
timeout -s INT "${BENCH_TIMEOUT:-420}" "$py" -m benchmarks --device cuda --quick --backends triton \
    --providers triton,triton-split,eager,triton-fused,triton-unfused,triton-split-fused,triton-split-unfused \
    --dtypes bf16,fp32 --layout channels_last --batch 32 --out "$out" 2>&1 | tee "$out/bench.log" | tail -90
echo "benchmark exit status: ${PIPESTATUS[0]}"
