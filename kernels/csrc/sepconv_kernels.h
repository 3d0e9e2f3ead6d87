// Fused depthwise -> pointwise kernels on NHWC buffers (channels fastest).
//
// Shapes (all buffers dense, channels fastest, 64-bit offsets throughout):
//   x           (N, H, W, CM)        input, already expanded to the CM = C*M hidden channels
//   dw_taps     (kh*kw, CM)          depthwise weight, tap-major
//   pw          (Cout, CM)           pointwise weight, row-major (as given by the caller)
//   panels      (ceil(Cout/32), CM, 32)  pointwise weight transposed into zero-padded panels
//   out / grad  (N, OH, OW, Cout)
//
// Forward: for a block of output pixels, the depthwise result for every hidden channel is
// computed into a thread-local tile (pixels x CM, sized for L2) and multiplied at once by the
// packed pointwise panels; the N*CM*OH*OW intermediate never reaches memory.
//
// Backward: each task owns a chunk of hidden channels (and a part of the pixels), so every
// gradient element is written by exactly one thread, and per-part sums are added in a fixed
// order (bitwise deterministic from run to run at a given thread count). Per block of pixels it
// forms grad_hidden = grad_out @ pw[:, chunk], recomputes the depthwise tile (for the pointwise
// weight gradient), and scatters grad_hidden through the transposed depthwise into grad_input and
// the depthwise weight and bias gradients.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "machine.h"
#include "microkernel.h"
#include "moments.h"
#include "streaming.h"
#include "vec.h"

namespace sepconv {

struct Geometry {
  int64_t N, H, W, CM, Cout, OH, OW;
  int64_t kh, kw, sh, sw, pt, pl, dh, dw;
  int64_t pixels() const { return N * OH * OW; }
};

// Output pixels per block of the backward: the K of its pointwise-weight-gradient GEMM, which reads
// and writes its C (the chunk of grad_pw, Cout x up to 256 channels) once per block, and the rows of
// its grad_hidden GEMM and depthwise tiles. AVX-512's 12-row tiles take 8 x 12 = 96. The 6-row tiles
// of AVX2 (and NEON, not measured) depend on the L2: with less than 2 MB a core they take 48 x 6 =
// 288, which on a 2-core AMD EPYC without AVX-512 (Zen 3, 512 KB L2 a core) took 1-8% off
// forward+backward of every Xception layer from 128->256@74 on, batch 1 and 8, against 8 x 6 = 48
// (728->1024@19 batch 8 82-84 -> 77-78 ms, 728->728@37 batch 1 28.3 -> 26.9 ms; 144 was between).
// With 2 MB or more they take 16 x 6 = 96: on a 2-core Intel Xeon held to AVX2 (2 MB L2 a core)
// forward+backward at batch 8 took 1-4.5% less time than with 288 on all ten Xception layers (two
// builds alternated twice, `python -m benchmarks.cpp_tune`); a block of 288 pixels with its grad_out
// rows (1.2 MB at 1024 channels), its gradient chunk and two hidden tiles no longer fits that L2, one
// of 96 does. SEPCONV_BWD_BLOCK fixes it for tuning runs. The sums over a block's pixels run in order
// and each block's are added once, so the bits depend on this size (so on the L2 size, with 6-row
// tiles) and on nothing else but the thread count.
#if defined(SEPCONV_BWD_BLOCK)
static_assert(SEPCONV_BWD_BLOCK > 0 && SEPCONV_BWD_BLOCK % kRows == 0, "a backward block is whole micro-kernel tiles");
#endif
inline int64_t backward_block() {
#if defined(SEPCONV_BWD_BLOCK)
  return SEPCONV_BWD_BLOCK;
#else
  if (kRows >= 12) return 8 * kRows;
  return machine().l2_bytes >= (int64_t(2) << 20) ? 16 * kRows : 48 * kRows;
#endif
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Rows a multiple of 4 KB apart (1024 or 2048 float32 channels): the kRows rows one micro-kernel
// call reads or writes together then all map to the same L1 sets (the forward streams such
// outputs).
inline bool rows_share_l1_sets(int64_t row_bytes) { return row_bytes % 4096 == 0; }

// Whether `rows` rows row_bytes apart, read together, need more ways of one L1 set than the L1 has
// (64-byte lines, MachineConfig::l1d_sets sets): then they evict each other on every step of a K loop.
// 12 rows of 1024 or 2048 float32 channels (4 or 8 KB apart) all fall in one of the 64 sets of an x86
// L1, which an 8-way 32 KB L1 (Zen 4) cannot hold and a 12-way 48 KB one (Zen 5, Intel from Ice Lake
// on) can; 6 rows (AVX2's tile) fit either. 1536 channels (6 KB) split 12 rows over two sets.
inline bool rows_overflow_l1_set(int64_t row_bytes, int64_t rows) {
  const int64_t ways = machine().l1d_ways, sets = machine().l1d_sets;
  if (rows <= ways) return false;
  auto set_of = [&](int64_t r) { return (r * row_bytes / 64) % sets; };
  for (int64_t r = 0; r < rows; ++r) {  // rows <= kRows: counting the rows that share r's set is cheap
    int64_t sharing = 0;
    for (int64_t q = 0; q < rows; ++q) sharing += set_of(q) == set_of(r);
    if (sharing > ways) return true;
  }
  return false;
}

// Whether the forward streams an output whose rows lie a multiple of 4 KB apart (1024 or 2048 channels;
// tiled_forward): where a micro-kernel call's rows fit one L1 set's ways. Measured, stores of such outputs
// against streaming stores: Zen 5 (12-way L1) with AVX-512's 12-row tiles, streaming 5% faster
// (728->1024@19 forward, batch 8); Zen 4 (8-way) with 12-row tiles, streaming 6-7% slower (728->1024@19
// and 1536->2048@10, batch 1 and 8); Zen 4 with AVX2's 6-row tiles, streaming 0.7-1.7% faster at
// 728->1024@19 and within 3% either way at 1536->2048@10 (batch 8).
inline bool stream_strided_rows() {
  static const bool stream = !rows_overflow_l1_set(4096, kRows);  // the machine's L1 is read once, too
  return stream;
}

// Prefetches the cache line at p + offset (elements) into L1. The address is formed as an integer:
// it may lie past either end of the buffer (a prefetch never faults).
template <typename T>
inline void prefetch_at(const T* p, int64_t offset, bool write = false) {
  const void* address = reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + offset * int64_t(sizeof(T)));
  if (write) {
    __builtin_prefetch(address, 1, 3);
  } else {
    __builtin_prefetch(address, 0, 3);
  }
}

// A per-channel affine map that the depthwise stage applies to each input it reads (a BatchNorm
// folded into the read, sepconv_cpp::batch_norm_separable): x * scale[c] + shift[c] in one fused
// multiply-add, before the ReLU of relu_input. Both null: the input as it is. The pointers address
// hidden channel 0; only in-bounds taps are read, so the zero padding stays zero.
template <typename T>
struct InputAffine {
  const T* scale = nullptr;
  const T* shift = nullptr;
  explicit operator bool() const { return scale != nullptr; }
  // The same map with its pointers at channel k0 (none stays none).
  InputAffine from(int64_t k0) const { return scale ? InputAffine{scale + k0, shift + k0} : InputAffine{}; }
  // relu?(x * scale[c] + shift[c]): one value of channel c as the depthwise stage reads it.
  T operator()(T x, int64_t c, bool relu) const {
    const T in = std::fma(x, scale[c], shift[c]);
    return relu ? std::max(in, T(0)) : in;
  }
};

// The sums a BatchNorm folded into this layer's input read (sepconv_cpp::batch_norm_separable) needs for its
// backward, taken by backward below over the input gradient as each of its rows is finished, while the row is
// still in cache, instead of in a pass of their own: per hidden channel c, sum(grad_x) and
// sum(grad_x * (x - mean[c])) (sums: 2 x CM doubles, the first sum in row 0). Rows are summed in the data type
// in steps of kSumRows, steps into double, in an order fixed by the shape and the thread count. mean null: not
// wanted. backward sets taken, or leaves it false where its tasks do not finish rows one by one (row bands,
// a single image): the caller then takes the sums itself.
template <typename T>
struct InputGradSums {
  static constexpr int64_t kSumRows = 64;
  const T* mean = nullptr;
  double* sums = nullptr;
  bool taken = false;
  explicit operator bool() const { return mean != nullptr; }
};

// One output pixel's depthwise result for kc hidden channels: out[c] = bias[c] +
// sum over the `valid` in-bounds taps v of relu?(affine(xs[v][c])) * ws[v][c] (bias may be null;
// affine's pointers already at the first of the kc channels).
// Each 64-channel slice accumulates over the taps in registers and is stored once.
template <typename T>
inline void depthwise_pixel(const T* const* xs, const T* const* ws, int64_t valid, const T* bias, bool relu,
                            int64_t kc, T* out, InputAffine<T> affine = {}) {
  constexpr int64_t kSlice = 64;
  for (int64_t c0 = 0; c0 < kc; c0 += kSlice) {
    const int64_t width = std::min(kSlice, kc - c0);
    T acc[kSlice];
    for (int64_t c = 0; c < width; ++c) acc[c] = bias ? bias[c0 + c] : T(0);
    for (int64_t v = 0; v < valid; ++v) {
      const T* xr = xs[v] + c0;
      const T* wr = ws[v] + c0;
      if (affine) {
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) acc[c] += affine(xr[c], c0 + c, relu) * wr[c];
      } else if (relu) {
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) acc[c] += std::max(xr[c], T(0)) * wr[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) acc[c] += xr[c] * wr[c];
      }
    }
    for (int64_t c = 0; c < width; ++c) out[c0 + c] = acc[c];
  }
}

#if defined(SEPCONV_HAS_VEC)
// float32 with a vector path: the four accumulators of a slice of four vectors (64 channels with
// AVX-512) stay in registers across the taps, and each tap's input two slices ahead is prefetched.
// The taps' rows mostly come from L2; waiting on them, the depthwise pass took about a fifth of the
// forward time of a 728-channel layer (perf, one thread, AVX-512), ten times its share of the FLOPs.
inline void depthwise_pixel_f32(const float* const* xs, const float* const* ws, int64_t valid, const float* bias,
                                bool relu, int64_t kc, float* out, InputAffine<float> affine = {}) {
  using V = VecF32;
  constexpr int64_t kLanes = V::kLanes, kSlice = 4 * kLanes;
  const V::Reg zero = V::zero();
  for (int64_t c0 = 0; c0 < kc; c0 += kSlice) {
    V::Mask m[4];
    V::Reg acc[4], scale[4], shift[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      m[q] = V::mask(kc - c0 - q * kLanes);
      acc[q] = bias ? V::load(m[q], bias + c0 + q * kLanes) : zero;
      scale[q] = affine ? V::load(m[q], affine.scale + c0 + q * kLanes) : zero;
      shift[q] = affine ? V::load(m[q], affine.shift + c0 + q * kLanes) : zero;
    }
    for (int64_t v = 0; v < valid; ++v) {
      const float* xr = xs[v] + c0;
      const float* wr = ws[v] + c0;
      for (int64_t line = 0; line < kSlice; line += 16) prefetch_at(xr, 2 * kSlice + line);
      V::Reg in[4];
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        in[q] = V::load(m[q], xr + q * kLanes);
        if (affine) in[q] = V::fmadd(in[q], scale[q], shift[q]);
        if (relu) in[q] = V::max(zero, in[q]);  // max(0, x) keeps a NaN input as NaN, like F.relu
      }
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[q] = V::fmadd(in[q], V::load(m[q], wr + q * kLanes), acc[q]);
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) V::store(out + c0 + q * kLanes, m[q], acc[q]);
  }
}
#endif

// How far ahead (in output pixels) the depthwise passes fetch the bottom-right tap, the one input
// a run of pixels has not read yet (the other taps' lines came in for earlier pixels or rows).
constexpr int64_t kRowAhead = 8;  // 2 to 12 measured the same

// A run of consecutive output pixels of one output row whose 3x3 window lies inside the input
// horizontally, addressed in x (N, H, W, CM): x[base + r * pixel_step + i * row_step + j * col_step]
// is tap (i, j) of pixel r at hidden channel 0. base may lie outside x when kernel row 0 does; only
// the kernel rows i with rows[i] are inside the input.
struct Run3x3 {
  int64_t count = 0;
  int64_t base = 0, pixel_step = 0, col_step = 0, row_step = 0;
  bool rows[3] = {};
  int64_t ahead = 0;  // offset from base of the bottom-right in-bounds tap kRowAhead pixels on
};

#if defined(SEPCONV_HAS_VEC)
// How the 3x3 row kernels read one vector of channels of an input: relu?(x * scale + shift) where a
// BatchNorm is folded into the read (affine: scale and shift that vector's channels), relu?(x)
// otherwise (max(0, x) keeps a NaN input as NaN, like F.relu).
struct InputLoad {
  bool relu = false, affine = false;
  VecF32::Reg scale = VecF32::zero(), shift = VecF32::zero();

