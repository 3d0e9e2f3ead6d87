// Training-mode batch normalisation on NHWC buffers: rows are pixels (M = N*H*W), columns are
// channels (C). The same arithmetic as ATen's channels-last CPU kernels:
//
//   forward:  mean = sum(x) / M, var = M2 / M with M2 = sum((x - mean)^2), invstd = 1/sqrt(var + eps),
//             y = x * alpha + beta with alpha = invstd * weight, beta = bias - mean * alpha
//   with relu, the output is max(y, 0) (NaN stays NaN, as F.relu), and the backward first masks dy
//   as ReLU's does: dy = 0 where the saved output is <= 0
//   backward: sum_dy = sum(dy), dot = sum(dy * (x - mean)),
//             dx = (dy - sum_dy / M - (x - mean) * dot * invstd^2 / M) * invstd * weight,
//             grad_weight = dot * invstd, grad_bias = sum_dy
//
// Column sums run over fixed row parts (their number depends on M only) whose partials, in the
// data type within 64-row steps and in double across steps, are added in part order: results are
// the same bits run to run and for any thread count. Every output element is written here.
//
// M2 is not a second pass over x from memory: each 64-row step (in L1 or L2 after its sum) gives its
// own mean and M2, and the steps, then the parts, are merged in order with Chan et al.'s update,
// M2 = M2_a + M2_b + (mean_b - mean_a)^2 * n_a * n_b / (n_a + n_b), in double; the mean that is
// returned is the plain sum / M. A second pass from memory for M2 cost the model's training step
// (batch 8, Intel Xeon, 2 threads) 102-110 ms of BatchNorm forward; one pass 90-97 ms (profiler, 3
// steps, 4 runs each over two sessions of measurements).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moments.h"
#include "streaming.h"

namespace sepconv {

// Calls fill(r, dst) for each row r of an (M, C) output `out`, which writes the row's C values to
// dst: `out`'s row itself, or, for an output larger than the cache, a buffer that then streams to
// it (the same values, without reading each output line from memory first).
template <typename T, typename Fill>
void write_rows(int64_t M, int64_t C, T* out, Fill fill) {
  const bool stream = should_stream(out, C * int64_t(sizeof(T)), M * C * int64_t(sizeof(T)));
  at::parallel_for(0, M, 256, [&](int64_t begin, int64_t end) {
    std::vector<T> row(static_cast<size_t>(stream ? C : 0));
    for (int64_t r = begin; r < end; ++r) {
      if (!stream) {
        fill(r, out + r * C);
        continue;
      }
      fill(r, row.data());
      if constexpr (std::is_same_v<T, float>) stream_copy(row.data(), out + r * C, C);
    }
    if (stream) stream_fence();
  });
}

// Rows summed in the data type before a step's sums go into double.
constexpr int64_t kSumStep = 64;

// The fixed row parts of the column sums (their number depends on M only): part p holds rows
// [first(p), end(p)).
struct RowParts {
  int64_t M, rows_per_part, count;
  explicit RowParts(int64_t rows)
      : M(rows), rows_per_part(std::max<int64_t>(256, (rows + 63) / 64)),
        count((rows + rows_per_part - 1) / rows_per_part) {}
  int64_t first(int64_t part) const { return part * rows_per_part; }
  int64_t end(int64_t part) const { return std::min(M, (part + 1) * rows_per_part); }
};

// Adds `kSums` column sums of per-row terms into out[k * C + c] (doubles, zeroed here):
// add_row(row, acc) adds row `row`'s terms into acc[k * C + c].
template <int kSums, typename T, typename AddRow>
void column_sums(int64_t M, int64_t C, AddRow add_row, double* out) {
  const RowParts parts(M);
  std::vector<double> partial(static_cast<size_t>(parts.count * kSums * C), 0.0);
  at::parallel_for(0, parts.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(static_cast<size_t>(kSums * C));
    for (int64_t part = begin; part < end; ++part) {
      double* dst = partial.data() + part * kSums * C;
      const int64_t last = parts.end(part);
      for (int64_t r0 = parts.first(part); r0 < last; r0 += kSumStep) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t r = r0; r < std::min(last, r0 + kSumStep); ++r) add_row(r, acc.data());
#pragma omp simd
        for (int64_t i = 0; i < kSums * C; ++i) dst[i] += acc[i];
      }
    }
  });
  std::fill(out, out + kSums * C, 0.0);
  for (int64_t part = 0; part < parts.count; ++part) {
    const double* src = partial.data() + part * kSums * C;
    for (int64_t i = 0; i < kSums * C; ++i) out[i] += src[i];
  }
}

