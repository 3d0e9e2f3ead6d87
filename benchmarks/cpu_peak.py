"""The CPU's arithmetic peak, measured: register-resident fused multiply-adds on every thread.

A library GEMM or 1x1 convolution is a poor yardstick for "% of peak" on CPU: on the
2-core AMD EPYC (Zen 5) development machine oneDNN's best 1x1 convolution reached 83-93%
of what the FMA units do in the recorded runs (torch.mm about 40%), and a run that divides
by it reports the library itself as ~100% efficient. This probe compiles (once, with ``torch.utils.cpp_extension``, cached
like the project's own C++ kernels) a loop of independent multiply-add chains as wide as
the host's vectors (``-march=native``, or AVX2 where the backend is held to it), runs it on
``threads`` OpenMP threads and returns the achieved float32 GFLOP/s.
"""

from __future__ import annotations

import shutil
from typing import Optional, Tuple

_SOURCE = r"""
#include <torch/extension.h>
#include <omp.h>

#if defined(__AVX512F__)
constexpr int kBytes = 64;
#elif defined(__AVX__)
constexpr int kBytes = 32;
#else
constexpr int kBytes = 16;
#endif
typedef float Vec __attribute__((vector_size(kBytes)));
constexpr int kLanes = kBytes / int(sizeof(float));
constexpr int kChains = 12;  // independent chains: enough to cover FMA latency x pipes

// Runs `iterations` steps of kChains chains a = a * b + c on each thread; returns a sum that
// depends on every chain (so nothing is optimised away).
static double chains(int64_t threads, int64_t iterations, float b_value) {
  double total = 0.0;
#pragma omp parallel num_threads(int(threads)) reduction(+ : total)
  {
    // b and c built as whole vectors (not lane by lane) stay in registers: filled lane by lane,
    // GCC kept b in a stack slot that straddled two cache lines and read it in every FMA, which ran
    // at 60% of the FMA rate on an Intel Xeon (AVX-512) while Zen 5 hid it.
    const Vec b = Vec{} + b_value, c = Vec{} + 1e-3f;
    Vec acc[kChains];
    for (int i = 0; i < kChains; ++i) {
      for (int l = 0; l < kLanes; ++l) acc[i][l] = 1e-4f * float(i + l);
    }
    for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
      for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * b + c;
    }
    float sum = 0.f;
    for (int i = 0; i < kChains; ++i) {
      for (int l = 0; l < kLanes; ++l) sum += acc[i][l];
    }
    total += sum;
  }
  return total;
}

// Best float32 GFLOP/s of a few runs that each last about `seconds`.
double fma_gflops(int64_t threads, double seconds) {
  TORCH_CHECK(threads >= 1, "threads must be >= 1, got ", threads);
  TORCH_CHECK(seconds > 0, "seconds must be > 0, got ", seconds);
  int64_t iterations = 1 << 14;
  double elapsed = 0.0;
  while (true) {  // calibrate: grow until one run takes `seconds`
    const double start = omp_get_wtime();
    chains(threads, iterations, 0.999999f);
    elapsed = omp_get_wtime() - start;
    if (elapsed >= seconds || iterations >= (int64_t(1) << 40)) break;
    iterations *= elapsed > 0 ? std::max<int64_t>(2, int64_t(seconds / elapsed * 1.2)) : 16;
  }
  double best = elapsed;
  for (int repeat = 0; repeat < 3; ++repeat) {
    const double start = omp_get_wtime();
    chains(threads, iterations, 0.999999f);
    best = std::min(best, omp_get_wtime() - start);
  }
  return 2.0 * kLanes * kChains * double(iterations) * double(threads) / best / 1e9;
}
"""

_modules = {}  # build variant (kernels.cpp_backend.ISA_VARIANT_FLAGS) -> the compiled probe


def fma_gflops(threads: int, seconds: float = 0.25) -> Tuple[Optional[float], Optional[str]]:
    """(float32 GFLOP/s of the FMA probe on ``threads`` threads, None) or (None, why it could not run).

    The probe is built for the vector path the cpp backend is held to (``SEPCONV_CPU_ISA``): with
    ``avx2`` (``python -m benchmarks --isa avx2``) it runs 256-bit FMAs, the peak of a CPU without
    AVX-512."""
    from kernels import cpp_backend

    try:
        variant = cpp_backend.requested_variant()
    except ValueError as error:
        return None, str(error)
    if variant not in _modules:
        if shutil.which("c++") is None:
            return None, "no C++ compiler (c++) to build the FMA probe"
        try:
            from torch.utils import cpp_extension

            _modules[variant] = cpp_extension.load_inline(
                name=cpp_backend.jit_name(variant, base="sepconv_fma_probe"),
                cpp_sources=[_SOURCE], functions=["fma_gflops"],
                extra_cflags=["-O2", "-march=native", "-fopenmp"] + cpp_backend.ISA_VARIANT_FLAGS[variant],
                extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as error:  # noqa: BLE001 - a compiler failure comes in many types
            return None, f"building the FMA probe failed: {type(error).__name__}: {error}"
    return float(_modules[variant].fma_gflops(int(threads), float(seconds))), None
