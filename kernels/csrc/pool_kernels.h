// Max pooling with a residual added, on NHWC buffers: the tail of Xception's strided blocks at
// inference, max_pool2d(rep) + shortcut, in one pass (ATen's max_pool2d also writes int64 indices,
// and the sum is a second pass over the result).
//
//   out[n, oh, ow, c] = residual[n, oh, ow, c] + max over the window's in-bounds input pixels
//
// Windows (kh x kw, stride sh x sw, padding ph/pw as -inf, floor mode) each hold at least one
// input pixel (padding <= kernel / 2, as for max_pool2d). A NaN anywhere in a window makes its
// maximum NaN, as in ATen. Bitwise equal to torch.max_pool2d(...) + residual.
//
// The backward (grad_input; the residual's gradient is grad_output itself) finds each window's
// argmax again from the input instead of storing int64 indices, with ATen's choice: the first
// maximum in row-major window order, the last NaN if there is one.
//
// float32 on a vector path (vec.h) takes kernels of its own that keep a block of channels' maximum,
// argmax and gradient sum in registers across the taps or windows (the plain loops below read and
// write them in memory at every step) and stream a gradient larger than the cache (streaming.h). The
// four pools of Xception at batch 8 (128 channels at 147x147, 256 at 74, 728 at 37, 1024 at 19), 2-core
// AMD EPYC Zen 5, medians of runs alternated with the plain loops: backward 12.3-13.4, 5.8-6.7, 4.0-4.7
// and 1.1-1.3 ms -> 5.8-6.9, 3.8-4.2, 2.2-3.3 and 0.45-0.72 ms with AVX-512; held to AVX2, where GCC
// vectorised the plain loops poorly, 36, 18, 13 and 4.6 ms -> 6.8, 3.8, 2.4 and 0.7 ms.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "streaming.h"
#include "vec.h"

namespace sepconv {

struct PoolGeometry {
  int64_t N, H, W, C, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw;
};

template <typename T>
void max_pool_add_generic(const PoolGeometry& g, const T* x, const T* residual, T* out) {
  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // one output row: image n, output row oh
      const int64_t n = row / g.OH, oh = row % g.OH;
      const int64_t ih0 = std::max<int64_t>(oh * g.sh - g.ph, 0), ih1 = std::min(oh * g.sh - g.ph + g.kh, g.H);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t iw0 = std::max<int64_t>(ow * g.sw - g.pw, 0), iw1 = std::min(ow * g.sw - g.pw + g.kw, g.W);
        T* o = out + (row * g.OW + ow) * g.C;
        bool first = true;
        for (int64_t ih = ih0; ih < ih1; ++ih) {
          for (int64_t iw = iw0; iw < iw1; ++iw) {
            const T* v = x + ((n * g.H + ih) * g.W + iw) * g.C;
            if (first) {
              std::memcpy(o, v, sizeof(T) * g.C);
              first = false;
              continue;
            }
#pragma omp simd
            for (int64_t c = 0; c < g.C; ++c) o[c] = (v[c] > o[c] || v[c] != v[c]) ? v[c] : o[c];
          }
        }
        const T* r = residual + (row * g.OW + ow) * g.C;
#pragma omp simd
        for (int64_t c = 0; c < g.C; ++c) o[c] += r[c];
      }
    }
  });
}

// The first window [i*stride - pad, i*stride - pad + kernel) that reaches position `at` (or 0).
inline int64_t first_window(int64_t at, int64_t kernel, int64_t stride, int64_t pad) {
  const int64_t a = at + pad - kernel;  // i > a / stride, rounded down
  const int64_t floor = a >= 0 ? a / stride : -((-a + stride - 1) / stride);
  return std::max<int64_t>(0, floor + 1);
}

// The backward's tasks: (image n, band [r0, r1) of kPoolBand input rows), with the output rows [oh0, oh1)
// whose windows reach the band.
constexpr int64_t kPoolBand = 8;

struct PoolBand {
  int64_t n, r0, r1, oh0, oh1;

  PoolBand(const PoolGeometry& g, int64_t task) {
    const int64_t bands = (g.H + kPoolBand - 1) / kPoolBand;
    n = task / bands;
    r0 = task % bands * kPoolBand;
    r1 = std::min(g.H, r0 + kPoolBand);
    oh0 = std::min(g.OH, first_window(r0, g.kh, g.sh, g.ph));
    oh1 = oh0;
    while (oh1 < g.OH && oh1 * g.sh - g.ph < r1) ++oh1;
  }

  static int64_t tasks(const PoolGeometry& g) { return g.N * ((g.H + kPoolBand - 1) / kPoolBand); }
};