// Per column c: sum[c] = the sum of x[r][c] over the rows (the parts, steps and order of
// column_sums: the same bits) and m2[c] = the sum of squared deviations from the column mean.
// Within a step the deviations are taken from the step's rounded mean c: with s1 = sum(x - c) and
// s2 = sum((x - c)^2), the step's own mean is c + s1 / n and its M2 is s2 - s1^2 / n (exact however
// far c is off, e.g. by the rounding of a float sum of large values); steps, then parts, are merged
// in order with Chan's update.
template <typename T>
void column_sum_m2(int64_t M, int64_t C, const T* x, double* sum, double* m2) {
  const RowParts parts(M);
  // Per part: C sums, C means, C M2s (the running state of the merge).
  std::vector<double> partial(static_cast<size_t>(parts.count * 3 * C), 0.0);
  // Folds (n_b rows: sum_b, mean_b, m2_b) into (n_a rows: sum_a, mean_a, m2_a), column by column.
  auto merge = [C](int64_t n_a, double* sum_a, double* mean_a, double* m2_a, int64_t n_b, const auto* sum_b,
                   const double* mean_b, const double* m2_b) {
    const double na = static_cast<double>(n_a), nb = static_cast<double>(n_b);
    for (int64_t c = 0; c < C; ++c) {
      merge_moments(na, nb, mean_b[c], m2_b[c], mean_a[c], m2_a[c]);
      sum_a[c] += static_cast<double>(sum_b[c]);
    }
  };
  at::parallel_for(0, parts.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(static_cast<size_t>(3 * C)), center(static_cast<size_t>(C));
    std::vector<double> step_mean(static_cast<size_t>(C)), step_m2(static_cast<size_t>(C));
    for (int64_t part = begin; part < end; ++part) {
      double* state = partial.data() + part * 3 * C;
      const int64_t last = parts.end(part);
      int64_t n = 0;
      for (int64_t r0 = parts.first(part); r0 < last; r0 += kSumStep) {
        const int64_t r1 = std::min(last, r0 + kSumStep), rows = r1 - r0;
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) acc[c] += row[c];
        }
        for (int64_t c = 0; c < C; ++c) {
          center[c] = static_cast<T>(static_cast<double>(acc[c]) / static_cast<double>(rows));
        }
        for (int64_t r = r0; r < r1; ++r) {  // the step's rows again, from cache
          const T* row = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T d = row[c] - center[c];
            acc[C + c] += d;
            acc[2 * C + c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          const double s1 = static_cast<double>(acc[C + c]), s2 = static_cast<double>(acc[2 * C + c]);
          step_mean[c] = static_cast<double>(center[c]) + s1 / static_cast<double>(rows);
          step_m2[c] = std::max(0.0, s2 - s1 * s1 / static_cast<double>(rows));
        }
        merge(n, state, state + C, state + 2 * C, rows, acc.data(), step_mean.data(), step_m2.data());
        n += rows;
      }
    }
  });
  std::vector<double> mean(static_cast<size_t>(C), 0.0);
  std::fill(sum, sum + C, 0.0);
  std::fill(m2, m2 + C, 0.0);
  for (int64_t part = 0; part < parts.count; ++part) {
    const double* state = partial.data() + part * 3 * C;
    const int64_t first = parts.first(part);
    merge(first, sum, mean.data(), m2, parts.end(part) - first, state, state + C, state + 2 * C);
  }
}

// The per-channel statistics from x's mean and M2 (2 x C doubles, as moments below): mean, invstd and the
// unbiased variance (for the running estimate; NaN when M == 1), in T.
template <typename T>
void batch_norm_stats(int64_t M, int64_t C, const double* moments, double eps, T* mean_out, T* invstd_out,
                      T* var_out) {
  for (int64_t c = 0; c < C; ++c) {
    const double m2 = moments[C + c];
    mean_out[c] = static_cast<T>(moments[c]);
    invstd_out[c] = static_cast<T>(1.0 / std::sqrt(m2 / static_cast<double>(M) + eps));
    var_out[c] = static_cast<T>(M > 1 ? m2 / static_cast<double>(M - 1) : NAN);
  }
}

// y = x * alpha + beta per channel: alpha = invstd * weight, beta = bias - mean * alpha (weight / bias may
// be null: 1 and 0). The one place these are computed, so that a BatchNorm folded into the next
// convolution's input read (sepconv_cpp::batch_norm_separable) and that read in its backward use the same
// values.
template <typename T>
void batch_norm_affine(int64_t C, const T* weight, const T* bias, const T* mean, const T* invstd, T* alpha, T* beta) {
  for (int64_t c = 0; c < C; ++c) {
    alpha[c] = invstd[c] * (weight ? weight[c] : T(1));
    beta[c] = (bias ? bias[c] : T(0)) - mean[c] * alpha[c];
  }
}

