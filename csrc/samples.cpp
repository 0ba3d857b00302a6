// WebDataset sample grouping; see samples.h for the contract and src/fastfeed/read/columnar.py
// (scan_samples_py) for the pure-Python twin.
#include "samples.h"

#include <cstring>
#include <unordered_map>

namespace fastfeed::samples {
namespace {

// Position of the first / last byte c in p[from, to), or kNone.
std::size_t find_first(const std::uint8_t* p, std::size_t from, std::size_t to, std::uint8_t c) {
  if (from >= to) return kNone;
  const void* hit = std::memchr(p + from, c, to - from);
  return hit == nullptr ? kNone : static_cast<std::size_t>(static_cast<const std::uint8_t*>(hit) - p);
}

std::size_t find_last(const std::uint8_t* p, std::size_t from, std::size_t to, std::uint8_t c) {
  for (std::size_t i = to; i > from; --i) {
    if (p[i - 1] == c) return i - 1;
  }
  return kNone;
}

bool is_dunder(const std::uint8_t* p) { return p[0] == '_' && p[1] == '_'; }

// Grouping state shared with the tar::scan_each visitor.
class Grouper {
 public:
  Grouper(const std::uint8_t* data, std::size_t max_samples, SampleScan& out)
      : data_(data), max_samples_(max_samples), out_(out) {}

  static bool visit(void* ctx, const tar::Member& m, std::size_t chain) {
    return static_cast<Grouper*>(ctx)->add(m, chain);
  }

  bool stopped() const { return stopped_; }

  // Whether the member named prefix + "/" + name (or name) starts a sample other than the last
  // one seen: it has a key, and not the last sample's.
  bool starts_new_sample(const tar::Span& prefix, const tar::Span& name) {
    std::size_t len = 0;
    const std::uint8_t* full = joined(prefix, name, len);
    std::size_t key_len = 0;
    if (!split_key(full, len, key_len)) return false;
    return out_.samples.empty() || key_.size() != key_len || std::memcmp(key_.data(), full, key_len) != 0;
  }

 private:
  // A member's name: contiguous in the input unless the ustar prefix field is set.
  const std::uint8_t* joined(const tar::Span& prefix, const tar::Span& name, std::size_t& len) {
    if (prefix.len == 0) {
      len = name.len;
      return data_ + name.off;
    }
    scratch_.assign(reinterpret_cast<const char*>(data_ + prefix.off), prefix.len);
    scratch_.push_back('/');
    scratch_.append(reinterpret_cast<const char*>(data_ + name.off), name.len);
    len = scratch_.size();
    return reinterpret_cast<const std::uint8_t*>(scratch_.data());
  }

  bool add(const tar::Member& m, std::size_t chain) {
    std::size_t len = 0;
    const std::uint8_t* name = joined(m.prefix, m.name, len);
    std::size_t key_len = 0;
    if (!split_key(name, len, key_len)) return true;  // not part of any sample: consumed

    if (out_.samples.empty() || key_.size() != key_len ||
        std::memcmp(key_.data(), name, key_len) != 0) {
      if (out_.samples.size() == max_samples_) {  // first member of sample max_samples + 1
        stopped_ = true;
        return false;
      }
      key_.assign(reinterpret_cast<const char*>(name), key_len);
      Sample s;
      s.chain = chain;
      s.first = out_.members.size();
      if (m.prefix.len == 0) {
        s.key_name = tar::Span{m.name.off, key_len};
      } else {
        // The key ends in the basename, after the '/' that joins prefix and name.
        s.key_prefix = m.prefix;
        s.key_name = tar::Span{m.name.off, key_len - m.prefix.len - 1};
      }
      out_.samples.push_back(s);
    }
    SampleMember sm;
    sm.member = m;
    sm.ext = intern(name + key_len + 1, len - key_len - 1);
    out_.members.push_back(sm);
    return true;
  }

  // The id of an extension, ASCII-lowered; new ones are numbered in order of appearance.
  std::uint32_t intern(const std::uint8_t* p, std::size_t n) {
    lowered_.assign(reinterpret_cast<const char*>(p), n);
    for (char& c : lowered_) {
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    }
    std::vector<std::string>& exts = out_.exts;
    // Samples repeat the same few extensions in the same order: guess the one after the last.
    const std::size_t guess = last_ext_ + 1 < exts.size() ? last_ext_ + 1 : 0;
    if (guess < exts.size() && exts[guess] == lowered_) return last_ext_ = static_cast<std::uint32_t>(guess);
    if (exts.size() <= kLinear) {
      for (std::size_t i = 0; i < exts.size(); ++i) {
        if (exts[i] == lowered_) return last_ext_ = static_cast<std::uint32_t>(i);
      }
    } else {
      const auto it = index_.find(lowered_);
      if (it != index_.end()) return last_ext_ = it->second;
    }
    const auto id = static_cast<std::uint32_t>(exts.size());
    exts.push_back(lowered_);
    if (exts.size() > kLinear) {
      if (index_.empty()) {
        for (std::size_t i = 0; i < exts.size(); ++i) index_.emplace(exts[i], static_cast<std::uint32_t>(i));
      } else {
        index_.emplace(lowered_, id);
      }
    }
    return last_ext_ = id;
  }