  // The vector of channels at c (relative to the affine's pointers) under mask m. kAffine a template
  // argument: the kernels are compiled once each way, each with its flag a constant (a flag known only at run
  // time cost the backward of 728->728@19 at batch 8 4%, without an affine).
  template <bool kAffine>
  static InputLoad at(bool relu, InputAffine<float> affine, int64_t c, VecF32::Mask m) {
    InputLoad in;
    in.relu = relu;
    if constexpr (kAffine) {
      in.affine = true;
      in.scale = VecF32::load(m, affine.scale + c);
      in.shift = VecF32::load(m, affine.shift + c);
    }
    return in;
  }

  // x[offset, offset + lanes) under mask m, mapped.
  VecF32::Reg operator()(const float* x, int64_t offset, VecF32::Mask m) const {
    VecF32::Reg v = VecF32::load(m, x + offset);
    if (affine) v = VecF32::fmadd(v, scale, shift);
    return relu ? VecF32::max(VecF32::zero(), v) : v;
  }
};

// The inputs of a run's windows for one vector of channels, where consecutive pixels are one column
// step apart: at pixel r, window[i][j] holds kernel row i, column r + j, and each input is loaded
// once. This sets columns 0 and 1 of the in-bounds kernel rows (zero elsewhere) before pixel 0;
// at each pixel column 2 comes in (load_window_row), and the columns shift left after it.
inline void start_window(VecF32::Reg (&window)[3][3], const float* x, const Run3x3& run, int64_t start, VecF32::Mask m,
                         const InputLoad& input) {
  for (int i = 0; i < 3; ++i) {
    window[i][0] = window[i][1] = window[i][2] = VecF32::zero();
    if (run.rows[i] && run.count > 0) {
      window[i][0] = input(x, start + i * run.row_step, m);
      window[i][1] = input(x, start + i * run.row_step + run.col_step, m);
    }
  }
}

// Kernel row i (in bounds) of the window of the pixel at `at`: its column 2, and columns 0 and 1 as
// well unless the window slides (then they are the previous pixel's columns 1 and 2, shifted).
template <bool kSliding>
inline void load_window_row(VecF32::Reg (&window)[3][3], int i, const float* x, const Run3x3& run, int64_t at,
                            VecF32::Mask m, const InputLoad& input) {
  const int64_t row = at + i * run.row_step;
  if constexpr (!kSliding) {
    window[i][0] = input(x, row, m);
    window[i][1] = input(x, row + run.col_step, m);
  }
  window[i][2] = input(x, row + 2 * run.col_step, m);
}

// Calls walk(std::true_type) where the window slides, walk(std::false_type) elsewhere, so that each
// walk over a run is compiled for one case, with no test inside its loop.
template <typename Walk>
inline void with_sliding(bool sliding, Walk&& walk) {
  if (sliding) {
    walk(std::true_type{});
  } else {
    walk(std::false_type{});
  }
}

// After a pixel: columns 1 and 2 of kernel row i become the next pixel's columns 0 and 1.
inline void shift_window_row(VecF32::Reg (&window)[3][3], int i) {
  window[i][0] = window[i][1];
  window[i][1] = window[i][2];
}

// Where the window slides and all three kernel rows are in bounds (every output row but the first
// and last), the run goes kSegment pixels at a time, and within a segment over all the channel
// vectors: each input row of a segment is one contiguous stretch of memory read front to back. The
// old order (one channel vector along the whole run, then the next) read the input at a stride of CM
// floats: a run's lines fell into few L1 sets (CM = 128: 8 sets, 441 lines; CM = 1024: one set) and
// came from L2 every time (128 hidden channels at 147x147: 10.7 ns a pixel-vector, 3x the same run
// held in L1). A segment's pixels share each input vector (loaded once for its up to three taps)
// and the nine weights, loaded once per channel vector per segment; each pixel sums its taps in the
// same two chains, in the same order, as depthwise_row3x3_f32 (same bits).
// Pixels per segment: with AVX-512, 6 (9 weights + 12 accumulators + inputs in 32 registers; 6 was
// 10-25% faster than 4 alone at 64-728 hidden channels); AVX2 and NEON, 4 (3 and 6 were slower).
#if !defined(SEPCONV_DW_SEGMENT) && defined(SEPCONV_VEC_AVX512)
#define SEPCONV_DW_SEGMENT 6
#elif !defined(SEPCONV_DW_SEGMENT)
#define SEPCONV_DW_SEGMENT 4
#endif
constexpr int kSegment = SEPCONV_DW_SEGMENT;

// Holds v in a register from here on: GCC otherwise folds an input's load into each of the up to
// three FMAs that use it (three loads of one vector).
inline void keep_in_register(VecF32::Reg& v) {
#if defined(SEPCONV_VEC_AVX512) && !defined(SEPCONV_NO_KEEP)
  asm("" : "+v"(v));
#elif defined(SEPCONV_VEC_AVX2) && !defined(SEPCONV_NO_KEEP)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

// kPixels consecutive pixels of a sliding run, one vector of channels: pixel p's window starts at
// x + at + p * col_step; its sum goes to out[p * ld].
// kAffine: each input as x * scale + shift first (InputLoad).
template <bool kRelu, bool kAffine, bool kMasked, int kPixels>
inline void depthwise_pixels3x3_f32(const float* x, int64_t at, int64_t row_step, int64_t col_step,
                                    const VecF32::Reg (&wv)[9], VecF32::Reg b, VecF32::Mask m, float* out,
                                    int64_t ld, VecF32::Reg scale, VecF32::Reg shift) {
  using V = VecF32;
  V::Reg acc[kPixels][2];
#pragma GCC unroll 8
  for (int p = 0; p < kPixels; ++p) {
    acc[p][0] = b;
    acc[p][1] = V::zero();
  }
#pragma GCC unroll 3
  for (int i = 0; i < 3; ++i) {
#pragma GCC unroll 10
    for (int j = 0; j < kPixels + 2; ++j) {
      const float* src = x + at + i * row_step + j * col_step;
      V::Reg v = kMasked ? V::load(m, src) : V::load(src);
      if constexpr (kAffine) v = V::fmadd(v, scale, shift);
      if constexpr (kRelu) v = V::max(V::zero(), v);  // keeps a NaN input as NaN, like F.relu
      keep_in_register(v);
#pragma GCC unroll 3
      for (int k = 0; k < 3; ++k) {  // input column j is column k of pixel j - k's window
        const int p = j - k, t = 3 * i + k;
        if (p < 0 || p >= kPixels) continue;
        acc[p][t & 1] = V::fmadd(v, wv[t], acc[p][t & 1]);  // tap t into chain t % 2, as window_sum
      }
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < kPixels; ++p) {
    const V::Reg sum = V::add(acc[p][0], acc[p][1]);
    if constexpr (kMasked) {
      V::store(out + p * ld, m, sum);
    } else {
      V::store(out + p * ld, sum);
    }
  }
}

// kPixels pixels starting at run pixel r, every channel vector of [0, kc) (affine, with kAffine: already
// at channel k0).
template <bool kRelu, bool kAffine, int kPixels>
inline void depthwise_segment3x3_f32(const float* x, const Run3x3& run, int64_t r, int64_t k0, const float* w,
                                     int64_t w_stride, const float* bias, int64_t kc, float* out, int64_t ld,
                                     InputAffine<float> affine) {
  using V = VecF32;
  const int64_t at = run.base + k0 + r * run.pixel_step;
  float* o = out + r * ld;
  auto vector = [&](int64_t c, auto masked) {
    constexpr bool kMasked = decltype(masked)::value;
    const V::Mask m = V::mask(kc - c);
    V::Reg wv[9];
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) wv[t] = kMasked ? V::load(m, w + t * w_stride + c) : V::load(w + t * w_stride + c);
    const V::Reg b = bias ? (kMasked ? V::load(m, bias + c) : V::load(bias + c)) : V::zero();
    V::Reg scale = V::zero(), shift = V::zero();
    if constexpr (kAffine) {
      scale = kMasked ? V::load(m, affine.scale + c) : V::load(affine.scale + c);
      shift = kMasked ? V::load(m, affine.shift + c) : V::load(affine.shift + c);
    }
    // The bottom kernel row's input is the one row not read for the previous output row (it comes
    // from L3 or memory): fetch its columns two segments on, this channel vector's line of each.
#pragma GCC unroll 8
    for (int j = 0; j < kPixels; ++j) prefetch_at(x, at + c + 2 * run.row_step + (2 + 2 * kPixels + j) * run.col_step);
    depthwise_pixels3x3_f32<kRelu, kAffine, kMasked, kPixels>(x, at + c, run.row_step, run.col_step, wv, b, m, o + c,
                                                             ld, scale, shift);
  };
  const int64_t full = kc / V::kLanes * V::kLanes;
  for (int64_t c = 0; c < full; c += V::kLanes) vector(c, std::false_type{});
  if (full < kc) vector(full, std::true_type{});
}

// The last `pixels` (1 to kPixels) pixels of a run, fewer than a segment.
template <bool kRelu, bool kAffine, int kPixels>
inline void depthwise_last_segment3x3_f32(int64_t pixels, const float* x, const Run3x3& run, int64_t r, int64_t k0,
                                          const float* w, int64_t w_stride, const float* bias, int64_t kc, float* out,
                                          int64_t ld, InputAffine<float> affine) {
  if constexpr (kPixels > 1) {
    if (pixels < kPixels) {
      depthwise_last_segment3x3_f32<kRelu, kAffine, kPixels - 1>(pixels, x, run, r, k0, w, w_stride, bias, kc, out,
                                                                 ld, affine);
      return;
    }
  }
  depthwise_segment3x3_f32<kRelu, kAffine, kPixels>(x, run, r, k0, w, w_stride, bias, kc, out, ld, affine);
}

template <bool kRelu, bool kAffine>
inline void depthwise_run3x3_sliding_f32(const float* x, const Run3x3& run, int64_t k0, const float* w,
                                         int64_t w_stride, const float* bias, int64_t kc, float* out, int64_t ld,
                                         InputAffine<float> affine) {
  int64_t r = 0;
  for (; r + kSegment <= run.count; r += kSegment) {
    depthwise_segment3x3_f32<kRelu, kAffine, kSegment>(x, run, r, k0, w, w_stride, bias, kc, out, ld, affine);
  }
  if (r < run.count) {
    depthwise_last_segment3x3_f32<kRelu, kAffine, kSegment - 1>(run.count - r, x, run, r, k0, w, w_stride, bias, kc,
                                                                out, ld, affine);
  }
}

// 3x3 depthwise, float32, over a run: hidden channels [k0, k0 + kc) (w and bias already offset to
// k0), pixel r into out[r * ld]. Each vector of channels keeps its nine weights in registers across
// the pixels, so a tap costs one load and one FMA (the per-pixel path also reloads the weight and
// walks a tap list: at 64 hidden channels that made the depthwise a third of the forward time).
// affine: as depthwise_pixel's (already at channel k0), given with kAffine.
template <bool kAffine = false>
inline void depthwise_row3x3_f32(const float* x, const Run3x3& run, int64_t k0, const float* w, int64_t w_stride,
                                 const float* bias, bool relu, int64_t kc, float* out, int64_t ld,
                                 InputAffine<float> affine = {}) {
  const VecF32::Reg zero = VecF32::zero();
  const int64_t pixel_step = run.pixel_step;
  const bool* rows = run.rows;
  const bool sliding = pixel_step == run.col_step;
  if (sliding && rows[0] && rows[1] && rows[2]) {
    if (relu) {
      depthwise_run3x3_sliding_f32<true, kAffine>(x, run, k0, w, w_stride, bias, kc, out, ld, affine);
    } else {
      depthwise_run3x3_sliding_f32<false, kAffine>(x, run, k0, w, w_stride, bias, kc, out, ld, affine);
    }
    return;
  }
  for (int64_t c = 0; c < kc; c += VecF32::kLanes) {
    const VecF32::Mask m = VecF32::mask(kc - c);
    VecF32::Reg wv[9];
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) wv[t] = VecF32::load(m, w + t * w_stride + c);
    const VecF32::Reg b = bias ? VecF32::load(m, bias + c) : zero;
    const InputLoad input = InputLoad::at<kAffine>(relu, affine, c, m);
    const int64_t start = run.base + k0 + c;
    // Where consecutive pixels are one column step apart (stride equal to dilation), each input
    // enters a window that slides along the run once (three loads a pixel, not nine; forward of
    // 128->128@147 at batch 8 4% faster); otherwise each pixel loads its whole window.
    // One pixel's sum, tap (i, j) = column(i, j) of its window: the taps alternate between two
    // chains (the order every path of this kernel sums in).
    auto window_sum = [&](auto&& column) {
      VecF32::Reg acc0 = b, acc1 = zero;
      if (rows[0]) {
        acc0 = VecF32::fmadd(column(0, 0), wv[0], acc0);
        acc1 = VecF32::fmadd(column(0, 1), wv[1], acc1);
        acc0 = VecF32::fmadd(column(0, 2), wv[2], acc0);
      }
      if (rows[1]) {
        acc1 = VecF32::fmadd(column(1, 0), wv[3], acc1);
        acc0 = VecF32::fmadd(column(1, 1), wv[4], acc0);
        acc1 = VecF32::fmadd(column(1, 2), wv[5], acc1);
      }
      if (rows[2]) {
        acc0 = VecF32::fmadd(column(2, 0), wv[6], acc0);
        acc1 = VecF32::fmadd(column(2, 1), wv[7], acc1);
        acc0 = VecF32::fmadd(column(2, 2), wv[8], acc0);
      }
      return VecF32::add(acc0, acc1);
    };
    with_sliding(sliding, [&](auto kind) {
      VecF32::Reg window[3][3];
      start_window(window, x, run, start, m, input);
      int64_t r = 0;
      if constexpr (decltype(kind)::value) {
        // Two pixels at a time where the window slides: their sums are independent chains of
        // FMAs, and with one pixel per iteration the loop waited on each pixel's chain (depthwise
        // stage 10-15% faster alone, same bits). Columns 2 and 3 of the pair's windows come in.
        for (; r + 1 < run.count; r += 2) {
          const int64_t at = start + r * pixel_step;
          prefetch_at(x, at + run.ahead);
          prefetch_at(x, at + run.ahead + pixel_step);
          VecF32::Reg fourth[3] = {zero, zero, zero};  // column 3 of each in-bounds kernel row
#pragma GCC unroll 3
          for (int i = 0; i < 3; ++i) {
            if (!rows[i]) continue;
            window[i][2] = input(x, at + i * run.row_step + 2 * run.col_step, m);
            fourth[i] = input(x, at + i * run.row_step + 3 * run.col_step, m);
          }
          VecF32::store(out + r * ld + c, m, window_sum([&](int i, int j) { return window[i][j]; }));
          VecF32::store(out + (r + 1) * ld + c, m,
                        window_sum([&](int i, int j) { return j < 2 ? window[i][j + 1] : fourth[i]; }));
#pragma GCC unroll 3
          for (int i = 0; i < 3; ++i) {  // columns 2 and 3 become the next pair's columns 0 and 1
            window[i][0] = window[i][2];
            window[i][1] = fourth[i];
          }
        }
      }
      for (; r < run.count; ++r) {
        const int64_t at = start + r * pixel_step;
        prefetch_at(x, at + run.ahead);  // from L3 the bottom-right tap stalled the loop
#pragma GCC unroll 3
        for (int i = 0; i < 3; ++i) {
          if (rows[i]) load_window_row<decltype(kind)::value>(window, i, x, run, at, m, input);
        }
        VecF32::store(out + r * ld + c, m, window_sum([&](int i, int j) { return window[i][j]; }));
#pragma GCC unroll 3
        for (int i = 0; i < 3; ++i) shift_window_row(window, i);
      }
    });
  }
}