// x's per-channel mean and M2 (2 x C doubles: the mean in row 0, M2 in row 1), from one pass over x.
template <typename T>
void batch_norm_moments(int64_t M, int64_t C, const T* x, double* moments) {
  column_sum_m2(M, C, x, moments, moments + C);  // the sums, then their means
  for (int64_t c = 0; c < C; ++c) moments[c] /= static_cast<double>(M);
}

// mean, invstd and the unbiased variance (for the running estimate; NaN when M == 1) per channel,
// and y (ReLU'd with relu). weight / bias may be null (1 and 0). moments: x's per-channel mean and M2
// (2 x C doubles) where the layer that wrote x gathered them (sepconv_cpp::forward_with_moments),
// which saves the pass over x that takes them here; null: taken here.
template <typename T>
void batch_norm_forward(int64_t M, int64_t C, const T* x, const T* weight, const T* bias, double eps, bool relu,
                        T* y, T* mean_out, T* invstd_out, T* var_out, const double* moments = nullptr) {
  std::vector<double> taken;
  if (moments == nullptr) {
    taken.resize(static_cast<size_t>(2 * C));
    batch_norm_moments(M, C, x, taken.data());
    moments = taken.data();
  }
  batch_norm_stats(M, C, moments, eps, mean_out, invstd_out, var_out);
  std::vector<T> alpha(static_cast<size_t>(C)), beta(static_cast<size_t>(C));
  batch_norm_affine(C, weight, bias, mean_out, invstd_out, alpha.data(), beta.data());
  write_rows(M, C, y, [&](int64_t r, T* out) {
    const T* in = x + r * C;
    if (relu) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] = std::max(in[c] * alpha[c] + beta[c], T(0));  // keeps NaN
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] = in[c] * alpha[c] + beta[c];
    }
  });
}

// grad_weight and grad_bias (when non-null), and grad_input (when non-null) from the backward's two sums per
// channel (2 x C doubles: sum(dy), then sum(dy * (x - mean)), dy masked as below): the pass over dy and x that
// writes grad_input. grad_input may be dy itself (each row is read before it is written). relu_output: as
// batch_norm_backward's.
template <typename T>
void batch_norm_backward_from_sums(int64_t M, int64_t C, const double* sums, const T* dy, const T* x,
                                   const T* weight, const T* mean, const T* invstd, const T* relu_output,
                                   T* grad_input, T* grad_weight, T* grad_bias) {
  for (int64_t c = 0; c < C; ++c) {
    if (grad_weight) grad_weight[c] = static_cast<T>(sums[C + c] * invstd[c]);
    if (grad_bias) grad_bias[c] = static_cast<T>(sums[c]);
  }
  if (grad_input == nullptr) return;
  std::vector<T> grad_mean(static_cast<size_t>(C)), k(static_cast<size_t>(C)), scale(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    grad_mean[c] = static_cast<T>(sums[c] / static_cast<double>(M));
    k[c] = static_cast<T>(sums[C + c] / static_cast<double>(M) * invstd[c] * invstd[c]);
    scale[c] = invstd[c] * (weight ? weight[c] : T(1));
  }
  write_rows(M, C, grad_input, [&](int64_t r, T* out) {
    const T* g = dy + r * C;
    const T* in = x + r * C;
    if (relu_output) {
      const T* y = relu_output + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T gc = y[c] <= T(0) ? T(0) : g[c];
        out[c] = (gc - (in[c] - mean[c]) * k[c] - grad_mean[c]) * scale[c];
      }
      return;
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = (g[c] - (in[c] - mean[c]) * k[c] - grad_mean[c]) * scale[c];
  });
}

// grad_input (when non-null), grad_weight and grad_bias (when non-null). relu_output: the forward's
// ReLU'd output, whose zeros mask dy (null: no ReLU).
template <typename T>
void batch_norm_backward(int64_t M, int64_t C, const T* dy, const T* x, const T* weight, const T* mean,
                         const T* invstd, const T* relu_output, T* grad_input, T* grad_weight, T* grad_bias) {
  std::vector<double> sums(static_cast<size_t>(2 * C));
  column_sums<2, T>(M, C, [&](int64_t r, T* acc) {
    const T* g = dy + r * C;
    const T* in = x + r * C;
    if (relu_output) {
      const T* y = relu_output + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T gc = y[c] <= T(0) ? T(0) : g[c];
        acc[c] += gc;
        acc[C + c] += gc * (in[c] - mean[c]);
      }
      return;
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      acc[c] += g[c];
      acc[C + c] += g[c] * (in[c] - mean[c]);
    }
  }, sums.data());
  batch_norm_backward_from_sums(M, C, sums.data(), dy, x, weight, mean, invstd, relu_output, grad_input,
                                grad_weight, grad_bias);
}

}  // namespace sepconv
