// Tar member indexing over a byte span: find the regular files of a (possibly partial) tar
// archive without copying anything.
//
// Plain C++17, no Python and no torch: the Python binding lives in bindings.cpp. The reference
// implementation with exactly the same semantics is scan_py() in src/fastfeed/read/tario.py; the
// two are tested against each other, so change them together.
//
// Safety contract: scan() reads only bytes inside [data, data + len), for every input, and
// never throws except std::bad_alloc from growing the output vector.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastfeed::tar {

// Tar block size in bytes: headers are one block, member data is padded to a multiple of it.
inline constexpr std::size_t kBlockSize = 512;

// `object_end` when the caller does not know where the object ends.
inline constexpr std::uint64_t kUnknownEnd = static_cast<std::uint64_t>(-1);

// Why a scan failed (or would fail if the buffer were final). The numeric values cross the
// Python binding: src/fastfeed/read/tario.py has the same table and the tests check that the two
// agree. Values below 20 are corrupt archives, 20 and above truncated ones.
enum class ErrorKind : int {
  kNone = 0,
  // Stored header checksum matches neither the unsigned nor the signed byte sum.
  // offset: header; a: stored value; b: unsigned sum.
  kBadChecksum = 1,
  // A numeric header field is not octal / base-256, is negative or does not fit in int64.
  // offset: header; a: the field's byte offset inside the header (124 size, 148 checksum).
  kBadField = 2,
  // A pax record is not "<len> <keyword>=<value>\n" or its length runs past the payload.
  // offset: the extension header; a: the record's byte offset inside the payload.
  kBadPaxRecord = 3,
  // A pax "size" value is not a decimal integer that fits in int64.
  // offset: the extension header; a: the record's byte offset inside the payload.
  kBadPaxSize = 4,
  // A GNU sparse member (typeflag 'S', or pax GNU.sparse.* keys): not supported.
  // offset: the header that declares it.
  kSparse = 5,
  // Extension headers (pax 'x', GNU 'L'/'K') followed by the end-of-archive block instead of
  // the member they describe. offset: the zero block; a: the first extension header.
  kDanglingExtension = 6,
  // Final buffer ends inside a header block. offset: the header; a: bytes present (< 512).
  // The member name is known only when extension headers already supplied it.
  kTruncatedHeader = 20,
  // Final buffer ends inside an extension header's payload or its padding, or the payload
  // would run past `object_end`. offset: the extension header; a: payload bytes present (in
  // the object); b: payload size.
  kTruncatedExtension = 21,
  // Final buffer ends inside a member's data, or the data would run past `object_end`.
  // offset: the member's header; a: data bytes present (in the object); b: data size.
  kTruncatedData = 22,
};

// A byte range of the scanned buffer: [off, off + len).
struct Span {
  std::size_t off = 0;
  std::size_t len = 0;
};

// A regular member. Its name is `prefix + "/" + name` when `prefix` is non-empty (ustar
// prefix field), else `name`; both are raw bytes of the input (callers decode them).
struct Member {
  Span prefix;
  Span name;
  std::uint64_t data_offset = 0;  // absolute offset of the first data byte in the buffer
  std::uint64_t size = 0;         // data size in bytes (< 2**63)
};

struct ScanResult {
  // Offset of the first header not consumed: where the next scan must resume.
  std::size_t next_pos = 0;
  // The end-of-archive marker (a zero block where a header was expected) is at next_pos.
  bool end = false;
  // A scan that stopped for lack of bytes (not final, no error, not at the end): the buffer
  // length a scan resumed at next_pos needs to get past the header chain or member it stopped
  // in (the rest of a header, an extension payload and its padding, or a member's data and
  // padding); always > len. Otherwise next_pos.
  std::size_t need = 0;
  // That scan stopped inside the data (or padding) of a regular member whose headers are
  // complete: its name (the member itself is not returned).
  bool partial = false;
  Span partial_prefix;
  Span partial_name;
  // On error everything below describes it, and the members found so far are meaningless.
  ErrorKind error = ErrorKind::kNone;
  std::int64_t err_offset = 0;  // absolute byte offset in the buffer, see ErrorKind
  std::int64_t err_a = 0;       // signed: a stored checksum may be a negative base-256 value
  std::int64_t err_b = 0;
  bool err_has_name = false;  // err_prefix/err_name hold the member's name
  Span err_prefix;
  Span err_name;
};

// Scans data[pos:len) for tar members; appends the complete regular members to `out`.
//
// `pos` must be <= len and lie on a header boundary of the archive. A member is emitted only
// when its header chain, its data and its padding are all inside the buffer; otherwise the
// scan stops with next_pos at the first header of that member's chain (extension headers
// included), so that a caller can append more bytes to data[next_pos:] and scan again.
//
// With `final` set the buffer holds the whole rest of the object: a member whose padding is
// cut off is accepted (next_pos = len), and stopping early on anything but zero bytes is a
// kTruncated* error.
//
// `object_end` (>= len, or kUnknownEnd) is where the object ends, in the buffer's coordinates
// (it may lie far beyond the buffer). A scan that is not final and stops inside an extension
// payload or member data that its header says runs past object_end fails at once with
// kTruncatedExtension / kTruncatedData, as a final scan of the whole object would: a header
// that claims more bytes than the object has is an error before any more bytes are read.
ScanResult scan(const std::uint8_t* data, std::size_t len, std::size_t pos, bool final,
                std::uint64_t object_end, std::vector<Member>& out);

// Called by scan_each() for each complete regular member, in archive order. `chain` is the
// offset of the member's first header (its extension headers included). Returning false
// refuses the member: the scan stops before it, with next_pos = chain and end = false, and
// reads nothing after it.
using MemberVisitor = bool (*)(void* ctx, const Member& member, std::size_t chain);

// scan() with a visitor instead of an output vector (scan() is scan_each() with a visitor that
// appends): same parsing, errors and next_pos contract. The visitor may throw; the exception
// passes through.
ScanResult scan_each(const std::uint8_t* data, std::size_t len, std::size_t pos, bool final,
                     std::uint64_t object_end, MemberVisitor visit, void* ctx);

}  // namespace fastfeed::tar
