// Times the forward's depthwise stage alone (depthwise_tile over an image in the forward's blocks of
// pixels, one thread), so the 3x3 row kernel can be tuned without the pointwise GEMM around it.
// Not a test: a developer's measuring tool. Build (AVX-512 host path; add -mno-avx512f for AVX2):
//   g++ -O3 -march=native -std=c++17 -I kernels/csrc -I $TORCH/include tests/csrc/depthwise_bench.cpp
// Run: ./a.out CM H [stride] [repeats]  -> ns per output pixel-vector, best of the repeats, and the
// same for one small block whose input stays in L1; ./a.out check -> a hash of the results.
// Caveat: the image here stays in L2/L3 between repeats and nothing else runs between the blocks,
// unlike in the forward (the GEMM between blocks, the input from L3 or memory): the previous kernel
// timed about three times slower here than its share of a perf profile of the forward implied.
// Check a change in the forward too (perf record on a loop of one layer's forward).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "sepconv_kernels.h"

using namespace sepconv;

// 64-byte aligned, as torch allocates tensors: std::vector's large blocks start 16 bytes into a
// page, so every vector load would straddle two cache lines (an earlier version timed that).
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const AlignedAllocator&) const { return true; }
  bool operator!=(const AlignedAllocator&) const { return false; }
};
using Buffer = std::vector<float, AlignedAllocator<float>>;

static double time_blocks(const Geometry& g, const Buffer& x, const Buffer& w,
                          int64_t block_rows, int64_t first, int64_t npix, int repeats, Buffer& tile,
                          int64_t ld) {
  double best = 1e30;
  for (int rep = 0; rep < repeats; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t p0 = first; p0 < first + npix; p0 += block_rows) {
      const int64_t rows = std::min(block_rows, first + npix - p0);
      depthwise_tile<float>(g, x.data(), w.data(), nullptr, false, p0, rows, 0, g.CM, tile.data(), ld);
    }
    const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, ns);
  }
  return best;
}

// `check`: an FNV-1a hash of the depthwise result over many shapes (channel counts with and without
// a partial vector, both strides, ReLU, bias, uneven blocks), to compare two builds bit for bit.
static int check() {
  uint64_t hash = 1469598103934665603ull;
  for (int64_t CM : {1, 5, 16, 17, 33, 64, 100, 128}) {
    for (int64_t H : {4, 9, 13}) {
      for (int64_t stride : {1, 2}) {
        for (int variant = 0; variant < 4; ++variant) {
          const bool relu = variant & 1, with_bias = variant & 2;
          Geometry g{};
          g.N = 2, g.H = H, g.W = H + 3, g.CM = CM, g.Cout = CM;
          g.kh = g.kw = 3, g.sh = g.sw = stride, g.pt = g.pl = 1, g.dh = g.dw = 1;
          g.OH = (g.H + 2 - 3) / stride + 1, g.OW = (g.W + 2 - 3) / stride + 1;
          Buffer x(size_t(g.N * g.H * g.W * CM)), w(size_t(9 * CM)), b(static_cast<size_t>(CM));
          for (size_t i = 0; i < x.size(); ++i) x[i] = float(int(i * 37 % 101) - 50) / 7.0f;
          for (size_t i = 0; i < w.size(); ++i) w[i] = float(int(i * 13 % 29) - 14) / 3.0f;
          for (size_t i = 0; i < b.size(); ++i) b[i] = float(int(i * 7 % 11) - 5) / 9.0f;
          const int64_t npix = g.pixels(), ld = round_up(CM, 16) + 16, block = 7;
          Buffer tile(size_t(npix * ld));
          for (int64_t p0 = 0; p0 < npix; p0 += block) {
            depthwise_tile<float>(g, x.data(), w.data(), with_bias ? b.data() : nullptr, relu, p0,
                                  std::min(block, npix - p0), 0, CM, tile.data() + p0 * ld, ld);
          }
          for (int64_t p = 0; p < npix; ++p) {
            for (int64_t c = 0; c < CM; ++c) {
              uint32_t bits;
              std::memcpy(&bits, &tile[size_t(p * ld + c)], 4);
              hash = (hash ^ bits) * 1099511628211ull;
            }
          }
        }
      }
    }
  }
  std::printf("%s check hash %016llx\n", kIsa, (unsigned long long)hash);
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "check") return check();
  const int64_t CM = argc > 1 ? std::atoll(argv[1]) : 128, H = argc > 2 ? std::atoll(argv[2]) : 147;
  const int64_t stride = argc > 3 ? std::atoll(argv[3]) : 1;
  const int repeats = argc > 4 ? std::atoi(argv[4]) : 20;
  Geometry g{};
  g.N = 1, g.H = H, g.W = H, g.CM = CM, g.Cout = CM;
  g.kh = g.kw = 3, g.sh = g.sw = stride, g.pt = g.pl = 1, g.dh = g.dw = 1;
  g.OH = (H + 2 - 3) / stride + 1, g.OW = g.OH;
  Buffer x(size_t(g.N * H * H * CM)), w(size_t(9 * CM));
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(int(i * 37 % 101) - 50) / 16.0f;
  for (size_t i = 0; i < w.size(); ++i) w[i] = float(int(i * 13 % 29) - 14) / 8.0f;
  const int64_t npix = g.pixels(), ld = round_up(CM, 16) + 16;
  // The forward's blocks: at most kMaxRows pixels whose tile stays in L2 (forward()).
  const int64_t block_rows = std::min(npix, std::clamp<int64_t>(machine().tile_bytes / (CM * 4), kRows, kMaxRows));
  Buffer tile(size_t(block_rows * ld));
  const double vectors = double(CM + VecF32::kLanes - 1) / VecF32::kLanes;
  const double whole = time_blocks(g, x, w, block_rows, 0, npix, repeats, tile, ld);
  // One output row's interior run, repeated: its three input rows stay in L1 when they fit.
  const int64_t row_pixels = std::min<int64_t>(g.OW, 16);
  const double small = time_blocks(g, x, w, row_pixels, g.OW + 1, row_pixels, repeats * 200, tile, ld);
  std::printf("%s CM=%lld H=%lld stride=%lld  image %.3f ms  %.2f ns/pixel-vector  L1-run %.2f ns/pixel-vector\n", kIsa,
              (long long)CM, (long long)H, (long long)stride, whole * 1e-6, whole / (npix * vectors),
              small / (row_pixels * vectors));
  return 0;
}
