// The float32 vector layer: one struct, VecF32, for the instruction set this library is compiled
// for, chosen by the compiler's target macros (-march=native picks the host's):
//
//   avx512  AVX-512F           16 lanes (zmm), 32 registers
//   avx2    AVX2 + FMA          8 lanes (ymm), 16 registers
//   neon    aarch64 Advanced SIMD  4 lanes (q), 32 registers
//   scalar  anything else: no VecF32; the kernels take their plain loops
//
// The kernels are written once against VecF32 (load, masked load/store, fmadd, max, ...) and size
// their register tiles from kLanes and kRegisters. A Mask selects lanes [0, left) of a vector:
// AVX-512 has mask registers, AVX2 lane masks in a vector register, NEON neither (a partial vector
// goes through a small buffer; only the last vector of a row is partial).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#define SEPCONV_VEC_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define SEPCONV_VEC_AVX2 1
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define SEPCONV_VEC_NEON 1
#include <arm_neon.h>
#endif

#if defined(SEPCONV_VEC_AVX512) || defined(SEPCONV_VEC_AVX2) || defined(SEPCONV_VEC_NEON)
#define SEPCONV_HAS_VEC 1
#endif

namespace sepconv {

#if defined(SEPCONV_VEC_AVX512)
constexpr const char* kIsa = "avx512";
#elif defined(SEPCONV_VEC_AVX2)
constexpr const char* kIsa = "avx2";
#elif defined(SEPCONV_VEC_NEON)
constexpr const char* kIsa = "neon";
#else
constexpr const char* kIsa = "scalar";
#endif

#if defined(SEPCONV_VEC_AVX512)
// Lanes [0, left) of a 16-float vector: all for left >= 16, none for left <= 0.
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
}

struct VecF32 {
  using Reg = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kRegisters = 32;
  static constexpr bool kStreams = true;  // non-temporal stores
  static Mask mask(int64_t left) { return tail_mask(left); }
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float v) { return _mm512_set1_ps(v); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, Mask m, Reg v) { _mm512_mask_storeu_ps(p, m, v); }
  static void stream(float* p, Reg v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }  // b where either is NaN
};
#elif defined(SEPCONV_VEC_AVX2)
struct VecF32 {
  using Reg = __m256;
  using Mask = __m256i;  // all ones in the selected lanes
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 16;
  static constexpr bool kStreams = true;
  static Mask mask(int64_t left) {
    const int clamped = int(std::clamp<int64_t>(left, 0, kLanes));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(clamped), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float v) { return _mm256_set1_ps(v); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg load(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }  // zero elsewhere, no fault
  static void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, Mask m, Reg v) { _mm256_maskstore_ps(p, m, v); }
  static void stream(float* p, Reg v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }  // b where either is NaN
};
#elif defined(SEPCONV_VEC_NEON)
struct VecF32 {
  using Reg = float32x4_t;
  using Mask = int;  // the number of leading lanes, 0..4
  static constexpr int kLanes = 4;
  static constexpr int kRegisters = 32;
  static constexpr bool kStreams = false;
  static Mask mask(int64_t left) { return int(std::clamp<int64_t>(left, 0, kLanes)); }
  static Reg zero() { return vdupq_n_f32(0.0f); }
  static Reg set1(float v) { return vdupq_n_f32(v); }
  static Reg load(const float* p) { return vld1q_f32(p); }
  static Reg load(Mask m, const float* p) {
    if (m == kLanes) return vld1q_f32(p);
    float lanes[kLanes] = {};
    std::memcpy(lanes, p, sizeof(float) * size_t(m));
    return vld1q_f32(lanes);
  }
  static void store(float* p, Reg v) { vst1q_f32(p, v); }
  static void store(float* p, Mask m, Reg v) {
    if (m == kLanes) {
      vst1q_f32(p, v);
      return;
    }
    float lanes[kLanes];
    vst1q_f32(lanes, v);
    std::memcpy(p, lanes, sizeof(float) * size_t(m));
  }
  static void stream(float* p, Reg v) { vst1q_f32(p, v); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return vfmaq_f32(c, a, b); }
  static Reg add(Reg a, Reg b) { return vaddq_f32(a, b); }
  // vmaxq gives NaN where either is NaN: max(0, NaN) stays NaN as on x86 (the only use: ReLU).
  static Reg max(Reg a, Reg b) { return vmaxq_f32(a, b); }
};
#endif

}  // namespace sepconv
