// The cache sizes the kernels block for, read once per process when the library first needs them
// (not constants for one CPU): Linux's sysfs (/sys/devices/system/cpu/cpu0/cache), else sysconf,
// else the development machine's (1 MB L2 per core, 32 MB L3). sysfs comes first because inside a
// VM it reports what the guest is given, where glibc's sysconf can report the host's whole L3.
//
//   tile_bytes    the forward's depthwise tile (pixels x hidden channels) that stays in L2: 3/4 of L2
//   stream_bytes  outputs above this leave through streaming stores (streaming.h): 3/4 of L3
//   l3_usable_bytes  the L3 that the forward's blocking counts on for the pointwise weight: the
//                 reported L3, at most 16 MB per online CPU
//   interleave_bytes  the backward takes each block of pixels through all of a thread's channel chunks in
//                 turn when its input and grad_out together exceed this (sepconv_kernels.h, backward):
//                 l3_usable_bytes; SEPCONV_INTERLEAVE_BYTES sets it (0: always), for tests and tuning
//
// The backward's pixel block (sepconv_kernels.h, backward_block) follows l2_bytes too with 6-row tiles.
//
// Inside a VM sysfs can report the host's whole L3 (480 MB on a 2-core Intel Xeon guest), so no
// output is streamed there. Streaming above 24 MB on that machine measured mixed (forward of
// 64->128@147 at batch 8 3.0x -> 3.3x the eager pair, forward+backward of 128->256@74 1.7x -> 1.2x),
// so the reported size stands there. The forward's rule for a pointwise weight too large to stay in
// L3 counts on no more than 16 MB a CPU (tiled_forward says what that measured): that guest's 480 MB
// put its threshold (a quarter of L3) at 120 MB, above every layer's weight, where the 32 MB of the
// AMD machine the rule was tuned on put it at 8 MB. 16 MB a CPU is four times a core's share in
// current server parts (1.9-4 MB), so it changes nothing on a machine whose L3 is its own.
// SEPCONV_TILE_BYTES and SEPCONV_STREAM_BYTES fix the tile and the stream threshold
// for tuning.
//
// sepconv_cpu_build_info() (sepconv_cpu.cpp) reports these with the ISA path, so a benchmark row
// can say what the kernels chose.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

namespace sepconv {

struct MachineConfig {
  int64_t l1d_bytes = 48 << 10, l2_bytes = 1 << 20, l3_bytes = 32 << 20;  // L1d and L2 per core, L3 shared
  int64_t l1d_ways = 0;  // L1d associativity (0 until read: then l1d_bytes / 4 KB, as x86 L1s have 64 sets)
  int64_t l1d_sets = 64;  // L1d sets of 64-byte lines, from the size and the associativity read
  std::string cache_source = "default";
  int64_t tile_bytes = 0, stream_bytes = 0, l3_usable_bytes = 0, interleave_bytes = 0;
};

constexpr int64_t kL3PerCpuCap = int64_t(16) << 20;

// "48K", "1024K", "32M" -> bytes (0 when unreadable).
inline int64_t parse_cache_size(const std::string& text) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || value <= 0) return 0;
  const char unit = *end;
  return unit == 'K' ? value << 10 : unit == 'M' ? value << 20 : unit == 'G' ? value << 30 : value;
}

inline bool read_sysfs_caches(MachineConfig& config) {
  int64_t l1d = 0, l2 = 0, l3 = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
    int level = 0;
    std::string type, size;
    if (!(level_file >> level) || !(type_file >> type) || !(size_file >> size)) continue;
    const int64_t bytes = parse_cache_size(size);
    if (level == 1 && type == "Data") {
      l1d = bytes;
      std::ifstream ways_file(dir + "ways_of_associativity");
      int64_t ways = 0;
      if (ways_file >> ways && ways > 0) config.l1d_ways = ways;
    }
    if (level == 2 && type != "Instruction") l2 = bytes;
    if (level == 3 && type != "Instruction") l3 = bytes;
  }
  if (l2 <= 0) return false;
  config.l1d_bytes = l1d > 0 ? l1d : config.l1d_bytes;
  config.l2_bytes = l2;
  config.l3_bytes = l3 > 0 ? l3 : config.l3_bytes;
  config.cache_source = "sysfs";
  return true;
}

inline bool read_sysconf_caches(MachineConfig& config) {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (l2 <= 0) return false;
  const long l1d = sysconf(_SC_LEVEL1_DCACHE_SIZE), l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  config.l1d_bytes = l1d > 0 ? l1d : config.l1d_bytes;
#if defined(_SC_LEVEL1_DCACHE_ASSOC)
  const long ways = sysconf(_SC_LEVEL1_DCACHE_ASSOC);
  if (ways > 0) config.l1d_ways = ways;
#endif
  config.l2_bytes = l2;
  config.l3_bytes = l3 > 0 ? l3 : config.l3_bytes;
  config.cache_source = "sysconf";
  return true;
#else
  (void)config;
  return false;
#endif
}

// The environment variable `name` as a whole number >= minimum, else fallback (unset or not such a number:
// kernels.cpp_backend checks the value before the library loads, so only valid ones get here).
inline int64_t env_whole_number(const char* name, long long minimum, int64_t fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  return end != text && *end == '\0' && value >= minimum ? value : fallback;
}

inline MachineConfig read_machine_config() {
  MachineConfig config;
  if (!read_sysfs_caches(config)) read_sysconf_caches(config);
  if (config.l1d_ways <= 0) config.l1d_ways = std::max<int64_t>(config.l1d_bytes >> 12, 1);
  config.l1d_sets = std::max<int64_t>(config.l1d_bytes / (64 * config.l1d_ways), 1);
  // SEPCONV_L1D_WAYS overrides the associativity, not the sets (tests take both sides of the rules that use
  // it with it).
  config.l1d_ways = env_whole_number("SEPCONV_L1D_WAYS", 1, config.l1d_ways);
#if defined(SEPCONV_TILE_BYTES)  // a fixed tile, for tuning runs
  config.tile_bytes = SEPCONV_TILE_BYTES;
#else
  config.tile_bytes = config.l2_bytes / 4 * 3;
#endif
#if defined(SEPCONV_STREAM_BYTES)  // a fixed threshold, for tuning runs
  config.stream_bytes = SEPCONV_STREAM_BYTES;
#else
  config.stream_bytes = config.l3_bytes / 4 * 3;
#endif
  const long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  config.l3_usable_bytes = std::min(config.l3_bytes, kL3PerCpuCap * std::max<long>(cpus, 1));
  config.interleave_bytes = env_whole_number("SEPCONV_INTERLEAVE_BYTES", 0, config.l3_usable_bytes);
  return config;
}

inline const MachineConfig& machine() {
  static const MachineConfig config = read_machine_config();
  return config;
}

}  // namespace sepconv