// The transposed 3x3 depthwise over a run (as depthwise_row3x3_f32; gh row r is pixel r), float32:
// for each pixel r and in-bounds tap t, grad_x[tap input] += gh[r] * w[t] (when gx is given) and
// dw_acc[t] += gh[r] * relu?(x[tap input]), db_acc += gh[r] (when dw_acc is given). Per vector of channels
// slice the weight-gradient sums stay in registers across the run, and then, in a second walk over
// the run, the nine weights. Where consecutive pixels are one column step apart (stride equal to
// dilation), the three pixels in a row that reach an input column do so one after the other: the
// first walk loads each input once (three per pixel, not nine) into a window that slides along the
// run, and the second sums a column's three updates in registers and adds them to grad_x once (3
// read-modify-writes of grad_x a pixel instead of 9, each of which waited on the store before it).
// Backward of 128->128@147 at batch 8: 5-9% faster; 728->728: 1-2%.
// affine: as depthwise_row3x3_f32's, for the inputs of the weight gradients (already at channel k0).
template <bool kAffine = false>
inline void depthwise_row3x3_backward_f32(const float* x, float* gx, const Run3x3& run, int64_t k0, const float* w,
                                          int64_t w_stride, const float* gh, int64_t ldh, bool relu, int64_t kc,
                                          float* dw_acc, int64_t acc_stride, float* db_acc,
                                          InputAffine<float> affine = {}) {
  const VecF32::Reg zero = VecF32::zero();
  const int64_t pixel_step = run.pixel_step, col_step = run.col_step, row_step = run.row_step;
  const bool sliding = pixel_step == col_step;
  for (int64_t c = 0; c < kc; c += VecF32::kLanes) {
    const VecF32::Mask m = VecF32::mask(kc - c);
    const int64_t start = run.base + k0 + c;
    if (dw_acc) {
      VecF32::Reg sum[9], bsum = zero;
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) sum[t] = zero;
      const InputLoad load = InputLoad::at<kAffine>(relu, affine, c, m);
      auto input = [&](int64_t offset) { return load(x, offset, m); };
      if (sliding) {
        VecF32::Reg window[3][3];
        start_window(window, x, run, start, m, load);
        for (int64_t r = 0; r < run.count; ++r) {
          const VecF32::Reg grad = VecF32::load(m, gh + r * ldh + c);
          const int64_t at = start + r * pixel_step;
          prefetch_at(x, at + run.ahead);
#pragma GCC unroll 3
          for (int i = 0; i < 3; ++i) {
            if (!run.rows[i]) continue;
            load_window_row<true>(window, i, x, run, at, m, load);
#pragma GCC unroll 3
            for (int j = 0; j < 3; ++j) sum[3 * i + j] = VecF32::fmadd(grad, window[i][j], sum[3 * i + j]);
            shift_window_row(window, i);
          }
          bsum = VecF32::add(bsum, grad);
        }
      } else {
        for (int64_t r = 0; r < run.count; ++r) {
          const VecF32::Reg grad = VecF32::load(m, gh + r * ldh + c);
          const int64_t at = start + r * pixel_step;
          prefetch_at(x, at + run.ahead);
#pragma GCC unroll 3
          for (int i = 0; i < 3; ++i) {
            if (!run.rows[i]) continue;
#pragma GCC unroll 3
            for (int j = 0; j < 3; ++j) {
              sum[3 * i + j] = VecF32::fmadd(grad, input(at + i * row_step + j * col_step), sum[3 * i + j]);
            }
          }
          bsum = VecF32::add(bsum, grad);
        }
      }
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        float* a = dw_acc + t * acc_stride + c;
        VecF32::store(a, m, VecF32::add(VecF32::load(m, a), sum[t]));
      }
      VecF32::store(db_acc + c, m, VecF32::add(VecF32::load(m, db_acc + c), bsum));
    }
    if (!gx) continue;
    VecF32::Reg wv[9];
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) wv[t] = VecF32::load(m, w + t * w_stride + c);
    auto add_to = [&](float* p, VecF32::Reg v) { VecF32::store(p, m, VecF32::add(VecF32::load(m, p), v)); };
    if (sliding) {
      VecF32::Reg pending[3][3];  // kernel row i: the sums for input columns r, r + 1, r + 2
#pragma GCC unroll 3
      for (int i = 0; i < 3; ++i) pending[i][0] = pending[i][1] = pending[i][2] = zero;
      for (int64_t r = 0; r < run.count; ++r) {
        const VecF32::Reg grad = VecF32::load(m, gh + r * ldh + c);
        const int64_t at = start + r * pixel_step;
        prefetch_at(gx, at + run.ahead, true);
#pragma GCC unroll 3
        for (int i = 0; i < 3; ++i) {
          if (!run.rows[i]) continue;
          pending[i][0] = VecF32::fmadd(grad, wv[3 * i], pending[i][0]);
          pending[i][1] = VecF32::fmadd(grad, wv[3 * i + 1], pending[i][1]);
          pending[i][2] = VecF32::fmadd(grad, wv[3 * i + 2], pending[i][2]);
          add_to(gx + at + i * row_step, pending[i][0]);  // column r: no later pixel of the run reaches it
          pending[i][0] = pending[i][1];
          pending[i][1] = pending[i][2];
          pending[i][2] = zero;
        }
      }
      const int64_t end = start + run.count * pixel_step;  // columns count and count + 1 are left
#pragma GCC unroll 3
      for (int i = 0; i < 3; ++i) {
        if (!run.rows[i] || run.count == 0) continue;
        add_to(gx + end + i * row_step, pending[i][0]);
        add_to(gx + end + i * row_step + col_step, pending[i][1]);
      }
      continue;
    }
    for (int64_t r = 0; r < run.count; ++r) {
      const VecF32::Reg grad = VecF32::load(m, gh + r * ldh + c);
      const int64_t at = start + r * pixel_step;
      prefetch_at(gx, at + run.ahead, true);
#pragma GCC unroll 3
      for (int i = 0; i < 3; ++i) {
        if (!run.rows[i]) continue;
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j) {
          float* p = gx + at + i * row_step + j * col_step;
          VecF32::store(p, m, VecF32::fmadd(grad, wv[3 * i + j], VecF32::load(m, p)));
        }
      }
    }
  }
}
#endif

// Calls visit(tap, offset) for each tap of output pixel (n, oh, ow) that falls inside the input,
// in tap order: tap = i * kw + j, offset = the position of its input pixel (channel 0) in x.
template <typename Visit>
inline void for_each_tap(const Geometry& g, int64_t n, int64_t oh, int64_t ow, Visit&& visit) {
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.sh - g.pt + i * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t iw = ow * g.sw - g.pl + j * g.dw;
      if (iw < 0 || iw >= g.W) continue;
      visit(i * g.kw + j, ((n * g.H + ih) * g.W + iw) * g.CM);
    }
  }
}

// Position of an output pixel, stepped along the flattened (n, oh, ow) order.
struct PixelCursor {
  int64_t n, oh, ow;
  PixelCursor(const Geometry& g, int64_t p) : n(p / (g.OH * g.OW)), oh(p / g.OW % g.OH), ow(p % g.OW) {}
  // Steps that stay within one output row, or end exactly at its end.
  void advance(const Geometry& g, int64_t steps) {
    ow += steps;
    if (ow == g.OW) {
      ow = 0;
      if (++oh == g.OH) {
        oh = 0;
        ++n;
      }
    }
  }
};

// The run from the cursor on (at most `limit` pixels, all in its output row); count 0 where none
// starts here (the kernel is not 3x3, or the cursor's window crosses the left or right edge).
inline Run3x3 run_3x3(const Geometry& g, const PixelCursor& at, int64_t limit) {
  Run3x3 run;
  const int64_t iw0 = at.ow * g.sw - g.pl;
  if (g.kh != 3 || g.kw != 3 || iw0 < 0) return run;
  const int64_t span = g.W - 1 - 2 * g.dw + g.pl;  // the last interior output column is span / sw
  if (span < 0) return run;
  run.count = std::max<int64_t>(0, std::min(limit, std::min(g.OW - 1, span / g.sw) - at.ow + 1));
  const int64_t ih0 = at.oh * g.sh - g.pt;
  for (int i = 0; i < 3; ++i) run.rows[i] = ih0 + i * g.dh >= 0 && ih0 + i * g.dh < g.H;
  run.base = ((at.n * g.H + ih0) * g.W + iw0) * g.CM;
  run.pixel_step = g.sw * g.CM;
  run.col_step = g.dw * g.CM;
  run.row_step = g.dh * g.W * g.CM;
  run.ahead = (run.rows[2] ? 2 * run.row_step : run.rows[1] ? run.row_step : 0) + 2 * run.col_step +
              kRowAhead * run.pixel_step;
  return run;
}

// Depthwise result of output pixels [p0, p0 + rows) for hidden channels [k0, k0 + kc), plus bias
// (may be null), into tile (rows x ld). Per pixel, the in-bounds taps are listed once.
template <typename T>
void depthwise_tile(const Geometry& g, const T* x, const T* dw_taps, const T* bias, bool relu, int64_t p0,
                    int64_t rows, int64_t k0, int64_t kc, T* tile, int64_t ld, InputAffine<T> affine = {}) {
  // The affine's channels from k0, as the kernels below address theirs.
  const InputAffine<T> at_k0 = affine.from(k0);
  const int64_t taps = g.kh * g.kw;
  std::vector<const T*> xs(taps), ws(taps);
  PixelCursor at(g, p0);
  for (int64_t r = 0; r < rows; ++r) {
#if defined(SEPCONV_HAS_VEC)
    if constexpr (std::is_same_v<T, float>) {  // runs of interior pixels take the row kernel
      const Run3x3 run = run_3x3(g, at, rows - r);
      if (run.count > 0) {
        if (affine) {
          depthwise_row3x3_f32<true>(x, run, k0, dw_taps + k0, g.CM, bias ? bias + k0 : nullptr, relu, kc,
                                     tile + r * ld, ld, at_k0);
        } else {
          depthwise_row3x3_f32(x, run, k0, dw_taps + k0, g.CM, bias ? bias + k0 : nullptr, relu, kc, tile + r * ld, ld);
        }
        r += run.count - 1;
        at.advance(g, run.count);
        continue;
      }
    }
#endif
    int64_t valid = 0;
    for_each_tap(g, at.n, at.oh, at.ow, [&](int64_t tap, int64_t offset) {
      xs[valid] = x + offset + k0;
      ws[valid++] = dw_taps + tap * g.CM + k0;
    });
    T* t = tile + r * ld;
    const T* b = bias ? bias + k0 : nullptr;
#if defined(SEPCONV_HAS_VEC)
    if constexpr (std::is_same_v<T, float>) {
      depthwise_pixel_f32(xs.data(), ws.data(), valid, b, relu, kc, t, at_k0);
    } else {
      depthwise_pixel<T>(xs.data(), ws.data(), valid, b, relu, kc, t, at_k0);
    }
#else
    depthwise_pixel<T>(xs.data(), ws.data(), valid, b, relu, kc, t, at_k0);
#endif
    at.advance(g, 1);
  }
}

