// fastfeed._native: the Python face of the tar indexer in tar_index.{h,cpp} and of the batch
// gather in gather.{h,cpp} (gather() below; its errors are plain Python exceptions, see there).
//
// The only file that sees Python. It never raises for a bad archive: scan() returns an error
// tuple (a numeric kind, see tar::ErrorKind) and src/fastfeed/read/tario.py turns it into
// CorruptShardError / TruncatedShardError, so no caller ever has to match message strings.
// Plain Python exceptions are raised only for caller bugs: TypeError / BufferError for an
// object without a contiguous buffer, ValueError for a `pos` outside the buffer.
#include <nanobind/nanobind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "crc32c.h"
#include "gather.h"
#include "samples.h"
#include "tar_index.h"

namespace nb = nanobind;
namespace tar = fastfeed::tar;
namespace gth = fastfeed::gather;
namespace smp = fastfeed::samples;

namespace {

// Holds a Py_buffer export for the duration of a scan. The export keeps the exporting object
// alive and its memory in place (a bytearray cannot be resized, an mmap cannot be closed while
// it exists), which is what makes it safe to read the bytes with the GIL released.
class BufferExport {
 public:
  explicit BufferExport(nb::handle obj) {
    // PyBUF_SIMPLE: contiguous bytes, read-only is fine. Non-contiguous exporters refuse.
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw nb::python_error();
  }
  ~BufferExport() { PyBuffer_Release(&view_); }  // runs with the GIL held (function scope)
  BufferExport(const BufferExport&) = delete;
  BufferExport& operator=(const BufferExport&) = delete;

