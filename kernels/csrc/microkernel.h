// Register-blocked GEMM micro-kernel shared by the forward and backward passes.
//
//   C[r][j] (+)= init[j] + sum_k A(r, k) * B[k * ldb + j]      r < mr <= kRows, j < nr <= kCols
//
// A is addressed through two strides (A(r, k) = a[r * a_rs + k * a_ks]) so the same kernel
// multiplies a row-major tile (a_ks = 1) or a transposed one (a_rs = 1). B rows are read as
// kCols-wide vectors (masked at the right edge); each A element is broadcast. The float32
// kernel keeps kRows x 2 AVX-512 accumulators in zmm registers; every other dtype (and a
// host without AVX-512) uses the plain loop, which the compiler vectorises as it can.
//
// The sum over k always runs in order 0..K-1 starting from zero, and C (when accumulating)
// is added once at the end, so results do not depend on how callers tile rows or columns.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sepconv {

constexpr int kRows = 12;  // accumulator rows (A broadcasts per k)
constexpr int kCols = 32;  // accumulator columns (two 16-float vectors)

struct MicroArgs {
  int64_t K;
  int64_t a_rs, a_ks;  // strides of A in elements
  int64_t ldb;         // row stride of B in elements
  int64_t ldc;         // row stride of C in elements
  int nr;              // valid columns, 1..kCols
  bool accumulate;     // add into C instead of overwriting it
  bool stream = false; // non-temporal stores of full, 64-byte aligned C rows (not accumulate)
};

template <typename T, int MR>
inline void micro_generic(const T* a, const T* b, T* c, const T* init, const MicroArgs& p) {
  T acc[MR][kCols] = {};
  for (int64_t k = 0; k < p.K; ++k) {
    const T* brow = b + k * p.ldb;
    for (int r = 0; r < MR; ++r) {
      const T av = a[r * p.a_rs + k * p.a_ks];
      for (int j = 0; j < p.nr; ++j) acc[r][j] += av * brow[j];
    }
  }
  for (int r = 0; r < MR; ++r) {
    T* crow = c + r * p.ldc;
    for (int j = 0; j < p.nr; ++j) {
      T v = acc[r][j];
      if (init) v += init[j];
      crow[j] = p.accumulate ? crow[j] + v : v;
    }
  }
}

#if defined(__AVX512F__)
// Lanes [0, left) of a 16-float vector: all for left >= 16, none for left <= 0.
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
}

template <int MR>
inline void micro_f32(const float* a, const float* b, float* c, const float* init, const MicroArgs& p) {
  const __mmask16 m0 = tail_mask(p.nr), m1 = tail_mask(p.nr - 16);
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
  const int64_t a_rs = p.a_rs, a_ks = p.a_ks, ldb = p.ldb;
  if (p.nr <= 16) {  // one vector of columns: half the FMAs of a full call
    for (int64_t k = 0; k < p.K; ++k) {
      const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + k * ldb);
      const float* ak = a + k * a_ks;
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) acc0[r] = _mm512_fmadd_ps(_mm512_set1_ps(ak[r * a_rs]), b0, acc0[r]);
    }
  } else if (p.nr == kCols) {
    for (int64_t k = 0; k < p.K; ++k) {
      const __m512 b0 = _mm512_loadu_ps(b + k * ldb);
      const __m512 b1 = _mm512_loadu_ps(b + k * ldb + 16);
      const float* ak = a + k * a_ks;
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(ak[r * a_rs]);
        acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
        acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
      }
    }
  } else {
    for (int64_t k = 0; k < p.K; ++k) {
      const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + k * ldb);
      const __m512 b1 = _mm512_maskz_loadu_ps(m1, b + k * ldb + 16);
      const float* ak = a + k * a_ks;
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(ak[r * a_rs]);
        acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
        acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
      }
    }
  }
  __m512 i0 = _mm512_setzero_ps(), i1 = _mm512_setzero_ps();
  if (init) {
    i0 = _mm512_maskz_loadu_ps(m0, init);
    i1 = _mm512_maskz_loadu_ps(m1, init + 16);
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    float* crow = c + r * p.ldc;
    __m512 v0 = _mm512_add_ps(acc0[r], i0), v1 = _mm512_add_ps(acc1[r], i1);
    if (p.accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, crow));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, crow + 16));
    }
    if (p.stream) {
      _mm512_stream_ps(crow, v0);
      _mm512_stream_ps(crow + 16, v1);
      continue;
    }
    _mm512_mask_storeu_ps(crow, m0, v0);
    _mm512_mask_storeu_ps(crow + 16, m1, v1);
  }
}
#endif

template <typename T, int MR>
inline void micro_fixed(const T* a, const T* b, T* c, const T* init, const MicroArgs& p) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    micro_f32<MR>(a, b, c, init, p);
    return;
  }
#endif
  micro_generic<T, MR>(a, b, c, init, p);
}

// Dispatch on the number of valid rows (1..kRows).
template <typename T>
inline void micro(int mr, const T* a, const T* b, T* c, const T* init, const MicroArgs& p) {
  switch (mr) {
    case 12: micro_fixed<T, 12>(a, b, c, init, p); break;
    case 11: micro_fixed<T, 11>(a, b, c, init, p); break;
    case 10: micro_fixed<T, 10>(a, b, c, init, p); break;
    case 9: micro_fixed<T, 9>(a, b, c, init, p); break;
    case 8: micro_fixed<T, 8>(a, b, c, init, p); break;
    case 7: micro_fixed<T, 7>(a, b, c, init, p); break;
    case 6: micro_fixed<T, 6>(a, b, c, init, p); break;
    case 5: micro_fixed<T, 5>(a, b, c, init, p); break;
    case 4: micro_fixed<T, 4>(a, b, c, init, p); break;
    case 3: micro_fixed<T, 3>(a, b, c, init, p); break;
    case 2: micro_fixed<T, 2>(a, b, c, init, p); break;
    default: micro_fixed<T, 1>(a, b, c, init, p); break;
  }
}

}  // namespace sepconv
