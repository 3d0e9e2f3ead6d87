// Non-temporal stores for outputs larger than the cache.
//
// An output much larger than L3 has left the cache before anything reads it again, and a normal
// store first reads the line it writes from memory: for such an output that read is a third of the
// pass's traffic. Rows of 64-byte multiples at a 64-byte aligned address can instead be written with
// streaming stores, which skip it. A thread that streamed must fence before the parallel region
// ends (stream_fence), so that the other threads see its rows.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sepconv {

// Outputs above this many bytes stream (most of the 32 MB L3 of the development machine).
constexpr int64_t kStreamBytes = int64_t(24) << 20;

// Whether a float32 output of `bytes` in rows of `row_bytes` at `data` should be streamed.
template <typename T>
inline bool should_stream(const T* data, int64_t row_bytes, int64_t bytes) {
#if defined(__AVX512F__)
  return std::is_same_v<T, float> && bytes > kStreamBytes && row_bytes % 64 == 0 &&
         reinterpret_cast<uintptr_t>(data) % 64 == 0;
#else
  (void)data, (void)row_bytes, (void)bytes;
  return false;
#endif
}

// dst[0, n) = src[0, n) with streaming stores; n a multiple of 16, dst 64-byte aligned.
inline void stream_copy(const float* src, float* dst, int64_t n) {
#if defined(__AVX512F__)
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
#endif
}

inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

}  // namespace sepconv