  const std::uint8_t* data() const { return static_cast<const std::uint8_t*>(view_.buf); }
  std::size_t size() const { return static_cast<std::size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

// Raw name bytes of a member: prefix + "/" + name when the ustar prefix is set.
const char* name_bytes(const std::uint8_t* base, const tar::Span& prefix, const tar::Span& name,
                       std::string& scratch, std::size_t& len) {
  if (prefix.len == 0) {
    len = name.len;
    return reinterpret_cast<const char*>(base + name.off);
  }
  scratch.assign(reinterpret_cast<const char*>(base + prefix.off), prefix.len);
  scratch.push_back('/');
  scratch.append(reinterpret_cast<const char*>(base + name.off), name.len);
  len = scratch.size();
  return scratch.data();
}

// New reference, or nullptr with a Python error set.
PyObject* decode_name(const std::uint8_t* base, const tar::Member& m, std::string& scratch) {
  std::size_t len = 0;
  const char* p = name_bytes(base, m.prefix, m.name, scratch, len);
  // What Python's tarfile does on Linux: UTF-8, undecodable bytes as lone surrogates.
  return PyUnicode_DecodeUTF8(p, static_cast<Py_ssize_t>(len), "surrogateescape");
}

// Builds [(name, data_offset, size), ...] with the C API: one preallocated list, one tuple per
// member. A partially filled list or tuple is safe to drop (its NULL slots are skipped).
nb::object build_members(const std::uint8_t* base, const std::vector<tar::Member>& members) {
  nb::object list = nb::steal(PyList_New(static_cast<Py_ssize_t>(members.size())));
  if (!list.is_valid()) throw nb::python_error();
  std::string scratch;
  Py_ssize_t i = 0;
  for (const tar::Member& m : members) {
    nb::object item = nb::steal(PyTuple_New(3));
    if (!item.is_valid()) throw nb::python_error();
    PyObject* name = decode_name(base, m, scratch);
    if (name == nullptr) throw nb::python_error();
    PyTuple_SET_ITEM(item.ptr(), 0, name);
    PyObject* off = PyLong_FromUnsignedLongLong(m.data_offset);
    if (off == nullptr) throw nb::python_error();
    PyTuple_SET_ITEM(item.ptr(), 1, off);
    PyObject* size = PyLong_FromUnsignedLongLong(m.size);
    if (size == nullptr) throw nb::python_error();
    PyTuple_SET_ITEM(item.ptr(), 2, size);
    // A tuple of a str and two ints cannot be part of a reference cycle. Untracking it (what
    // CPython's GC would do on its first pass anyway) keeps tens of thousands of fresh tuples
    // from being traversed by every young-generation collection this loop triggers.
    PyObject_GC_UnTrack(item.ptr());
    PyList_SET_ITEM(list.ptr(), i++, item.release().ptr());
  }
  return list;
}

// A scan's `pos` argument: an index in 0..len(buf), else ValueError.
std::size_t scan_pos(nb::handle pos_obj, const BufferExport& view) {
  // Clamps instead of overflowing for huge ints, so that they fail the range check below.
  const Py_ssize_t pos = PyNumber_AsSsize_t(pos_obj.ptr(), nullptr);
  if (pos == -1 && PyErr_Occurred()) throw nb::python_error();
  if (pos < 0 || static_cast<std::size_t>(pos) > view.size()) {
    PyErr_Format(PyExc_ValueError, "pos=%zd is outside the buffer (0..%zu)", pos, view.size());
    throw nb::python_error();
  }
  return static_cast<std::size_t>(pos);
}

// A scan's `object_end` argument: -1 (unknown) or an offset >= len(buf), else ValueError.
std::uint64_t scan_object_end(std::int64_t object_end, const BufferExport& view) {
  if (object_end < 0) {
    if (object_end == -1) return tar::kUnknownEnd;
  } else if (static_cast<std::uint64_t>(object_end) >= view.size()) {
    return static_cast<std::uint64_t>(object_end);
  }
  PyErr_Format(PyExc_ValueError, "object_end=%lld is before the end of the buffer (%zu bytes)",
               static_cast<long long>(object_end), view.size());
  throw nb::python_error();
}

// The raw name bytes of the member a scan stopped inside (see tar::ScanResult::partial), or None.
nb::object partial_name(const std::uint8_t* base, const tar::ScanResult& r) {
  if (!r.partial) return nb::none();
  std::string scratch;
  std::size_t len = 0;
  const char* p = name_bytes(base, r.partial_prefix, r.partial_name, scratch, len);
  nb::object name = nb::steal(PyBytes_FromStringAndSize(p, static_cast<Py_ssize_t>(len)));
  if (!name.is_valid()) throw nb::python_error();
  return name;
}

// The error tuple (kind, offset, name: bytes | None, a, b) of a failed tar scan.
nb::tuple scan_error(const std::uint8_t* base, const tar::ScanResult& r) {
  nb::object name = nb::none();
  if (r.err_has_name) {
    std::string scratch;
    std::size_t len = 0;
    const char* p = name_bytes(base, r.err_prefix, r.err_name, scratch, len);
    name = nb::steal(PyBytes_FromStringAndSize(p, static_cast<Py_ssize_t>(len)));
    if (!name.is_valid()) throw nb::python_error();
  }
  return nb::make_tuple(static_cast<int>(r.error), r.err_offset, name, r.err_a, r.err_b);
}

// scan(buf, pos, final, object_end) -> (members, next_pos, end, error, need, partial)
// error is None or (kind, offset, name: bytes | None, a, b); see tar::ErrorKind. object_end:
// -1 when unknown. need: tar::ScanResult::need; partial: the raw name of the regular member
// the scan stopped inside, or None.
nb::tuple scan(nb::handle buf, nb::handle pos_obj, bool final, std::int64_t object_end_arg) {
  BufferExport view(buf);
  const std::size_t pos = scan_pos(pos_obj, view);
  const std::uint64_t object_end = scan_object_end(object_end_arg, view);

  std::vector<tar::Member> members;
  tar::ScanResult r;
  {
    nb::gil_scoped_release nogil;  // pure C++ over the exported bytes from here on
    r = tar::scan(view.data(), view.size(), pos, final, object_end, members);
  }

  if (r.error != tar::ErrorKind::kNone) {
    return nb::make_tuple(nb::list(), r.next_pos, false, scan_error(view.data(), r), r.next_pos,
                          nb::none());
  }
  return nb::make_tuple(build_members(view.data(), members), r.next_pos, r.end, nb::none(), r.need,
                        partial_name(view.data(), r));
}

// ---------------------------------------------------------------------------------------------
// scan_samples(): the binding of samples.{h,cpp}; the reference is scan_samples_py() in
// src/fastfeed/read/columnar.py.

// New reference to the text of raw name bytes, or nullptr with a Python error set.
PyObject* decode(const std::uint8_t* base, const tar::Span& prefix, const tar::Span& name,
                 std::string& scratch) {
  std::size_t len = 0;
  const char* p = name_bytes(base, prefix, name, scratch, len);
  return PyUnicode_DecodeUTF8(p, static_cast<Py_ssize_t>(len), "surrogateescape");
}

// scan_samples(buf, pos, final, max_samples, object_end)
//   -> (keys, fields, next_pos, end, error, duplicate, need)
// max_samples < 0: no limit; object_end: as scan(). fields: {ext: bytearray of int64
// (data_offset, size) rows, one per key}. error: as scan(); duplicate: None or (member name,
// key) of a repeated extension. On either, keys and fields are empty. need: SampleScan::need.
nb::tuple scan_samples(nb::handle buf, nb::handle pos_obj, bool final, std::int64_t max_samples,
                       std::int64_t object_end_arg) {
  BufferExport view(buf);
  const std::size_t pos = scan_pos(pos_obj, view);
  const std::size_t limit =
      max_samples < 0 ? smp::kNoLimit : static_cast<std::size_t>(max_samples);
  const std::uint64_t object_end = scan_object_end(object_end_arg, view);

  smp::SampleScan r;
  {
    nb::gil_scoped_release nogil;
    r = smp::scan(view.data(), view.size(), pos, final, object_end, limit);
  }
  if (r.tar.error != tar::ErrorKind::kNone) {
    return nb::make_tuple(nb::list(), nb::dict(), r.tar.next_pos, false,
                          scan_error(view.data(), r.tar), nb::none(), r.tar.next_pos);
  }

  // Canonical extensions: the ASCII-lowered bytes decoded, and lowered by Python's str.lower
  // when not ASCII (which may map several byte strings to one text).
  const std::size_t n_raw = r.exts.size();
  nb::list names;                  // canonical extension texts, by canonical id
  nb::dict ids;                    // text -> canonical id
  std::vector<std::uint32_t> canon(n_raw);
  std::vector<std::uint8_t> reserved;
  for (std::size_t e = 0; e < n_raw; ++e) {
    const std::string& raw = r.exts[e];
    nb::object text = nb::steal(
        PyUnicode_DecodeUTF8(raw.data(), static_cast<Py_ssize_t>(raw.size()), "surrogateescape"));
    if (!text.is_valid()) throw nb::python_error();
    if (!PyUnicode_IS_ASCII(text.ptr())) {
      text = nb::steal(PyObject_CallMethod(text.ptr(), "lower", nullptr));
      if (!text.is_valid()) throw nb::python_error();
    }
    PyObject* known = PyDict_GetItemWithError(ids.ptr(), text.ptr());  // borrowed
    if (known == nullptr && PyErr_Occurred()) throw nb::python_error();
    if (known != nullptr) {
      canon[e] = static_cast<std::uint32_t>(PyLong_AsUnsignedLong(known));
      continue;
    }
    canon[e] = static_cast<std::uint32_t>(reserved.size());
    ids[text] = canon[e];
    names.append(text);
    reserved.push_back(PyUnicode_CompareWithASCIIString(text.ptr(), "__key__") == 0 ||
                               PyUnicode_CompareWithASCIIString(text.ptr(), "__url__") == 0
                           ? 1
                           : 0);
  }
  const std::size_t n_canon = reserved.size();

  // One bytearray of (-1, 0) rows for each extension that a returned sample has.
  const std::size_t n = r.complete;
  const std::size_t n_members = n < r.samples.size() ? r.samples[n].first : r.members.size();
  std::vector<bool> present(n_canon, false);
  for (std::size_t i = 0; i < n_members; ++i) present[canon[r.members[i].ext]] = true;
  std::vector<nb::object> arrays(n_canon);
  std::vector<std::int64_t*> out(n_canon, nullptr);
  for (std::size_t c = 0; c < n_canon; ++c) {
    if (!present[c]) continue;
    arrays[c] = nb::steal(
        PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(n * 2 * sizeof(std::int64_t))));
    if (!arrays[c].is_valid()) throw nb::python_error();
    // bytearray storage comes from PyObject_Malloc: aligned for int64.
    auto* rows = reinterpret_cast<std::int64_t*>(PyByteArray_AS_STRING(arrays[c].ptr()));
    for (std::size_t i = 0; i < n; ++i) {
      rows[2 * i] = -1;
      rows[2 * i + 1] = 0;
    }
    out[c] = rows;
  }

  std::string scratch;
  const std::size_t dup = smp::fill_fields(r, canon.data(), reserved.data(), n_canon, out.data());
  if (dup != smp::kNone) {
    std::size_t s = 0;  // the sample of member `dup`
    while (s + 1 < r.samples.size() && r.samples[s + 1].first <= dup) ++s;
    const tar::Member& m = r.members[dup].member;
    nb::object name = nb::steal(decode(view.data(), m.prefix, m.name, scratch));
    if (!name.is_valid()) throw nb::python_error();
    nb::object key =
        nb::steal(decode(view.data(), r.samples[s].key_prefix, r.samples[s].key_name, scratch));
    if (!key.is_valid()) throw nb::python_error();
    return nb::make_tuple(nb::list(), nb::dict(), r.next_pos, false, nb::none(),
                          nb::make_tuple(name, key), r.next_pos);
  }

  nb::object keys = nb::steal(PyList_New(static_cast<Py_ssize_t>(n)));
  if (!keys.is_valid()) throw nb::python_error();
  for (std::size_t i = 0; i < n; ++i) {
    PyObject* key = decode(view.data(), r.samples[i].key_prefix, r.samples[i].key_name, scratch);
    if (key == nullptr) throw nb::python_error();
    PyList_SET_ITEM(keys.ptr(), static_cast<Py_ssize_t>(i), key);
  }
  nb::dict fields;
  for (std::size_t c = 0; c < n_canon; ++c) {
    if (present[c]) fields[names[c]] = arrays[c];
  }
  return nb::make_tuple(keys, fields, r.next_pos, r.end, nb::none(), nb::none(), r.need);
}

// ---------------------------------------------------------------------------------------------
// gather(): the binding of gather.{h,cpp}. Every check below has a twin, in the same order and
// with the same exception class and message, in gather_py() in src/fastfeed/batch/gather.py.

// Copies of at least this many bytes run with the GIL released. Below it the copy takes less
// than ~5 us, and giving the GIL away would only add a wait to get it back when other Python
// threads are busy.
constexpr std::size_t kReleaseGilBytes = std::size_t{64} << 10;

// The Py_buffer exports of one gather() call, released (with the GIL held) when it returns. An
// export keeps its object alive and its memory in place (a bytearray or numpy array cannot be
// resized, an mmap cannot be closed), which is what makes the copy safe without the GIL.
class Exports {
 public:
  // Room for exactly `capacity` exports, allocated once (a Py_buffer stays at the address its
  // exporter filled in until it is released) and not zeroed: with 10,000 sources that is
  // 800 KB nobody needs to touch twice.
  explicit Exports(std::size_t capacity) : views_(new Py_buffer[capacity]), capacity_(capacity) {}
  ~Exports() {
    for (std::size_t i = size_; i-- > 0;) PyBuffer_Release(&views_[i]);
  }
  Exports(const Exports&) = delete;
  Exports& operator=(const Exports&) = delete;

