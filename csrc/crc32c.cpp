#include "crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define FASTFEED_CRC_X86 1
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

#ifdef FASTFEED_CRC_X86
__attribute__((target("sse4.2"))) std::uint32_t sse42(std::uint32_t crc, const std::uint8_t* p,
                                                        std::size_t len) {
  std::uint64_t c = crc;
  while (len >= 8) {
    std::uint64_t word = 0;
    std::memcpy(&word, p, 8);
    c = _mm_crc32_u64(c, word);
    p += 8;
    len -= 8;
  }
  auto c32 = static_cast<std::uint32_t>(c);
  while (len--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}

bool detect() { return __builtin_cpu_supports("sse4.2") != 0; }
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
#ifdef FASTFEED_CRC_X86
  if (hardware()) return ~sse42(crc, data, len);
#endif
  return ~software(crc, data, len);
}

std::uint32_t extend_portable(std::uint32_t crc, const std::uint8_t* data, std::size_t len) {
  return ~software(~crc, data, len);
}

}  // namespace crc
