// Max pooling with a residual added, on NHWC buffers: the tail of Xception's strided blocks at
// inference, max_pool2d(rep) + shortcut, in one pass (ATen's max_pool2d also writes int64 indices,
// and the sum is a second pass over the result).
//
//   out[n, oh, ow, c] = residual[n, oh, ow, c] + max over the window's in-bounds input pixels
//
// Windows (kh x kw, stride sh x sw, padding ph/pw as -inf, floor mode) each hold at least one
// input pixel (padding <= kernel / 2, as for max_pool2d). A NaN anywhere in a window makes its
// maximum NaN, as in ATen. Bitwise equal to torch.max_pool2d(...) + residual.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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

}  // namespace sepconv