  // Exports obj with `flags`; nullptr with a Python error set on failure.
  Py_buffer* add(PyObject* obj, int flags) {
    if (size_ == capacity_) {  // cannot happen: the caller counted
      PyErr_SetString(PyExc_RuntimeError, "gather: more buffer exports than counted");
      return nullptr;
    }
    Py_buffer* v = &views_[size_];
    if (PyObject_GetBuffer(obj, v, flags) != 0) return nullptr;  // nothing to release
    ++size_;
    return v;
  }

 private:
  std::unique_ptr<Py_buffer[]> views_;
  std::size_t capacity_;
  std::size_t size_ = 0;
};

// type(obj).__name__ (for "must be ..., not 'name'" messages, as the reference writes them).
nb::object type_name(PyObject* obj) {
  nb::object name =
      nb::steal(PyObject_GetAttrString(reinterpret_cast<PyObject*>(Py_TYPE(obj)), "__name__"));
  if (!name.is_valid()) throw nb::python_error();
  return name;
}

// operator.index(obj), which must lie in lo..hi (else ValueError).
Py_ssize_t index_arg(nb::handle obj, const char* name, Py_ssize_t lo, Py_ssize_t hi) {
  nb::object idx = nb::steal(PyNumber_Index(obj.ptr()));
  if (!idx.is_valid()) throw nb::python_error();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(idx.ptr(), &overflow);
  if (overflow == 0 && v == -1 && PyErr_Occurred()) throw nb::python_error();
  if (overflow != 0 || v < lo || v > hi) {
    PyErr_Format(PyExc_ValueError, "%s must be in %zd..%zd, got %R", name, lo, hi, idx.ptr());
    throw nb::python_error();
  }
  return static_cast<Py_ssize_t>(v);
}

// The writable C-contiguous export of dst or offsets (`what`).
Py_buffer* export_writable(Exports& ex, PyObject* obj, const char* what, const char* kind) {
  if (!PyObject_CheckBuffer(obj)) {
    PyErr_Format(PyExc_TypeError, "%s must be a writable C-contiguous %sbuffer, not %R", what,
                 kind, type_name(obj).ptr());
    throw nb::python_error();
  }
  // PyBUF_FULL_RO: what memoryview() asks for, so that the accepted objects and the errors are
  // those of the reference.
  Py_buffer* v = ex.add(obj, PyBUF_FULL_RO);
  if (v == nullptr) throw nb::python_error();
  if (v->readonly) {
    PyErr_Format(PyExc_TypeError, "%s is read-only", what);
    throw nb::python_error();
  }
  if (!PyBuffer_IsContiguous(v, 'C')) {
    PyErr_Format(PyExc_BufferError, "%s is not C-contiguous", what);
    throw nb::python_error();
  }
  return v;
}

// Whether a buffer format describes native int64 values (numpy int64 is "l", array('q') "q").
bool is_int64_format(const char* fmt, Py_ssize_t itemsize) {
  if (itemsize != 8) return false;
  if (fmt == nullptr) return false;  // "B"
  const std::uint16_t probe = 1;
  const bool little = *reinterpret_cast<const unsigned char*>(&probe) == 1;
  if (*fmt == '@' || *fmt == '=' || *fmt == (little ? '<' : '>') || (!little && *fmt == '!')) ++fmt;
  return (fmt[0] == 'q' || fmt[0] == 'l' || fmt[0] == 'n') && fmt[1] == '\0';
}

// gather(dst, srcs, dst_offset, offsets, item_size, threads) -> bytes written
nb::object gather(nb::handle dst, nb::handle srcs, nb::handle dst_offset_obj,
                  nb::handle offsets_obj, nb::handle item_size_obj, nb::handle threads_obj) {
  const Py_ssize_t dst_offset = index_arg(dst_offset_obj, "dst_offset", 0, PY_SSIZE_T_MAX);
  const Py_ssize_t item_size =
      item_size_obj.is_none() ? -1 : index_arg(item_size_obj, "item_size", 0, PY_SSIZE_T_MAX);
  const Py_ssize_t threads =
      index_arg(threads_obj, "threads", 1, static_cast<Py_ssize_t>(gth::kMaxThreads));

  // A tuple of the sources (the same object for a tuple): the list can no longer change
  // under us, and the tuple keeps every source alive, which is all a bytes object needs.
  nb::object seq = nb::steal(PySequence_Tuple(srcs.ptr()));
  if (!seq.is_valid()) throw nb::python_error();
  const Py_ssize_t n = PyTuple_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());  // the tuple's item array

