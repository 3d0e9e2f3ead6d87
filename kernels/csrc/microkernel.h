// Register-blocked GEMM micro-kernel shared by the forward and backward passes.
//
//   C[r][j] (+)= init[j] + sum_k A(r, k) * B[k * ldb + j]      r < mr <= kRows, j < nr <= kCols
//
// A is addressed through two strides (A(r, k) = a[r * a_rs + k * a_ks]) so the same kernel
// multiplies a row-major tile (a_ks = 1) or a transposed one (a_rs = 1); or, for a convolution read in
// place, K is taps of tap_k columns each at an offset of its own (MicroArgs::tap_offsets). B rows are read as
// vectors (masked at the right edge); each A element is broadcast. The float32 kernels fix some strides
// (micro_pass): micro_copying's A is k-major (a_rs 1, a_ks kRows), every other call's A row-major (a_ks 1)
// and its B a packed panel (ldb = panel_pass_cols). The float32 kernel keeps a
// register tile of kRows x kTileVectors accumulators (vec.h): kTileVectors vectors of columns per
// pass over k, as many passes as the kCols = 32 columns of a panel need. The tile is sized from the
// ISA's register count: accumulators + the B vectors + one broadcast fill it.
//
//   avx512  12 rows x 2 zmm (32 columns, one pass)
//   avx2     6 rows x 2 ymm (16 columns, two passes)
//   neon     6 rows x 4 q   (16 columns, two passes)
//
// Every other dtype (and a build without a vector path) uses the plain loop, which the compiler
// vectorises as it can.
//
// The sum over k always runs in order 0..K-1 starting from zero, and C (when accumulating)
// is added once at the end, so results do not depend on how callers tile rows or columns.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "vec.h"

