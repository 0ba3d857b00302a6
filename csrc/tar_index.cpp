// Tar member indexing; see tar_index.h for the contract and src/fastfeed/read/tario.py (scan_py) for
// the pure-Python twin. Every read below is preceded by a check that the bytes are inside the
// buffer: header reads happen only after `len - p >= kBlockSize`, payload reads only after the
// payload size has been compared with the bytes available.
#include "tar_index.h"

#include <cstring>
#include <limits>

namespace fastfeed::tar {
namespace {

constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();

// Header fields used here: (offset, length) in bytes inside the 512-byte header. The layout is
// shared by v7, ustar/pax and GNU headers for everything except `prefix`, which only ustar has
// (GNU keeps atime/ctime there).
constexpr std::size_t kNameOff = 0;
constexpr std::size_t kNameLen = 100;
constexpr std::size_t kSizeOff = 124;
constexpr std::size_t kSizeLen = 12;
constexpr std::size_t kChksumOff = 148;
constexpr std::size_t kChksumLen = 8;
constexpr std::size_t kTypeOff = 156;
constexpr std::size_t kMagicOff = 257;
constexpr std::size_t kPrefixOff = 345;
constexpr std::size_t kPrefixLen = 155;
// POSIX ustar magic "ustar\0" (the version "00" that follows is not checked). GNU headers carry
// "ustar  \0" instead, so this also tells GNU headers apart.
constexpr std::uint8_t kUstarMagic[6] = {'u', 's', 't', 'a', 'r', 0};

// Rounds a byte count up to whole blocks. Callers pass sizes < 2**63, so this cannot overflow.
std::uint64_t padded(std::uint64_t size) {
  return (size + (kBlockSize - 1)) & ~static_cast<std::uint64_t>(kBlockSize - 1);
}

// Length of the NUL-terminated string in f[0, n): n when there is no NUL.
std::size_t cstr_len(const std::uint8_t* f, std::size_t n) {
  const void* nul = std::memchr(f, 0, n);
  return nul == nullptr ? n : static_cast<std::size_t>(static_cast<const std::uint8_t*>(nul) - f);
}

bool all_zero(const std::uint8_t* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

// Parses a numeric header field f[0, n), n >= 2. Returns false when it is not a number or does
// not fit in int64.
//  * GNU base-256: f[0] == 0x80 (positive) or 0xff (negative, two's complement); the value is
//    big-endian in f[1, n).
//  * Otherwise octal ASCII: leading spaces, then octal digits, then NUL, space or the end of
//    the field; whatever follows that terminator is ignored. No digits at all reads as 0, like
//    Python's tarfile (an all-NUL field).
bool parse_number(const std::uint8_t* f, std::size_t n, std::int64_t& out) {
  if (f[0] == 0x80 || f[0] == 0xff) {
    // Accumulate the exact value, refusing any step that would leave the int64 range:
    // v * 256 + b stays in range iff v <= 2**55 - 1 (positive) or v >= -2**55 (negative).
    std::int64_t v = f[0] == 0x80 ? 0 : -1;
    for (std::size_t i = 1; i < n; ++i) {
      if (v > (kInt64Max >> 8) || v < -(std::int64_t{1} << 55)) return false;
      // Shift as unsigned: left-shifting a negative int64 is undefined before C++20.
      v = static_cast<std::int64_t>((static_cast<std::uint64_t>(v) << 8) | f[i]);
    }
    out = v;
    return true;
  }
  std::size_t i = 0;
  while (i < n && f[i] == ' ') ++i;
  std::int64_t v = 0;
  for (; i < n && f[i] >= '0' && f[i] <= '7'; ++i) {
    if (v > (kInt64Max >> 3)) return false;  // v * 8 + 7 would overflow
    v = v * 8 + (f[i] - '0');
  }
  if (i < n && f[i] != 0 && f[i] != ' ') return false;
  out = v;
  return true;
}

// What one pax extended header ('x'/'X') says about the member that follows it.
struct PaxInfo {
  bool has_path = false;
  Span path;  // relative to the payload start
  bool has_size = false;
  std::uint64_t size = 0;
};

bool keyword_is(const std::uint8_t* p, std::size_t n, const char* word) {
  const std::size_t w = std::strlen(word);
  return n == w && std::memcmp(p, word, w) == 0;
}

// Parses the pax records in p[0, n): "<len> <keyword>=<value>\n", where <len> (decimal, at
// most 20 digits) counts the whole record including itself and the newline. A NUL where a
// record should start ends the list (zero fill after the last record). For a global header
// ('g') the records are only validated. On error returns the kind and sets bad_at to the
// offset of the offending record inside the payload.
//
// Keywords used: "path" (the member name; trailing '/' stripped, as Python's tarfile does),
// "size" (the data size; must be decimal and fit in int64) and "GNU.sparse.*" (a sparse member,
// unsupported). An empty value deletes the keyword (POSIX), i.e. the header field applies.
ErrorKind parse_pax(const std::uint8_t* p, std::size_t n, bool global, PaxInfo& info,
                    std::size_t& bad_at) {
  std::size_t i = 0;
  while (i < n) {
    if (p[i] == 0) break;
    bad_at = i;
    std::size_t j = i;
    std::uint64_t length = 0;  // saturates at UINT64_MAX, which then fails the bounds check
    for (; j < n && j - i < 20 && p[j] >= '0' && p[j] <= '9'; ++j) {
      const auto digit = static_cast<std::uint64_t>(p[j] - '0');
      constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
      length = length > (kMax - 9) / 10 ? kMax : length * 10 + digit;
    }
    if (j == i || j >= n || p[j] != ' ') return ErrorKind::kBadPaxRecord;
    if (length < 5 || length > n - i) return ErrorKind::kBadPaxRecord;
    const std::size_t end = i + static_cast<std::size_t>(length);  // one past the '\n'
    const std::size_t kv = j + 1;
    if (kv >= end || p[end - 1] != '\n') return ErrorKind::kBadPaxRecord;
    const void* eq = std::memchr(p + kv, '=', end - 1 - kv);
    if (eq == nullptr) return ErrorKind::kBadPaxRecord;
    const auto e = static_cast<std::size_t>(static_cast<const std::uint8_t*>(eq) - p);
    if (e == kv) return ErrorKind::kBadPaxRecord;  // empty keyword
    const std::uint8_t* key = p + kv;
    const std::size_t key_len = e - kv;
    const std::size_t val_off = e + 1;
    const std::size_t val_len = end - 1 - val_off;
    if (!global) {
      if (keyword_is(key, key_len, "path")) {
        std::size_t vl = val_len;
        while (vl > 0 && p[val_off + vl - 1] == '/') --vl;
        info.has_path = val_len > 0;
        info.path = Span{val_off, vl};
      } else if (keyword_is(key, key_len, "size")) {
        info.has_size = val_len > 0;
        std::uint64_t v = 0;
        for (std::size_t k = val_off; k < val_off + val_len; ++k) {
          if (p[k] < '0' || p[k] > '9') return ErrorKind::kBadPaxSize;
          const auto digit = static_cast<std::uint64_t>(p[k] - '0');
          if (v > (static_cast<std::uint64_t>(kInt64Max) - digit) / 10) return ErrorKind::kBadPaxSize;
          v = v * 10 + digit;
        }
        info.size = v;
      } else if (key_len >= 11 && std::memcmp(key, "GNU.sparse.", 11) == 0) {
        return ErrorKind::kSparse;
      }
    }
    i = end;
  }
  return ErrorKind::kNone;
}

ScanResult fail(ErrorKind kind, std::size_t offset, std::int64_t a = 0, std::int64_t b = 0) {
  ScanResult r;
  r.next_pos = offset;
  r.need = offset;
  r.error = kind;
  r.err_offset = static_cast<std::int64_t>(offset);
  r.err_a = a;
  r.err_b = b;
  return r;
}

// A final scan's kTruncated* error, with the member's name when it is known.
ScanResult truncated(ErrorKind kind, std::size_t offset, std::uint64_t a, std::uint64_t b,
                     const Member* named) {
  ScanResult r = fail(kind, offset, static_cast<std::int64_t>(a), static_cast<std::int64_t>(b));
  if (named != nullptr) {
    r.err_has_name = true;
    r.err_prefix = named->prefix;
    r.err_name = named->name;
  }
  return r;
}

// The scan ran out of bytes; the member chain starting at `chain` is incomplete. Not an error
// unless the buffer is final and the unconsumed tail holds anything but zero bytes (a partial
// end-of-archive block, or none at all, is a clean end). Otherwise a stop that a resumed scan
// gets past once the buffer is `need` bytes long; `partial` names the regular member whose
// data it stopped in (nullptr: a header, an extension payload or another type of member).
ScanResult stop(const std::uint8_t* data, std::size_t len, std::size_t chain, bool final,
                ErrorKind kind, std::size_t offset, std::uint64_t a, std::uint64_t b,
                const Member* named, std::uint64_t need, const Member* partial) {
  if (final && !all_zero(data + chain, len - chain)) return truncated(kind, offset, a, b, named);
  ScanResult r;
  r.next_pos = chain;
  if (!final) {
    r.need = static_cast<std::size_t>(need);
    if (partial != nullptr) {
      r.partial = true;
      r.partial_prefix = partial->prefix;
      r.partial_name = partial->name;
    }
  } else {
    r.need = chain;
  }
  return r;
}

}  // namespace

ScanResult scan(const std::uint8_t* data, std::size_t len, std::size_t pos, bool final,
                std::uint64_t object_end, std::vector<Member>& out) {
  const MemberVisitor append = [](void* ctx, const Member& m, std::size_t) {
    static_cast<std::vector<Member>*>(ctx)->push_back(m);
    return true;
  };
  return scan_each(data, len, pos, final, object_end, append, &out);
}

ScanResult scan_each(const std::uint8_t* data, std::size_t len, std::size_t pos, bool final,
                     std::uint64_t object_end, MemberVisitor visit, void* ctx) {
  if (pos > len) pos = len;  // the binding rejects this; clamping keeps reads in bounds anyway
  if (object_end < len) object_end = len;  // likewise
  std::size_t p = pos;
  for (;;) {
    // One member: optional extension headers, then the member's own header.
    std::size_t chain = p;   // first header of this member (where a resumed scan restarts)
    bool in_chain = false;   // extension headers seen for this member
    Member pending;          // name supplied by GNU 'L' / pax "path", if has_name
    bool has_name = false;
    bool has_size = false;   // size supplied by pax "size"
    std::uint64_t size_override = 0;
    for (;;) {
      if (len - p < kBlockSize) {
        return stop(data, len, chain, final, ErrorKind::kTruncatedHeader, p, len - p, 0,
                    has_name ? &pending : nullptr, p + kBlockSize, nullptr);
      }
      const std::uint8_t* h = data + p;
      std::uint32_t raw_sum = 0;  // <= 512 * 255, no overflow
      for (std::size_t i = 0; i < kBlockSize; ++i) raw_sum += h[i];
      if (raw_sum == 0) {  // a zero block: end of archive
        if (in_chain) {
          return fail(ErrorKind::kDanglingExtension, p, static_cast<std::int64_t>(chain));
        }
        ScanResult r;
        r.next_pos = p;
        r.need = p;
        r.end = true;
        return r;
      }

      // Checksum: byte sum with the checksum field counted as 8 spaces, unsigned or signed
      // (some old tars summed signed chars), like Python's tarfile.
      std::int64_t stored = 0;
      if (!parse_number(h + kChksumOff, kChksumLen, stored)) {
        return fail(ErrorKind::kBadField, p, static_cast<std::int64_t>(kChksumOff));
      }
      std::uint32_t field_sum = 0;
      for (std::size_t i = kChksumOff; i < kChksumOff + kChksumLen; ++i) field_sum += h[i];
      const std::int64_t unsigned_sum = std::int64_t{raw_sum - field_sum} + 8 * ' ';
      if (stored != unsigned_sum) {
        std::int64_t signed_sum = 8 * ' ';
        for (std::size_t i = 0; i < kBlockSize; ++i) {
          if (i >= kChksumOff && i < kChksumOff + kChksumLen) continue;
          signed_sum += h[i] >= 128 ? std::int64_t{h[i]} - 256 : std::int64_t{h[i]};
        }
        if (stored != signed_sum) return fail(ErrorKind::kBadChecksum, p, stored, unsigned_sum);
      }

      std::int64_t header_size = 0;
      if (!parse_number(h + kSizeOff, kSizeLen, header_size) || header_size < 0) {
        return fail(ErrorKind::kBadField, p, static_cast<std::int64_t>(kSizeOff));
      }
      const auto size = static_cast<std::uint64_t>(header_size);
      const std::uint8_t type = h[kTypeOff];
      const std::size_t data_off = p + kBlockSize;
      const std::uint64_t avail = len - data_off;  // bytes after this header
      const std::uint64_t in_object = object_end - data_off;  // of which the object can hold

      if (type == 'x' || type == 'X' || type == 'g' || type == 'L' || type == 'K') {
        // Extension header: its payload (and padding) must be complete before we look at it.
        const std::uint64_t total = padded(size);
        if (!final && size > in_object) {
          return truncated(ErrorKind::kTruncatedExtension, p, in_object, size, nullptr);
        }
        if (!final && total > in_object) {
          return truncated(ErrorKind::kTruncatedExtension, p, size, size, nullptr);
        }
        if (size > avail) {
          return stop(data, len, chain, final, ErrorKind::kTruncatedExtension, p, avail, size,
                      nullptr, data_off + total, nullptr);
        }
        if (total > avail) {
          return stop(data, len, chain, final, ErrorKind::kTruncatedExtension, p, size, size,
                      nullptr, data_off + total, nullptr);
        }
        const auto n = static_cast<std::size_t>(size);
        const std::uint8_t* payload = data + data_off;
        // When several extension headers name the member, the first one wins (as in tarfile).
        if (type == 'L') {
          if (!has_name) {
            has_name = true;
            pending.name = Span{data_off, cstr_len(payload, n)};
          }
        } else if (type != 'K') {  // pax: 'x' / 'X' (Solaris) for the next member, 'g' global
          PaxInfo info;
          std::size_t bad_at = 0;
          const ErrorKind err = parse_pax(payload, n, type == 'g', info, bad_at);
          if (err == ErrorKind::kSparse) return fail(err, p);
          if (err != ErrorKind::kNone) return fail(err, p, static_cast<std::int64_t>(bad_at));
          if (info.has_path && !has_name) {
            has_name = true;
            pending.name = Span{data_off + info.path.off, info.path.len};
          }
          if (info.has_size && !has_size) {
            has_size = true;
            size_override = info.size;
          }
        }
        const std::size_t next = data_off + static_cast<std::size_t>(total);
        // A global header on its own is consumed like a member (its values are ignored);
        // inside a chain it is transparent.
        if (type == 'g' && !in_chain) {
          chain = next;
        } else {
          in_chain = true;
        }
        p = next;
        continue;
      }
      if (type == 'S') return fail(ErrorKind::kSparse, p);

      // The member's own header.
      const std::size_t header_name_len = cstr_len(h + kNameOff, kNameLen);
      // Old v7 archives mark directories as AREGTYPE ('\0') with a trailing slash (tarfile).
      const bool v7_dir = type == 0 && header_name_len > 0 && h[header_name_len - 1] == '/';
      const bool regular = type == '0' || type == '7' || (type == 0 && !v7_dir);
      // POSIX: hard links, symlinks, devices, directories and FIFOs carry no data whatever
      // their size field says (tarfile agrees). Unknown types are skipped by their size.
      const bool no_data = v7_dir || (type >= '1' && type <= '6');
      if (!has_name) {
        pending.name = Span{p + kNameOff, header_name_len};
        if (std::memcmp(h + kMagicOff, kUstarMagic, sizeof kUstarMagic) == 0) {
          pending.prefix = Span{p + kPrefixOff, cstr_len(h + kPrefixOff, kPrefixLen)};
        }
      }
      const std::uint64_t member_size = has_size ? size_override : size;
      const std::uint64_t data_len = no_data ? 0 : member_size;
      const std::uint64_t total = padded(data_len);
      // Padding cut off by the end of the object is accepted (see below), data is not.
      if (!final && data_len > in_object) {
        return truncated(ErrorKind::kTruncatedData, p, in_object, data_len, &pending);
      }
      if (data_len > avail) {
        return stop(data, len, chain, final, ErrorKind::kTruncatedData, p, avail, data_len,
                    &pending, data_off + total, regular ? &pending : nullptr);
      }
      std::size_t next = len;
      if (total <= avail) {
        next = data_off + static_cast<std::size_t>(total);
      } else if (!final) {
        // Data complete but padding not: wait for it (never an error since !final).
        return stop(data, len, chain, final, ErrorKind::kTruncatedData, p, data_len, data_len,
                    &pending, data_off + total, regular ? &pending : nullptr);
      }  // else final: the object ends inside the padding; accept and consume everything.
      if (regular) {
        pending.data_offset = data_off;
        pending.size = member_size;
        if (!visit(ctx, pending, chain)) {
          ScanResult r;
          r.next_pos = chain;
          r.need = chain;
          return r;
        }
      }
      p = next;
      break;
    }
  }
}

}  // namespace fastfeed::tar