  std::size_t n_exports = offsets_obj.is_none() ? 1 : 2;  // dst (and offsets)
  for (Py_ssize_t i = 0; i < n; ++i) n_exports += PyBytes_CheckExact(items[i]) ? 0 : 1;
  Exports ex(n_exports);

  Py_buffer* dv = export_writable(ex, dst.ptr(), "dst", "");

  std::vector<gth::Piece> pieces(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = items[i];
    gth::Piece& p = pieces[static_cast<std::size_t>(i)];
    if (PyBytes_CheckExact(obj)) {  // immutable: the tuple's reference is enough
      p.data = reinterpret_cast<const std::uint8_t*>(PyBytes_AS_STRING(obj));
      p.len = static_cast<std::size_t>(PyBytes_GET_SIZE(obj));
    } else {
      if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "srcs[%zd] must be a C-contiguous buffer, not %R", i,
                     type_name(obj).ptr());
        throw nb::python_error();
      }
      // A plain contiguous export first: about half the cost of a formatted one for a numpy
      // array. An exporter that refuses it gets memoryview()'s request, whose error (or
      // non-contiguous view) is what the reference reports; one that serves it but refuses
      // memoryview() (a numpy datetime64 array) is served in the reference by b"".join,
      // which makes the same plain request.
      Py_buffer* v = ex.add(obj, PyBUF_SIMPLE);
      if (v == nullptr) {
        PyErr_Clear();
        v = ex.add(obj, PyBUF_FULL_RO);
        if (v == nullptr) throw nb::python_error();
        if (!PyBuffer_IsContiguous(v, 'C')) {
          PyErr_Format(PyExc_BufferError, "srcs[%zd] is not C-contiguous", i);
          throw nb::python_error();
        }
      }
      p.data = static_cast<const std::uint8_t*>(v->buf);
      p.len = static_cast<std::size_t>(v->len);
    }
    if (item_size >= 0 && p.len != static_cast<std::size_t>(item_size)) {
      PyErr_Format(PyExc_ValueError, "srcs[%zd] has %zu bytes, expected item_size=%zd", i, p.len,
                   item_size);
      throw nb::python_error();
    }
  }

  std::uint8_t* offsets = nullptr;
  std::size_t offsets_len = 0;
  if (!offsets_obj.is_none()) {
    Py_buffer* ov = export_writable(ex, offsets_obj.ptr(), "offsets", "int64 ");
    if (!is_int64_format(ov->format, ov->itemsize)) {
      PyErr_Format(PyExc_TypeError, "offsets must hold int64 values, got format %R with itemsize %zd",
                   nb::str(ov->format != nullptr ? ov->format : "B").ptr(), ov->itemsize);
      throw nb::python_error();
    }
    offsets = static_cast<std::uint8_t*>(ov->buf);
    offsets_len = static_cast<std::size_t>(ov->len);
    const std::size_t have = offsets_len / sizeof(std::int64_t);
    if (have <= static_cast<std::size_t>(n)) {
      PyErr_Format(PyExc_ValueError,
                   "offsets has %zu elements, needs at least %zd (len(srcs) + 1)", have, n + 1);
      throw nb::python_error();
    }
  }

  auto* out = static_cast<std::uint8_t*>(dv->buf);
  const auto dst_len = static_cast<std::size_t>(dv->len);
  const auto max_total = static_cast<std::size_t>(PY_SSIZE_T_MAX);
  const auto nthreads = static_cast<unsigned>(threads);
  const auto off = static_cast<std::size_t>(dst_offset);
  gth::Result r = gth::total_size(pieces.data(), pieces.size(), max_total);
  if (r.status == gth::Status::kOk && r.total >= kReleaseGilBytes) {
    nb::gil_scoped_release nogil;  // every pointer above stays valid: the exports pin them
    r = gth::gather(out, dst_len, off, pieces.data(), pieces.size(), offsets, offsets_len,
                    max_total, nthreads);
  } else if (r.status == gth::Status::kOk) {
    r = gth::gather(out, dst_len, off, pieces.data(), pieces.size(), offsets, offsets_len,
                    max_total, nthreads);
  }

  switch (r.status) {
    case gth::Status::kOk:
      return nb::steal(PyLong_FromSize_t(r.total));
    case gth::Status::kTooLarge:
      PyErr_SetString(PyExc_ValueError, "the sources add up to more than sys.maxsize bytes");
      break;
    case gth::Status::kDstTooSmall:
      // dst_offset + total <= 2 * PY_SSIZE_T_MAX: fits in size_t.
      PyErr_Format(PyExc_ValueError,
                   "dst too small: needs %zu bytes (dst_offset %zd + %zu from %zd sources), has %zu",
                   off + r.total, dst_offset, r.total, n, dst_len);
      break;
    case gth::Status::kOffsetsTooShort:  // checked above
      PyErr_SetString(PyExc_ValueError, "offsets too short");
      break;
  }
  throw nb::python_error();
}

