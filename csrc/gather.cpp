// Batch gather over byte spans; see gather.h for the contract.
#include "gather.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <thread>

namespace fastfeed::gather {

namespace {

constexpr std::size_t kInt64Max = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max());

// A position in the concatenation of the pieces: `skip` bytes into pieces[index].
struct Cursor {
  std::size_t index = 0;
  std::size_t skip = 0;
};

// Copies `bytes` bytes of the concatenation, starting at `at`, to out. The caller guarantees
// that they exist (at + bytes <= total).
void copy_span(std::uint8_t* out, const Piece* pieces, Cursor at, std::size_t bytes) noexcept {
  std::size_t i = at.index;
  std::size_t skip = at.skip;
  while (bytes > 0) {
    const Piece& p = pieces[i];
    const std::size_t c = std::min(p.len - skip, bytes);
    if (c > 0) std::memmove(out, p.data + skip, c);  // memmove: a source may overlap dst
    out += c;
    bytes -= c;
    skip = 0;
    ++i;
  }
}

// Copies everything with `k` (>= 2) threads: the output is cut into k contiguous ranges of
// nearly equal size, range 0 is done by the caller.
void copy_threaded(std::uint8_t* out, const Piece* pieces, std::size_t n, std::size_t total,
                   unsigned k) noexcept {
  // Range t is [start[t], start[t + 1]); cursor[t] is where it begins in the pieces.
  std::array<std::size_t, kMaxThreads + 1> start{};
  std::array<Cursor, kMaxThreads> cursor{};
  const std::size_t base = total / k;
  const std::size_t extra = total % k;
  for (unsigned t = 0; t <= k; ++t) start[t] = base * t + std::min<std::size_t>(t, extra);

  // One walk over the pieces finds every range's first piece.
  std::size_t pos = 0;  // offset of pieces[i] in the output
  std::size_t i = 0;
  for (unsigned t = 0; t < k; ++t) {
    while (i < n && pos + pieces[i].len <= start[t]) pos += pieces[i++].len;
    cursor[t] = Cursor{i, start[t] - pos};
  }

  std::array<std::thread, kMaxThreads> workers{};
  for (unsigned t = 1; t < k; ++t) {
    const Cursor c = cursor[t];
    std::uint8_t* o = out + start[t];
    const std::size_t bytes = start[t + 1] - start[t];
    try {
      workers[t] = std::thread([=] { copy_span(o, pieces, c, bytes); });
    } catch (...) {  // std::system_error (no threads left) or std::bad_alloc: do it here
      copy_span(o, pieces, c, bytes);
    }
  }
  copy_span(out, pieces, cursor[0], start[1]);
  for (unsigned t = 1; t < k; ++t) {
    if (workers[t].joinable()) workers[t].join();
  }
}

void write_offsets(std::uint8_t* offsets, const Piece* pieces, std::size_t n) noexcept {
  std::int64_t pos = 0;
  std::memcpy(offsets, &pos, sizeof pos);  // memcpy: the buffer need not be aligned
  for (std::size_t i = 0; i < n; ++i) {
    pos += static_cast<std::int64_t>(pieces[i].len);  // total <= INT64_MAX: no overflow
    std::memcpy(offsets + (i + 1) * sizeof pos, &pos, sizeof pos);
  }
}

}  // namespace

Result total_size(const Piece* pieces, std::size_t n, std::size_t max_total) noexcept {
  Result r;
  std::size_t total = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t len = pieces[i].len;
    if (len > max_total - total) {
      r.status = Status::kTooLarge;
      return r;
    }
    total += len;
  }
  r.total = total;
  return r;
}

Result gather(std::uint8_t* dst, std::size_t dst_len, std::size_t dst_offset, const Piece* pieces,
              std::size_t n, std::uint8_t* offsets, std::size_t offsets_len, std::size_t max_total,
              unsigned threads) noexcept {
  Result r = total_size(pieces, n, std::min(max_total, kInt64Max));
  if (r.status != Status::kOk) return r;
  const std::size_t total = r.total;
  if (dst_offset > dst_len || total > dst_len - dst_offset) {
    r.status = Status::kDstTooSmall;
    return r;
  }
  if (offsets != nullptr) {
    // n + 1 elements of 8 bytes, without overflowing: n < offsets_len / 8.
    if (n >= offsets_len / sizeof(std::int64_t)) {
      r.status = Status::kOffsetsTooShort;
      return r;
    }
  }

  std::uint8_t* out = dst + dst_offset;  // total > 0 implies dst is a real buffer
  if (total > 0) {
    const std::size_t by_size = total / kMinBytesPerThread;  // threads worth starting
    const std::size_t k = std::min<std::size_t>({threads, kMaxThreads, by_size});
    if (k >= 2) {
      copy_threaded(out, pieces, n, total, static_cast<unsigned>(k));
    } else {
      copy_span(out, pieces, Cursor{}, total);
    }
  }
  if (offsets != nullptr) write_offsets(offsets, pieces, n);
  return r;
}

}  // namespace fastfeed::gather
