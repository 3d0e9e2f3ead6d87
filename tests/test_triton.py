"""Triton backend specifics: 16-bit accuracy, reductions, dispatch, errors, and AOT fitness for GPUs.

The shared grid (tests/test_separable_conv.py) runs the triton backend in fp32; on
a machine without CUDA it runs in Triton's interpreter on CPU tensors. The AOT test
compiles every kernel for every GPU tile config for sm_80 and sm_90 without a GPU
and requires zero register spills.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
import kernels.triton as triton_backend
from conftest import OLDEST_TRITON_PYTHON, compiled_environment, device_for, needs_oldest_triton, require_backend
from test_separable_conv import check, make_case, to_layout

ROOT = Path(__file__).resolve().parents[1]

# Flash-attention's criterion: error vs a float64 reference at most this many times
# PyTorch's own error in the same dtype (plus a tiny floor for exact zeros).
ERROR_RATIO = 2.0
ERROR_FLOOR = 1e-6


def _run(leaves, backend, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in leaves]
    out = kernels.separable_conv2d(*leaves, backend=backend, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    out.backward(grad)
    return [out.detach()] + [leaf.grad for leaf in leaves]


def assert_within_torch_error(case, dtype, device, **kwargs):
    """Every output of the triton backend in ``dtype`` within ERROR_RATIO x PyTorch's own error there."""
    reference = _run(case, "torch", **kwargs)
    try:
        own = _run([t.to(dtype) for t in case], "torch", **kwargs)
    except RuntimeError as error:  # e.g. a CPU build without fp16 convolution
        pytest.skip(f"PyTorch's own {dtype} convolution is unavailable on CPU: {error}")
    ours = _run([t.to(dtype=dtype, device=device) for t in case], "triton", **kwargs)
    assert ours[0].dtype == dtype
    names = ("output", "input", "depthwise_weight", "pointwise_weight", "depthwise_bias", "pointwise_bias")
    for name, ref, torch_own, mine in zip(names, reference, own, ours):
        own_error = (torch_own.double() - ref).abs().max().item()
        error = (mine.cpu().double() - ref).abs().max().item()
        assert error <= ERROR_RATIO * own_error + ERROR_FLOOR, (
            f"{name}: triton {dtype} error {error:.3g} > {ERROR_RATIO} x torch's own {own_error:.3g}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_within_twice_torch_error(dtype, layout):
    device = require_backend("triton", dtype)
    case = make_case(2, 12, 9, 10, (3, 3), 2, 20, True, torch.float64, torch.device("cpu"))
    case = (to_layout(case[0], layout),) + case[1:]
    assert_within_torch_error(case, dtype, device, stride=(1, 2), padding=1, relu_input=False)


def _gpu_tables():
    """kernel name -> (its autotuned launchers per dtype family, its GPU configs per family)."""
    from kernels.triton import backward, forward, narrow

    return {
        "forward": (forward.forward_autotuned, forward.GPU_CONFIGS),
        "narrow_forward": (forward.narrow_autotuned, forward.NARROW_CONFIGS),
        # 16-bit inputs only (fp32 narrow layers keep narrow_forward); one kernel, configs per hidden width.
        "narrow_tiled_forward": ({"16bit": narrow.tiled_autotuned[64]},
                                 {"16bit": [c for configs in narrow.TILED_CONFIGS.values() for c in configs]}),
        "grad_hidden": (backward.grad_hidden_autotuned, backward.GRAD_HIDDEN_CONFIGS_GPU),
        "grad_input": (backward.grad_input_autotuned, backward.GRAD_INPUT_CONFIGS_GPU),
        "grad_pointwise": (backward.grad_pointwise_autotuned, backward.GRAD_POINTWISE_CONFIGS_GPU),
    }


@pytest.mark.parametrize("index", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", ["forward", "narrow_forward", "narrow_tiled_forward", "grad_hidden", "grad_input",
                                    "grad_pointwise"])