// Tasks are (image, band of input rows). A task finds the argmax (a flat input pixel index per
// output element and channel) of every output row whose windows reach its band, then writes each
// of its grad_input elements once: the sum, in (oh, ow) order from +0, of the output gradients
// whose argmax it is: the order and the bits of ATen's zero-fill-then-scatter.
template <typename T>
void max_pool_add_backward_generic(const PoolGeometry& g, const T* x, const T* grad_out, T* grad_in) {
  at::parallel_for(0, PoolBand::tasks(g), 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> arg;
    for (int64_t task = begin; task < end; ++task) {
      const PoolBand band(g, task);
      const int64_t n = band.n, r0 = band.r0, r1 = band.r1, oh0 = band.oh0, oh1 = band.oh1;
      const T* xn = x + n * g.H * g.W * g.C;
      const T* gon = grad_out + n * g.OH * g.OW * g.C;
      T* gin = grad_in + n * g.H * g.W * g.C;
      arg.resize(static_cast<size_t>(std::max<int64_t>(oh1 - oh0, 0) * g.OW * g.C));
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const int64_t ih0 = std::max<int64_t>(oh * g.sh - g.ph, 0), ih1 = std::min(oh * g.sh - g.ph + g.kh, g.H);
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t iw0 = std::max<int64_t>(ow * g.sw - g.pw, 0), iw1 = std::min(ow * g.sw - g.pw + g.kw, g.W);
          int32_t* a = arg.data() + ((oh - oh0) * g.OW + ow) * g.C;
          const T* v0 = xn + (ih0 * g.W + iw0) * g.C;
          const int32_t p0 = static_cast<int32_t>(ih0 * g.W + iw0);
          // best starts at the first tap: the same choice as ATen's -inf start (v > -inf or NaN).
          for (int64_t c0 = 0; c0 < g.C; c0 += 256) {
            const int64_t cn = std::min<int64_t>(256, g.C - c0);
            T best[256];
#pragma omp simd
            for (int64_t c = 0; c < cn; ++c) {
              best[c] = v0[c0 + c];
              a[c0 + c] = p0;
            }
            for (int64_t ih = ih0; ih < ih1; ++ih) {
              for (int64_t iw = iw0; iw < iw1; ++iw) {
                const int32_t p = static_cast<int32_t>(ih * g.W + iw);
                if (p == p0) continue;
                const T* v = xn + p * g.C + c0;
#pragma omp simd
                for (int64_t c = 0; c < cn; ++c) {
                  const bool take = v[c] > best[c] || v[c] != v[c];
                  best[c] = take ? v[c] : best[c];
                  a[c0 + c] = take ? p : a[c0 + c];
                }
              }
            }
          }
        }
      }
      for (int64_t ih = r0; ih < r1; ++ih) {
        const int64_t lo_h = first_window(ih, g.kh, g.sh, g.ph);  // windows holding row ih: [lo_h, ...)
        for (int64_t iw = 0; iw < g.W; ++iw) {
          const int32_t p = static_cast<int32_t>(ih * g.W + iw);
          T* dst = gin + p * g.C;
#pragma omp simd
          for (int64_t c = 0; c < g.C; ++c) dst[c] = T(0);
          for (int64_t oh = lo_h; oh < oh1 && oh * g.sh - g.ph <= ih; ++oh) {
            for (int64_t ow = first_window(iw, g.kw, g.sw, g.pw); ow < g.OW && ow * g.sw - g.pw <= iw; ++ow) {
              const int32_t* a = arg.data() + ((oh - oh0) * g.OW + ow) * g.C;
              const T* go = gon + (oh * g.OW + ow) * g.C;
#pragma omp simd
              for (int64_t c = 0; c < g.C; ++c) dst[c] = a[c] == p ? dst[c] + go[c] : dst[c];
            }
          }
        }
      }
    }
  });
}

#if defined(SEPCONV_HAS_VEC)
// The in-bounds taps of the windows of one output row, in row-major window order: window ow's are
// [first[ow], first[ow + 1]), each an element offset in the image (pixel index times C) and the pixel
// index as a float.
struct RowWindows {
  std::vector<int64_t> offsets, first;
  std::vector<float> pixels;

  void fill(const PoolGeometry& g, int64_t oh) {
    offsets.clear();
    pixels.clear();
    first.assign(1, 0);
    const int64_t ih0 = std::max<int64_t>(oh * g.sh - g.ph, 0), ih1 = std::min(oh * g.sh - g.ph + g.kh, g.H);
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const int64_t iw0 = std::max<int64_t>(ow * g.sw - g.pw, 0), iw1 = std::min(ow * g.sw - g.pw + g.kw, g.W);
      for (int64_t ih = ih0; ih < ih1; ++ih) {
        for (int64_t iw = iw0; iw < iw1; ++iw) {
          offsets.push_back((ih * g.W + iw) * g.C);
          pixels.push_back(static_cast<float>(ih * g.W + iw));
        }
      }
      first.push_back(static_cast<int64_t>(offsets.size()));
    }
  }
};