// ---------------------------------------------------------------------------------------------
// gather_spans(): the columnar gather, on the same core as gather(). Every check below has a
// twin, in the same order and with the same exception class and message, in gather_spans_py()
// in src/fastfeed/read/columnar.py.

// The C-contiguous export of src or spans (`what`), read-only allowed.
Py_buffer* export_readable(Exports& ex, PyObject* obj, const char* what, const char* kind) {
  if (!PyObject_CheckBuffer(obj)) {
    PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous %sbuffer, not %R", what, kind,
                 type_name(obj).ptr());
    throw nb::python_error();
  }
  Py_buffer* v = ex.add(obj, PyBUF_FULL_RO);  // what memoryview() asks for
  if (v == nullptr) throw nb::python_error();
  if (!PyBuffer_IsContiguous(v, 'C')) {
    PyErr_Format(PyExc_BufferError, "%s is not C-contiguous", what);
    throw nb::python_error();
  }
  return v;
}

// gather_spans(dst, src, spans, dst_offset, offsets) -> bytes written
nb::object gather_spans(nb::handle dst, nb::handle src, nb::handle spans_obj,
                        nb::handle dst_offset_obj, nb::handle offsets_obj) {
  const Py_ssize_t dst_offset = index_arg(dst_offset_obj, "dst_offset", 0, PY_SSIZE_T_MAX);
  Exports ex(offsets_obj.is_none() ? 3 : 4);
  Py_buffer* dv = export_writable(ex, dst.ptr(), "dst", "");
  Py_buffer* sv = export_readable(ex, src.ptr(), "src", "");
  Py_buffer* pv = export_readable(ex, spans_obj.ptr(), "spans", "int64 ");
  if (!is_int64_format(pv->format, pv->itemsize)) {
    PyErr_Format(PyExc_TypeError, "spans must hold int64 values, got format %R with itemsize %zd",
                 nb::str(pv->format != nullptr ? pv->format : "B").ptr(), pv->itemsize);
    throw nb::python_error();
  }
  if (pv->ndim != 2 || pv->shape[1] != 2) {
    nb::list shape;
    for (int d = 0; d < pv->ndim; ++d) shape.append(pv->shape[d]);
    PyErr_Format(PyExc_ValueError, "spans must have shape [n, 2], got %R", nb::tuple(shape).ptr());
    throw nb::python_error();
  }
  const Py_ssize_t n = pv->shape[0];

  std::uint8_t* offsets = nullptr;
  std::size_t offsets_len = 0;
  if (!offsets_obj.is_none()) {
    Py_buffer* ov = export_writable(ex, offsets_obj.ptr(), "offsets", "int64 ");
    if (!is_int64_format(ov->format, ov->itemsize)) {
      PyErr_Format(PyExc_TypeError, "offsets must hold int64 values, got format %R with itemsize %zd",
                   nb::str(ov->format != nullptr ? ov->format : "B").ptr(), ov->itemsize);
      throw nb::python_error();
    }
    offsets = static_cast<std::uint8_t*>(ov->buf);
    offsets_len = static_cast<std::size_t>(ov->len);
    const std::size_t have = offsets_len / sizeof(std::int64_t);
    if (have <= static_cast<std::size_t>(n)) {
      PyErr_Format(PyExc_ValueError,
                   "offsets has %zu elements, needs at least %zd (len(spans) + 1)", have, n + 1);
      throw nb::python_error();
    }
  }

  // Every span inside src: (-1, 0) is an empty row, otherwise 0 <= off, 0 <= size and
  // off + size <= len(src).
  const auto* base = static_cast<const std::uint8_t*>(sv->buf);
  const auto src_len = static_cast<std::int64_t>(sv->len);
  const auto* rows = static_cast<const std::uint8_t*>(pv->buf);
  std::vector<gth::Piece> pieces(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    std::int64_t span[2];
    std::memcpy(span, rows + static_cast<std::size_t>(i) * sizeof span, sizeof span);  // any alignment
    const std::int64_t off = span[0];
    const std::int64_t size = span[1];
    gth::Piece& p = pieces[static_cast<std::size_t>(i)];
    if (off == -1 && size == 0) continue;  // a sample without this field
    if (off < 0 || size < 0 || off > src_len || size > src_len - off) {
      PyErr_Format(PyExc_ValueError, "spans[%zd] = (%lld, %lld) is outside src (%lld bytes)", i,
                   static_cast<long long>(off), static_cast<long long>(size),
                   static_cast<long long>(src_len));
      throw nb::python_error();
    }
    p.data = base + off;
    p.len = static_cast<std::size_t>(size);
  }

  auto* out = static_cast<std::uint8_t*>(dv->buf);
  const auto dst_len = static_cast<std::size_t>(dv->len);
  const auto max_total = static_cast<std::size_t>(PY_SSIZE_T_MAX);
  const auto off = static_cast<std::size_t>(dst_offset);
  gth::Result r = gth::total_size(pieces.data(), pieces.size(), max_total);
  if (r.status == gth::Status::kOk && r.total >= kReleaseGilBytes) {
    nb::gil_scoped_release nogil;  // every pointer above stays valid: the exports pin them
    r = gth::gather(out, dst_len, off, pieces.data(), pieces.size(), offsets, offsets_len,
                    max_total, 1);
  } else if (r.status == gth::Status::kOk) {
    r = gth::gather(out, dst_len, off, pieces.data(), pieces.size(), offsets, offsets_len,
                    max_total, 1);
  }

  switch (r.status) {
    case gth::Status::kOk:
      return nb::steal(PyLong_FromSize_t(r.total));
    case gth::Status::kTooLarge:
      PyErr_SetString(PyExc_ValueError, "the spans add up to more than sys.maxsize bytes");
      break;
    case gth::Status::kDstTooSmall:
      PyErr_Format(PyExc_ValueError,
                   "dst too small: needs %zu bytes (dst_offset %zd + %zu from %zd spans), has %zu",
                   off + r.total, dst_offset, r.total, n, dst_len);
      break;
    case gth::Status::kOffsetsTooShort:  // checked above
      PyErr_SetString(PyExc_ValueError, "offsets too short");
      break;
  }
  throw nb::python_error();
}