def test_every_gpu_config(monkeypatch, kernel, dtype, index):
    """Each GPU tile config of each kernel, pinned, gives the right result (the interpreter runs them too)."""
    device = require_backend("triton", dtype)
    from kernels.triton import forward, narrow

    if kernel == "forward":  # the test's layer is narrow: make it take the wide-layer kernel
        monkeypatch.setattr(forward, "NARROW_MAX_CHANNELS", 0)
    if kernel == "narrow_forward":  # in bf16 the test's layer (48 hidden channels, stride 1 down) is the tiled one's
        monkeypatch.setattr(narrow, "TILED_MAX_HIDDEN", 0)

    autotuned, gpu_configs = _gpu_tables()[kernel]
    family = forward.family(dtype)
    configs = gpu_configs.get(family, [])
    if index >= len(configs):
        pytest.skip(f"{kernel} has {len(configs)} {family} configs")
    monkeypatch.setitem(forward.forced_configs, autotuned[family].fn, gpu_configs[family][index])
    _check_pinned(dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unrolled_taps(monkeypatch, dtype):
    """UNROLL_TAPS (a sweep candidate, in no default list) computes what the runtime tap loop does."""
    device = require_backend("triton", dtype)
    import triton

    from kernels.triton import backward, forward

    # The test's layer is narrow; UNROLL_TAPS belongs to the wide-layer kernel.
    monkeypatch.setattr(forward, "NARROW_MAX_CHANNELS", 0)
    family = forward.family(dtype)
    for tuner in (forward.forward_autotuned[family], backward.grad_pointwise_autotuned[family]):
        first = tuner.configs[0]
        unrolled = triton.Config({**first.kwargs, "UNROLL_TAPS": True}, num_warps=first.num_warps,
                                 num_stages=first.num_stages)
        monkeypatch.setitem(forward.forced_configs, tuner.fn, unrolled)
    _check_pinned(dtype, device)


@pytest.mark.parametrize("stride,padding,dilation,multiplier", [
    (1, 1, 1, 1), (2, 1, 1, 1), (1, "same", 2, 2), ((2, 1), 0, (1, 2), 1)], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_narrow_forward(monkeypatch, layout, stride, padding, dilation, multiplier):
    """The narrow-layer kernel: several pixel tiles a persistent program, output channels masked past C_out,
    and with channels_last 128-bit vectors (ALIGN = 8)."""
    device = require_backend("triton")
    from kernels.triton import forward

    aligns = []
    real = forward.narrow_launch

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        aligns.append(result[-1]["ALIGN"])
        return result

    monkeypatch.setattr(forward, "narrow_launch", spy)
    case = make_case(2, 16, 9, 11, (3, 3), multiplier, 40, True, torch.float32, device)
    check("triton", *case, stride, padding, dilation, relu_input=True, layout=layout)
    assert aligns == [8 if layout == "channels_last" else 1]


@pytest.mark.parametrize("stride,padding,dilation,multiplier,bias", [
    (1, 1, 1, 1, True), ((1, 2), (2, 0), (1, 2), 2, False), (1, 2, (1, 2), 1, True), (1, 1, 1, 5, False)], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "sliced"])
def test_narrow_tiled_forward(monkeypatch, layout, stride, padding, dilation, multiplier, bias):
    """The tiled narrow-layer kernel (bf16, vertical stride and dilation 1, 16 to 80 hidden channels: both
    hidden-width classes): slots cut by the image's bottom and right edges, several slot tiles a persistent
    program, input columns shared (horizontal stride and dilation 1) or not, a depth multiplier, biases, the
    fused ReLU, any input strides; 128-bit vectors (ALIGN = 8) with channels_last. Forward only: its error
    against float64 at most ERROR_RATIO x PyTorch's own bf16 error."""
    device = require_backend("triton", torch.bfloat16)
    from kernels.triton import narrow

    launched = []
    real = narrow.tiled_launch

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        launched.append(result[-1])
        return result

    monkeypatch.setattr(narrow, "tiled_launch", spy)
    # 10 x 11 output pixels with stride 1 (3 x 2 slots in the interpreter): partial slots at both edges.
    case = make_case(3, 16, 10, 11, (3, 3), multiplier, 40, bias, torch.float64, torch.device("cpu"))
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, relu_input=True)

    def forward(tensors, backend, target=None):
        tensors = [t.to(**target) if t is not None and target else t for t in tensors]
        x = to_layout(tensors[0], layout)
        with torch.no_grad():
            return kernels.separable_conv2d(x, *tensors[1:], backend=backend, **kwargs).cpu().double()

    reference = forward(case, "torch")
    try:
        own = forward(case, "torch", dict(dtype=torch.bfloat16))
    except RuntimeError as error:
        pytest.skip(f"PyTorch's own bf16 convolution is unavailable on CPU: {error}")
    ours = forward(case, "triton", dict(dtype=torch.bfloat16, device=device))
    own_error = (own - reference).abs().max().item()
    error = (ours - reference).abs().max().item()
    assert error <= ERROR_RATIO * own_error + ERROR_FLOOR, f"triton bf16 error {error:.3g} vs torch's {own_error:.3g}"
    columns_shared = stride in (1, (1, 1)) and dilation in (1, (1, 1))
    assert [(c["ALIGN"], c["COL_REUSE"]) for c in launched] == [(8 if layout == "channels_last" else 1,
                                                                  columns_shared)]