// Uninitialised memory for `elements` values of T, starting on a cache line. malloc's large blocks
// start 16 bytes into a page, so every 64-byte vector load of a packed panel row spanned two lines:
// Intel Xeon (2 MB L2), the micro-kernel alone on a 480 x 728 tile and 23 panels 191-193 -> 198-203
// GFLOP/s a core; the wide layers' forward+backward 2-6% less time, batch 1 and 8 (3 interleaved runs).
constexpr std::size_t kLineBytes = 64;
template <typename T>
struct LineFree {
  void operator()(T* p) const { ::operator delete[](p, std::align_val_t(kLineBytes)); }
};
template <typename T>
using LineArray = std::unique_ptr<T[], LineFree<T>>;
template <typename T>
LineArray<T> line_array(int64_t elements) {
  static_assert(std::is_trivially_default_constructible_v<T>, "the values are left uninitialised");
  const std::size_t bytes = sizeof(T) * std::size_t(std::max<int64_t>(elements, 1));
  return LineArray<T>(static_cast<T*>(::operator new[](bytes, std::align_val_t(kLineBytes))));
}

// A per-task work buffer whose every element is written before it is read: left uninitialised
// (a std::vector would zero it first, megabytes per call in the backward at batch 1).
template <typename T>
struct Work {
  LineArray<T> memory;
  explicit Work(int64_t elements) : memory(line_array<T>(elements)) {}
  T* data() { return memory.get(); }
};

// Scratch memory that stays mapped between calls: one growing buffer per calling thread, type
// and purpose (Tag), its contents not kept when it grows. The pointwise panels of a 1536->2048
// layer take 12.6 MB, and a fresh allocation of that size is paged in again on every call.
template <typename T, typename Tag>
T* scratch(int64_t elements) {
  thread_local LineArray<T> buffer;
  thread_local int64_t capacity = 0;
  if (capacity < elements) {
    buffer = line_array<T>(elements);
    capacity = elements;
  }
  return buffer.get();
}


// Panel jp of pw (Cout, CM): panel[panel_offset<T>(CM, k, j)] = pw[(jp * kCols + j) * CM + k], zero
// past Cout (microkernel.h: with 32-column passes, the row-major CM x kCols panel).
template <typename T>
void pack_panel(const T* pw, int64_t Cout, int64_t CM, int64_t jp, T* panel) {
  constexpr int64_t kStep = 16;  // transpose in (kStep x kCols) blocks that stay in L1
  const int64_t cols = std::min<int64_t>(kCols, Cout - jp * kCols);
#if defined(SEPCONV_HAS_VEC)
  if constexpr (std::is_same_v<T, float>) {
    // Square blocks of kLanes x kLanes transposed in registers (16x16 with AVX-512); the scalar
    // transpose took a fifth of the forward time of the 10x10 layers at batch 1 (perf), where every
    // call packs its whole weight. Each row is read six lines ahead: in a network the weights come
    // from DRAM (728->728 at 19x19 with a different weight each call: 0.91 ms -> 0.86 ms with AVX-512,
    // with the next-panel prefetch in forward). The rows are read a cache line at a time (with AVX2,
    // two 8x8 blocks from the same lines): read half a line per block, the 32 rows of a panel
    // evicted each other's lines before their second halves were read where the rows share L1 sets.
    // AVX2, a 1536 x 1024 weight packed alone: 0.53-0.62 ms -> 0.32-0.37 ms (1536 x 728: 0.18 ->
    // 0.13 ms); the 10x10 forwards that pack such weights: 0.97-1.01x the time (interleaved pairs).
    using V = VecF32;
    constexpr int64_t kLanes = V::kLanes, kLine = 64 / int64_t(sizeof(T)), kAhead = 6 * kLine;
    static_assert(kLine % kLanes == 0, "a cache line holds whole vectors");
    for (int64_t line = 0; line < CM; line += kLine) {
      for (int64_t j0 = 0; j0 < kCols; j0 += kLanes) {
        for (int64_t k0 = line; k0 < std::min(CM, line + kLine); k0 += kLanes) {
          const int64_t width = std::min(kLanes, CM - k0);
          const V::Mask m = V::mask(width);
          V::Reg r[kLanes];
          for (int64_t i = 0; i < kLanes; ++i) {
            const int64_t j = j0 + i;
            if (j < cols && k0 == line) prefetch_at(pw, (jp * kCols + j) * CM + k0 + kAhead);
            r[i] = j < cols ? V::load(m, pw + (jp * kCols + j) * CM + k0) : V::zero();
          }
          V::transpose(r);
          for (int64_t k = 0; k < width; ++k) V::store(panel + panel_offset<T>(CM, k0 + k, j0), r[k]);
        }
      }
    }
    return;
  }
#endif
  static_assert(std::is_same_v<T, float> || panel_pass_cols<T>() == kCols, "this copy writes row-major panels");
  for (int64_t k0 = 0; k0 < CM; k0 += kStep) {
    const int64_t k1 = std::min(CM, k0 + kStep);
    T block[kStep][kCols] = {};
    for (int64_t j = 0; j < cols; ++j) {
      const T* src = pw + (jp * kCols + j) * CM;
      for (int64_t k = k0; k < k1; ++k) block[k - k0][j] = src[k];
    }
    std::memcpy(panel + k0 * kCols, block, sizeof(T) * (k1 - k0) * kCols);
  }
}

// Share `part` of `parts` of the cache lines of panel jp's rows of pw (Cout, CM), fetched into L2.
template <typename T>
void prefetch_panel_source(const T* pw, int64_t Cout, int64_t CM, int64_t jp, int64_t part, int64_t parts) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  const int64_t per_row = ceil_div(CM, kLine), cols = std::min<int64_t>(kCols, Cout - jp * kCols);
  const int64_t lines = cols * per_row, first = part * lines / parts, last = (part + 1) * lines / parts;
  for (int64_t line = first; line < last; ++line) {
    __builtin_prefetch(pw + (jp * kCols + line / per_row) * CM + (line % per_row) * kLine, 0, 2);
  }
}

// The packing state of one shared panel: the first task to need it packs it while any other
// waits (a panel takes microseconds); then every task reads it.
class PanelSlot {
 public:
  template <typename Pack>
  void ensure_packed(Pack&& pack) {
    if (state_.load(std::memory_order_acquire) == kReady) return;
    int expected = kEmpty;
    if (state_.compare_exchange_strong(expected, kPacking, std::memory_order_acquire)) {
      pack();
      state_.store(kReady, std::memory_order_release);
      return;
    }
    while (state_.load(std::memory_order_acquire) != kReady) std::this_thread::yield();
  }

 private:
  static constexpr int kEmpty = 0, kPacking = 1, kReady = 2;
  std::atomic<int> state_{kEmpty};
};

#ifndef SEPCONV_MAX_ROWS
#define SEPCONV_MAX_ROWS 192
#endif
// Forward tile: up to kMaxRows pixels whose pixels x CM depthwise tile stays in L2 (machine().tile_bytes,
// 3/4 of L2), so each pass over the pointwise weight (from L3) serves many pixels.
constexpr int64_t kMaxRows = SEPCONV_MAX_ROWS;

// Per-channel mean and sum of squared deviations (M2) of an output, in double: what a training-mode
// BatchNorm after the layer needs, gathered as the output is written (see tiled_forward).
struct OutputMoments {
  double* mean;  // Cout
  double* m2;    // Cout
};

// The moments of one panel's columns (nr <= kCols) over a block's rows, gathered call by call as the
// rows are stored (add: n rows ld apart, in L1). Rows are summed as deviations from a shift x0 (the
// shifted-data sums s1 = sum(x - x0), s2 = sum((x - x0)^2), in T: small where the mean is large against
// the spread): the block's first row, then the mean so far (rounded to T). Every kMomentRows rows or
// more (at a call's end)
// those rows' mean x0 + s1 / n and M2 s2 - s1^2 / n go into the double state with Chan et al.'s update
// (merge_moments). finish() flushes and leaves the block's mean and M2 in its arrays.
template <typename T>
class PanelMoments {
 public:
  static constexpr int64_t kMomentRows = 64;

  PanelMoments(double* mean, double* m2, int nr) : mean_(mean), m2_(m2), nr_(nr) {}

  void add(const T* rows, int64_t ld, int64_t n) {
    if (nr_ == kCols) {
      add_rows<kCols>(rows, ld, n, kCols);
    } else {
      add_rows<0>(rows, ld, n, nr_);
    }
    pending_ += n;
    if (pending_ >= kMomentRows) flush();
  }

  void finish() { flush(); }

