#include "crc32c.h"

#include <array>
#include <cstring>

// The CPU's CRC32C instructions, one 64-bit word or one byte at a time: SSE4.2 on x86-64, the
// ARMv8 CRC extension on aarch64 (both chosen at run time, the rest of the file shared).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <nmmintrin.h>
#define FASTFEED_CRC_HW 1
#if defined(__clang__)
// Recent clang (and zig cc) keep the crc32 instructions apart from SSE4.2.
#define FASTFEED_CRC_TARGET __attribute__((target("sse4.2,crc32")))
#else
#define FASTFEED_CRC_TARGET __attribute__((target("sse4.2")))
#endif
namespace {
FASTFEED_CRC_TARGET inline std::uint64_t hw_u64(std::uint64_t c, std::uint64_t w) { return _mm_crc32_u64(c, w); }
FASTFEED_CRC_TARGET inline std::uint32_t hw_u8(std::uint32_t c, std::uint8_t b) { return _mm_crc32_u8(c, b); }
bool detect() {
  // CPUID leaf 1, ECX bit 20, asked directly: __builtin_cpu_supports relies on the runtime
  // library's CPU model, which a wheel built with zig cc (compiler-rt) left empty.
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_SSE4_2) != 0;
}
}  // namespace
#elif defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#include <arm_acle.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#define FASTFEED_CRC_HW 1
#if defined(__clang__)
#define FASTFEED_CRC_TARGET __attribute__((target("crc")))
#else
#define FASTFEED_CRC_TARGET __attribute__((target("+crc")))
#endif
namespace {
FASTFEED_CRC_TARGET inline std::uint64_t hw_u64(std::uint64_t c, std::uint64_t w) {
  return __crc32cd(static_cast<std::uint32_t>(c), w);
}
FASTFEED_CRC_TARGET inline std::uint32_t hw_u8(std::uint32_t c, std::uint8_t b) { return __crc32cb(c, b); }
bool detect() {
#if defined(__APPLE__)
  return true;  // every Apple arm64 CPU has the CRC extension
#elif defined(__linux__)
  return (getauxval(AT_HWCAP) & (1UL << 7)) != 0;  // HWCAP_CRC32
#else
  return false;
#endif
}
}  // namespace
#endif

namespace crc {
namespace {

constexpr std::uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

// Slicing-by-8 tables for the portable path.
struct Tables {
  std::array<std::array<std::uint32_t, 256>, 8> t{};
  Tables() {
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ kPoly : c >> 1;
      t[0][i] = c;
    }
    for (std::size_t i = 0; i < 256; ++i) {
      for (std::size_t s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFFu];
    }
  }
};

const Tables& tables() {
  static const Tables instance;
  return instance;
}

std::uint32_t software(std::uint32_t crc, const std::uint8_t* p, std::size_t len) {
  const auto& t = tables().t;
  while (len >= 8) {
    const std::uint32_t lo = crc ^ (std::uint32_t{p[0]} | std::uint32_t{p[1]} << 8 |
                                    std::uint32_t{p[2]} << 16 | std::uint32_t{p[3]} << 24);
    const std::uint32_t hi = std::uint32_t{p[4]} | std::uint32_t{p[5]} << 8 |
                             std::uint32_t{p[6]} << 16 | std::uint32_t{p[7]} << 24;
    crc = t[7][lo & 0xFFu] ^ t[6][(lo >> 8) & 0xFFu] ^ t[5][(lo >> 16) & 0xFFu] ^ t[4][lo >> 24] ^
          t[3][hi & 0xFFu] ^ t[2][(hi >> 8) & 0xFFu] ^ t[1][(hi >> 16) & 0xFFu] ^ t[0][hi >> 24];
    p += 8;
    len -= 8;
  }
  while (len--) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFFu];
  return crc;
}

