#!/usr/bin/env bash
# The GPU checks in one short run (about 9.5 minutes at most), for a time-limited lease on a CUDA
# machine, most telling first, each part under its own time limit:
#   1. correctness of the Triton backend on CUDA tensors, both modes (16-bit accuracy, every GPU
#      tile config pinned, opcheck, determinism, the whole model);
#   2. the host time of one call per provider (benchmarks.host_time: a tiny layer, so the Python,
#      dispatch and launch work is all that is left; before it, direct launches and op calls checked against
#      Triton's own path and the dispatcher), the Triton providers again with every launch
#      through Triton's own path (SEPCONV_TRITON_FAST_LAUNCH=0), and split mode's host path under cProfile;
#   3. each kernel's device time per call at three layers (benchmarks.kernel_profile), and the tile
#      configs of split mode's two depthwise kernels at 728->728@19, the transposed one's tile sizes
#      first (benchmarks.triton_sweep); the fastest of each is pinned for parts 4-6;
#   3b. the Triton kernels that parts 4-6 launch compiled in parallel worker processes into Triton's
#      on-disk cache (--warm-only: nothing timed), so that those parts spend their time timing;
#   4. every Xception layer in bf16, forward and forward+backward, batch 32, channels_last, in plain
#      calls: triton (fused), triton-split, auto and the eager nn.Conv2d pair (cuDNN);
#   5. the same layers replayed from CUDA graphs (the GPU's time without the host's): triton-split
#      and the eager pair;
#   6. the whole model in bf16 (eval and the training step);
#   7. the dispatch table rebuilt from this GPU's recorded results plus this run's (a preview);
#   8. the rest of the Triton tests, in the time left.
# The benchmarks run each kernel's first tile config (SEPCONV_TRITON_AUTOTUNE=0, recorded in the
# rows), but split mode's two depthwise kernels run the sweep's fastest (SEPCONV_TRITON_CONFIGS, in the
# rows' triton_configs): autotuning compiles and times every config of every kernel, about 14 s a
# layer, which took a whole earlier run's time limit. tests/conftest.py runs the Triton tests on CUDA
# tensors.
#
# Usage: bash benchmarks/gpu_check.sh OUT_DIR [PYTHON]
# OUT_DIR gets at most seven files, so that a machine that hands back a few files returns them all:
# check.log (everything printed), gpu_dispatch_table.json and results/: <slug>.jsonl (the committed
# rows with this run's appended) and <slug>.md (this run's reports), host-time-<slug>.jsonl and
# kernel-profile-<slug>.txt and triton_sweep-<slug>.jsonl (likewise appended to the committed ones).
# To record the run: copy OUT_DIR/results/* into benchmarks/results/, then rebuild the committed table
# from the committed file: python -m benchmarks.dispatch_table benchmarks/results/cuda-<gpu>.jsonl
# (add --capability sm_XY while that file holds rows from runs that did not record it). Where the
# rows' triton_configs name pinned configs, first put them first in split.GPU_CONFIGS and
# TRANSPOSED_CONFIGS, and the tile in TRANSPOSED_TILES, so that the table is built from what users
# run. Then python -m benchmarks.gpu_model --validate compares each profiled Triton kernel with the
# static model.
# QUICK_TIMEOUT, HOST_TIMEOUT, PROFILE_TIMEOUT, SWEEP_TIMEOUT, WARM_TIMEOUT, LAYERS_TIMEOUT,
# GRAPHS_TIMEOUT, MODEL_TIMEOUT and TEST_TIMEOUT bound the parts (seconds; 50 + 30 + 35 + 70 + 45 +
# 75 + 60 + 75 + 20 by
# default; with the host profile, the direct-launch tests, the host time without direct launches and the table,
# at most about 9.5 minutes).
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
# One config per kernel: in the tests (the test_*every* tests pin every GPU config in turn) and the benchmarks.
export SEPCONV_TRITON_AUTOTUNE=0
exec > >(tee "$out/check.log") 2>&1

tests() {
    local limit=$1
    shift
    SEPCONV_REQUIRE_BACKENDS=triton timeout "$limit" "$py" -m pytest -q -rs -p no:cacheprovider "$@" | tail -25
    echo "tests: exit status ${PIPESTATUS[0]} after ${SECONDS}s"
}