 private:
  // kNr: nr as a constant (a whole panel), 0: nr at run time.
  template <int kNr>
  void add_rows(const T* rows, int64_t ld, int64_t n, int nr) {
    if constexpr (kNr > 0) nr = kNr;
    T shift[kCols], s1[kCols], s2[kCols];
    if (pending_ == 0) {
#pragma omp simd
      for (int j = 0; j < nr; ++j) {
        shift[j] = merged_ > 0 ? static_cast<T>(mean_[j]) : rows[j];
        s1[j] = s2[j] = T(0);
      }
    } else {
#pragma omp simd
      for (int j = 0; j < nr; ++j) {
        shift[j] = shift_[j];
        s1[j] = s1_[j];
        s2[j] = s2_[j];
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      const T* row = rows + r * ld;
#pragma omp simd
      for (int j = 0; j < nr; ++j) {
        const T d = row[j] - shift[j];
        s1[j] += d;
        s2[j] += d * d;
      }
    }
#pragma omp simd
    for (int j = 0; j < nr; ++j) {
      shift_[j] = shift[j];
      s1_[j] = s1[j];
      s2_[j] = s2[j];
    }
  }

  void flush() {
    if (pending_ == 0) return;
    const double nb = static_cast<double>(pending_), na = static_cast<double>(merged_), inv = 1.0 / nb;
    const bool first = merged_ == 0;
#pragma omp simd
    for (int j = 0; j < nr_; ++j) {
      const double d1 = static_cast<double>(s1_[j]);
      const double rows_mean = static_cast<double>(shift_[j]) + d1 * inv;
      const double rows_m2 = std::max(0.0, static_cast<double>(s2_[j]) - d1 * d1 * inv);
      if (first) {
        mean_[j] = rows_mean;
        m2_[j] = rows_m2;
      } else {
        merge_moments(na, nb, rows_mean, rows_m2, mean_[j], m2_[j]);
      }
    }
    merged_ += pending_;
    pending_ = 0;
  }

  double* mean_;
  double* m2_;
  int nr_;
  int64_t pending_ = 0, merged_ = 0;
  T shift_[kCols], s1_[kCols], s2_[kCols];
};

// out = A @ pw^T + bias, A (pixels x K) formed a block of pixels at a time: fill_tile(p0, rows, tile, ld)
// writes rows p0..p0+rows-1 of A into the tile (rows x ld, K values a row). pw is (Cout, K). The
// separable forward's A is the depthwise result (K = CM); a dense convolution's, the input windows.
// With moments, also the output's per-channel moments (OutputMoments): each micro-kernel call's rows
// are added in right after it stores them (PanelMoments), in call order within a block, and the
// blocks are merged in block order at the end, so the result depends on the blocking (the machine's
// L2 and the thread count) and on nothing else. Such an output is never streamed (its rows are read
// back from L1). Gathering them costs the forward 0.3-1% from 728->728@37 on and up to 9% at 147x147
// (short calls, K = 64 or 128), less than the pass over the output they save BatchNorm (Intel Xeon,
// batch 8: forward and BatchNorm together 0.3-12% less time; docs/cpu-backends.md).
//
// in_place (optional): a dense convolution's A read from its input where it can be. Called for each
// micro-kernel call as in_place(first pixel, rows, first panel of the task?, the call's tile rows,
// ld, MicroArgs&): either sets the args' tap_offsets and returns where A starts in the input, or
// returns null after (on the task's first panel) filling the call's rows of the tile.
//
// packed (optional): pw already packed (pack_pointwise: every panel, in order), read in place of a
// pack per call. The panels hold the same values, so the output has the same bits.
template <typename T, typename FillTile, typename InPlace = std::nullptr_t>
void tiled_forward(const Geometry& g, int64_t K, FillTile fill_tile, const T* pw, const T* bias, T* out,
                   const OutputMoments* moments = nullptr, InPlace in_place = nullptr, const T* packed = nullptr) {
  const int64_t npix = g.pixels();
  if (npix == 0) return;
  const int64_t threads = at::get_num_threads();
  const int64_t l2_tile_bytes = machine().tile_bytes;

  // Blocks of pixels whose depthwise tile stays in L2: at most max_groups * kRows pixels each.
  const int64_t groups = ceil_div(npix, kRows);
  const int64_t max_groups = std::clamp<int64_t>(l2_tile_bytes / (K * int64_t(sizeof(T))), kRows, kMaxRows) / kRows;
  int64_t blocks = ceil_div(groups, max_groups);
  const int64_t tile_bytes = npix * K * int64_t(sizeof(T)), weight_bytes = g.Cout * K * int64_t(sizeof(T));
  if (tile_bytes <= 2 * l2_tile_bytes) {
    // Few pixels (late layers at batch 1). A weight much larger than the tile is read once, its
    // panels split between the threads (each recomputes the cheap depthwise tile); otherwise the
    // pixels are split and each thread packs the whole weight for its own share of the tile, which
    // then stays in L2 (728->728 at 19x19: 1.00 ms -> 0.88 ms; 1536->2048 at 10x10 is the other way).
    // A weight of a quarter of L2 or less stays there beside L2-sized blocks, which keep their
    // output rows in L2 across the panels too: 128->256 at 74x74, batch 1 (a 2.8 MB tile as two
    // 1.4 MB halves before), forward 8.6% less time with AVX-512 and 4% with AVX2 on an Intel Xeon
    // (2 MB L2; 4 interleaved runs: 0.90x -> 0.99x and 0.97x -> 1.03x the eager pair).
    if (weight_bytes > 4 * tile_bytes) {
      blocks = 1;
    } else if (4 * weight_bytes <= machine().l2_bytes) {
      blocks = std::min(groups, round_up(blocks, threads));  // as for more pixels, below
    } else {
      blocks = std::min(groups, threads);
    }
  } else if (tile_bytes <= 3 * l2_tile_bytes && weight_bytes >= tile_bytes && threads > 1) {
    // Up to 3 L2 tiles of pixels against a larger weight: a block a thread, each thread packing the
    // weight once for its share (at 2 threads 1.5 L2 tiles, partly read from L3), not twice for two that
    // fit. 728->728 and 728->1024 at 19x19, batch 1, on a 2-core AMD EPYC without AVX-512 (Zen 3,
    // 512 KB L2: a 1.05 MB tile): forward 2.39 -> 2.30 ms and 3.29-3.31 -> 3.11-3.14 ms.
    blocks = std::min(groups, threads);
  } else if (const int64_t l3_share = machine().l3_usable_bytes / 4; weight_bytes >= l3_share) {
    // A pointwise weight of a quarter of L3 or more (1536->2048: 12.6 MB) read again from L3 for
    // every L2-sized block of pixels kept each panel's reuse to ~8 micro-kernel calls. Instead each
    // thread takes one block (a tile of up to a quarter of L3 a thread, read from L3) and packs each
    // panel once, into L2, for all its pixels: 1536->2048 at 10x10, batch 8, 7% less time (30
    // interleaved pairs in one process, Zen 5); at 6.3 MB (1024->1536) no change, and at 3 MB
    // (728->1024 at 19x19) the L2 tile is 7% faster, hence the threshold. L3 here is the usable
    // share (machine.h: at most 16 MB a CPU): on a 2-core Intel Xeon guest that reports the host's
    // 480 MB, 1536->2048 at batch 8 took 3-4% less time this way with AVX-512 and 7% with AVX2.
    blocks = std::min(groups, round_up(ceil_div(tile_bytes, l3_share), threads));
  } else {
    blocks = std::min(groups, round_up(blocks, threads));
  }
  // Block b holds pixels [b * npix / blocks, (b + 1) * npix / blocks), and a block's micro-kernel
  // calls share its pixels evenly (rows differing by at most one): whole groups per block left one
  // thread a 1-row call per panel at 19x19 (361 = 180 + 15 * 12 + 1), as long as a 4-row call.
  auto first_pixel = [&](int64_t block) { return block * npix / blocks; };
  const int64_t rows = ceil_div(npix, blocks);
  const int64_t npanels = ceil_div(g.Cout, kCols);
  // Too few pixel blocks for the threads: split the output channels too (recomputing the
  // cheap depthwise tile once per split).
  const int64_t splits = std::min<int64_t>(npanels, blocks >= threads ? 1 : ceil_div(threads, blocks));
  const int64_t panels_per_split = ceil_div(npanels, splits);

  // The pointwise weight as kCols-wide panels (CM x kCols each). When a panel serves one task
  // (a block or two per thread: batch 1), the task packs it into an L2-resident buffer right
  // before using it, so the weight crosses memory once; a separate packing pass would write and
  // re-read all of it, which at batch 1 costs as much as the GEMM. Otherwise every block reads
  // every panel from one shared buffer, and the panels are packed there by the first task that
  // needs each (PanelSlot), right before its first use; the threads' first blocks start at
  // different panels, so each packs its share. (A packing pass ahead of the blocks cost its own
  // parallel region, wrote the whole packed weight out and read it back: 0.2-0.7 ms of a 12-27 ms
  // forward of the 10x10 layers at batch 8.)
  // A prepacked weight (packed) is read where it lies, by every block; with a block or two per thread the
  // threads go through its panels in step, as they do packing on use.
  const bool in_step = blocks <= 2 * threads, pack_on_use = packed == nullptr && in_step;
  T* packed_here = nullptr;  // the shared panels this call packs
  std::unique_ptr<PanelSlot[]> panel_slots;
  if (packed == nullptr && !pack_on_use) {
    packed_here = scratch<T, struct PointwisePanels>(npanels * K * kCols);
    panel_slots.reset(new PanelSlot[npanels]);
  }

  // An output larger than the cache goes out with streaming stores, in full 32-column panels
  // (streaming.h; 64->128@147 at batch 8, an 88 MB output: 6% faster on Zen 5, 5-7% on Zen 4). So
  // does one of any size whose rows lie a multiple of 4 KB apart (1024 or 2048 channels) where a
  // micro-kernel call's rows fit the ways of the L1 set they all map to (stream_strided_rows): stored
  // normally they pushed the tile and the panel out of it. 728->1024 at 19x19, batch 8: 5% less time
  // (interleaved pairs in one process, Zen 5); the next layer reading the output from memory did not
  // show in the whole network (batch 1 and 8). Where the rows overflow the set (12-row tiles on Zen 4's
  // 8-way L1) the same outputs stored normally took 6-7% less time (728->1024@19 and 1536->2048@10,
  // batch 1 and 8).
  const int64_t row_bytes = g.Cout * int64_t(sizeof(T));
  const bool strided_rows = rows_share_l1_sets(row_bytes) && stream_strided_rows();
  const bool stream = moments == nullptr && (should_stream(out, row_bytes, npix * row_bytes) ||
                                             (strided_rows && can_stream(out, row_bytes)));
  // Each block's moments (mean, then M2, Cout each), merged in block order after the blocks.
  std::vector<double> block_moments(moments ? blocks * 2 * g.Cout : 0);
  // Row stride of the tile: padded by one cache line so the kRows rows the micro-kernel reads
  // together do not map to the same L1 sets (CM is often a multiple of 512 bytes).
  const int64_t ld = round_up(K, 16) + 16;
  at::parallel_for(0, blocks * splits, 1, [&](int64_t begin, int64_t end) {
    Work<T> tile(rows * ld), own_panel(pack_on_use ? K * kCols : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / splits, split = task % splits;
      const int64_t p0 = first_pixel(block), nrows = first_pixel(block + 1) - p0;
      const int64_t jp0 = split * panels_per_split, jp1 = std::min(npanels, jp0 + panels_per_split);
      if (jp0 >= jp1 || nrows == 0) continue;
      fill_tile(p0, nrows, tile.data(), ld);
      // Blocks reading the shared panels start at evenly spaced ones (the order of the panels does
      // not change any sum). Packing on use, the threads go in step: both read the same rows of pw
      // at about the same time, and one fetch from DRAM serves them.
      const int64_t first_panel = in_step ? jp0 : jp0 + block * (jp1 - jp0) / blocks;
      auto panel_at = [&](int64_t step) {
        return first_panel + step < jp1 ? first_panel + step : first_panel + step - (jp1 - jp0);
      };
      for (int64_t step = 0; step < jp1 - jp0; ++step) {
        const int64_t jp = panel_at(step);
        MicroArgs args{K, ld, 1, panel_pass_cols<T>(), g.Cout, int(std::min<int64_t>(kCols, g.Cout - jp * kCols)),
                       false};
        args.stream = stream && args.nr == kCols;
        args.b_pass = K * args.ldb;
        args.next_ld_bytes = g.Cout * int64_t(sizeof(T));  // the output's rows, for MicroArgs::next
        const T* panel = (packed != nullptr ? packed : packed_here) + jp * K * kCols;
        if (pack_on_use) {
          pack_panel(pw, g.Cout, K, jp, own_panel.data());
          panel = own_panel.data();
        } else if (packed == nullptr) {
          panel_slots[jp].ensure_packed([&] { pack_panel(pw, g.Cout, K, jp, packed_here + jp * K * kCols); });
        }
        const T* init = bias ? bias + jp * kCols : nullptr;
        const int64_t calls = ceil_div(nrows, kRows);
        double* state = moments ? block_moments.data() + block * 2 * g.Cout + jp * kCols : nullptr;
        PanelMoments<T> panel_moments(state, state ? state + g.Cout : nullptr, args.nr);
        for (int64_t call = 0; call < calls; ++call) {
          const int64_t r0 = call * nrows / calls, r1 = (call + 1) * nrows / calls;
          // The rows of pw two panels on, a share before each call: in a network they come from
          // DRAM (its weights overflow L3), and the pack stalled on them.
          if (pack_on_use && step + 2 < jp1 - jp0) prefetch_panel_source(pw, g.Cout, K, jp + 2, call, calls);
          // The output lines the next call writes, fetched for writing while this one computes:
          // each store at the end of a call otherwise waits for its line, from L3 or memory. Intel
          // Xeon (2 MB L2), batch 8, against the eager pair, 4 interleaved runs each: 64->128@147
          // 2.75x -> 3.08x, 256->728@37 1.04x -> 1.11x, 728->728@19 0.97x -> 0.98x; batch 1 0.92x ->
          // 0.96x at 728->728@19. Streamed outputs need no line first. The micro-kernel fetches them
          // a row at a time across its K loop (MicroArgs::next): fetched all at once before the call,
          // the 24 fetches waited for fill buffers (13% of the forward's samples at 128->256@74, batch
          // 1); spread out, batch 8 256->728@37 1.13x -> 1.22x, 256->256@74 2.00x -> 2.12x, batch 1
          // 128->256@74 0.82x -> 0.87x (3 interleaved runs; the wide layers within noise).
          args.next = nullptr;
          if (!stream) {
            if (call + 1 < calls) {
              args.next = out + (p0 + r1) * g.Cout + jp * kCols;
              args.next_rows = int((call + 2) * nrows / calls - r1);
              args.next_bytes = args.nr * int(sizeof(T));
            } else if (step + 1 < jp1 - jp0) {
              const int64_t next = panel_at(step + 1);
              args.next = out + p0 * g.Cout + next * kCols;
              args.next_rows = int(nrows / calls);
              args.next_bytes = int(std::min<int64_t>(kCols, g.Cout - next * kCols) * int64_t(sizeof(T)));
            }
          }
          T* const c = out + (p0 + r0) * g.Cout + jp * kCols;
          T* const tile_rows = tile.data() + r0 * ld;
          if constexpr (std::is_same_v<InPlace, std::nullptr_t>) {
            micro<T>(int(r1 - r0), tile_rows, panel, c, init, args);
          } else if (MicroArgs taps = args; const T* a = in_place(p0 + r0, r1 - r0, step == 0, tile_rows, ld, taps)) {
            micro_taps<T>(int(r1 - r0), a, panel, c, init, taps);
          } else {
            micro<T>(int(r1 - r0), tile_rows, panel, c, init, args);
          }
          if (moments) panel_moments.add(c, g.Cout, r1 - r0);
        }
        if (moments) panel_moments.finish();
      }
    }
    if (stream) stream_fence();
  });
  if (moments) {
    for (int64_t block = 0, n = 0; block < blocks; ++block) {
      const int64_t rows_b = first_pixel(block + 1) - first_pixel(block);
      if (rows_b == 0) continue;
      const double* state = block_moments.data() + block * 2 * g.Cout;
      for (int64_t c = 0; c < g.Cout; ++c) {
        if (n == 0) {
          moments->mean[c] = state[c];
          moments->m2[c] = state[g.Cout + c];
        } else {
          merge_moments(static_cast<double>(n), static_cast<double>(rows_b), state[c], state[g.Cout + c],
                        moments->mean[c], moments->m2[c]);
        }
      }
      n += rows_b;
    }
  }
}

// out = pointwise(depthwise(x)) + bias; pw is (Cout, CM); bias (Cout) already includes pw @ dw_bias.
// With moments, also out's per-channel mean and M2; with packed, pw as pack_pointwise packed it (tiled_forward);
// with affine, the depthwise stage reads relu?(x * scale + shift) (InputAffine).
template <typename T>
void forward(const Geometry& g, const T* x, const T* dw_taps, const T* pw, const T* bias, bool relu, T* out,
             const OutputMoments* moments = nullptr, const T* packed = nullptr, InputAffine<T> affine = {}) {
  tiled_forward<T>(g, g.CM, [&](int64_t p0, int64_t rows, T* tile, int64_t ld) {
    depthwise_tile<T>(g, x, dw_taps, nullptr, relu, p0, rows, 0, g.CM, tile, ld, affine);
  }, pw, bias, out, moments, nullptr, packed);
}

// Elements of pw (Cout, CM) packed as the forward reads it: every kCols-wide panel, in order.
inline int64_t packed_pointwise_size(int64_t Cout, int64_t CM) { return ceil_div(Cout, kCols) * CM * kCols; }

// pw (Cout, CM) packed into `packed` (packed_pointwise_size elements): what tiled_forward packs per call,
// once, for a weight that serves many calls (inference).
template <typename T>
void pack_pointwise(const T* pw, int64_t Cout, int64_t CM, T* packed) {
  at::parallel_for(0, ceil_div(Cout, kCols), 1, [&](int64_t begin, int64_t end) {
    for (int64_t jp = begin; jp < end; ++jp) pack_panel(pw, Cout, CM, jp, packed + jp * CM * kCols);
  });
}

// The input windows of output pixels [p0, p0 + rows) as rows of a dense convolution's A: row r holds,
// tap by tap (tap = i * kw + j), the CM input channels under that tap, zeros where it falls in the
// padding.
// A kernel row whose taps all lie inside the input, one pixel apart (dilation 1), is one stretch of x
// (kw * CM values), copied at once. The copies are inline loops: a library memcpy per tap cost as
// much as the GEMM at 32 channels (128-byte copies).
template <typename T>
void window_tile(const Geometry& g, const T* x, int64_t p0, int64_t rows, T* tile, int64_t ld) {
  auto copy = [](T* dst, const T* src, int64_t n) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) dst[c] = src[c];
  };
  PixelCursor at(g, p0);
  for (int64_t r = 0; r < rows; ++r) {
    T* row = tile + r * ld;
    const int64_t iw0 = at.ow * g.sw - g.pl, iw_last = iw0 + (g.kw - 1) * g.dw;
    const bool whole_rows = g.dw == 1 && iw0 >= 0 && iw_last < g.W;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = at.oh * g.sh - g.pt + i * g.dh;
      T* dst = row + i * g.kw * g.CM;
      if (ih < 0 || ih >= g.H) {
        std::fill_n(dst, g.kw * g.CM, T(0));
        continue;
      }
      const T* src = x + ((at.n * g.H + ih) * g.W + iw0) * g.CM;
      if (whole_rows) {
        copy(dst, src, g.kw * g.CM);
        continue;
      }
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t iw = iw0 + j * g.dw;
        if (iw < 0 || iw >= g.W) {
          std::fill_n(dst + j * g.CM, g.CM, T(0));
        } else {
          copy(dst + j * g.CM, src + j * g.dw * g.CM, g.CM);
        }
      }
    }
    at.advance(g, 1);
  }
}

