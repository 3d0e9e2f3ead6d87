// Large result buffers that are recycled instead of handed back to the operating system.
//
// glibc maps a block of 32 MiB or more afresh on every allocation and unmaps it on free (smaller
// blocks come from its heap, where a trim can also return them), so the first writes into a
// large result fault its 4 KiB pages in one by one: an 88 MB activation at 147x147, batch 8,
// costs ~22 ms of page faults on the 2-core development machine, more than the kernel that fills
// it. A training step allocates the same shapes every time, so the ops of this library take
// their large results from this cache: a freed block waits, already paged in, for the next
// request of its size class (sizes are rounded up to 2 MiB). Blocks are 2 MiB aligned and, unless
// SEPCONV_HUGEPAGES=0, advised as transparent huge pages before first use.
//
// Idle blocks are bounded: SEPCONV_CACHE_MB (default 2048) caps their total, a block freed beyond
// the cap goes back to the system, and SEPCONV_CACHE_MB=0 turns recycling off. The profiler sees
// live blocks as allocations (torch.profiler's memory trace counts them like torch's own); idle
// blocks are resident memory that no tensor uses, reported by cache_stats() and given back by
// release_idle() (kernels.empty_cache() in Python).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__)
#include <pthread.h>
#endif

namespace sepconv {

inline bool env_flag_off(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::string(value) == "0";
}

// Transparent huge pages for fresh large blocks; SEPCONV_HUGEPAGES=0 turns the advice off (in a
// virtual machine whose host reclaims free guest memory, backing a fresh huge page now and then
// takes tens of milliseconds; with recycling that happens only on a block's first use).
inline bool advise_huge_pages() {
  static const bool enabled = !env_flag_off("SEPCONV_HUGEPAGES");
  return enabled;
}

class BufferCache final : public c10::Allocator {
 public:
  static constexpr size_t kGranule = size_t(2) << 20;
  // Smaller requests are left to at::empty: glibc recycles them from its heap.
  static constexpr size_t kMinBytes = size_t(1) << 20;

  // Never destroyed: tensors freed during interpreter shutdown still hand their blocks back here.
  static BufferCache& instance() {
    static BufferCache* cache = [] {
      BufferCache* created = new BufferCache();
#if defined(__unix__)
      // A process forked while another thread holds the lock (DataLoader workers fork) would find
      // it held forever: fork waits for the lock, and both sides release it.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
#endif
      return created;
    }();
    return *cache;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    const size_t bytes = (nbytes + kGranule - 1) / kGranule * kGranule;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto hit = idle_.find(bytes);
      if (hit != idle_.end()) {
        ptr = hit->second;
        idle_.erase(hit);
        idle_bytes_ -= bytes;
      }
    }
    if (ptr == nullptr) ptr = fresh_block(bytes);
    size_t live = 0;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      live = live_bytes_ += bytes;
    }
    c10::reportMemoryUsageToProfiler(ptr, static_cast<int64_t>(bytes), live, live, c10::Device(c10::kCPU));
    return {ptr, new Block{ptr, bytes}, &BufferCache::give_back, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // An uninitialised tensor whose storage comes from this cache (or from at::empty when small or
  // when recycling is off).
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
    const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
    if (nbytes < kMinBytes || limit_ == 0) return at::empty(sizes, options, format);
    at::Tensor tensor = at::detail::empty_generic(sizes, this, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                  c10::typeMetaToScalarType(options.dtype()), format);
    // As torch.empty does: under torch.use_deterministic_algorithms(True) with
    // fill_uninitialized_memory, a fresh float buffer holds NaN (so a kernel that leaves an element
    // unwritten shows in the tests).
    const auto& context = at::globalContext();
    if (context.deterministicAlgorithms() && context.deterministicFillUninitializedMemory() &&
        tensor.is_floating_point()) {
      tensor.fill_(std::numeric_limits<double>::quiet_NaN());
    }
    return tensor;
  }

  // Frees every idle block; returns the bytes freed.
  int64_t release_idle() {
    std::multimap<size_t, void*> idle;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    int64_t freed = 0;
    for (const auto& [bytes, ptr] : idle) {
      std::free(ptr);
      freed += static_cast<int64_t>(bytes);
    }
    return freed;
  }

  // {bytes in live tensors, bytes idle, idle cap}.
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {static_cast<int64_t>(live_bytes_), static_cast<int64_t>(idle_bytes_), static_cast<int64_t>(limit_)};
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  BufferCache() {
    const char* value = std::getenv("SEPCONV_CACHE_MB");
    long long megabytes = 2048;
    if (value != nullptr && *value != '\0') {
      char* end = nullptr;
      megabytes = std::strtoll(value, &end, 10);
      TORCH_CHECK(end != nullptr && *end == '\0' && megabytes >= 0,
                  "SEPCONV_CACHE_MB must be a whole number of MiB >= 0, got '", value, "'");
    }
    limit_ = static_cast<size_t>(megabytes) << 20;
  }

  static void* fresh_block(size_t bytes) {
    void* ptr = nullptr;
    TORCH_CHECK(posix_memalign(&ptr, kGranule, bytes) == 0 && ptr != nullptr,
                "sepconv_cpp: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (advise_huge_pages()) madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
    return ptr;
  }

  static void give_back(void* context) {
    Block* block = static_cast<Block*>(context);
    BufferCache& cache = instance();
    bool keep = false;
    size_t live = 0;
    {
      std::lock_guard<std::mutex> guard(cache.mutex_);
      live = cache.live_bytes_ -= block->bytes;
      if (cache.idle_bytes_ + block->bytes <= cache.limit_) {
        cache.idle_.emplace(block->bytes, block->ptr);
        cache.idle_bytes_ += block->bytes;
        keep = true;
      }
    }
    c10::reportMemoryUsageToProfiler(block->ptr, -static_cast<int64_t>(block->bytes), live, live,
                                     c10::Device(c10::kCPU));
    if (!keep) std::free(block->ptr);
    delete block;
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;  // size class -> block
  size_t idle_bytes_ = 0;
  size_t live_bytes_ = 0;
  size_t limit_ = 0;
};

}  // namespace sepconv