// ---------------------------------------------------------------------------------------------
// parse_ints(): WebDataset's small ASCII integer fields (.cls, .idx, ...) of a whole batch at
// once. Twin: RaggedBytes._to_ints_py() in src/fastfeed/batch/assemble.py (the tests compare them).

bool is_space(std::uint8_t c) { return c == ' ' || (c >= 9 && c <= 13); }

// One item: optional spaces, an optional sign, 1 to 18 digits, optional spaces.
bool parse_one(const std::uint8_t* p, std::int64_t len, std::int64_t& value) {
  std::int64_t i = 0;
  while (i < len && is_space(p[i])) ++i;
  bool negative = false;
  if (i < len && (p[i] == '-' || p[i] == '+')) negative = p[i++] == '-';
  const std::int64_t first = i;
  std::int64_t v = 0;
  while (i < len && p[i] >= '0' && p[i] <= '9' && i - first < 18) v = v * 10 + (p[i++] - '0');
  if (i == first) return false;
  while (i < len && is_space(p[i])) ++i;
  if (i != len) return false;
  value = negative ? -v : v;
  return true;
}

// parse_ints(data, offsets, out) -> index of the first item that is not an integer, or -1
Py_ssize_t parse_ints(nb::handle data_obj, nb::handle offsets_obj, nb::handle out_obj) {
  Exports ex(3);
  Py_buffer* dv = export_readable(ex, data_obj.ptr(), "data", "");
  Py_buffer* ov = export_readable(ex, offsets_obj.ptr(), "offsets", "int64 ");
  Py_buffer* outv = export_writable(ex, out_obj.ptr(), "out", "int64 ");
  if (!is_int64_format(ov->format, ov->itemsize) || !is_int64_format(outv->format, outv->itemsize)) {
    PyErr_SetString(PyExc_TypeError, "offsets and out must hold int64 values");
    throw nb::python_error();
  }
  const Py_ssize_t n = ov->len / 8 - 1;
  if (n < 0 || outv->len / 8 < n) {
    PyErr_Format(PyExc_ValueError, "out has %zd elements, needs %zd", outv->len / 8, n);
    throw nb::python_error();
  }
  const auto* base = static_cast<const std::uint8_t*>(dv->buf);
  const auto data_len = static_cast<std::int64_t>(dv->len);
  const auto* offs = static_cast<const std::uint8_t*>(ov->buf);
  auto* out = static_cast<std::uint8_t*>(outv->buf);
  Py_ssize_t bad = -1;
  {
    nb::gil_scoped_release nogil;  // the exports pin every buffer
    std::int64_t lo = 0;
    std::memcpy(&lo, offs, 8);
    for (Py_ssize_t i = 0; i < n && bad < 0; ++i) {
      std::int64_t hi = 0;
      std::memcpy(&hi, offs + (i + 1) * 8, 8);
      std::int64_t value = 0;
      if (lo < 0 || hi < lo || hi > data_len || !parse_one(base + lo, hi - lo, value)) {
        bad = i;
      } else {
        std::memcpy(out + i * 8, &value, 8);
      }
      lo = hi;
    }
  }
  return bad;
}