// A dense convolution (groups 1): out = conv(x, weight) + bias, x (N, H, W, CM), weight as (Cout, kh*kw*CM)
// with taps outer and input channels inner, out (N, OH, OW, Cout).
//
// A micro-kernel call whose output pixels lie in one output row, with every window inside the input,
// reads its A from x itself: row r is pixel r's window, sw * CM elements on from the row before, and
// tap t's CM channels sit at a fixed offset from the window's corner (MicroArgs::tap_offsets). The other
// calls (windows over the padding, runs across a row's end) gather their windows into the tile
// (window_tile), as do rows a multiple of 4 KB apart (they would all share an L1 set). Both sum the same
// products in the same order: the same bits. Gathering every window cost the stem's 32->64 convolution
// at 147x147 about a tenth of its time (perf samples of window_tile against the micro-kernel's, AMD
// EPYC Zen 4); read in place, CM = 1 to 32 took less time (CM = 3, stride 2, batch 4: 1.7 -> 1.0 ms) and
// CM = 64, stride 2, the same within noise.
template <typename T>
void conv_forward(const Geometry& g, const T* x, const T* weight, const T* bias, T* out) {
  const int64_t taps = g.kh * g.kw, row_step = g.sw * g.CM;
  std::vector<int64_t> tap_offsets(static_cast<size_t>(taps));
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) tap_offsets[i * g.kw + j] = (i * g.dh * g.W + j * g.dw) * g.CM;
  }
  const bool reads_in_place = !rows_share_l1_sets(row_step * int64_t(sizeof(T)));
  auto in_place = [&](int64_t p, int64_t rows, bool fill, T* tile_rows, int64_t ld, MicroArgs& args) -> const T* {
    const PixelCursor at(g, p);
    const int64_t ih0 = at.oh * g.sh - g.pt, iw0 = at.ow * g.sw - g.pl;
    if (reads_in_place && at.ow + rows <= g.OW && ih0 >= 0 && ih0 + (g.kh - 1) * g.dh < g.H && iw0 >= 0 &&
        iw0 + (rows - 1) * g.sw + (g.kw - 1) * g.dw < g.W) {
      args.a_rs = row_step;
      args.a_ks = 1;
      args.tap_offsets = tap_offsets.data();
      args.tap_k = g.CM;
      return x + ((at.n * g.H + ih0) * g.W + iw0) * g.CM;
    }
    if (fill) window_tile<T>(g, x, p, rows, tile_rows, ld);
    return nullptr;
  };
  tiled_forward<T>(g, taps * g.CM, [](int64_t, int64_t, T*, int64_t) {}, weight, bias, out, nullptr, in_place);
}

// depthwise: the depthwise weight and bias gradients (one reduction); pointwise: the pointwise weight's;
// pointwise_bias: the pointwise bias's (a sum of grad_out over pixels, skipped for a layer without one).
struct BackwardOutputs {
  bool input, depthwise, pointwise, pointwise_bias;
};

