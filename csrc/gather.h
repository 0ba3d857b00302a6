// Batch gather over byte spans: copy many source buffers back to back into one destination
// (the hot path of batch assembly: fixed-size fields stacked into [B, ...], variable-size
// fields flattened into one buffer plus offsets).
//
// Plain C++17, no Python and no torch: the Python binding lives in bindings.cpp. The reference
// implementation with the same semantics is gather_py() in src/fastfeed/batch/gather.py; the two are
// tested against each other, so change them together.
//
// Safety contract: gather() checks every size before it writes anything, writes only inside
// dst[dst_offset, dst_offset + total) and offsets[0, 8 * (n + 1)), and reads only inside the
// pieces. Sources that overlap the destination are copied one after the other with memmove
// when threads == 1 (so the result is that of copying them in order); with more threads the
// order between pieces is unspecified. It never throws.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastfeed::gather {

// One source: len bytes at data (data may be null when len is 0).
struct Piece {
  const std::uint8_t* data = nullptr;
  std::size_t len = 0;
};

enum class Status : int {
  kOk = 0,
  // The pieces add up to more than `max_total` bytes.
  kTooLarge = 1,
  // dst_offset + total > dst_len.
  kDstTooSmall = 2,
  // offsets requested but offsets_len < 8 * (n + 1).
  kOffsetsTooShort = 3,
};

struct Result {
  Status status = Status::kOk;
  std::size_t total = 0;  // bytes the pieces add up to (valid unless kTooLarge)
};

// Sum of the piece lengths, or kTooLarge once it would exceed max_total. Writes nothing.
Result total_size(const Piece* pieces, std::size_t n, std::size_t max_total) noexcept;

// Below this many bytes per extra thread a copy is not split (thread start-up is ~50 us).
inline constexpr std::size_t kMinBytesPerThread = std::size_t{4} << 20;
inline constexpr unsigned kMaxThreads = 64;

// Copies pieces[0..n) back to back into dst[dst_offset, dst_offset + total).
//
// offsets (any alignment, may be null): receives n + 1 native-endian int64 values,
// offsets[0] = 0 and offsets[i + 1] = offsets[i] + pieces[i].len (relative to dst_offset);
// offsets_len is its size in bytes. The offsets are written after the data.
//
// threads > 1 splits the copy into that many contiguous ranges of the output (at most one per
// kMinBytesPerThread bytes, at most kMaxThreads), each copied by its own std::thread; the
// calling thread does one of them. If a thread cannot be started its range is copied by the
// caller. Every check happens first: on any status other than kOk nothing is written.
// `total` must not exceed max_total (INT64_MAX at most): the offsets are int64.
Result gather(std::uint8_t* dst, std::size_t dst_len, std::size_t dst_offset, const Piece* pieces,
              std::size_t n, std::uint8_t* offsets, std::size_t offsets_len, std::size_t max_total,
              unsigned threads) noexcept;

}  // namespace fastfeed::gather