// crc32c(buf, value) -> the CRC32C of buf continuing from value (GIL released).
std::uint32_t crc32c(nb::handle buf, std::uint32_t value, bool portable) {
  BufferExport view(buf);
  nb::gil_scoped_release nogil;
  return portable ? crc::extend_portable(value, view.data(), view.size())
                  : crc::extend(value, view.data(), view.size());
}

// crc32c_chunks(buf, chunk) -> [CRC32C of each `chunk` bytes of buf] (the last piece may be
// shorter), all with the GIL released once: a thread checking a cache entry's chunks does not
// wait for the GIL between them while another thread runs Python.
nb::object crc32c_chunks(nb::handle buf, Py_ssize_t chunk) {
  if (chunk <= 0) {
    PyErr_Format(PyExc_ValueError, "chunk=%zd must be > 0", chunk);
    throw nb::python_error();
  }
  BufferExport view(buf);
  const auto step = static_cast<std::size_t>(chunk);
  std::vector<std::uint32_t> crcs((view.size() + step - 1) / step);
  {
    nb::gil_scoped_release nogil;
    for (std::size_t i = 0; i < crcs.size(); ++i) {
      const std::size_t lo = i * step;
      crcs[i] = crc::extend(0, view.data() + lo, std::min(step, view.size() - lo));
    }
  }
  nb::object list = nb::steal(PyList_New(static_cast<Py_ssize_t>(crcs.size())));
  if (!list.is_valid()) throw nb::python_error();
  for (std::size_t i = 0; i < crcs.size(); ++i) {
    PyObject* value = PyLong_FromUnsignedLong(crcs[i]);
    if (value == nullptr) throw nb::python_error();
    PyList_SET_ITEM(list.ptr(), static_cast<Py_ssize_t>(i), value);
  }
  return list;
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "Native tar member indexing for fastfeed; use fastfeed.read.tario, not this module.";
  m.def("scan", &scan, nb::arg("buf"), nb::arg("pos"), nb::arg("final"), nb::arg("object_end") = -1,
        "scan(buf, pos, final, object_end=-1) -> (members, next_pos, end, error, need, partial)\n\n"
        "Index the tar members in buf[pos:] (any contiguous buffer) with the GIL released.\n"
        "members: [(name, data_offset, size)] of complete regular files; error: None or\n"
        "(kind, offset, name_bytes_or_None, a, b), kind as in ERROR_KINDS; need: the buffer\n"
        "length a resumed scan needs to get further; partial: None or the raw name of the\n"
        "regular member the scan stopped inside. object_end: where the object ends (-1: unknown).");

  nb::dict kinds;
  kinds["BAD_CHECKSUM"] = static_cast<int>(tar::ErrorKind::kBadChecksum);
  kinds["BAD_FIELD"] = static_cast<int>(tar::ErrorKind::kBadField);
  kinds["BAD_PAX_RECORD"] = static_cast<int>(tar::ErrorKind::kBadPaxRecord);
  kinds["BAD_PAX_SIZE"] = static_cast<int>(tar::ErrorKind::kBadPaxSize);
  kinds["SPARSE"] = static_cast<int>(tar::ErrorKind::kSparse);
  kinds["DANGLING_EXTENSION"] = static_cast<int>(tar::ErrorKind::kDanglingExtension);
  kinds["TRUNCATED_HEADER"] = static_cast<int>(tar::ErrorKind::kTruncatedHeader);
  kinds["TRUNCATED_EXTENSION"] = static_cast<int>(tar::ErrorKind::kTruncatedExtension);
  kinds["TRUNCATED_DATA"] = static_cast<int>(tar::ErrorKind::kTruncatedData);
  m.attr("ERROR_KINDS") = kinds;

  m.def("gather", &gather, nb::arg("dst").none(), nb::arg("srcs").none(), nb::arg("dst_offset").none(),
        nb::arg("offsets").none(), nb::arg("item_size").none(), nb::arg("threads").none(),
        "gather(dst, srcs, dst_offset, offsets, item_size, threads) -> bytes written\n\n"
        "Copy the C-contiguous buffers srcs back to back into the writable buffer dst at\n"
        "byte dst_offset (GIL released for large copies); use fastfeed.batch.gather.gather.");
  m.attr("GATHER_MAX_THREADS") = gth::kMaxThreads;

  m.def("scan_samples", &scan_samples, nb::arg("buf"), nb::arg("pos"), nb::arg("final"),
        nb::arg("max_samples"), nb::arg("object_end") = -1,
        "scan_samples(buf, pos, final, max_samples, object_end=-1) -> (keys, fields, next_pos,\n"
        "end, error, duplicate, need)\n\n"
        "Group the tar members in buf[pos:] into WebDataset samples (the tar scan runs with the\n"
        "GIL released); max_samples < 0: no limit. Use fastfeed.read.columnar.scan_samples.");
  m.def("parse_ints", &parse_ints, nb::arg("data").none(), nb::arg("offsets").none(),
        nb::arg("out").none(),
        "parse_ints(data, offsets, out) -> index of the first non-integer item, or -1\n\n"
        "Parse each data[offsets[i]:offsets[i + 1]] as an ASCII integer into int64 out[i]\n"
        "(GIL released); use fastfeed.batch.assemble.RaggedBytes.to_ints.");
  m.def("gather_spans", &gather_spans, nb::arg("dst").none(), nb::arg("src").none(),
        nb::arg("spans").none(), nb::arg("dst_offset").none(), nb::arg("offsets").none(),
        "gather_spans(dst, src, spans, dst_offset, offsets) -> bytes written\n\n"
        "Copy src[off:off + size] for each int64 row (off, size) of spans back to back into\n"
        "dst at byte dst_offset; use fastfeed.read.columnar.gather_spans.");
  m.def("crc32c", &crc32c, nb::arg("buf"), nb::arg("value") = 0, nb::arg("portable") = false,
        "crc32c(buf, value=0, portable=False) -> int\n\n"
        "The CRC32C (Castagnoli) of buf, continuing from value (GIL released; the CPU's CRC32\n"
        "instruction where it has one, unless portable).");
  m.def("crc32c_chunks", &crc32c_chunks, nb::arg("buf"), nb::arg("chunk"),
        "crc32c_chunks(buf, chunk) -> list[int]\n\n"
        "The CRC32C of each `chunk` bytes of buf (the last piece may be shorter), computed with\n"
        "the GIL released once.");
  m.attr("CRC32C_HARDWARE") = crc::hardware();
}