// Calls body(c, vectors, masked) for C channels in blocks of kPoolVectors vectors from c (vectors a
// std::integral_constant), then single vectors, the last one partial (masked std::true_type).
constexpr int kPoolVectors = VecF32::kRegisters >= 32 ? 8 : 4;

template <typename Body>
inline void for_channel_blocks(int64_t C, Body&& body) {
  constexpr int64_t kLanes = VecF32::kLanes, kBlock = kPoolVectors * kLanes;
  int64_t c = 0;
  for (; c + kBlock <= C; c += kBlock) body(c, std::integral_constant<int, kPoolVectors>{}, std::false_type{});
  for (; c + kLanes <= C; c += kLanes) body(c, std::integral_constant<int, 1>{}, std::false_type{});
  if (c < C) body(c, std::integral_constant<int, 1>{}, std::true_type{});
}

// The window maximum (and, with kArgmax, where it is) of each window of an output row, window by
// window, a block of channels at a time (for_channel_blocks): the block's vectors are registers across
// the taps. done(ow, c, m, masked, best, at) gets each block's results (arrays of its vector count).
template <bool kArgmax, typename Done>
inline void row_maxima(const RowWindows& row, const float* xn, int64_t C, int64_t OW, Done&& done) {
  using V = VecF32;
  for (int64_t ow = 0; ow < OW; ++ow) {
    const int64_t t0 = row.first[ow], t1 = row.first[ow + 1];
    for_channel_blocks(C, [&](int64_t c, auto vectors, auto masked) {
      constexpr int NV = decltype(vectors)::value;
      const V::Mask m = V::mask(C - c);
      auto load = [&](const float* at) { return masked ? V::load(m, at) : V::load(at); };
      V::Reg best[NV], at[NV];
      const V::Reg here0 = V::set1(row.pixels[t0]);
      for (int v = 0; v < NV; ++v) {
        best[v] = load(xn + row.offsets[t0] + c + v * V::kLanes);
        at[v] = here0;
      }
      for (int64_t t = t0 + 1; t < t1; ++t) {
        const V::Reg here = kArgmax ? V::set1(row.pixels[t]) : here0;
        for (int v = 0; v < NV; ++v) V::keep_max(load(xn + row.offsets[t] + c + v * V::kLanes), here, best[v], at[v]);
      }
      done(ow, c, m, masked, best, at);
    });
  }
}

template <int NV, bool kMasked>
inline void store_block(float* p, VecF32::Mask m, const VecF32::Reg (&v)[NV], bool stream = false) {
  static_assert(!kMasked || NV == 1, "for_channel_blocks masks only a single last vector");
  for (int i = 0; i < NV; ++i) {
    if (kMasked) {
      VecF32::store(p, m, v[i]);
    } else if (stream) {
      VecF32::stream(p + i * VecF32::kLanes, v[i]);
    } else {
      VecF32::store(p + i * VecF32::kLanes, v[i]);
    }
  }
}

// Taken where a pixel's channels are one block (for_channel_blocks): wider pixels, read a block at a time
// window by window, came in an order that left the loads waiting on memory (256 channels at 74x74,
// batch 8, Zen 5: 2.1 ms with the plain loops, 2.9 this way), so they take max_pool_add_generic.
inline bool pool_f32_forward_fits(int64_t C) { return C <= kPoolVectors * VecF32::kLanes; }

inline void max_pool_add_f32(const PoolGeometry& g, const float* x, const float* residual, float* out) {
  using V = VecF32;
  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
    RowWindows windows;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.OH, oh = row % g.OH;
      windows.fill(g, oh);
      row_maxima<false>(windows, x + n * g.H * g.W * g.C, g.C, g.OW,
                        [&](int64_t ow, int64_t c, V::Mask m, auto masked, auto& best, auto&) {
        constexpr int NV = std::extent_v<std::remove_reference_t<decltype(best)>>;
        const int64_t at = (row * g.OW + ow) * g.C + c;
        for (int v = 0; v < NV; ++v) {
          best[v] = V::add(best[v], masked ? V::load(m, residual + at) : V::load(residual + at + v * V::kLanes));
        }
        store_block<NV, masked>(out + at, m, best);
      });
    }
  });
}

