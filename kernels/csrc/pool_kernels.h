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
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace sepconv {

struct PoolGeometry {
  int64_t N, H, W, C, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw;
};

template <typename T>
void max_pool_add(const PoolGeometry& g, const T* x, const T* residual, T* out) {
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

// Tasks are (image, band of input rows). A task finds the argmax (a flat input pixel index per
// output element and channel) of every output row whose windows reach its band, then writes each
// of its grad_input elements once: the sum, in (oh, ow) order from +0, of the output gradients
// whose argmax it is: the order and the bits of ATen's zero-fill-then-scatter.
template <typename T>
void max_pool_add_backward(const PoolGeometry& g, const T* x, const T* grad_out, T* grad_in) {
  constexpr int64_t kBand = 8;
  const int64_t bands = (g.H + kBand - 1) / kBand;
  at::parallel_for(0, g.N * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> arg;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, r0 = task % bands * kBand, r1 = std::min(g.H, r0 + kBand);
      // Output rows whose windows reach input rows [r0, r1).
      const int64_t oh0 = std::min(g.OH, first_window(r0, g.kh, g.sh, g.ph));
      int64_t oh1 = oh0;
      while (oh1 < g.OH && oh1 * g.sh - g.ph < r1) ++oh1;
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

}  // namespace sepconv
