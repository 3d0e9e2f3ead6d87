#!/usr/bin/env bash
# The GPU checks in one short run (about 8 minutes at most), for a time-limited lease on a CUDA
# machine, most telling first, each part under its own time limit:
#   1. correctness of the Triton backend on CUDA tensors, both modes (16-bit accuracy, every GPU
#      tile config pinned, opcheck, determinism, the whole model), then auto's CUDA dispatch
#      (tests/test_gpu_dispatch.py, with the tuner timing real candidates);
#   2. every Xception layer in bf16, forward and forward+backward, batch 32, channels_last:
#      triton (fused), triton-split, auto and the eager nn.Conv2d pair (cuDNN);
#   3. the whole model in bf16 (eval and the training step) with the same paths;
#   4. the dispatch table rebuilt from this GPU's recorded results plus this run's (a preview: see below);
#   5. the rest of the Triton tests, in the time left.
# tests/conftest.py runs the Triton tests on CUDA tensors when CUDA is there.
#
# Usage: bash benchmarks/gpu_check.sh OUT_DIR [PYTHON]
# OUT_DIR gets env.txt, quick-tests.log, dispatch-tests.log, layers.log, model.log, table.log, tests.log,
# results/ (benchmarks/results/cuda-<gpu>.jsonl with this run's rows appended, its .md: the layers
# report then the model report, and the charts) and gpu_dispatch_table.json.
# To record the run: copy OUT_DIR/results/* into benchmarks/results/, then rebuild the committed table
# from the committed file: python -m benchmarks.dispatch_table benchmarks/results/cuda-<gpu>.jsonl
# (add --capability sm_XY while that file holds rows from runs that did not record it).
# QUICK_TIMEOUT, DISPATCH_TIMEOUT, LAYERS_TIMEOUT, MODEL_TIMEOUT and TEST_TIMEOUT bound the parts
# (seconds; 80 + 40 + 170 + 130 + 60 by default), under a 10-minute call.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out/results"
export PYTHONUNBUFFERED=1
# auto as a user gets it: the committed table, the default Triton mode.
unset SEPCONV_TRITON_MODE SEPCONV_TUNE XCEPTION_SEPCONV_BACKEND
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

# One benchmark run (SIGINT on timeout: it then writes the report of the cases it finished). Its
# rows are appended to results/<slug>.jsonl; its report is kept as results/<slug>.<part>.md.
bench() {
    local limit=$1 part=$2
    shift 2
    timeout -s INT "$limit" "$py" -m benchmarks --device cuda --dtypes bf16 --layout channels_last --batch 32 \
        --modes fwd,full --out "$out/results" "$@" 2>&1 | tee "$out/$part.log" | tail -60
    echo "$part benchmark: exit status ${PIPESTATUS[0]} after ${SECONDS}s"
    [ -f "$out/results/$slug.md" ] && mv "$out/results/$slug.md" "$out/results/$slug.$part.md"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$py" -c "import torch, triton
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print('gpu', torch.cuda.get_device_name(0), 'capability sm_%d%d' % torch.cuda.get_device_capability(0))
print('tf32: cudnn.allow_tf32', torch.backends.cudnn.allow_tf32,
      'cuda.matmul.allow_tf32', torch.backends.cuda.matmul.allow_tf32)"
    git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -20
    echo "cpus: $(nproc)"
} 2>&1 | tee "$out/env.txt"
slug=$("$py" -c "from benchmarks.machine import device_slug; print(device_slug('cuda'))" 2>/dev/null || echo cuda-unknown)
capability=$("$py" -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo "")
[ -f "benchmarks/results/$slug.jsonl" ] && cp "benchmarks/results/$slug.jsonl" "$out/results/$slug.jsonl"

tests "${QUICK_TIMEOUT:-80}" quick-tests.log tests/test_triton.py tests/test_triton_split.py \
    tests/test_separable_conv.py tests/test_model.py \
    -k "triton and not aot and (precision or every or opcheck or deterministic or model or setting)"
tests "${DISPATCH_TIMEOUT:-40}" dispatch-tests.log tests/test_gpu_dispatch.py

bench "${LAYERS_TIMEOUT:-170}" layers --suite layers --quick --providers triton,triton-split,auto,eager
bench "${MODEL_TIMEOUT:-130}" model --suite model --no-peak \
    --providers eager,triton-fused,triton-unfused,triton-split-fused,triton-split-unfused,auto-fused,auto-unfused
cat "$out/results/$slug".layers.md "$out/results/$slug".model.md > "$out/results/$slug.md" 2>/dev/null

timeout 60 "$py" -m benchmarks.dispatch_table "$out/results/$slug.jsonl" ${capability:+--capability "$capability"} \
    --out "$out/gpu_dispatch_table.json" 2>&1 | tee "$out/table.log"
"$py" - "$out/gpu_dispatch_table.json" <<'EOF' 2>&1 | tee -a "$out/table.log"
import json, sys
table = json.load(open(sys.argv[1]))
for e in table["entries"]:
    times = ", ".join(f"{name} {ms:.3f}" for name, ms in e["times_ms"].items())
    print(f"{e['device_class']} {e['dtype']} {e['mode']} {e['in_channels']}->{e['out_channels']}@{e['height']} "
          f"N{e['batch']}: {e['choice']} ({times} ms; run {e['run_id']})")
EOF

tests "${TEST_TIMEOUT:-60}" tests.log tests/test_triton_split.py tests/test_separable_conv.py tests/test_triton.py \
    -k "triton and not aot and not (precision or every or opcheck or deterministic or model or setting)"
echo "gpu_check: done after ${SECONDS}s"