// As max_pool_add_backward_generic (the same tasks, argmax and summation order), with the argmax held as
// float pixel indices (exact below 2^24 pixels an image) and each gradient summed in registers over its
// windows, then stored once (streamed where it is larger than the cache).
inline void max_pool_add_backward_f32(const PoolGeometry& g, const float* x, const float* grad_out, float* grad_in) {
  using V = VecF32;
  const int64_t row_bytes = g.C * int64_t(sizeof(float));
  const bool stream = should_stream(grad_in, row_bytes, g.N * g.H * g.W * row_bytes);
  at::parallel_for(0, PoolBand::tasks(g), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> arg;
    std::vector<int64_t> windows;
    RowWindows row_windows;
    for (int64_t task = begin; task < end; ++task) {
      const PoolBand band(g, task);
      const int64_t n = band.n, r0 = band.r0, r1 = band.r1, oh0 = band.oh0, oh1 = band.oh1;
      const float* xn = x + n * g.H * g.W * g.C;
      const float* gon = grad_out + (n * g.OH + oh0) * g.OW * g.C;  // from output row oh0, as arg
      float* gin = grad_in + n * g.H * g.W * g.C;
      arg.resize(static_cast<size_t>(std::max<int64_t>(oh1 - oh0, 0) * g.OW * g.C));
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        row_windows.fill(g, oh);
        row_maxima<true>(row_windows, xn, g.C, g.OW, [&](int64_t ow, int64_t c, V::Mask m, auto masked, auto&, auto& at) {
          constexpr int NV = std::extent_v<std::remove_reference_t<decltype(at)>>;
          const int64_t offset = ((oh - oh0) * g.OW + ow) * g.C + c;
          // The band's scatter below reads this output gradient: fetched into L2 meanwhile.
          for (int v = 0; v < NV; ++v) __builtin_prefetch(gon + offset + v * V::kLanes, 0, 2);
          store_block<NV, masked>(arg.data() + offset, m, at);
        });
      }
      for (int64_t ih = r0; ih < r1; ++ih) {
        const int64_t lo_h = first_window(ih, g.kh, g.sh, g.ph);
        for (int64_t iw = 0; iw < g.W; ++iw) {
          windows.clear();  // the windows holding pixel (ih, iw), in (oh, ow) order: offsets into arg and gon
          for (int64_t oh = lo_h; oh < oh1 && oh * g.sh - g.ph <= ih; ++oh) {
            for (int64_t ow = first_window(iw, g.kw, g.sw, g.pw); ow < g.OW && ow * g.sw - g.pw <= iw; ++ow) {
              windows.push_back(((oh - oh0) * g.OW + ow) * g.C);
            }
          }
          const V::Reg here = V::set1(static_cast<float>(ih * g.W + iw));
          float* dst = gin + (ih * g.W + iw) * g.C;
          for_channel_blocks(g.C, [&](int64_t c, auto vectors, auto masked) {
            constexpr int NV = decltype(vectors)::value;
            const V::Mask m = V::mask(g.C - c);
            auto load = [&](const float* at) { return masked ? V::load(m, at) : V::load(at); };
            V::Reg sum[NV];  // +0, then the gradients in order: ATen's zero-fill and scatter
            for (int v = 0; v < NV; ++v) sum[v] = V::zero();
            for (const int64_t w : windows) {
              for (int v = 0; v < NV; ++v) {
                const int64_t at = w + c + v * V::kLanes;
                sum[v] = V::add_where_equal(sum[v], load(gon + at), load(arg.data() + at), here);
              }
            }
            store_block<NV, masked>(dst + c, m, sum, stream);
          });
        }
      }
    }
    if (stream) stream_fence();
  });
}
#endif

template <typename T>
void max_pool_add(const PoolGeometry& g, const T* x, const T* residual, T* out) {
#if defined(SEPCONV_HAS_VEC)
  if constexpr (std::is_same_v<T, float>) {
    if (pool_f32_forward_fits(g.C)) {
      max_pool_add_f32(g, x, residual, out);
      return;
    }
  }
#endif
  max_pool_add_generic(g, x, residual, out);
}

template <typename T>
void max_pool_add_backward(const PoolGeometry& g, const T* x, const T* grad_out, T* grad_in) {
#if defined(SEPCONV_HAS_VEC)
  // Pixel indices as floats are exact up to 2^24.
  if constexpr (std::is_same_v<T, float>) {
    if (g.H * g.W <= (int64_t(1) << 24)) {
      max_pool_add_backward_f32(g, x, grad_out, grad_in);
      return;
    }
  }
#endif
  max_pool_add_backward_generic(g, x, grad_out, grad_in);
}

}  // namespace sepconv