  static constexpr std::size_t kLinear = 16;  // extensions looked up linearly, then hashed

  const std::uint8_t* data_;
  std::size_t max_samples_;
  SampleScan& out_;
  bool stopped_ = false;
  std::string scratch_;  // a prefixed member name
  std::string key_;      // the key of the last sample
  std::string lowered_;
  std::uint32_t last_ext_ = 0;
  std::unordered_map<std::string, std::uint32_t> index_;
};

}  // namespace

// The rules of reader.split_key, on bytes (see samples.h for why that is exact):
//  1. skip a top-level "__*__": no '/', starts and ends with "__";
//  2. skip names matching re.match(r"__[^/]*__($|/)"); Python's '$' also matches before a
//     final '\n';
//  3. key/ext from re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$"). Whatever the regex engine tries
//     first, a match splits at the first dot d of the basename (the ext may not contain '/',
//     and the part of the key after the slash the `.*/` stops at has no dot). It exists iff
//     d > 0 and either the name has no dot before the basename (the empty alternative), or a
//     slash t lies between the last such dot D and d - 1 with no '\n' before t (`.` does not
//     match '\n'); the first slash after D is the best candidate.
bool split_key(const std::uint8_t* s, std::size_t n, std::size_t& key_len) noexcept {
  const std::size_t first_slash = find_first(s, 0, n, '/');
  if (first_slash == kNone && n >= 2 && is_dunder(s) && is_dunder(s + n - 2)) return false;  // 1.
  if (n >= 4 && is_dunder(s)) {                                                            // 2.
    const std::size_t c = first_slash == kNone ? n : first_slash;  // end of the first component
    if (c >= 4 && is_dunder(s + c - 2)) return false;
    if (c == n && n >= 5 && s[n - 1] == '\n' && is_dunder(s + n - 3)) return false;
  }
  const std::size_t last_slash = find_last(s, 0, n, '/');  // 3.
  const std::size_t base = last_slash == kNone ? 0 : last_slash + 1;
  const std::size_t d = find_first(s, base, n, '.');
  if (d == kNone || d == 0) return false;
  const std::size_t dot_before = find_last(s, 0, base, '.');
  if (dot_before != kNone) {
    const std::size_t t = find_first(s, dot_before + 1, n, '/');  // <= last_slash
    if (t + 1 >= d) return false;                                   // basename starts with '.'
    if (find_first(s, 0, t, '\n') != kNone) return false;
  }
  key_len = d;
  return true;
}

SampleScan scan(const std::uint8_t* data, std::size_t len, std::size_t pos, bool final,
                std::uint64_t object_end, std::size_t max_samples) {
  SampleScan out;
  Grouper grouper(data, max_samples, out);
  const tar::ScanResult r =
      tar::scan_each(data, len, pos, final, object_end, &Grouper::visit, &grouper);
  out.tar = r;
  if (r.error != tar::ErrorKind::kNone) return out;
  out.next_pos = r.next_pos;
  out.need = r.need;
  out.end = r.end;
  out.complete = out.samples.size();
  if (!grouper.stopped() && !r.end && !final && !out.samples.empty() &&
      !(r.partial && grouper.starts_new_sample(r.partial_prefix, r.partial_name))) {
    // Out of bytes: the last sample may have more members still to come.
    out.complete -= 1;
    out.next_pos = out.samples.back().chain;
  }
  return out;
}

std::size_t fill_fields(const SampleScan& scan, const std::uint32_t* canon,
                        const std::uint8_t* reserved, std::size_t n_canon,
                        std::int64_t* const* out) {
  // seen[c] == sample index + 1: canonical extension c already occurs in that sample (the
  // members of a sample are consecutive).
  std::vector<std::size_t> seen(n_canon, 0);
  const std::size_t n_samples = scan.samples.size();
  for (std::size_t s = 0; s < n_samples; ++s) {
    const std::size_t begin = scan.samples[s].first;
    const std::size_t end = s + 1 < n_samples ? scan.samples[s + 1].first : scan.members.size();
    for (std::size_t i = begin; i < end; ++i) {
      const SampleMember& m = scan.members[i];
      const std::uint32_t c = canon[m.ext];
      if (reserved[c] != 0 || seen[c] == s + 1) return i;
      seen[c] = s + 1;
      if (s < scan.complete && out[c] != nullptr) {
        out[c][2 * s] = static_cast<std::int64_t>(m.member.data_offset);
        out[c][2 * s + 1] = static_cast<std::int64_t>(m.member.size);
      }
    }
  }
  return kNone;
}

}  // namespace fastfeed::samples
