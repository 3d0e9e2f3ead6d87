// Non-temporal stores for outputs larger than the cache.
//
// An output much larger than L3 has left the cache before anything reads it again, and a normal
// store first reads the line it writes from memory: for such an output that read is a third of the
// pass's traffic. Rows of 64-byte multiples at a 64-byte aligned address can instead be written with
// streaming stores (x86 builds with a vector path), which skip it. A thread that streamed must fence
// before the parallel region ends (stream_fence), so that the other threads see its rows.
#pragma once

#include <cstdint>
#include <type_traits>

#include "machine.h"
#include "vec.h"

namespace sepconv {

// Whether rows of `row_bytes` at `data` can be written with streaming stores: float32 rows of
// 64-byte multiples at a 64-byte aligned address, on an ISA that has the stores.
template <typename T>
inline bool can_stream(const T* data, int64_t row_bytes) {
#if defined(SEPCONV_HAS_VEC)
  return VecF32::kStreams && std::is_same_v<T, float> && row_bytes % 64 == 0 &&
         reinterpret_cast<uintptr_t>(data) % 64 == 0;
#else
  (void)data, (void)row_bytes;
  return false;
#endif
}

// Whether a float32 output of `bytes` in rows of `row_bytes` at `data` should be streamed: above
// three quarters of the last-level cache (machine.h; 24 MB of the 32 MB L3 of the development machine).
template <typename T>
inline bool should_stream(const T* data, int64_t row_bytes, int64_t bytes) {
  return can_stream(data, row_bytes) && bytes > machine().stream_bytes;
}

// dst[0, n) = src[0, n) with streaming stores; n a multiple of 16, dst 64-byte aligned.
inline void stream_copy(const float* src, float* dst, int64_t n) {
#if defined(SEPCONV_HAS_VEC)
  for (int64_t i = 0; i < n; i += VecF32::kLanes) VecF32::stream(dst + i, VecF32::load(src + i));
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
#endif
}

inline void stream_fence() {
#if defined(SEPCONV_VEC_AVX512) || defined(SEPCONV_VEC_AVX2)
  _mm_sfence();
#endif
}

}  // namespace sepconv