def _check_pinned(dtype, device):
    """Forward and every gradient against the float64 reference (fp32) or PyTorch's own error (bf16)."""
    # Channels spanning several hidden/output tiles, a stride, a depth multiplier and the fused ReLU.
    case = make_case(1, 24, 7, 8, (3, 3), 2, 150, True, torch.float64, torch.device("cpu"))
    kwargs = dict(stride=(1, 2), padding=1, relu_input=True)
    if dtype == torch.float32:
        reference = _run(case, "torch", **kwargs)
        ours = _run([t.float().to(device) for t in case], "triton", **kwargs)
        for ref, mine in zip(reference, ours):
            torch.testing.assert_close(mine.cpu().double(), ref, atol=1e-4, rtol=1e-4)
    else:
        assert_within_torch_error(case, dtype, device, **kwargs)


def test_autotune_setting(monkeypatch):
    """SEPCONV_TRITON_AUTOTUNE=0 and deterministic mode launch each kernel's first config; bad values are errors."""
    device = require_backend("triton")
    from kernels.triton import forward

    tuners = [tuner for table, _ in _gpu_tables().values() for tuner in table.values()]
    for tuner in tuners:  # two configs each, so that there is a choice to make
        monkeypatch.setattr(tuner, "configs", list(tuner.configs) * 2)
    monkeypatch.setenv("SEPCONV_TRITON_AUTOTUNE", "1")
    assert all(forward.launch_config(tuner) is None for tuner in tuners)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert all(forward.launch_config(tuner) is tuner.configs[0] for tuner in tuners)
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.setenv("SEPCONV_TRITON_AUTOTUNE", "0")
    assert all(forward.launch_config(tuner) is tuner.configs[0] for tuner in tuners)
    case = make_case(2, 16, 8, 8, (3, 3), 1, 24, True, torch.float64, torch.device("cpu"))
    reference = _run(case, "torch", padding=1)
    ours = _run([t.float().to(device) for t in case], "triton", padding=1)
    for ref, mine in zip(reference, ours):
        torch.testing.assert_close(mine.cpu().double(), ref, atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("SEPCONV_TRITON_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="SEPCONV_TRITON_AUTOTUNE='yes'"):
        kernels.separable_conv2d(*[t.float().to(device) for t in case], backend="triton", padding=1)


def test_reductions_over_many_blocks_and_splits(monkeypatch):
    """Channels spanning several tiles and the pointwise-weight reduction split many ways."""
    device = require_backend("triton")
    from kernels.triton import backward

    monkeypatch.setattr(backward, "PIXELS_PER_SPLIT", 8)
    case = make_case(2, 20, 5, 6, (3, 3), 1, 19, True, torch.float64, torch.device("cpu"))
    reference = _run(case, "torch", padding=1)
    ours = _run([t.float().to(device) for t in case], "triton", padding=1)
    for ref, mine in zip(reference, ours):
        torch.testing.assert_close(mine.cpu().double(), ref, atol=1e-4, rtol=1e-4)


def test_deterministic_algorithms_bitwise(monkeypatch):
    """Deterministic mode launches a fixed config (exercised here with two configs per kernel)."""
    device = require_backend("triton")
    from kernels.triton import backward

    for table in (backward.grad_hidden_autotuned, backward.grad_input_autotuned, backward.grad_pointwise_autotuned):
        for tuner in table.values():
            monkeypatch.setattr(tuner, "configs", list(tuner.configs) * 2)
    case = [t.to(device) for t in make_case(2, 16, 8, 8, (3, 3), 1, 24, True, torch.float32, torch.device("cpu"))]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _run(case, "triton", padding=1), _run(case, "triton", padding=1)
    finally:
        torch.use_deterministic_algorithms(previous)
    reference = _run([t.double().cpu() for t in case], "torch", padding=1)
    for a, b, ref in zip(first, second, reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.cpu().double(), ref, atol=1e-4, rtol=1e-4)


def test_cpu_without_interpreter_raises(monkeypatch):
    require_backend("triton")
    if device_for("triton").type != "cpu":
        pytest.skip("CUDA is available: the CPU path is not the one under test")
    x, dw, pw, dwb, pwb = make_case(1, 2, 5, 5, (3, 3), 1, 3, True, torch.float32, torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="interpreter"):
        torch.ops.sepconv_triton.forward(x, dw, pw, dwb, pwb, [1, 1], [1, 1, 1, 1], [1, 1], False)


def test_auto_picks_torch_for_cuda():
    """auto takes cuDNN on CUDA (the fused Triton kernels measured slower there); triton runs when named."""
    require_backend("triton")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert kernels.dispatch._resolve_uncached("auto", torch.device("cuda"), dtype) == "torch"
        assert kernels.dispatch._resolve_uncached("triton", torch.device("cuda"), dtype) == "triton"


class _CudaFloat32:
    """Stands for an fp32 CUDA tensor where only ``is_cuda`` and ``dtype`` are read."""

    is_cuda = True
    dtype = torch.float32


def test_tf32_follows_pytorch_convolution_setting():
    """fp32 products use TF32 exactly when PyTorch's cuDNN convolutions may; split mode's GEMMs follow the same
    setting for their duration and leave cuBLAS's own setting as it was."""
    require_backend("triton")
    from kernels.triton.common import conv_tf32, matmul_like_conv

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    previous_conv = torch.backends.cudnn.allow_tf32
    try:
        for allowed, expected in ((True, "tf32"), (False, "ieee")):
            torch.backends.cudnn.allow_tf32 = allowed
            assert conv_tf32(_CudaFloat32()) is allowed
            with matmul_like_conv(_CudaFloat32()):
                assert matmul.fp32_precision == expected
            assert matmul.fp32_precision == before
        assert not conv_tf32(torch.zeros(1))  # CPU (the interpreter): IEEE
        assert not conv_tf32(torch.zeros(1, dtype=torch.float64))
    finally:
        torch.backends.cudnn.allow_tf32 = previous_conv


def test_too_many_pixels_is_a_clear_error():
    require_backend("triton")
    from kernels.triton.forward import check_pixels

    huge = torch.empty((2**15, 1, 2**8, 2**8), device="meta")
    with pytest.raises(ValueError, match="too many pixels"):
        check_pixels(2**31, huge)


def _bundled_ptxas():
    if triton_backend.unsupported() is not None:  # not installed, or too old to compile the kernels
        return None
    import triton

    root = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return next((p for p in (root / "ptxas-blackwell", root / "ptxas") if p.exists()), None)


def test_aot_report_removes_its_triton_cache(monkeypatch):
    """The report compiles into a Triton cache of its own; it used to stay in /tmp (~120 MB a run, 2.4 GB
    after a day of test runs) and its TRITON_CACHE_DIR leaked into the calling process."""
    require_backend("triton")
    from kernels.triton import aot_report

    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    with aot_report._fresh_triton_cache(True):
        cache = Path(os.environ["TRITON_CACHE_DIR"])
        assert cache.is_dir() and cache.name.startswith("sepconv-aot-")
        (cache / "kernel.cubin").write_bytes(b"\0" * 1024)
    assert not cache.exists()
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else"
    monkeypatch.delenv("TRITON_CACHE_DIR")
    with aot_report._fresh_triton_cache(True):
        pass
    assert "TRITON_CACHE_DIR" not in os.environ
    with aot_report._fresh_triton_cache(False):  # --use-cache: Triton's own cache, untouched
        assert "TRITON_CACHE_DIR" not in os.environ


def test_dot_tiles_are_at_least_16_wide():
    """Every GPU config of a kernel that calls tl.dot (through ``common.mma``) gives each dot dimension at
    least 16: Triton 3.6, the oldest version the project supports, refuses a smaller K at compile time
    ("K >= 16"; 3.9 accepts 8 for fp32), which took the fp32 narrow forward's BLOCK_K=8 configs down."""
    import inspect

    require_backend("triton")  # the kernel modules import only where the backend can run
    from kernels.triton import aot_report

    checked = 0
    for name, spec in aot_report.kernel_specs().items():
        if "mma(" not in inspect.getsource(spec["fn"].fn):
            continue
        for kind, configs in spec["configs"].items():
            for config in configs:
                tiles = {key: value for key, value in config.kwargs.items() if key.startswith("BLOCK_")}
                assert tiles, f"{name} {kind}: no BLOCK_ tile in {config}"
                small = {key: value for key, value in tiles.items() if value < 16}
                assert not small, f"{name} {kind} {aot_report.config_name(config)}: dot tiles below 16: {small}"
                checked += 1
    assert checked >= 10, checked  # forward, narrow_forward, narrow_tiled, grad_hidden, grad_pointwise


def _aot_report(python: str, tmp_path: Path):
    """Runs ``python -m kernels.triton.aot_report`` (every kernel x GPU config x {bf16, fp32}, sm_90 and sm_80)
    under ``python`` and checks its rows: all compiled, none spills, and the split path's kernels, compiled as
    launched at Xception layers, load channel vectors (no 16-bit scalars)."""
    env = compiled_environment(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    report = tmp_path / "aot.json"
    result = subprocess.run([python, "-m", "kernels.triton.aot_report", "--json", str(report)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert report.exists(), f"aot_report failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    rows = json.loads(report.read_text())
    from kernels.triton import aot_report

    specs = aot_report.kernel_specs()
    expected = sum(len(spec["configs"][kind]) * len(aot_report.layers_of(spec)) * len(spec.get("targets", (80, 90)))
                   for spec in specs.values() for kind in ("16bit", "fp32"))
    assert len(rows) == expected
    assert {r["kernel"] for r in rows} == set(specs)
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["layer"] for r in rows if r["kernel"] == "depthwise"} == {"728->728@19", "128->256@74"}
    assert {r["layer"] for r in rows if r["kernel"] == "narrow_forward"} == {"128->256@74", "64->128@147"}
    assert {(r["layer"], r["dtype"]) for r in rows if r["kernel"].startswith("narrow_tiled")} == {
        ("64->128@147", "bf16"), ("128->128@147", "bf16")}  # 16-bit only
    for row in rows:
        where = f"{row['kernel']} [{row['config']}] {row['dtype']} {row['target']} {row['layer']}"
        assert not row["error"], f"{where}: {row['error']}"
        assert row["registers"] is not None and row["registers"] <= 255, where
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, (
            f"{where}: spills {row['spill_stores']}/{row['spill_loads']} bytes\n{result.stdout}")
        if row["layer"]:  # compiled as launched at an Xception layer: channel vectors, never 16-bit scalars
            assert row["global_loads"], where
            if specs[row["kernel"]].get("prologue_16bit_loads"):  # weights once a program, before the loops
                assert aot_report.vector_loads(row["global_loads"]), f"{where}: {row['global_loads']}"
            else:
                assert row["scalar_16bit_loads"] == 0, f"{where}: {row['global_loads']}"
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.skipif(_bundled_ptxas() is None, reason="triton >= 3.6 (with its bundled NVIDIA ptxas) is not installed")
def test_aot_compiles_without_spills(tmp_path):
    """Every kernel (split mode's too) x GPU config x {bf16, fp32} compiles for sm_90 and sm_80 with 0 bytes spilled,
    with the installed Triton; the split path's kernels load channel vectors."""
    _aot_report(sys.executable, tmp_path)


@needs_oldest_triton
def test_aot_compiles_with_the_oldest_supported_triton(tmp_path):
    """The same compile under the oldest Triton the backend accepts (the GPU machine's version): versions
    differ in what they compile (3.6 refuses a tl.dot with K < 16, which 3.9 accepts for fp32)."""
    from kernels.triton import MIN_TRITON

    found = subprocess.run([OLDEST_TRITON_PYTHON, "-c", "import triton; print(triton.__version__)"],
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-2000:]
    version = tuple(int(part) for part in found.stdout.strip().split(".")[:2])
    assert version == MIN_TRITON, f"{OLDEST_TRITON_PYTHON} has triton {found.stdout.strip()}, not {MIN_TRITON}"
    _aot_report(OLDEST_TRITON_PYTHON, tmp_path)


def test_every_sweep_candidate_of_the_fused_kernels(monkeypatch):
    """Every tile config the sweep may time (and pin) for the fused kernels (``benchmarks.triton_sweep``):
    output and every gradient against float64, each kernel seen launching its candidate. 264 output channels
    take the wide-layer forward kernel (the narrow ones are not swept)."""
    if require_backend("triton").type != "cpu":
        pytest.skip("the interpreter checks every sweep config's arithmetic; compiled one by one on a GPU they "
                    "would take minutes (the sweep itself reports a config that fails there)")
    from benchmarks.triton_sweep import candidate, sweep_candidates
    from kernels.triton import pinned

    monkeypatch.setenv("SEPCONV_TRITON_MODE", "fused")
    launched = []
    interpreted = type(pinned.kernel_tables()["forward"]["fp32"].fn)
    real_run = interpreted.run

    def run(self, *args, **kwargs):
        launched.append(self)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(interpreted, "run", run)
    case = make_case(1, 12, 5, 6, (3, 3), 2, 264, True, torch.float32, torch.device("cpu"))
    seen = set()
    for kernel in ("forward", "grad_hidden", "grad_input", "grad_pointwise"):
        fn = pinned.kernel_tables()[kernel]["fp32"].fn
        for _, config in sweep_candidates(kernel, "fp32"):
            key = (kernel, tuple(sorted(config.kwargs.items())))
            if key in seen:  # the same arithmetic in another warp or stage count
                continue
            seen.add(key)
            launched.clear()
            with candidate(kernel, "fp32", config, None):
                check("triton", *case, 1, 1, 1, relu_input=True, layout="channels_last")
            assert fn in launched, key
    assert len(seen) > 30