# One benchmark run (SIGINT on timeout: it then writes the report of the cases it finished). Its
# rows are appended to results/<slug>.jsonl; its report is added to results/<slug>.md.
bench() {
    local limit=$1 part=$2
    shift 2
    timeout -s INT "$limit" "$py" -m benchmarks --device cuda --dtypes bf16 --layout channels_last --batch 32 \
        --out "$out/parts" "$@" | tail -60
    echo "$part benchmark: exit status ${PIPESTATUS[0]} after ${SECONDS}s"
    [ -f "$out/parts/$slug.jsonl" ] && cat "$out/parts/$slug.jsonl" >> "$out/results/$slug.jsonl"
    [ -f "$out/parts/$slug.md" ] && cat "$out/parts/$slug.md" >> "$out/results/$slug.md"
    rm -rf "$out/parts"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
"$py" -c "import torch, triton
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print('gpu', torch.cuda.get_device_name(0), 'capability sm_%d%d' % torch.cuda.get_device_capability(0))
print('tf32: cudnn.allow_tf32', torch.backends.cudnn.allow_tf32,
      'cuda.matmul.allow_tf32', torch.backends.cuda.matmul.allow_tf32)"
git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -20
echo "cpus: $(nproc)"
slug=$("$py" -c "from benchmarks.machine import device_slug; print(device_slug('cuda'))" 2>/dev/null || echo cuda-unknown)
capability=$("$py" -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo "")
for committed in "$slug.jsonl" "host-time-$slug.jsonl" "kernel-profile-$slug.txt" "triton_sweep-$slug.jsonl"; do
    [ -f "benchmarks/results/$committed" ] && cp "benchmarks/results/$committed" "$out/results/$committed"
done

tests "${QUICK_TIMEOUT:-50}" tests/test_triton.py tests/test_triton_split.py tests/test_separable_conv.py \
    tests/test_model.py -k "triton and not aot and (precision or every or opcheck or deterministic or model or setting)"

# Kernels launched again directly, and ops run without the dispatcher: the same bits as Triton's own path.
tests 20 tests/test_fast_launch.py tests/test_host_path.py -k "on_a_gpu or directly"

timeout "${HOST_TIMEOUT:-30}" "$py" -m benchmarks.host_time --device cuda \
    --providers eager,torch,triton-split,triton,auto --out "$out/results"
echo "host time: exit status $? after ${SECONDS}s"
# The Triton providers again with every launch through Triton's own path (kernels.triton.fast_launch off).
SEPCONV_TRITON_FAST_LAUNCH=0 timeout 20 "$py" -m benchmarks.host_time --device cuda \
    --providers triton-split,triton --out "$out/results"
echo "host time, fast launch off: exit status $? after ${SECONDS}s"
# Where split mode's host time goes (printed only: the profiler's cost inflates what it times).
timeout 20 "$py" -m benchmarks.host_time --device cuda --providers triton-split --calls 100 --profile 30 \
    --out "$out/profiled"
rm -rf "$out/profiled"
timeout "${PROFILE_TIMEOUT:-35}" "$py" -m benchmarks.kernel_profile --layers "728->728@19,256->728@37,64->128@147" \
    --providers triton-split,triton,eager --modes fwd,full --top 12 --out "$out/results"
echo "kernel profile: exit status $? after ${SECONDS}s"
# Half the sweep's time each: the transposed kernel (its tiles first) and the depthwise kernel. The
# fastest config of each is pinned (SEPCONV_TRITON_CONFIGS) for the benchmarks below; the pins are in
# the rows' run metadata (triton_configs), so the file stays out of OUT_DIR.
limit=$(( ${SWEEP_TIMEOUT:-70} / 2 ))
pins=$(mktemp -d)/triton-configs.json
# Worker processes that compile in parallel (the sweep's candidates, then the benchmarks' kernels).
jobs=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
for kernel in transposed depthwise; do
    timeout "$limit" "$py" -m benchmarks.triton_sweep --kernels "$kernel" --shapes "728->728@19" --rep 10 \
        --dtypes bf16 --budget "$(( limit - 12 ))" --jsonl "$out/results/triton_sweep-$slug.jsonl" --pins "$pins" \
        --jobs "$jobs"
    echo "tile sweep ($kernel): exit status $? after ${SECONDS}s"
done
if [ -s "$pins" ]; then
    export SEPCONV_TRITON_CONFIGS=$pins
    echo "pinned for the benchmarks below (SEPCONV_TRITON_CONFIGS):"
    cat "$pins"
fi

# The cases of parts 4-6 that launch Triton kernels, called once each in parallel (compiles only).
timeout -s INT -k 10 "${WARM_TIMEOUT:-45}" "$py" -m benchmarks --device cuda --dtypes bf16 --layout channels_last --batch 32 \
    --suite layers,model --quick --modes fwd,full --no-peak --warm-only --jobs "$jobs" \
    --providers triton,triton-split,triton-split-fused,triton-split-unfused | tail -40
echo "compile warm-up: exit status ${PIPESTATUS[0]} after ${SECONDS}s"

bench "${LAYERS_TIMEOUT:-75}" layers --suite layers --quick --modes fwd,full --min-time 0.1 \
    --providers triton,triton-split,auto,eager
bench "${GRAPHS_TIMEOUT:-60}" graphs --suite layers --quick --modes fwd,full --min-time 0.1 --cuda-graphs \
    --no-memory --no-peak --providers triton-split,eager
bench "${MODEL_TIMEOUT:-75}" model --suite model --no-peak \
    --providers eager,triton-split-fused,triton-split-unfused,auto-fused,auto-unfused

timeout 30 "$py" -m benchmarks.dispatch_table "$out/results/$slug.jsonl" ${capability:+--capability "$capability"} \
    --out "$out/gpu_dispatch_table.json"
"$py" - "$out/gpu_dispatch_table.json" <<'PYTHON'
import json, sys
table = json.load(open(sys.argv[1]))
for e in table["entries"]:
    times = ", ".join(f"{name} {ms:.3f}" for name, ms in e["times_ms"].items())
    print(f"{e['device_class']} {e['dtype']} {e['mode']} {e['in_channels']}->{e['out_channels']}@{e['height']} "
          f"N{e['batch']}: {e['choice']} ({times} ms; run {e['run_id']})")
PYTHON

unset SEPCONV_TRITON_CONFIGS  # the tests check the kernels' own configs
tests "${TEST_TIMEOUT:-20}" tests/test_triton_split.py tests/test_separable_conv.py tests/test_triton.py \
    -k "triton and not aot and not (precision or every or opcheck or deterministic or model or setting)"
rm -f "$out"/results/*.png
echo "gpu_check: done after ${SECONDS}s"