#ifdef FASTFEED_CRC_HW
// The CPU's crc32 instruction has a latency of 3 cycles and a throughput of 1 per cycle: one
// chain of it runs at a third of the instruction's speed. So long inputs are cut into blocks of
// three equal stretches whose CRCs are computed as three independent chains at once, then
// combined. The CRC register (before the final inversion) is linear: the register after A||B,
// started at s, is shift(register after A, |B|) ^ register after B started at 0, where shift(c, n)
// is the register after n zero bytes started at c, itself linear in c: four table lookups.
constexpr std::size_t kLong = 8192;  // bytes of one stretch of a long block (3 x 8 KiB)
constexpr std::size_t kShort = 256;  // and of a short one (3 x 256 B), for what remains

struct Shift {
  std::array<std::array<std::uint32_t, 256>, 4> t{};
  std::uint32_t operator()(std::uint32_t c) const {
    return t[0][c & 0xFFu] ^ t[1][(c >> 8) & 0xFFu] ^ t[2][(c >> 16) & 0xFFu] ^ t[3][c >> 24];
  }
};

// The register after `len` (a multiple of 8) zero bytes, started at `c`.
FASTFEED_CRC_TARGET std::uint32_t zeros(std::uint32_t c, std::size_t len) {
  std::uint64_t r = c;
  for (std::size_t i = 0; i < len; i += 8) r = hw_u64(r, 0);
  return static_cast<std::uint32_t>(r);
}

Shift make_shift(std::size_t len) {
  std::array<std::uint32_t, 32> basis{};
  for (std::size_t bit = 0; bit < 32; ++bit) basis[bit] = zeros(1u << bit, len);
  Shift s;
  for (std::size_t k = 0; k < 4; ++k) {
    for (std::size_t b = 0; b < 256; ++b) {
      std::uint32_t v = 0;
      for (std::size_t bit = 0; bit < 8; ++bit) {
        if ((b >> bit) & 1u) v ^= basis[8 * k + bit];
      }
      s.t[k][b] = v;
    }
  }
  return s;
}

inline std::uint64_t load64(const std::uint8_t* p) {
  std::uint64_t word = 0;
  std::memcpy(&word, p, 8);
  return word;
}

// Three chains over the three stretches of each block of 3 * n bytes while len allows.
FASTFEED_CRC_TARGET std::uint64_t blocks3(std::uint64_t c0, const std::uint8_t*& p, std::size_t& len,
                                                        std::size_t n, const Shift& shift) {
  while (len >= 3 * n) {
    std::uint64_t c1 = 0;
    std::uint64_t c2 = 0;
    const std::uint8_t* const end = p + n;
    do {
      c0 = hw_u64(c0, load64(p));
      c1 = hw_u64(c1, load64(p + n));
      c2 = hw_u64(c2, load64(p + 2 * n));
      p += 8;
    } while (p < end);
    c0 = shift(static_cast<std::uint32_t>(c0)) ^ static_cast<std::uint32_t>(c1);
    c0 = shift(static_cast<std::uint32_t>(c0)) ^ static_cast<std::uint32_t>(c2);
    p += 2 * n;
    len -= 3 * n;
  }
  return c0;
}

FASTFEED_CRC_TARGET std::uint32_t hardware_crc(std::uint32_t crc, const std::uint8_t* p, std::size_t len) {
  static const Shift long_shift = make_shift(kLong);  // thread-safe initialization (C++11)
  static const Shift short_shift = make_shift(kShort);
  std::uint64_t c = crc;
  c = blocks3(c, p, len, kLong, long_shift);
  c = blocks3(c, p, len, kShort, short_shift);
  while (len >= 8) {
    c = hw_u64(c, load64(p));
    p += 8;
    len -= 8;
  }
  auto c32 = static_cast<std::uint32_t>(c);
  while (len--) c32 = hw_u8(c32, *p++);
  return c32;
}

#else
bool detect() { return false; }
#endif

}  // namespace

bool hardware() {
  static const bool has = detect();
  return has;
}

std::uint32_t extend(std::uint32_t crc, const std::uint8_t* data, std::size_t len) {
  crc = ~crc;
#ifdef FASTFEED_CRC_HW
  if (hardware()) return ~hardware_crc(crc, data, len);
#endif
  return ~software(crc, data, len);
}

std::uint32_t extend_portable(std::uint32_t crc, const std::uint8_t* data, std::size_t len) {
  return ~software(~crc, data, len);
}

}  // namespace crc
