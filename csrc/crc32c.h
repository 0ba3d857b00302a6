// CRC32C (Castagnoli), the checksum of checkpoint parts and cache entries. Hardware instructions
// where the CPU has them (x86-64 SSE4.2, the aarch64 CRC extension; chosen at run time), a
// table-driven fallback elsewhere. No Python.
#pragma once

#include <cstddef>
#include <cstdint>

namespace crc {

// The CRC32C of data[0:len], continuing from `crc` (0 to start): crc32c(a + b) ==
// extend(extend(0, a), b).
std::uint32_t extend(std::uint32_t crc, const std::uint8_t* data, std::size_t len);

// extend() without the CPU instruction (the portable path, for tests on any machine).
std::uint32_t extend_portable(std::uint32_t crc, const std::uint8_t* data, std::size_t len);

// Whether extend() uses the CPU's CRC32 instruction.
bool hardware();

}  // namespace crc
