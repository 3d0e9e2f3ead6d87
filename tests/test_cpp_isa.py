"""The C++ backend's vector paths: what the loaded build reports, what "auto" does with a build that has
no vector path, the AVX2 build (the path of x86 CPUs without AVX-512) on the cpp correctness grid, the
vector layer and micro-kernel of every path against a float64 sum (tests/csrc/vec_check.cpp; NEON
cross-compiled and run under qemu-user), and the whole library compiled for aarch64."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import kernels
from conftest import require_backend
from kernels import cpp_backend, dispatch

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def _sysfs_cache_value(level: int, name: str) -> str:
    """Linux's `name` (size, ways_of_associativity, ...) of the level-`level` data or unified cache of cpu0
    ("" when not listed)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            if int((index / "level").read_text()) == level and (index / "type").read_text().strip() != "Instruction":
                return (index / name).read_text().strip()
        except (OSError, ValueError):
            continue
    return ""


def _sysfs_cache_bytes(level: int) -> int:
    """Linux's size of the level-`level` data or unified cache of cpu0 (0 when not listed)."""
    size = _sysfs_cache_value(level, "size")
    return _size_bytes(size) if size else 0


def _size_bytes(text: str) -> int:
    """sysfs's "48K", "1024K", "32M" in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def test_build_info_names_the_vector_path_and_the_blocking():
    require_backend("cpp")
    info = cpp_backend.build_info()
    assert info["isa"] in ("avx512", "avx2", "neon", "scalar")
    if cpp_backend.requested_variant() == "native" and not os.environ.get("SEPCONV_EXTRA_CFLAGS"):
        assert info["isa"] == cpp_backend.host_isa(), "-march=native did not take the host's vector path"
    lanes = {"avx512": 16, "avx2": 8, "neon": 4, "scalar": 1}[info["isa"]]
    assert info["lanes"] == lanes
    if info["isa"] != "scalar":  # accumulators + B vectors + one broadcast fit the register file
        registers = 16 if info["isa"] == "avx2" else 32
        assert (info["tile_rows"] + 1) * info["tile_vectors"] + 1 <= registers
    # The backward's pixel block is whole register tiles: 8 x 12 rows with AVX-512; with 6-row tiles 16 x 6 where
    # L2 has 2 MB a core or more, 48 x 6 below.
    assert info["backward_block"] % info["tile_rows"] == 0
    six_row_tiles = 16 if info["l2_bytes"] >= 2 << 20 else 48
    assert info["backward_block"] == (96 if info["tile_rows"] >= 12 else six_row_tiles * info["tile_rows"])
    assert info["l2_bytes"] > 0 and info["l3_bytes"] > 0
    assert info["tile_bytes"] == info["l2_bytes"] // 4 * 3 and info["stream_bytes"] == info["l3_bytes"] // 4 * 3
    # A guest can report its host's whole L3 (480 MB on a 2-core Xeon): the weight rule counts on 16 MB a CPU at most.
    assert info["l3_usable_bytes"] == min(info["l3_bytes"], (16 << 20) * os.cpu_count())
    interleave = os.environ.get("SEPCONV_INTERLEAVE_BYTES")
    assert info["interleave_bytes"] == (int(interleave) if interleave else info["l3_usable_bytes"])
    assert info["l1d_ways"] >= 1
    # Outputs with 4 KB-strided rows are streamed where a call's rows fit the ways of the L1 set they share
    # (12 rows: Zen 5's and Intel's 12-way L1s, not Zen 4's 8-way one; AVX2's 6 rows: both).
    if not os.environ.get("SEPCONV_L1D_WAYS"):
        sets = max(info["l1d_bytes"] // (64 * info["l1d_ways"]), 1)
        busiest = max(sum(1 for r in range(info["tile_rows"]) if r * 64 % sets == s) for s in range(sets))
        assert info["stream_strided_rows"] is (busiest <= info["l1d_ways"])
    if info["cache_source"] == "sysfs":
        assert info["l2_bytes"] == _sysfs_cache_bytes(2)
        ways = _sysfs_cache_value(1, "ways_of_associativity")
        if not os.environ.get("SEPCONV_L1D_WAYS") and ways.isdigit() and int(ways) > 0:
            assert info["l1d_ways"] == int(ways)


@pytest.fixture
def fresh_resolution(monkeypatch):
    """Backend choices and one-time warnings recomputed for the test, then restored."""
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def test_auto_takes_cpp_where_the_build_has_a_vector_path(fresh_resolution):
    require_backend("cpp")
    if cpp_backend.build_info()["isa"] == "scalar":
        pytest.skip("this build has no vector path (the next test covers it)")
    assert dispatch.resolve("auto", CPU, torch.float32) == "cpp"


def test_auto_takes_torch_where_the_build_has_no_vector_path(fresh_resolution, monkeypatch):
    """A build without a vector path runs plain loops, slower than ATen's convolutions: "auto" says why
    once and takes torch; the cpp backend asked for by name still runs."""
    require_backend("cpp")
    info = dict(cpp_backend.build_info(), isa="scalar", lanes=1)
    monkeypatch.setattr(cpp_backend, "build_info", lambda: info)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.resolve("auto", CPU, torch.float32) == "torch"
        assert dispatch.resolve("auto", CPU, torch.float64) == "torch"
    notes = [str(w.message) for w in caught if "vector path" in str(w.message)]
    assert len(notes) == 2 and all("'cpp' skipped" in note and "isa 'scalar'" in note for note in notes), notes
    assert dispatch.resolve("cpp", CPU, torch.float32) == "cpp"


def test_host_isa_is_one_of_the_paths():
    assert cpp_backend.host_isa() in ("avx512", "avx2", "neon", "scalar", "unknown")


def test_isa_variable_is_checked(monkeypatch):
    monkeypatch.setenv(cpp_backend.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="SEPCONV_CPU_ISA must be one of .*got 'sse9'"):
        cpp_backend.requested_variant()


def test_library_built_for_a_later_isa_is_refused(monkeypatch):
    """A prebuilt AVX-512 library on an AVX2-only CPU would stop on an illegal instruction: load refuses it."""
    require_backend("cpp")
    monkeypatch.setattr(cpp_backend, "_loaded", None)
    monkeypatch.setattr(cpp_backend, "host_isa", lambda: "avx2")
    monkeypatch.setattr(cpp_backend, "build_info", lambda: {"isa": "avx512"})
    monkeypatch.setattr(cpp_backend, "_prebuilt", lambda: None)
    monkeypatch.setattr(cpp_backend, "_jit_build", lambda variant="native": "stub build")
    with pytest.raises(RuntimeError, match="built for avx512, which this CPU \\(avx2\\) cannot run"):
        cpp_backend.load()


_AVX2_REASON = "the AVX2 build needs an x86-64 CPU with AVX2 and FMA"


@pytest.mark.slow
@pytest.mark.skipif(cpp_backend.host_isa() not in ("avx2", "avx512"), reason=_AVX2_REASON)
def test_avx2_build_passes_the_cpp_grid():
    """The library held to AVX2+FMA (SEPCONV_CPU_ISA=avx2: its own name and cache, so the default build
    stays) runs the shared cpp grid, the row-kernel, determinism, work-split and packed-weight tests of
    test_cpp.py and the dense convolution's in a fresh interpreter, and reports the avx2 path."""
    require_backend("cpp")  # the compiler and ninja are there
    check_isa = ("from kernels import cpp_backend; cpp_backend.load(); "
                 "assert cpp_backend.build_info()['isa'] == 'avx2', cpp_backend.build_info()")
    env = dict(os.environ, SEPCONV_CPU_ISA="avx2", PYTHONPATH=str(ROOT), SEPCONV_REQUIRE_BACKENDS="cpp")
    result = subprocess.run([sys.executable, "-c", check_isa], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    cpp_tests = ["test_gradients_bitwise_deterministic", "test_thread_counts_agree", "test_realistic_shapes",
                 "test_3x3_row_kernel_edges", "test_strided_depth_multiplier_relu", "test_single_image_row_bands",
                 "test_grad_input_written_everywhere", "test_relu_input_gradient_is_relu_backward",
                 "test_large_output_forward", "test_two_consumers_accumulate_in_place",
                 "test_forward_packed_equals_forward"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             *[f"tests/test_cpp.py::{name}" for name in cpp_tests],
                             "tests/test_batch_norm.py", "tests/test_pooling.py", "tests/test_conv.py",
                             "tests/test_separable_conv.py", "-k",
                             "(cpp and not compile) or test_batch_norm or test_op_equals_conv2d or test_windows_read"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-1000:]


AARCH64_CXX = "aarch64-linux-gnu-g++"
HOST_CXX = os.environ.get("CXX", "c++")
X86 = platform.machine().lower() in ("x86_64", "amd64")
_NO_CROSS = f"no aarch64 cross compiler ({AARCH64_CXX}; Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)"

# path -> (compiler, flags, how to run the program, the path it must report, why it cannot run here)
VEC_CHECK_BUILDS = {
    "native": (HOST_CXX, ["-march=native"], [], cpp_backend.host_isa(),
               None if shutil.which(HOST_CXX) else f"no C++ compiler ({HOST_CXX})"),
    "avx2": (HOST_CXX, ["-march=native", "-mno-avx512f"], [], "avx2",
             None if cpp_backend.host_isa() in ("avx2", "avx512") else "needs an x86-64 CPU with AVX2 and FMA"),
    "scalar": (HOST_CXX, ["-march=x86-64"], [], "scalar", None if X86 else "x86-64 only (the baseline ISA)"),
    "neon": (AARCH64_CXX, ["-march=armv8-a", "-static"], ["qemu-aarch64"], "neon",
             _NO_CROSS if shutil.which(AARCH64_CXX) is None
             else "no qemu-user (apt-get install qemu-user) to run an aarch64 program" if shutil.which("qemu-aarch64")
             is None else None),
}


@pytest.mark.parametrize("path", list(VEC_CHECK_BUILDS))
def test_vector_layer_and_micro_kernel(path, tmp_path):
    """Each path's micro-kernel (every row count, partial panels, both A layouts, init, accumulate) against
    a float64 sum, nothing written outside its tile; micro_copying bitwise equal to micro on the same A stored
    row-major, with its side copy in place and nothing written past the copy's buffer; strides the float32
    kernels take as constants refused when they differ; the transpose, masked loads/stores and ReLU's NaN."""
    compiler, flags, runner, expected, unavailable = VEC_CHECK_BUILDS[path]
    if unavailable:
        pytest.skip(unavailable)
    program = tmp_path / "vec_check"
    build = subprocess.run([compiler, "-std=c++20", "-O2", *flags, f"-I{cpp_backend.CSRC}",
                            str(ROOT / "tests" / "csrc" / "vec_check.cpp"), "-o", str(program)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    result = subprocess.run([*runner, str(program)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith(f"{expected} ok"), result.stdout[-3000:]


# path -> (compiler, target flags, why it cannot be compiled here): the paths the host build does not take.
LIBRARY_BUILDS = {
    "neon": (AARCH64_CXX, ["-march=armv8-a"], _NO_CROSS if shutil.which(AARCH64_CXX) is None else None),
    "scalar": (HOST_CXX, ["-march=x86-64"], None if X86 and shutil.which(HOST_CXX) else "x86-64 only"),
}


@pytest.mark.parametrize("path", list(LIBRARY_BUILDS))
def test_library_compiles_for_each_path(path):
    """The whole library compiles (syntax and template instantiation, no object) for aarch64, where the
    vector layer must take its NEON path, and for plain x86-64, where it has none."""
    from torch.utils import cpp_extension

    compiler, target, unavailable = LIBRARY_BUILDS[path]
    if unavailable:
        pytest.skip(unavailable)
    includes = [f"-I{include}" for include in cpp_extension.include_paths()] + [f"-I{cpp_backend.CSRC}"]
    flags = ["-std=c++20", "-fsyntax-only", *target, "-fopenmp", "-w"]
    probe = f'#include "vec.h"\nstatic_assert(std::string_view(sepconv::kIsa) == "{path}");\n'
    result = subprocess.run([compiler, *flags, *includes, "-include", "string_view", "-x", "c++", "-"], input=probe,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([compiler, *flags, *includes, str(cpp_backend.CSRC / "sepconv_cpu.cpp")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_cpp_build_info_is_public():
    require_backend("cpp")
    assert kernels.cpp_build_info() == cpp_backend.build_info()
