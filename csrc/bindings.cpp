// fastfeed._native: the Python face of the tar indexer in tar_index.{h,cpp}.
//
// The only file that sees Python. It never raises for a bad archive: scan() returns an error
// tuple (a numeric kind, see tar::ErrorKind) and src/fastfeed/tario.py turns it into
// CorruptShardError / TruncatedShardError, so no caller ever has to match message strings.
// Plain Python exceptions are raised only for caller bugs: TypeError / BufferError for an
// object without a contiguous buffer, ValueError for a `pos` outside the buffer.
#include <nanobind/nanobind.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tar_index.h"

namespace nb = nanobind;
namespace tar = fastfeed::tar;

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

// scan(buf, pos, final) -> (members, next_pos, end, error)
// error is None or (kind, offset, name: bytes | None, a, b); see tar::ErrorKind.
nb::tuple scan(nb::handle buf, nb::handle pos_obj, bool final) {
  BufferExport view(buf);
  // Clamps instead of overflowing for huge ints, so that they fail the range check below.
  const Py_ssize_t pos = PyNumber_AsSsize_t(pos_obj.ptr(), nullptr);
  if (pos == -1 && PyErr_Occurred()) throw nb::python_error();
  if (pos < 0 || static_cast<std::size_t>(pos) > view.size()) {
    PyErr_Format(PyExc_ValueError, "pos=%zd is outside the buffer (0..%zu)", pos, view.size());
    throw nb::python_error();
  }

  std::vector<tar::Member> members;
  tar::ScanResult r;
  {
    nb::gil_scoped_release nogil;  // pure C++ over the exported bytes from here on
    r = tar::scan(view.data(), view.size(), static_cast<std::size_t>(pos), final, members);
  }

  if (r.error != tar::ErrorKind::kNone) {
    nb::object name = nb::none();
    if (r.err_has_name) {
      std::string scratch;
      std::size_t len = 0;
      const char* p = name_bytes(view.data(), r.err_prefix, r.err_name, scratch, len);
      name = nb::steal(PyBytes_FromStringAndSize(p, static_cast<Py_ssize_t>(len)));
      if (!name.is_valid()) throw nb::python_error();
    }
    nb::tuple err = nb::make_tuple(static_cast<int>(r.error), r.err_offset, name, r.err_a, r.err_b);
    return nb::make_tuple(nb::list(), r.next_pos, false, err);
  }
  return nb::make_tuple(build_members(view.data(), members), r.next_pos, r.end, nb::none());
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "Native tar member indexing for fastfeed; use fastfeed.tario, not this module.";
  m.def("scan", &scan, nb::arg("buf"), nb::arg("pos"), nb::arg("final"),
        "scan(buf, pos, final) -> (members, next_pos, end, error)\n\n"
        "Index the tar members in buf[pos:] (any contiguous buffer) with the GIL released.\n"
        "members: [(name, data_offset, size)] of complete regular files; error: None or\n"
        "(kind, offset, name_bytes_or_None, a, b), kind as in ERROR_KINDS.");

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
}
