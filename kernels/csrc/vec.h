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
  // Max pooling's step (pool_kernels.h): where v > best or v is NaN, best = v and at = here.
  static void keep_max(Reg v, Reg here, Reg& best, Reg& at) {
    const __mmask16 take = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_mask_mov_ps(best, take, v);
    at = _mm512_mask_mov_ps(at, take, here);
  }
  // acc + add in the lanes where a == b, acc in the others.
  static Reg add_where_equal(Reg acc, Reg add, Reg a, Reg b) {
    return _mm512_mask_add_ps(acc, _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ), acc, add);
  }
  // In-register transpose of 16 rows of 16 floats: on return r[c] holds column c. Three rounds of
  // interleaves: 32-bit pairs, 64-bit pairs, then 128-bit lanes across groups of four rows.
  static void transpose(Reg (&r)[kLanes]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    // u[4g + c], lane L: column 4L + c of rows 4g..4g+3.
    for (int g = 0; g < 4; ++g) {
      const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
      const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
      u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
      u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
      u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; ++c) {
      const __m512 x0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), x1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
      const __m512 y0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
      const __m512 y1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
      r[c] = _mm512_shuffle_f32x4(x0, y0, 0x88);
      r[4 + c] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
      r[8 + c] = _mm512_shuffle_f32x4(x1, y1, 0x88);
      r[12 + c] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
    }
  }
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
  static void keep_max(Reg v, Reg here, Reg& best, Reg& at) {
    const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    best = _mm256_blendv_ps(best, v, take);
    at = _mm256_blendv_ps(at, here, take);
  }
  static Reg add_where_equal(Reg acc, Reg add, Reg a, Reg b) {
    return _mm256_blendv_ps(acc, _mm256_add_ps(acc, add), _mm256_cmp_ps(a, b, _CMP_EQ_OQ));
  }
  // In-register transpose of 8 rows of 8 floats (r[c] becomes column c): 32-bit pairs, 64-bit
  // pairs within each 128-bit half, then the halves across rows 0-3 and 4-7.
  static void transpose(Reg (&r)[kLanes]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int g = 0; g < 8; g += 4) {  // u[g + c], half h: column 4h + c of rows g..g+3
      u[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
      u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xEE);
      u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
      u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
      r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
  }
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
  static void keep_max(Reg v, Reg here, Reg& best, Reg& at) {
    const uint32x4_t take = vorrq_u32(vcgtq_f32(v, best), vmvnq_u32(vceqq_f32(v, v)));
    best = vbslq_f32(take, v, best);
    at = vbslq_f32(take, here, at);
  }
  static Reg add_where_equal(Reg acc, Reg add, Reg a, Reg b) {
    return vbslq_f32(vceqq_f32(a, b), vaddq_f32(acc, add), acc);
  }
  // In-register transpose of 4 rows of 4 floats (r[c] becomes column c).
  static void transpose(Reg (&r)[kLanes]) {
    const float32x4x2_t rows01 = vtrnq_f32(r[0], r[1]), rows23 = vtrnq_f32(r[2], r[3]);
    r[0] = vcombine_f32(vget_low_f32(rows01.val[0]), vget_low_f32(rows23.val[0]));
    r[1] = vcombine_f32(vget_low_f32(rows01.val[1]), vget_low_f32(rows23.val[1]));
    r[2] = vcombine_f32(vget_high_f32(rows01.val[0]), vget_high_f32(rows23.val[0]));
    r[3] = vcombine_f32(vget_high_f32(rows01.val[1]), vget_high_f32(rows23.val[1]));
  }
};
#endif

}  // namespace sepconv
