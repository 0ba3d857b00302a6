// WebDataset samples over a tar byte span: group the regular members found by tar::scan_each()
// into samples (consecutive members with the same key) without creating any Python object.
//
// Plain C++17, no Python and no torch: the Python binding lives in bindings.cpp. The reference
// implementation with the same semantics is scan_samples_py() in src/fastfeed/read/columnar.py
// (built on tario.scan_py and reader.split_key); the two are tested against each other and
// against reader.iter_samples, so change them together.
//
// Names are raw bytes here. Every rule of reader.split_key tests or splits at ASCII characters
// ('/', '.', '_', '\n'), and UTF-8 with surrogateescape (how the names are decoded) maps ASCII
// bytes to the same characters and never puts an ASCII byte inside a multi-byte character, so
// the byte rules below give exactly the split of the decoded name. Lower-casing is the one step
// that needs Python for non-ASCII text: scan() lowers ASCII letters only and the caller lowers
// the rest (see fill_fields).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tar_index.h"

namespace fastfeed::samples {

inline constexpr std::size_t kNoLimit = static_cast<std::size_t>(-1);
inline constexpr std::size_t kNone = static_cast<std::size_t>(-1);

// reader.split_key on the raw bytes of a member name: false for names WebDataset skips, else
// the key is name[0, key_len) and the extension (not lower-cased) name[key_len + 1, len).
bool split_key(const std::uint8_t* name, std::size_t len, std::size_t& key_len) noexcept;

// A member that belongs to a sample.
struct SampleMember {
  tar::Member member;     // name spans, data offset and size, as tar::scan reports them
  std::uint32_t ext = 0;  // extension id: index into SampleScan::exts
};

struct Sample {
  std::size_t chain = 0;  // offset of the first header of its first member (resume point)
  std::size_t first = 0;  // index of its first member in SampleScan::members
  // The key's bytes: key_prefix + "/" + key_name when key_prefix is non-empty (ustar prefix
  // field), else key_name; both are spans of the input.
  tar::Span key_prefix;
  tar::Span key_name;
};

struct SampleScan {
  // tar.error != kNone: the scan failed (see tar::ScanResult) and nothing below is meaningful.
  tar::ScanResult tar;
  // The sample members seen, in archive order, including those of an incomplete last sample
  // (which still count for duplicate checks).
  std::vector<SampleMember> members;
  // The samples seen; samples[0, complete) are complete, at most one more is not.
  std::vector<Sample> samples;
  std::size_t complete = 0;
  // Extensions by id, in order of first appearance, with ASCII letters lower-cased.
  std::vector<std::string> exts;
  // Offset of the first header of the first sample not returned (where the next scan resumes),
  // and whether the end-of-archive marker was reached.
  std::size_t next_pos = 0;
  bool end = false;
  // The tar scan's `need` (see tar::ScanResult): the buffer length a scan resumed at next_pos
  // needs to get further than this one; next_pos when it did not stop for lack of bytes.
  std::size_t need = 0;
};

// Groups the members of data[pos, len) into samples, as reader.iter_samples would group
// tar::scan(data, len, pos, final)'s members:
//
//  * a sample is complete once the first member of the next sample has been seen (its headers
//    are enough: a scan that stops inside the data of a regular member whose key differs
//    completes the sample before it), the end-of-archive marker is reached, or the buffer is
//    `final` and ends cleanly;
//  * the scan stops at the first member of sample max_samples + 1 (kNoLimit: no limit) without
//    reading past it; next_pos is then that member's first header;
//  * otherwise, if the buffer is not final, the last sample is incomplete and next_pos is its
//    first header; members that belong to no sample are consumed.
//
// Tar errors are reported as tar::scan reports them (they win over duplicate extensions,
// which fill_fields finds); `object_end` is tar::scan's. Throws only std::bad_alloc.
SampleScan scan(const std::uint8_t* data, std::size_t len, std::size_t pos, bool final,
                std::uint64_t object_end, std::size_t max_samples);

// Checks every sample for a repeated extension and writes the field spans of the complete
// samples.
//
// canon[e] (e < scan.exts.size()) is the id, < n_canon, of extension e after full lower-casing
// (different ASCII-lowered byte strings can lower to the same text); reserved[c] marks the
// canonical extensions "__key__" and "__url__", which every sample already has (in
// reader.iter_samples the sample dict holds them), so they are always duplicates. out[c] is
// null or an int64 array of 2 * scan.complete values, rows of (data_offset, size), that the
// caller has filled with (-1, 0); the rows of the samples that have the extension are written.
//
// Returns the index in scan.members of the first member (in archive order) whose canonical
// extension already occurs in its sample, or kNone. Writes nothing past that member.
std::size_t fill_fields(const SampleScan& scan, const std::uint32_t* canon,
                        const std::uint8_t* reserved, std::size_t n_canon,
                        std::int64_t* const* out);

}  // namespace fastfeed::samples