namespace sepconv {

constexpr int kCols = 32;  // panel width: the columns one call covers
#if defined(SEPCONV_HAS_VEC)
constexpr int kTileVectors = VecF32::kLanes >= 8 ? 2 : 4;  // vectors of columns per pass
constexpr int kPassCols = kTileVectors * VecF32::kLanes;
static_assert(kCols % kPassCols == 0, "a panel is a whole number of passes");
// Accumulator rows: the registers left after kTileVectors B vectors and one broadcast, at most 12.
constexpr int kRows = std::min(12, (VecF32::kRegisters - kTileVectors - 1) / kTileVectors);
#else
constexpr int kRows = 12;
#endif

struct MicroArgs {
  int64_t K;
  int64_t a_rs, a_ks;  // strides of A in elements
  int64_t ldb;         // row stride of B in elements
  int64_t ldc;         // row stride of C in elements
  int nr;              // valid columns, 1..kCols
  bool accumulate;     // add into C instead of overwriting it
  bool stream = false; // non-temporal stores of full, 64-byte aligned C rows (not accumulate)
  // Where each pass's columns of B start: 0, side by side in B's rows (pass i at b + i * kPassCols,
  // a row-major B); otherwise pass i at b + i * b_pass, each pass's columns a block of their own
  // (a packed panel, see panel_offset).
  int64_t b_pass = 0;
  // Lines to fetch for writing while the K loop runs (the next call's C, which it will store to):
  // next_rows rows of next_bytes bytes from next, next_ld_bytes apart; null: none (the plain loop
  // of other dtypes fetches nothing). The float32 kernel's first pass fetches one row after
  // each stretch of k: fetched together before the call, 24 lines waited for fill buffers (see
  // forward).
  const void* next = nullptr;
  int64_t next_ld_bytes = 0;
  int next_rows = 0, next_bytes = 0;
  // A copy that micro_copying makes while its K loop runs: for each k < K, copy_cols (<= kRows)
  // elements from copy_src + k * copy_ld to copy_dst + k * kRows, where the next call's A goes. The
  // float32 kernel's first pass moves one row after each step of k, whole vectors at a time, so
  // copy_dst needs kCopyPad elements past K * kRows and the lanes past copy_cols get zeros; the plain
  // loop copies up front. null: none.
  const void* copy_src = nullptr;
  void* copy_dst = nullptr;
  int64_t copy_ld = 0;
  int copy_cols = 0;
  // A convolution's input read in place (micro_taps): K = taps * tap_k, and A(r, t * tap_k + c) =
  // a[r * a_rs + tap_offsets[t] + c] (a_ks 1): row r is an output pixel, tap t the input pixel under
  // it, c an input channel. The sums run k = 0..K-1 in order as for a tile holding the same values.
  const int64_t* tap_offsets = nullptr;
  int64_t tap_k = 0;
};

// Elements a buffer of MicroArgs::copy_dst needs past its K rows of kRows.
#if defined(SEPCONV_HAS_VEC)
constexpr int kCopyVectors = (kRows + VecF32::kLanes - 1) / VecF32::kLanes;  // vectors a copied row takes
constexpr int kCopyPad = kCopyVectors * VecF32::kLanes - kRows;
#else
constexpr int kCopyPad = 0;
#endif

// Rows [0, K) of cols elements from src (rows ld apart) to dst's kRows-wide rows: MicroArgs::copy_src's
// copy, made all at once.
template <typename T>
inline void copy_rows(const T* src, int64_t ld, T* dst, int64_t cols, int64_t K) {
  for (int64_t k = 0; k < K; ++k) std::copy_n(src + k * ld, cols, dst + k * kRows);
}

// Fetches for writing the lines of row `row` of MicroArgs::next.
inline void prefetch_next_row(const MicroArgs& p, int row) {
  const char* first = static_cast<const char*>(p.next) + row * p.next_ld_bytes;
  const char* last = first + p.next_bytes - 1;
  for (const char* line = first; line < last; line += 64) __builtin_prefetch(line, 1, 3);
  __builtin_prefetch(last, 1, 3);
}

// Columns of B that one pass of the micro-kernel reads. A packed panel stores them together, so a
// pass walks one contiguous stream: AVX2 and NEON passes read half of a 32-column row, and reading
// every other 64-byte line of a 1536-row panel from L2 ran the 1536->2048 GEMM at 90 GFLOP/s a core,
// 97-104 with each half contiguous (Zen 5, -mno-avx512f).
template <typename T>
constexpr int panel_pass_cols() {
#if defined(SEPCONV_HAS_VEC)
  if constexpr (std::is_same_v<T, float>) return kPassCols;
#endif
  return kCols;
}

// Offset of element (k, j) in a packed panel of K rows: panel_pass_cols() columns a block, the
// blocks one after the other (with 32-column passes this is the row-major K x kCols panel). The
// micro-kernel reads such a panel with ldb = panel_pass_cols<T>() and b_pass = K * ldb.
template <typename T>
constexpr int64_t panel_offset(int64_t K, int64_t k, int64_t j) {
  constexpr int64_t kPass = panel_pass_cols<T>();
  return ((j / kPass) * K + k) * kPass + j % kPass;
}

template <typename T, int MR>
inline void micro_generic(const T* a, const T* b, T* c, const T* init, const MicroArgs& p) {
  if (p.copy_dst != nullptr) {  // up front
    copy_rows(static_cast<const T*>(p.copy_src), p.copy_ld, static_cast<T*>(p.copy_dst), p.copy_cols, p.K);
  }
  T acc[MR][kCols] = {};
  for (int64_t k = 0; k < p.K; ++k) {
    const T* brow = b + k * p.ldb;
    const T* ak = p.tap_offsets != nullptr ? a + p.tap_offsets[k / p.tap_k] + k % p.tap_k : a + k * p.a_ks;
    for (int r = 0; r < MR; ++r) {
      const T av = ak[r * p.a_rs];
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

#if defined(SEPCONV_HAS_VEC)
// One pass: columns [0, left) of the pass starting at b, c and init (left >= 1). NV vectors of
// columns are live (the rest of the pass is past nr); kMasked: the last live one is partial.
template <int MR, int NV, bool kMasked, bool kCopy, bool kTaps = false>
inline void micro_pass(const float* a, const float* b, float* c, const float* init, const MicroArgs& p,
                       int64_t left) {
  using V = VecF32;
  typename V::Mask m[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) m[v] = V::mask(left - v * V::kLanes);
  auto load = [&](int v, const float* at) { return kMasked ? V::load(m[v], at) : V::load(at); };
  typename V::Reg acc[MR][NV];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  }
  // The strides the callers fix (micro_f32 checks them) are constants here: a k-major A under kCopy (a_ks
  // kRows), else a row-major A (a_ks 1) and a packed B (ldb kPassCols). Read from MicroArgs, they and the
  // twelve rows' offsets took more general registers than x86-64 has, and GCC moved some in and out of
  // vector registers and the stack on every step of k (see also micro_f32_plain).
  const int64_t a_rs = p.a_rs;
  constexpr int64_t a_ks = kCopy ? kRows : 1;
  const int64_t ldb = kCopy ? p.ldb : kPassCols;
  // Two steps of k per loop trip (the sums still run k = 0, 1, 2, ... in order: same bits). With
  // AVX-512 on an Intel Xeon (AMX, 2 MB L2 a core) the loop of one step ran at ~72% of the FMA
  // rate (a 192 x 728 tile times 23 panels, one thread: 163-169 GFLOP/s), two steps 173-189; the
  // layers' ratio to the eager pair 0.97x -> 1.02x (728->728@19 and 1024->1536@10, forward+backward,
  // batch 8, 3 interleaved runs each). AVX2 on the same machine: no change (already ~92%).
  // kCopy: A's rows are adjacent (a_rs 1: the k-major A of micro_copying), so its addresses are
  // constant offsets from one pointer and take no register a row (with the copy's pointers, 12 row
  // offsets in registers left too few for the rest: GCC kept them on the stack).
  auto step = [&](int64_t k) {
    typename V::Reg bk[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bk[v] = load(v, b + k * ldb + v * V::kLanes);
    const float* ak = a + k * a_ks;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const typename V::Reg av = V::set1(ak[kCopy ? r : r * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(av, bk[v], acc[r][v]);
    }
  };
  int64_t k = 0;
  if constexpr (kCopy) {
    const int64_t K = p.K;
    if (p.copy_dst != nullptr) {  // a row of the next call's A after each step (MicroArgs::copy_src)
      typename V::Mask cm[kCopyVectors];
#pragma GCC unroll 4
      for (int v = 0; v < kCopyVectors; ++v) cm[v] = V::mask(p.copy_cols - v * V::kLanes);
      const float* src = static_cast<const float*>(p.copy_src);
      float* dst = static_cast<float*>(p.copy_dst);
      const int64_t copy_ld = p.copy_ld;
#pragma GCC unroll 2
      for (; k < K; ++k) {
        step(k);
#pragma GCC unroll 4
        for (int v = 0; v < kCopyVectors; ++v) {
          V::store(dst + k * kRows + v * V::kLanes, V::load(cm[v], src + k * copy_ld + v * V::kLanes));
        }
      }
    }
#pragma GCC unroll 2
    for (; k < K; ++k) step(k);
  } else if constexpr (kTaps) {
    // step, with A's columns k of tap t at a + shift + k (shift = tap_offsets[t] - t * tap_k, a_ks 1). A
    // lambda of its own: a second argument to step made GCC leave it out of line in the kCopy kernels.
    auto tap_step = [&](int64_t k, int64_t shift) {
      typename V::Reg bk[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bk[v] = load(v, b + k * ldb + v * V::kLanes);
      const float* ak = a + shift + k;
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        const typename V::Reg av = V::set1(ak[r * a_rs]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(av, bk[v], acc[r][v]);
      }
    };
    const int64_t K = p.K, tap_k = p.tap_k, taps = K / tap_k;
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t shift = p.tap_offsets[t] - t * tap_k, end = k + tap_k;
#pragma GCC unroll 2
      for (; k < end; ++k) tap_step(k, shift);
      if (p.next != nullptr) {  // the next C's rows spread over the taps
        const int first = int(t * p.next_rows / taps), last = int((t + 1) * p.next_rows / taps);
        for (int row = first; row < last; ++row) prefetch_next_row(p, row);
      }
    }
  } else {
    if (p.next != nullptr) {  // one row of the next C after each of next_rows + 1 stretches of k
      for (int row = 0; row < p.next_rows; ++row) {
        const int64_t until = (row + 1) * p.K / (p.next_rows + 1);
#pragma GCC unroll 2
        for (; k < until; ++k) step(k);
        prefetch_next_row(p, row);
      }
    }
#pragma GCC unroll 2
    for (; k < p.K; ++k) step(k);
  }
  typename V::Reg bias[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) bias[v] = init ? load(v, init + v * V::kLanes) : V::zero();
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    float* crow = c + r * p.ldc;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      typename V::Reg out = V::add(acc[r][v], bias[v]);
      if (p.accumulate) out = V::add(out, load(v, crow + v * V::kLanes));
      if constexpr (!kMasked) {
        if (p.stream) {
          V::stream(crow + v * V::kLanes, out);
          continue;
        }
        V::store(crow + v * V::kLanes, out);
      } else {
        V::store(crow + v * V::kLanes, m[v], out);
      }
    }
  }
}

// The strides the float32 kernels take as constants (micro_pass): an error in this library where they differ.
template <bool kCopy>
inline void check_f32_strides(const MicroArgs& p) {
  const bool fixed = kCopy ? p.a_rs == 1 && p.a_ks == kRows : p.a_ks == 1 && p.ldb == kPassCols;
  if (!fixed) {
    throw std::logic_error("sepconv micro-kernel: float32 strides a_rs=" + std::to_string(p.a_rs) + " a_ks=" +
                           std::to_string(p.a_ks) + " ldb=" + std::to_string(p.ldb) +
                           (kCopy ? " (a k-major A needs a_rs 1, a_ks kRows)"
                                  : " (a row-major A needs a_ks 1, a packed B ldb kPassCols)"));
  }
}

template <int MR, bool kCopy, bool kTaps>
inline void micro_f32(const float* a, const float* b, float* c, const float* init, const MicroArgs& p) {
  check_f32_strides<kCopy>(p);
  constexpr int kHalf = kTileVectors / 2 * VecF32::kLanes;
  MicroArgs later = p;  // the passes after the first fetch and copy nothing
  later.next = nullptr;
  later.copy_dst = nullptr;
  for (int j0 = 0; j0 < p.nr; j0 += kPassCols) {
    const MicroArgs& pass_args = j0 == 0 ? p : later;
    const int64_t left = p.nr - j0;
    const float* pass_init = init ? init + j0 : nullptr;
    const float* pass_b = p.b_pass ? b + j0 / kPassCols * p.b_pass : b + j0;
    if (left >= kPassCols) {
      micro_pass<MR, kTileVectors, false, kCopy, kTaps>(a, pass_b, c + j0, pass_init, pass_args, left);
    } else if (left <= kHalf) {  // half the vectors live: half the FMAs
      micro_pass<MR, kTileVectors / 2, true, kCopy, kTaps>(a, pass_b, c + j0, pass_init, pass_args, left);
    } else {
      micro_pass<MR, kTileVectors, true, kCopy, kTaps>(a, pass_b, c + j0, pass_init, pass_args, left);
    }
  }
}
#endif

#if defined(SEPCONV_HAS_VEC)
// micro_taps' float32 kernels, kept out of line: inlined into tiled_forward, GCC kept their accumulators
// on the stack (the stem's 32->64 convolution took 1.45x the time of gathering its windows into a tile).
template <int MR>
[[gnu::noinline]] void micro_f32_taps(const float* a, const float* b, float* c, const float* init,
                                      const MicroArgs& p) {
  micro_f32<MR, false, true>(a, b, c, init, p);
}

// micro's other float32 kernels, out of line too: inlined into tiled_forward, GCC allocated their registers
// together with the caller's loops and kept some of the twelve rows' addresses (AVX-512) on the stack or in
// vector registers, moved to a general register on every step of k. Zen 4, AVX-512, a 12 x 32 tile by a
// 728-row panel, one thread: 107-109 GFLOP/s (93% of the FMA rate), 111-112 with the strides as constants
// (micro_pass) and these kernels out of line; AVX2's 6 x 16 tile, 113-116 either way (the micro-kernel alone,
// alternated builds). Whole layers, one thread, the fastest of 30 calls in three alternated runs: with
// AVX-512 64->128@147 (batch 1) 8% less time forward and 4% forward+backward, 728->728@19 and
// 1024->1536@10 (batch 4) within 1%, 128->128@147 within 3% either way; with AVX2 1024->1536@10 forward 3%
// and 128->128@147 3-6% less, the others within 1%. The same instructions compute the sums: same bits.
template <int MR>
[[gnu::noinline]] void micro_f32_plain(const float* a, const float* b, float* c, const float* init,
                                       const MicroArgs& p) {
  micro_f32<MR, false, false>(a, b, c, init, p);
}
#endif

template <typename T, int MR, bool kCopy, bool kTaps>
inline void micro_fixed(const T* a, const T* b, T* c, const T* init, const MicroArgs& p) {
#if defined(SEPCONV_HAS_VEC)
  if constexpr (std::is_same_v<T, float> && kTaps) {
    micro_f32_taps<MR>(a, b, c, init, p);
    return;
  } else if constexpr (std::is_same_v<T, float> && !kCopy) {
    micro_f32_plain<MR>(a, b, c, init, p);
    return;
  } else if constexpr (std::is_same_v<T, float>) {
    micro_f32<MR, kCopy, kTaps>(a, b, c, init, p);
    return;
  }
#endif
  micro_generic<T, MR>(a, b, c, init, p);
}

// Dispatch on the number of valid rows (1..kRows). kCopy: micro_copying's kernels; kTaps: micro_taps'.
template <typename T, int MR = kRows, bool kCopy = false, bool kTaps = false>
inline void micro(int mr, const T* a, const T* b, T* c, const T* init, const MicroArgs& p) {
  if constexpr (MR > 1) {
    if (mr < MR) {
      micro<T, MR - 1, kCopy, kTaps>(mr, a, b, c, init, p);
      return;
    }
  }
  micro_fixed<T, MR, kCopy, kTaps>(a, b, c, init, p);
}

// micro for a k-major A (a_rs 1, a_ks kRows) that also makes MicroArgs::copy_src's copy, if any: the
// float32 kernels of their own, so the other callers' loops stay as they were (compiled together,
// the forward's ran 1-5% slower with AVX2).
template <typename T>
inline void micro_copying(int mr, const T* a, const T* b, T* c, const T* init, const MicroArgs& p) {
  micro<T, kRows, true>(mr, a, b, c, init, p);
}

// micro for A read in place through MicroArgs::tap_offsets (a convolution's input), kernels of their
// own for the same reason.
template <typename T>
inline void micro_taps(int mr, const T* a, const T* b, T* c, const T* init, const MicroArgs& p) {
  micro<T, kRows, false, true>(mr, a, b, c, init, p);
}

}  // namespace sepconv
