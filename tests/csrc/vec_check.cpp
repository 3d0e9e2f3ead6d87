// Stand-alone check of the vector layer and the GEMM micro-kernel (no torch needed), built by
// tests/test_cpp_isa.py for each path it can run: the host's (-march=native), AVX2 (-mno-avx512f),
// and aarch64 NEON (cross-compiled, run under qemu-user). Prints the path and "ok", or the first
// mismatch, and exits non-zero on any.
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "microkernel.h"

namespace {

int failures = 0;

void expect(bool condition, const char* what, int a, int b, int c) {
  if (!condition && failures++ < 5) std::printf("FAIL %s (%d, %d, %d)\n", what, a, b, c);
}

float value(int i) { return float((i * 37 % 101) - 50) / 16.0f; }

// Values with full mantissas: sums of their products come out differently in another order (value()'s
// products are multiples of 1/256 and sum exactly in any order), so bit-for-bit checks see the order.
float full_mantissa(int i) { return std::sin(0.7f * float(i) + 0.3f); }

// B (K rows of kCols, row-major, ldb apart) as the packed panel the kernels read for a row-major A
// (panel_offset), and the strides that say so.
std::vector<float> packed_panel(const std::vector<float>& b, int K, int64_t ldb) {
  using namespace sepconv;
  std::vector<float> panel(size_t(K * kCols));
  for (int k = 0; k < K; ++k) {
    for (int j = 0; j < kCols; ++j) panel[size_t(panel_offset<float>(K, k, j))] = b[size_t(k * ldb + j)];
  }
  return panel;
}

void set_packed(sepconv::MicroArgs& args) {
  args.ldb = sepconv::panel_pass_cols<float>();
  args.b_pass = args.K * args.ldb;
}

// Every row count, column count of a panel, both A layouts (a row-major A by a packed panel through micro,
// a k-major A by a row-major B through micro_copying), with and without init and accumulate.
void check_micro() {
  using namespace sepconv;
  const int K = 37;
  for (int mr = 1; mr <= kRows; ++mr) {
    for (int nr : {1, 3, 4, 7, 8, 9, 15, 16, 17, 24, 31, 32}) {
      for (int variant = 0; variant < 8; ++variant) {
        const bool transposed = variant & 1, accumulate = variant & 2, with_init = variant & 4;
        const int64_t lda = transposed ? kRows : K + 5, ldb = kCols + 8, ldc = kCols + 4;
        std::vector<float> a(size_t(lda * (transposed ? K : kRows))), b(size_t(K * ldb)), c(size_t(kRows * ldc));
        std::vector<float> init(kCols);
        for (size_t i = 0; i < a.size(); ++i) a[i] = value(int(i));
        for (size_t i = 0; i < b.size(); ++i) b[i] = value(int(i) + 11);
        for (size_t i = 0; i < c.size(); ++i) c[i] = value(int(i) + 23);
        for (int j = 0; j < kCols; ++j) init[j] = value(j + 5);
        const std::vector<float> before = c, panel = packed_panel(b, K, ldb);
        MicroArgs args{K, transposed ? 1 : lda, transposed ? lda : 1, ldb, ldc, nr, accumulate};
        if (transposed) {
          micro_copying<float>(mr, a.data(), b.data(), c.data(), with_init ? init.data() : nullptr, args);
        } else {
          set_packed(args);
          micro<float>(mr, a.data(), panel.data(), c.data(), with_init ? init.data() : nullptr, args);
        }
        for (int r = 0; r < kRows; ++r) {
          for (int j = 0; j < ldc; ++j) {
            const float got = c[size_t(r * ldc + j)], old = before[size_t(r * ldc + j)];
            if (r >= mr || j >= nr) {  // outside the tile: untouched
              expect(got == old, "micro wrote outside its tile", mr, nr, variant);
              continue;
            }
            double want = 0;
            for (int k = 0; k < K; ++k) want += double(a[size_t(r * args.a_rs + k * args.a_ks)]) * b[size_t(k * ldb + j)];
            if (with_init) want += init[j];
            if (accumulate) want += old;
            expect(std::fabs(got - want) <= 1e-4 * (1 + std::fabs(want)), "micro value", mr, nr, variant);
          }
        }
      }
    }
  }
}

// micro_copying: the same bits as micro on the same A stored row-major, by the same B packed (the same sums
// in the same order), and the copy it makes on the side (every row of copy_cols elements in place, nothing
// past the buffer's K * kRows + kCopyPad elements), for every row count, full and partial panels, and each
// copy width.
void check_micro_copying() {
  using namespace sepconv;
  const int K = 29;
  const int64_t ldb = kCols + 8, ldc = kCols + 4, copy_ld = kRows + 5;
  for (int mr = 1; mr <= kRows; ++mr) {
    for (int nr : {5, 16, 32}) {
      for (int copy_cols = 0; copy_cols <= kRows; ++copy_cols) {
        std::vector<float> a(size_t(K * kRows)), rows(size_t(kRows * K)), b(size_t(K * ldb)), src(size_t(K * copy_ld));
        for (size_t i = 0; i < a.size(); ++i) a[i] = full_mantissa(int(i));
        for (int k = 0; k < K; ++k) {
          for (int r = 0; r < kRows; ++r) rows[size_t(r * K + k)] = a[size_t(k * kRows + r)];
        }
        for (size_t i = 0; i < b.size(); ++i) b[i] = full_mantissa(int(i) + 11);
        for (size_t i = 0; i < src.size(); ++i) src[i] = value(int(i) + 41);
        std::vector<float> c(size_t(kRows * ldc), 0.0f), want(c);
        const size_t used = size_t(K * kRows + kCopyPad);
        std::vector<float> dst(used + 8, -7.0f);
        const std::vector<float> panel = packed_panel(b, K, ldb);
        MicroArgs row_major{K, K, 1, ldb, ldc, nr, false};
        set_packed(row_major);
        micro<float>(mr, rows.data(), panel.data(), want.data(), nullptr, row_major);
        MicroArgs args{K, 1, kRows, ldb, ldc, nr, false};
        if (copy_cols > 0) {
          args.copy_src = src.data();
          args.copy_ld = copy_ld;
          args.copy_dst = dst.data();
          args.copy_cols = copy_cols;
        }
        micro_copying<float>(mr, a.data(), b.data(), c.data(), nullptr, args);
        for (size_t i = 0; i < c.size(); ++i) expect(c[i] == want[i], "micro_copying value", mr, nr, copy_cols);
        for (int k = 0; k < K; ++k) {
          for (int j = 0; j < copy_cols; ++j) {
            expect(dst[size_t(k * kRows + j)] == src[size_t(k * copy_ld + j)], "micro_copying copy", mr, k, j);
          }
        }
        for (size_t i = copy_cols > 0 ? used : 0; i < dst.size(); ++i) {
          expect(dst[i] == -7.0f, "micro_copying wrote past its copy", mr, nr, int(i));
        }
      }
    }
  }
}

// micro_taps: the same bits as micro on a tile holding the same A (each row's taps gathered one after the
// other: the same sums in the same order), for every row count, full and partial panels, with and without
// init, accumulate and the next call's rows to fetch; nothing written outside its tile.
void check_micro_taps() {
  using namespace sepconv;
  const int taps = 5, tap_k = 7, K = taps * tap_k;
  const int64_t a_rs = 9, ldb = kCols + 8, ldc = kCols + 4, lda = K + 3;
  const int64_t tap_offsets[taps] = {0, 3, 40, 41, 90};  // overlapping and far apart, as a window's taps are
  std::vector<float> x(size_t(kRows * a_rs + 90 + tap_k)), b(size_t(K * ldb)), tile(size_t(kRows * lda));
  for (size_t i = 0; i < x.size(); ++i) x[i] = full_mantissa(int(i));
  for (size_t i = 0; i < b.size(); ++i) b[i] = full_mantissa(int(i) + 1000);
  for (int r = 0; r < kRows; ++r) {
    for (int k = 0; k < K; ++k) tile[size_t(r * lda + k)] = x[size_t(r * a_rs + tap_offsets[k / tap_k] + k % tap_k)];
  }
  const std::vector<float> panel = packed_panel(b, K, ldb);
  std::vector<float> init(kCols);
  for (int j = 0; j < kCols; ++j) init[j] = value(j + 5);
  for (int mr = 1; mr <= kRows; ++mr) {
    for (int nr : {5, 16, 17, 31, 32}) {
      for (int variant = 0; variant < 8; ++variant) {
        const bool accumulate = variant & 1, with_init = variant & 2, fetch = variant & 4;
        std::vector<float> c(size_t(kRows * ldc)), want;
        for (size_t i = 0; i < c.size(); ++i) c[i] = value(int(i) + 23);
        const std::vector<float> before = c;
        want = c;
        MicroArgs args{K, lda, 1, ldb, ldc, nr, accumulate};
        set_packed(args);
        micro<float>(mr, tile.data(), panel.data(), want.data(), with_init ? init.data() : nullptr, args);
        args.a_rs = a_rs;
        args.tap_offsets = tap_offsets;
        args.tap_k = tap_k;
        if (fetch) {
          args.next = before.data();
          args.next_ld_bytes = ldc * int64_t(sizeof(float));
          args.next_rows = mr;
          args.next_bytes = nr * int(sizeof(float));
        }
        micro_taps<float>(mr, x.data(), panel.data(), c.data(), with_init ? init.data() : nullptr, args);
        for (size_t i = 0; i < c.size(); ++i) {
          const bool inside = int(i / ldc) < mr && int(i % ldc) < nr;
          expect(c[i] == (inside ? want[i] : before[i]), inside ? "micro_taps value" : "micro_taps wrote outside",
                 mr, nr, variant);
        }
      }
    }
  }
}

// The float32 kernels refuse strides they do not take (micro_pass fixes them): a row-major B through micro, a
// k-major A with another row stride through micro_copying.
void check_fixed_strides() {
#if defined(SEPCONV_HAS_VEC)
  using namespace sepconv;
  const int K = 4;
  std::vector<float> a(size_t(K * (kRows + 3))), b(size_t(K * (kCols + 8))), c(size_t(kRows * kCols));
  const MicroArgs cases[2] = {{K, K, 1, kCols + 8, kCols, kCols, false}, {K, 1, kRows + 3, kCols + 8, kCols, kCols, false}};
  for (int i = 0; i < 2; ++i) {
    bool refused = false;
    try {
      if (i == 0) micro<float>(kRows, a.data(), b.data(), c.data(), nullptr, cases[i]);
      else micro_copying<float>(kRows, a.data(), b.data(), c.data(), nullptr, cases[i]);
    } catch (const std::logic_error&) {
      refused = true;
    }
    expect(refused, "strides the kernel does not take are refused", i, 0, 0);
  }
#endif
}

#if defined(SEPCONV_HAS_VEC)
void check_vector_layer() {
  using V = sepconv::VecF32;
  constexpr int L = V::kLanes;
  float in[L * L], out[L * L];
  for (int i = 0; i < L * L; ++i) in[i] = float(i);
  V::Reg rows[L];
  for (int i = 0; i < L; ++i) rows[i] = V::load(in + i * L);
  V::transpose(rows);
  for (int i = 0; i < L; ++i) V::store(out + i * L, rows[i]);
  for (int i = 0; i < L; ++i) {
    for (int j = 0; j < L; ++j) expect(out[i * L + j] == in[j * L + i], "transpose", i, j, 0);
  }
  for (int left = -1; left <= L + 1; ++left) {  // masked loads read, and masked stores write, [0, left) only
    float dst[L], src[L];
    for (int i = 0; i < L; ++i) {
      dst[i] = -1.0f;
      src[i] = float(i + 1);
    }
    const V::Mask m = V::mask(left);
    V::store(dst, m, V::add(V::load(m, src), V::set1(0.5f)));
    for (int i = 0; i < L; ++i) {
      expect(dst[i] == (i < left ? src[i] + 0.5f : -1.0f), "masked load/store", left, i, 0);
    }
  }
  const float nan = std::nanf("");
  float relu_in[L], relu_out[L];
  for (int i = 0; i < L; ++i) relu_in[i] = i == 0 ? nan : float(i % 3) - 1.0f;
  V::store(relu_out, V::max(V::zero(), V::load(relu_in)));  // the kernels' ReLU keeps NaN, as F.relu
  expect(std::isnan(relu_out[0]), "relu keeps NaN", 0, 0, 0);
  for (int i = 1; i < L; ++i) expect(relu_out[i] == std::fmax(relu_in[i], 0.0f), "relu", i, 0, 0);
  // keep_max, lane by lane: a greater value or a NaN (even over a NaN) takes the place; an equal value,
  // a smaller one and -inf do not.
  const float inf = INFINITY;
  const float best_in[6] = {1.0f, 1.0f, 1.0f, nan, nan, -inf}, v_in[6] = {2.0f, 1.0f, 0.5f, 3.0f, nan, -inf};
  float best[L], v[L], at[L], here[L];
  for (int i = 0; i < L; ++i) {
    best[i] = best_in[i % 6];
    v[i] = v_in[i % 6];
    at[i] = float(i);
    here[i] = float(100 + i);
  }
  V::Reg best_r = V::load(best), at_r = V::load(at);
  V::keep_max(V::load(v), V::load(here), best_r, at_r);
  V::store(best, best_r);
  V::store(at, at_r);
  for (int i = 0; i < L; ++i) {
    const bool take = v_in[i % 6] > best_in[i % 6] || std::isnan(v_in[i % 6]);
    const float want = take ? v_in[i % 6] : best_in[i % 6];
    expect(std::isnan(want) ? std::isnan(best[i]) : best[i] == want, "keep_max value", i, 0, 0);
    expect(at[i] == (take ? float(100 + i) : float(i)), "keep_max index", i, 0, 0);
  }
  // add_where_equal: acc + add where a == b (never at a NaN), acc elsewhere.
  float acc[L], add[L], a[L], b[L], sum[L];
  for (int i = 0; i < L; ++i) {
    acc[i] = float(i) * 0.25f;
    add[i] = 10.0f + float(i);
    a[i] = i % 3 == 2 ? nan : float(i % 2);
    b[i] = 1.0f;
  }
  V::store(sum, V::add_where_equal(V::load(acc), V::load(add), V::load(a), V::load(b)));
  for (int i = 0; i < L; ++i) expect(sum[i] == (a[i] == b[i] ? acc[i] + add[i] : acc[i]), "add_where_equal", i, 0, 0);
}
#endif

}  // namespace

int main() {
  check_micro();
  check_micro_copying();
  check_micro_taps();
  check_fixed_strides();
#if defined(SEPCONV_HAS_VEC)
  check_vector_layer();
#endif
  std::printf("%s %s\n", sepconv::kIsa, failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