// Gradients, into the buffers that are asked for (any contents: every element is written):
// grad_x (N, H, W, CM), grad_dw_taps (kh*kw, CM), grad_dw_bias (CM), grad_pw (Cout, CM),
// grad_pw_bias (Cout).
// With affine, the layer's input is relu?(x * scale + shift) (as forward's), and grad_x the gradient reaching
// x * scale + shift (masked by the ReLU as ReLU's backward does, not multiplied by scale). With grad_sums (and
// grad_x asked for), also those sums over grad_x (InputGradSums).
template <typename T>
void backward(const Geometry& g, const T* x, const T* dw_taps, const T* dw_bias, const T* pw, const T* grad_out,
              bool relu, BackwardOutputs want, T* grad_x, T* grad_dw_taps, T* grad_dw_bias, T* grad_pw,
              T* grad_pw_bias, InputAffine<T> affine = {}, InputGradSums<T>* grad_sums = nullptr) {
  const int64_t npix = g.pixels();
  const int64_t taps = g.kh * g.kw;
  // Pixel block: fixed for the machine (backward_block), so the summation order depends only on how the
  // pixels are split into parts below (the same on every run with the same thread count: bitwise
  // deterministic).
  const int64_t pixel_block = backward_block();
  // A part's last few pixels (up to a quarter block) join the block before them: each block reads and
  // writes its chunk of the weight gradient once (2 MB at 2048 x 256), whatever its pixel count, and
  // a 10x10 image is 96 + 4 pixels. Backward of 1536->2048@10 at batch 1, 2 threads: 6% and 1.7% less
  // time in two interleaved runs, 1024->1536@10 3.6% and 1.3% (one thread 4%); 728->728@19 and
  // 728->1024@19 at batch 8 (2888 pixels: 30 x 96 + 8) -1% to +2.3%, within the runs' noise. Still a
  // function of the shape and the thread count only, so the bits stay deterministic.
  const int64_t merge_tail = pixel_block / 4;
  const int64_t max_block = pixel_block + merge_tail;
  auto block_end = [&](int64_t p0, int64_t last) {
    const int64_t end = std::min(last, p0 + pixel_block);
    return last - end <= merge_tail ? last : end;
  };
  const int64_t threads = at::get_num_threads();
  // A single image is split into bands of output rows when its hidden channels fit one chunk:
  // bands b and b + 2 never write the same grad_input rows, so the even bands run together, then
  // the odd ones (2 * threads bands, each at least tall enough to keep that property). Band b holds
  // output rows [b * OH / bands, (b + 1) * OH / bands): heights differ by one at most, so the bands
  // of a phase end together (37 rows cut as 10, 10, 10, 7 left a thread idle for a third of the odd
  // phase: 256->728 at 37x37, batch 1, backward 5-6% slower, AVX-512 and AVX2, interleaved pairs).
  const int64_t min_band_rows = ceil_div((g.kh - 1) * g.dh + 1, g.sh);
  int64_t bands = 0;
  if (g.N == 1 && threads > 1 && g.CM <= 8 * kCols) {
    bands = std::min<int64_t>(2 * threads, g.OH / min_band_rows) / 2 * 2;
    if (bands < 4) bands = 0;
  }
  // Channel chunks, at most `widest` channels each. With an image or more per thread (or row bands)
  // and at most 256 hidden channels, one chunk takes them all and the pixels are split instead:
  // every chunk reads grad_out and walks the taps for each pixel, so fewer, wider chunks pay
  // those per-pixel costs once (backward of 128->128@147 at batch 8: 70 ms -> 53 ms).
  // Otherwise about one chunk per thread (at least 64 channels when images can be split too), at
  // most 128 channels, or 256 with an image or more per thread: each chunk reads all of grad_out,
  // which at 37x37 and batch 8 (32 MB) no longer stays in cache between chunks (backward of
  // 728->728@37 at batch 8: 6 chunks 90-93 ms, 4 chunks 86-88 ms; neutral at 19x19, Zen 5), and
  // each multiplies all of it by its share of the weight: at 1536->2048@10, batch 8 (2048 output
  // channels), 6 chunks instead of 12 took 9% off the backward with AVX-512 and 4.6% with AVX2 on
  // an Intel Xeon; 728->728@19, 728->1024@19 and 1024->1536@10 within 1-2% (interleaved calls).
  const int64_t min_chunk = g.N > 1 ? 2 * kCols : kCols;
  const int64_t max_chunk = g.N >= threads ? 8 * kCols : 4 * kCols;
  const int64_t widest = (g.N >= threads || bands) && g.CM <= 8 * kCols
                             ? round_up(g.CM, kCols)
                             : std::clamp<int64_t>(round_up(ceil_div(g.CM, threads), kCols), min_chunk, max_chunk);
  int64_t nchunks = ceil_div(g.CM, widest);
  // With a chunk or more per thread, a multiple of the thread count of chunks, their bounds at
  // 16-channel steps (a 16-column panel costs half a 32-column one): 728 channels were 5 x 128 + 88,
  // one thread 3 x 128 and the other 2 x 128 + 88; now 128, 112, 128 | 112, 128, 120 (the
  // 728-channel backward 0.5-2% faster, same bits).
  if (nchunks >= threads) nchunks = round_up(nchunks, threads);
  auto chunk_start = [&](int64_t ci) {
    return ci >= nchunks ? g.CM : std::min(g.CM, (ci * g.CM / nchunks + 8) / 16 * 16);
  };
  int64_t chunk = 0;  // the widest chunk
  for (int64_t ci = 0; ci < nchunks; ++ci) chunk = std::max(chunk, chunk_start(ci + 1) - chunk_start(ci));
  // Too few chunks for the threads: also split the pixels into `parts`, groups of whole images
  // (their grad_x writes never overlap) or the row bands. Each part sums its weight gradients
  // into its own buffer, and the parts are added in a fixed order afterwards.
  const int64_t parts = bands ? bands
                        : nchunks >= threads
                            ? 1
                            : std::clamp<int64_t>(ceil_div(threads, nchunks), 1, std::max<int64_t>(g.N, 1));
  const int64_t images_per_part = ceil_div(g.N, parts);
  auto part_first_pixel = [&](int64_t part) {
    return bands ? part * g.OH / bands * g.OW : std::min(g.N, part * images_per_part) * g.OH * g.OW;
  };
  // Per-part weight gradients, each written in full by its part's tasks (no zero fill; a part
  // without pixels writes nothing and is left out of the sum).
  Work<T> part_pw(parts > 1 && want.pointwise ? parts * g.Cout * g.CM : 0);
  Work<T> part_dw(parts > 1 && want.depthwise ? parts * taps * g.CM : 0);
  Work<T> part_db(parts > 1 && want.depthwise ? parts * g.CM : 0);
  Work<T> part_pb(parts > 1 && want.pointwise_bias ? parts * g.Cout : 0);
  const bool need_hidden_grad = want.input || want.depthwise;

  // grad_x is zeroed here, not by the caller: row bands (their tasks' inputs overlap) zero it all up
  // front, in parallel; every other task zeroes the rows of its own images and channels just
  // before its first scatter into them, so the zeros are still in cache when they are added to
  // (a separate pass over a fresh buffer cost a training step of the model at batch 8 ~7%).
  auto zero_rows = [&](int64_t from, int64_t to, int64_t k0, int64_t kc) {
    for (int64_t q = from; q < to; ++q) std::fill_n(grad_x + q * g.CM + k0, kc, T(0));
  };
  // With relu, the gradient reaching the raw input is grad_x where x > 0 and 0 elsewhere (ReLU's
  // threshold backward: 0 even where grad_x is not finite). Tasks apply it to the input rows that
  // no later pixel of theirs reaches, while those rows are still in cache.
  const bool mask_relu = relu && want.input;
  auto mask_rows = [&](int64_t from, int64_t to, int64_t k0, int64_t kc) {
    for (int64_t q = from; q < to; ++q) {
      T* gx = grad_x + q * g.CM + k0;
      const T* xr = x + q * g.CM + k0;
      if (affine) {
#pragma omp simd
        for (int64_t c = 0; c < kc; ++c) gx[c] = affine(xr[c], k0 + c, false) > T(0) ? gx[c] : T(0);
        continue;
      }
#pragma omp simd
      for (int64_t c = 0; c < kc; ++c) gx[c] = xr[c] > T(0) ? gx[c] : T(0);
    }
  };
  // The input-gradient sums, each task's rows into its part's row of part_sums (zeroed here: a part without
  // pixels adds zeros), the parts added in order at the end.
  const bool want_sums = grad_sums != nullptr && *grad_sums && want.input && !bands;
  std::vector<double> part_sums(want_sums ? parts * 2 * g.CM : 0, 0.0);
  // Rows [from, to) of grad_x, channels [k0, k0 + kc), are final: ReLU's mask, then the sums into `sums`
  // (the part's 2 x CM), in steps of kSumRows rows summed in T (`step`: 2 * kc values).
  auto finish_rows = [&](int64_t from, int64_t to, int64_t k0, int64_t kc, double* sums, T* step) {
    if (mask_relu) mask_rows(from, to, k0, kc);
    if (!want_sums) return;
    const T* mean = grad_sums->mean + k0;
    for (int64_t q0 = from; q0 < to; q0 += InputGradSums<T>::kSumRows) {
      std::fill_n(step, 2 * kc, T(0));
      for (int64_t q = q0; q < std::min(to, q0 + InputGradSums<T>::kSumRows); ++q) {
        const T* gx = grad_x + q * g.CM + k0;
        const T* xr = x + q * g.CM + k0;
#pragma omp simd
        for (int64_t c = 0; c < kc; ++c) {
          step[c] += gx[c];
          step[kc + c] += gx[c] * (xr[c] - mean[c]);
        }
      }
      for (int64_t c = 0; c < kc; ++c) {
        sums[k0 + c] += step[c];
        sums[g.CM + k0 + c] += step[kc + c];
      }
    }
  };
  if (want.input && (npix == 0 || bands)) {
    at::parallel_for(0, g.N * g.H * g.W, 1024, [&](int64_t begin, int64_t end) { zero_rows(begin, end, 0, g.CM); });
  }
  if (npix == 0) {  // no pixel: the weight gradients are zero
    if (want.pointwise) std::fill_n(grad_pw, g.Cout * g.CM, T(0));
    if (want.pointwise_bias) std::fill_n(grad_pw_bias, g.Cout, T(0));
    if (want.depthwise) {
      std::fill_n(grad_dw_taps, taps * g.CM, T(0));
      std::fill_n(grad_dw_bias, g.CM, T(0));
    }
    return;
  }
  const bool lazy_zero = want.input && !bands;

  // grad_out is read in place unless the kRows rows a micro-kernel call reads together need more
  // ways of one L1 set than the L1 has (rows_overflow_l1_set: 1024 or 2048 channels with AVX-512's
  // 12-row tiles on an 8-way L1, Zen 4); then each block is first copied to padded rows, once per
  // chunk of channels. Zen 4, forward + backward against in place (interleaved calls, same bits):
  // 728->1024@19 3-5% less time at batch 8 and 8% at batch 1, 1536->2048@10 1.4-2%. Where the rows fit
  // the L1's ways (12-way L1s with AVX-512, any L1 with AVX2's 6-row tiles) the copy only costs: Intel
  // Xeon, backward of 728->1024@19 and 1536->2048@10 at batch 8 without it 4.5% less time with AVX-512,
  // 3% with AVX2 (728->1024@19 at batch 1 within 1-2%). (Before the weight-gradient GEMM read grad_out's
  // columns from a copy of their own, below, it read grad_out transposed in place, 96 rows a column
  // strip, and the padded copy was 7-10% faster on every machine.)
  // Each task sums its chunk of grad_pw in a buffer of its own, rows ldh apart, and copies it out
  // once, at the end. Summed in place, the rows a micro-kernel call adds to lie CM floats apart:
  // with 728 hidden channels every other row starts 32 bytes into a cache line, so each 64-byte
  // AVX-512 load and store of C spans two lines; with 1024 or 2048 they map to the same L1 sets; and
  // a narrow chunk of a wide layer's rows is spread over many pages (2048 rows 6 KB apart at
  // 1536->2048). Intel Xeon, backward with the padded buffer against in place (interleaved calls,
  // same bits), AVX-512: 728->728@19 and 728->1024@19 at batch 8 3.7-4.6% less time, 728->728@37
  // 4.1-5.9% (batch 1: 4.6%), 1536->2048@10 at batch 1 4.5-6.8% (batch 8 within 2%), the layers of
  // 64-256 hidden channels (whole-line rows) within 2% either way; AVX2 (32-byte accesses) within
  // 0.5% at batch 8 and 2-3% less at batch 1; the model's training step at batch 8 1.7% less. (It
  // began as the rule for 4 KB rows only: 1024->1536 at 10x10, batch 8, 3-5% faster on Zen 5.)
  const bool pad_grad_out = rows_overflow_l1_set(g.Cout * int64_t(sizeof(T)), kRows);
  const int64_t ldg = pad_grad_out ? round_up(g.Cout, 16) + 16 : g.Cout;
  // Padded row stride of the hidden tiles (see forward): rows read together must not share L1 sets.
  const int64_t ldh = round_up(chunk, 16) + 16;
  const int64_t chunk_panels = ceil_div(chunk, kCols);
  // Panel j0 / kCols of pw[:, k0:k0+kc], into its place in `panels`, as a Cout x kCols panel
  // (panel_offset), zero-padded.
  auto pack_chunk_panel = [&](T* panels, int64_t k0, int64_t kc, int64_t j0) {
    constexpr int64_t kPass = panel_pass_cols<T>();
    T* panel = panels + (j0 / kCols) * g.Cout * kCols;
    for (int64_t q = 0; q < kCols; q += kPass) {
      const int64_t cols = std::clamp<int64_t>(kc - j0 - q, 0, kPass);
      for (int64_t co = 0; co < g.Cout; ++co) {
        T* row = panel + panel_offset<T>(g.Cout, co, q);
        std::memcpy(row, pw + co * g.CM + k0 + j0 + q, sizeof(T) * cols);
        std::fill(row + cols, row + kPass, T(0));
      }
    }
  };
  // With one chunk every task multiplies by the same panels: packed once, here, instead of by each
  // task (row bands at batch 1: four tasks, each packing 0.75 MB at 256->728). 256->728 at 37x37,
  // batch 1, and 128->256 at 74x74, batch 8: backward 1-3% less time (AVX-512, alternated pairs).
  const bool shared_chunk = nchunks == 1 && need_hidden_grad && parts > 1;
  Work<T> chunk_pw(shared_chunk ? chunk_panels * g.Cout * kCols : 0);
  if (shared_chunk) {
    at::parallel_for(0, chunk_panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t jp = begin; jp < end; ++jp) {
        pack_chunk_panel(chunk_pw.data(), 0, g.CM, jp * kCols);
      }
    });
  }
  // Every chunk's task reads all of grad_out and x. Where the two do not fit in L3 together (728->728 at 37x37,
  // batch 8: 64 MB), a thread with several chunks takes each block of pixels through all of them in turn
  // (interleave), so that the block's rows are read from memory once, not once per chunk; each chunk's sums
  // still run over the blocks in order, so the bits are the same. Zen 5, the quick layer grid run twice
  // (`python -m benchmarks --suite layers`, in one process each, as `make bench` runs it;
  // benchmarks/results/backward-order/): 728->728@37
  // forward+backward at batch 8 89.9 -> 77.2 ms with AVX-512 (0.97x -> 1.12x the eager pair); with AVX2 146 ms
  // against 160 ms, but the run without it was slower on every layer that day, and `make bench` runs before
  // and after took 148 and 147 ms: no clear change. Taking every layer with several chunks a thread through
  // this order made 1024->1536@10 and 1536->2048@10 at batch 1, whose tensors stay in cache, 8% and 16% slower
  // (forward+backward, AVX-512, the same runs).
  const int64_t activation_bytes = (npix * g.Cout + g.N * g.H * g.W * g.CM) * int64_t(sizeof(T));
  const bool interleave = !bands && parts == 1 && nchunks > threads && activation_bytes > machine().interleave_bytes;
  // Runs the (chunk, part) tasks whose part has this parity (-1: every part).
  auto run_tasks = [&](int64_t parity) {
    const int64_t step = parity < 0 ? 1 : 2, phase_parts = parity < 0 ? parts : (parts - parity + 1) / 2;
    at::parallel_for(0, nchunks * phase_parts, 1, [&](int64_t begin, int64_t end) {
      Work<T> hidden(max_block * ldh), grad_hidden(max_block * ldh), padded(pad_grad_out ? max_block * ldg : 0);
      // Two buffers of grad_out columns (see below): the group's and the next group's.
      const int64_t cols_size = max_block * kRows + kCopyPad;
      Work<T> grad_out_cols(want.pointwise ? 2 * cols_size : 0);
      std::vector<T> sum_step(want_sums ? 2 * chunk : 0);
      // A (chunk, part) task: its channels and pixels, where its gradients go, its running sums, and its panels
      // of pw (unless shared_chunk).
      struct Task {
        int64_t k0 = 0, kc = 0, first = 0, last = 0, part = 0;
        T *gpw = nullptr, *gdw = nullptr, *gdb = nullptr, *pw_panels = nullptr;
        bool sum_bias = false;
        // Input rows [zeroed, input_end) not zeroed yet; rows before masked finished (finish_rows).
        int64_t zeroed = 0, masked = 0, input_end = 0;
        double* sums = nullptr;
        Work<T> own_pw, gpw_sum;
        std::vector<T> dw_acc, db_acc, pb_acc;
        Task(int64_t own_pw_size, int64_t gpw_size, int64_t dw_size, int64_t db_size, int64_t pb_size)
            : own_pw(own_pw_size), gpw_sum(gpw_size), dw_acc(dw_size), db_acc(db_size), pb_acc(pb_size) {}
      };
      auto new_task = [&] {
        return std::make_unique<Task>(shared_chunk ? 0 : chunk_panels * g.Cout * kCols, want.pointwise ? g.Cout * ldh : 0,
                                      taps * chunk, chunk, want.pointwise_bias ? g.Cout : 0);
      };
      // Sets t up as task `task`; false when its part has no pixels.
      auto start = [&](Task& t, int64_t task) {
        const int64_t ci = task / phase_parts, part = std::max<int64_t>(parity, 0) + step * (task % phase_parts);
        t.part = part;
        t.k0 = chunk_start(ci);
        t.kc = chunk_start(ci + 1) - t.k0;
        t.first = part_first_pixel(part);
        t.last = part_first_pixel(part + 1);
        if (t.first >= t.last) return false;
        t.gpw = parts > 1 ? part_pw.data() + part * g.Cout * g.CM : grad_pw;
        t.gdw = parts > 1 ? part_dw.data() + part * taps * g.CM : grad_dw_taps;
        t.gdb = parts > 1 ? part_db.data() + part * g.CM : grad_dw_bias;
        t.pw_panels = shared_chunk ? chunk_pw.data() : t.own_pw.data();
        std::fill(t.dw_acc.begin(), t.dw_acc.end(), T(0));
        std::fill(t.db_acc.begin(), t.db_acc.end(), T(0));
        t.sum_bias = want.pointwise_bias && ci == 0;  // the first chunk's tasks sum grad_out
        if (t.sum_bias) std::fill(t.pb_acc.begin(), t.pb_acc.end(), T(0));
        const int64_t plane = g.OH * g.OW;
        t.zeroed = t.masked = t.first / plane * g.H * g.W;
        t.sums = want_sums ? part_sums.data() + part * 2 * g.CM : nullptr;
        t.input_end = ceil_div(t.last, plane) * g.H * g.W;
        if (need_hidden_grad && !shared_chunk) {
          for (int64_t j0 = 0; j0 < t.kc; j0 += kCols) {
            pack_chunk_panel(t.pw_panels, t.k0, t.kc, j0);
          }
        }
        return true;
      };
      // Pixels [p0, p1) of task t, one block of its part.
      auto run_block = [&](Task& t, int64_t p0, int64_t p1) {
        const int64_t k0 = t.k0, kc = t.kc, first = t.first, last = t.last;
        const T* pw_panels = t.pw_panels;
        const bool sum_bias = t.sum_bias;
        int64_t &zeroed = t.zeroed, &masked = t.masked;
        double* sums = t.sums;
        std::vector<T> &dw_acc = t.dw_acc, &db_acc = t.db_acc, &pb_acc = t.pb_acc;
        Work<T>& gpw_sum = t.gpw_sum;
        const int64_t nrows = p1 - p0;
        const T* gob = grad_out + p0 * g.Cout;
        if (pad_grad_out) {
          for (int64_t r = 0; r < nrows; ++r) std::copy_n(gob + r * g.Cout, g.Cout, padded.data() + r * ldg);
          gob = padded.data();
        }
        if (sum_bias) {  // grad_pw_bias: the part's sum over pixels, in pixel order
          for (int64_t r = 0; r < nrows; ++r) {
            const T* src = gob + r * ldg;
#pragma omp simd
            for (int64_t c = 0; c < g.Cout; ++c) pb_acc[c] += src[c];
          }
        }
        // grad_hidden[block, chunk] = grad_out[block] @ pw[:, chunk]. Before the pointwise weight
        // gradient: its row-by-row reads bring the block of grad_out into L2, where the other
        // GEMM's column strips then find it (from L3, 728->728 at 19x19 took 6-9% longer).
        if (need_hidden_grad) {
          for (int64_t j0 = 0; j0 < kc; j0 += kCols) {
            MicroArgs args{g.Cout, ldg, 1, panel_pass_cols<T>(), ldh, int(std::min<int64_t>(kCols, kc - j0)), false};
            args.b_pass = g.Cout * args.ldb;
            const T* panel = pw_panels + (j0 / kCols) * g.Cout * kCols;
            for (int64_t r0 = 0; r0 < nrows; r0 += kRows) {
              micro<T>(int(std::min<int64_t>(kRows, nrows - r0)), gob + r0 * ldg, panel,
                       grad_hidden.data() + r0 * ldh + j0, nullptr, args);
            }
          }
        }
        if (want.pointwise) {
          // grad_pw[:, chunk] += grad_out[block]^T @ hidden[block, chunk], kRows rows of grad_pw at a
          // time. The micro-kernel's A is those kRows columns of grad_out, copied first to kRows-wide
          // rows (grad_out_cols): read in place, each step of its K loop took the next row of grad_out,
          // 2.9 KB or more on, further than Intel's stride prefetcher looks (2 KB), once per column
          // strip. Intel Xeon (2 MB L2), forward+backward at batch 8 against the eager pair, 3
          // interleaved runs: 728->728@19 1.03x -> 1.07x, 728->728@37 1.12x -> 1.18x, 728->1024@19
          // 1.00x -> 1.07x; batch 1 within noise. Copying the whole block once instead (strips outer)
          // lost 6-12% against this. Same sums in the same order: same bits.
          //
          // The first group's columns are copied here; each next group's by the group before, in its
          // first micro-kernel call, a row after each step of its K loop (micro_copying), into the
          // other of two buffers. Copied up front, each group waited on its kRows-wide reads from
          // grad_out rows apart. Intel Xeon, forward+backward against the eager pair, 20 cells
          // (10 layers, batch 1 and 8), 3 interleaved runs: AVX-512 +0.5% to +6.7% (728->728@19 b8
          // 1.06x -> 1.10x), AVX2 +0.7% to +4.7% but one noisy cell (728->1024@19 b8 0.91x -> 0.94x).
          // Same sums in the same order: same bits.
          depthwise_tile<T>(g, x, dw_taps, dw_bias, relu, p0, nrows, k0, kc, hidden.data(), ldh, affine);
          copy_rows(gob, ldg, grad_out_cols.data(), std::min<int64_t>(kRows, g.Cout), nrows);
          for (int64_t co = 0, group = 0; co < g.Cout; co += kRows, ++group) {
            const int64_t rows = std::min<int64_t>(kRows, g.Cout - co);
            const T* a = grad_out_cols.data() + (group % 2) * cols_size;
            for (int64_t j0 = 0; j0 < kc; j0 += kCols) {  // the task's first block overwrites
              MicroArgs args{nrows, 1, kRows, ldh, ldh, int(std::min<int64_t>(kCols, kc - j0)), p0 != first};
              if (j0 == 0 && co + kRows < g.Cout) {
                args.copy_src = gob + co + kRows;
                args.copy_ld = ldg;
                args.copy_dst = grad_out_cols.data() + (1 - group % 2) * cols_size;
                args.copy_cols = int(std::min<int64_t>(kRows, g.Cout - co - kRows));
              }
              if (args.accumulate && co + kRows < g.Cout) {  // the next group's lines here, added to after its K loop
                for (int64_t r = co + kRows; r < std::min(g.Cout, co + 2 * kRows); ++r) {
                  prefetch_at(gpw_sum.data(), r * ldh + j0, true);
                  prefetch_at(gpw_sum.data(), r * ldh + j0 + args.nr - 1, true);
                }
              }
              micro_copying<T>(int(rows), a, hidden.data() + j0, gpw_sum.data() + co * ldh + j0, nullptr, args);
            }
          }
        }
        if (!need_hidden_grad) return;
        // Transposed depthwise: scatter into grad_x, and reduce the depthwise weight/bias grads.
        if (lazy_zero) {  // zero the input rows up to the lowest one this block's taps reach
          const PixelCursor end(g, p0 + nrows - 1);
          const int64_t ih = std::clamp<int64_t>(end.oh * g.sh - g.pt + (g.kh - 1) * g.dh + 1, 0, g.H);
          const int64_t bound = (end.n * g.H + ih) * g.W;
          if (bound > zeroed) {
            zero_rows(zeroed, bound, k0, kc);
            zeroed = bound;
          }
        }
        PixelCursor at(g, p0);
        for (int64_t r = 0; r < nrows; ++r) {
          const T* gh = grad_hidden.data() + r * ldh;
#if defined(SEPCONV_HAS_VEC)
          if constexpr (std::is_same_v<T, float>) {  // runs of interior pixels take the row kernel
            const Run3x3 run = run_3x3(g, at, nrows - r);
            if (run.count > 0) {
              float* gx = want.input ? grad_x : nullptr;
              float* dw_sums = want.depthwise ? dw_acc.data() : nullptr;
              if (affine) {
                depthwise_row3x3_backward_f32<true>(x, gx, run, k0, dw_taps + k0, g.CM, gh, ldh, relu, kc, dw_sums,
                                                    chunk, db_acc.data(), affine.from(k0));
              } else {
                depthwise_row3x3_backward_f32(x, gx, run, k0, dw_taps + k0, g.CM, gh, ldh, relu, kc, dw_sums, chunk,
                                              db_acc.data());
              }
              r += run.count - 1;
              at.advance(g, run.count);
              continue;
            }
          }
#endif
          if (want.depthwise) {
#pragma omp simd
            for (int64_t c = 0; c < kc; ++c) db_acc[c] += gh[c];
          }
          const int64_t base = at.n * g.H * g.W * g.CM + k0;
          {  // the bottom-right tap kRowAhead pixels on, and its grad_x, ahead of the updates below
            const int64_t ih = at.oh * g.sh - g.pt + (g.kh - 1) * g.dh;
            const int64_t iw = (at.ow + kRowAhead) * g.sw - g.pl + (g.kw - 1) * g.dw;
            if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
              const int64_t offset = base + (ih * g.W + iw) * g.CM;
              for (int64_t c = 0; c < kc; c += 64 / int64_t(sizeof(T))) {
                if (want.depthwise) prefetch_at(x, offset + c);
                if (want.input) prefetch_at(grad_x, offset + c, true);
              }
            }
          }
          for_each_tap(g, at.n, at.oh, at.ow, [&](int64_t tap, int64_t pixel_offset) {
            const int64_t offset = pixel_offset + k0;
            if (want.depthwise) {
              const T* xr = x + offset;
              T* acc = dw_acc.data() + tap * chunk;
              if (affine) {
#pragma omp simd
                for (int64_t c = 0; c < kc; ++c) acc[c] += gh[c] * affine(xr[c], k0 + c, relu);
              } else if (relu) {
#pragma omp simd
                for (int64_t c = 0; c < kc; ++c) acc[c] += gh[c] * std::max(xr[c], T(0));
              } else {
#pragma omp simd
                for (int64_t c = 0; c < kc; ++c) acc[c] += gh[c] * xr[c];
              }
            }
            if (want.input) {
              T* gx = grad_x + offset;
              const T* wr = dw_taps + tap * g.CM + k0;
#pragma omp simd
              for (int64_t c = 0; c < kc; ++c) gx[c] += gh[c] * wr[c];
            }
          });
          at.advance(g, 1);
        }
        if (lazy_zero && (mask_relu || want_sums) && p0 + nrows < last) {  // rows above the next pixel's taps
          const PixelCursor next(g, p0 + nrows);                               // are final
          const int64_t ih = std::clamp<int64_t>(next.oh * g.sh - g.pt, 0, g.H);
          const int64_t final_end = std::min((next.n * g.H + ih) * g.W, zeroed);
          if (final_end > masked) {
            finish_rows(masked, final_end, k0, kc, sums, sum_step.data());
            masked = final_end;
          }
        }
      };
      // After task t's last block: the input rows no tap reached, and its sums from its own buffers.
      auto finish = [&](Task& t) {
        const int64_t k0 = t.k0, kc = t.kc, part = t.part, input_end = t.input_end, zeroed = t.zeroed, masked = t.masked;
        double* sums = t.sums;
        T *gpw = t.gpw, *gdw = t.gdw, *gdb = t.gdb;
        const bool sum_bias = t.sum_bias;
        std::vector<T> &dw_acc = t.dw_acc, &db_acc = t.db_acc, &pb_acc = t.pb_acc;
        Work<T>& gpw_sum = t.gpw_sum;
        if (lazy_zero) {
          zero_rows(zeroed, input_end, k0, kc);  // rows no tap reached
          finish_rows(masked, input_end, k0, kc, sums, sum_step.data());
        }
        if (want.pointwise) {
          for (int64_t co = 0; co < g.Cout; ++co) {
            std::memcpy(gpw + co * g.CM + k0, gpw_sum.data() + co * ldh, sizeof(T) * kc);
          }
        }
        if (sum_bias) std::copy_n(pb_acc.data(), g.Cout, parts > 1 ? part_pb.data() + part * g.Cout : grad_pw_bias);
        if (want.depthwise) {
          for (int64_t tap = 0; tap < taps; ++tap) {
            std::memcpy(gdw + tap * g.CM + k0, dw_acc.data() + tap * chunk, sizeof(T) * kc);
          }
          std::memcpy(gdb + k0, db_acc.data(), sizeof(T) * kc);
        }
      };
      // The tasks go in groups, each block of pixels through a group's tasks in turn: with interleave all of this
      // thread's tasks (one part, parts == 1, so they share their pixels; see interleave), otherwise one at a time.
      const int64_t group = interleave ? end - begin : 1;
      std::vector<std::unique_ptr<Task>> tasks;
      for (int64_t i = 0; i < group; ++i) tasks.push_back(new_task());
      std::vector<Task*> live;  // the group's tasks with pixels
      for (int64_t from = begin; from < end; from += group) {
        live.clear();
        for (int64_t i = 0; i < group && from + i < end; ++i) {
          if (start(*tasks[i], from + i)) live.push_back(tasks[i].get());
        }
        if (live.empty()) continue;
        const int64_t first = live.front()->first, last = live.front()->last;
        for (int64_t p0 = first, p1; p0 < last; p0 = p1) {
          p1 = block_end(p0, last);
          for (Task* t : live) run_block(*t, p0, p1);
        }
        for (Task* t : live) finish(*t);
      }
    });
  };
  if (bands) {
    run_tasks(0);
    run_tasks(1);
  } else {
    run_tasks(-1);
  }
  if (mask_relu && bands) {  // row bands share boundary rows: mask once every band is done
    at::parallel_for(0, g.N * g.H * g.W, 1024, [&](int64_t begin, int64_t end) { mask_rows(begin, end, 0, g.CM); });
  }
  if (want_sums) {  // the parts' sums in part order
    std::fill_n(grad_sums->sums, 2 * g.CM, 0.0);
    for (int64_t part = 0; part < parts; ++part) {
      const double* src = part_sums.data() + part * 2 * g.CM;
      for (int64_t i = 0; i < 2 * g.CM; ++i) grad_sums->sums[i] += src[i];
    }
    grad_sums->taken = true;
  }
  if (parts > 1) {  // fixed-order sum of the per-part weight gradients
    std::vector<int64_t> filled;  // the parts with pixels, in order
    for (int64_t part = 0; part < parts; ++part) {
      if (part_first_pixel(part) < part_first_pixel(part + 1)) filled.push_back(part);
    }
    // dst = part 0 + part 1 + ..., element by element in that order, a span of dst at a time (it
    // stays in L1 while each part is added to it): the part loop inside the element loop kept the
    // element loop scalar (batch 1, 256->728 at 37x37: four 0.75 MB parts, 5% of the backward).
    auto reduce = [&](const T* partial, T* dst, int64_t size) {
      at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
        constexpr int64_t kSpan = 1024;
        for (int64_t i0 = begin; i0 < end; i0 += kSpan) {
          const int64_t n = std::min(kSpan, end - i0);
          T* d = dst + i0;
          std::copy_n(partial + filled[0] * size + i0, n, d);
          for (size_t f = 1; f < filled.size(); ++f) {
            const T* src = partial + filled[f] * size + i0;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) d[i] += src[i];
          }
        }
      });
    };
    if (want.pointwise) reduce(part_pw.data(), grad_pw, g.Cout * g.CM);
    if (want.pointwise_bias) reduce(part_pb.data(), grad_pw_bias, g.Cout);
    if (want.depthwise) {
      reduce(part_dw.data(), grad_dw_taps, taps * g.CM);
      reduce(part_db.data(), grad_dw_bias, g.CM);
    }
  }
}

}  // namespace sepconv
