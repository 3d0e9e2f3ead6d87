#!/usr/bin/env bash
# The GPU checks in one short run, for a time-limited lease on a CUDA machine, most telling first:
#   1. a quick correctness pass of the Triton backend on CUDA tensors, both modes (16-bit accuracy,
#      every GPU tile config pinned, opcheck, determinism, the whole model);
#   2. the GPU benchmark, cut to fit: batch 32, bf16 and fp32, channels_last, triton (fused and
#      split mode) vs the eager nn.Conv2d pair (cuDNN), the ten Xception layers and the whole model;
#   3. the rest of the Triton tests (the shared geometry/option grids, both modes).
# tests/conftest.py runs the Triton tests on CUDA tensors when CUDA is there.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR [PYTHON]   (OUT_DIR gets env.txt, quick-tests.log,
# bench.log, tests.log and the benchmark's cuda-<gpu>.jsonl/.md). QUICK_TIMEOUT, BENCH_TIMEOUT and
# TEST_TIMEOUT bound the three parts (seconds; 90 + 300 + 180 by default, under a 10-minute call).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The cpp backend is for CPUs: without a compiler it reports itself unavailable instead of
# spending the lease on its JIT build.
export CXX=/nonexistent/c++
# One config per kernel in the tests (SEPCONV_TRITON_AUTOTUNE=0: one compile per kernel size, no
# timing runs); the test_*every* tests pin every GPU config in turn. The benchmark autotunes.
tests() {
    local limit=$1 log=$2
    shift 2
    SEPCONV_REQUIRE_BACKENDS=triton SEPCONV_TRITON_AUTOTUNE=0 timeout "$limit" \
        "$py" -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$out/$log" | tail -25
    echo "$log: exit status ${PIPESTATUS[0]} after ${SECONDS}s"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name(0))"
    echo "cpus: $(nproc)"
} 2>&1 | tee "$out/env.txt"

tests "${QUICK_TIMEOUT:-90}" quick-tests.log tests/test_triton.py tests/test_triton_split.py tests/test_separable_conv.py \
    tests/test_model.py \
    -k "triton and not aot and (precision or every or opcheck or deterministic or model or setting)"

# SIGINT on timeout: the benchmark then writes the report of the cases it finished.
timeout -s INT "${BENCH_TIMEOUT:-300}" "$py" -m benchmarks --device cuda --quick --backends triton \
    --providers triton,triton-split,eager,triton-fused,triton-unfused,triton-split-fused,triton-split-unfused \
    --dtypes bf16,fp32 --layout channels_last --batch 32 --out "$out" 2>&1 | tee "$out/bench.log" | tail -90
echo "benchmark: exit status ${PIPESTATUS[0]} after ${SECONDS}s"

tests "${TEST_TIMEOUT:-180}" tests.log tests/test_triton_split.py tests/test_separable_conv.py tests/test_triton.py \
    -k "triton and not aot and not (precision or every or opcheck or deterministic or model or setting)"
