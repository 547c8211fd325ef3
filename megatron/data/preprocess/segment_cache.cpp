// C++ hot path of megatron/data/preprocess/piece_cache.py, built as `_segment_cache` by
// setup.py: segment cutting, one segment -> ids cache, and the flat id array of a batch.
//
// A text is cut before every ' ' whose next code point is not whitespace by Python's
// str.isspace (why each cut is a GPT-2 pre-token boundary: piece_cache.split_segments), so a
// segment's ids depend on its bytes only and the cache is keyed by them (the leading ' '
// included). Known segments are copied from the cache; a batch's new ones go to a Python
// callable (the exact GPT-2 tokenizer) in few calls and are cut apart by token byte lengths.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace py = pybind11;

namespace {

// Python's str.isspace, as a code point set (the tests compare it over every code point).
bool is_space(uint32_t cp) {
  if (cp < 0x80) return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20);
  return cp == 0x85 || cp == 0xa0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f || cp == 0x3000;
}

// The code point starting at p (valid UTF-8 from PyUnicode_AsUTF8AndSize, at least 1 byte).
uint32_t decode_utf8(const unsigned char* p) {
  if (p[0] < 0x80) return p[0];
  if (p[0] < 0xe0) return ((p[0] & 0x1fu) << 6) | (p[1] & 0x3fu);
  if (p[0] < 0xf0) return ((p[0] & 0x0fu) << 12) | ((p[1] & 0x3fu) << 6) | (p[2] & 0x3fu);
  return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3fu) << 12) | ((p[2] & 0x3fu) << 6) |
         (p[3] & 0x3fu);
}

// Calls f(begin, end) for each segment of s[0, n) in order; the first one may be empty.
template <typename F>
void for_each_segment(const char* s, size_t n, F&& f) {
  const auto* u = reinterpret_cast<const unsigned char*>(s);
  size_t start = 0;
  for (size_t i = 0; i + 1 < n; ++i) {
    const void* hit = std::memchr(s + i, ' ', n - 1 - i);   // a ' ' with a code point after
    if (hit == nullptr) break;
    i = static_cast<const char*>(hit) - s;
    if (!is_space(decode_utf8(u + i + 1))) {
      f(start, i);
      start = i;
    }
  }
  f(start, n);
}

py::str decode(std::string_view utf8) {
  PyObject* s = PyUnicode_DecodeUTF8(utf8.data(), static_cast<Py_ssize_t>(utf8.size()), "strict");
  if (s == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(s);
}

std::string_view utf8_of(PyObject* text, size_t index) {
  if (!PyUnicode_Check(text))
    throw py::type_error("text " + std::to_string(index) + " is not a str");
  Py_ssize_t n = 0;
  const char* s = PyUnicode_AsUTF8AndSize(text, &n);
  if (s == nullptr) {
    PyErr_Clear();
    throw py::value_error("text " + std::to_string(index) +
                          " is not valid Unicode (a lone surrogate?); it cannot be tokenized");
  }
  return {s, static_cast<size_t>(n)};
}

// Records in one growing array of 32-bit words: [key bytes][value][key, padded][ids].
// Offsets (not pointers) name them, so growing the array invalidates nothing.
class Records {
 public:
  uint64_t add(std::string_view key, uint32_t value, const int32_t* ids = nullptr,
               size_t n_ids = 0) {
    if (key.size() >= UINT32_MAX) throw py::value_error("a segment of 4 GiB or more");
    uint64_t at = words_.size();
    size_t key_words = (key.size() + 3) / 4;
    words_.resize(at + 2 + key_words + n_ids);
    words_[at] = static_cast<uint32_t>(key.size());
    words_[at + 1] = value;
    std::memcpy(&words_[at + 2], key.data(), key.size());
    if (n_ids) std::memcpy(&words_[at + 2 + key_words], ids, n_ids * sizeof(int32_t));
    return at;
  }
  std::string_view key(uint64_t at) const {
    return {reinterpret_cast<const char*>(&words_[at + 2]), words_[at]};
  }
  uint32_t value(uint64_t at) const { return words_[at + 1]; }
  const int32_t* ids(uint64_t at) const {
    return reinterpret_cast<const int32_t*>(&words_[at + 2 + (words_[at] + 3) / 4]);
  }
  size_t bytes() const { return words_.size() * sizeof(uint32_t); }
  void clear() { words_.clear(); }
  void release() { std::vector<uint32_t>().swap(words_); }

 private:
  std::vector<uint32_t> words_;
};

// Open-addressing hash table (linear probing, at most half full): key -> record offset. A hit
// usually touches one slot and one record (key and ids side by side); with std::unordered_map
// and separate id storage a warm batch took 2.3x longer.
class Table {
 public:
  static constexpr uint64_t kNone = UINT64_MAX;

  uint64_t find(uint64_t hash, std::string_view key, const Records& records) const {
    if (slots_.empty()) return kNone;
    for (size_t i = hash & mask_;; i = (i + 1) & mask_) {
      const Slot& slot = slots_[i];
      if (slot.record == kNone) return kNone;
      if (slot.hash == hash && records.key(slot.record) == key) return slot.record;
    }
  }
  void insert(uint64_t hash, uint64_t record) {   // the key must be absent
    if ((size_ + 1) * 2 > slots_.size()) grow();
    place(hash, record);
    ++size_;
  }
  size_t size() const { return size_; }
  void clear() {
    std::fill(slots_.begin(), slots_.end(), Slot{0, kNone});
    size_ = 0;
  }
  void release() {
    std::vector<Slot>().swap(slots_);
    size_ = mask_ = 0;
  }

 private:
  struct Slot {
    uint64_t hash;
    uint64_t record;
  };
  void place(uint64_t hash, uint64_t record) {
    size_t i = hash & mask_;
    while (slots_[i].record != kNone) i = (i + 1) & mask_;
    slots_[i] = {hash, record};
  }
  void grow() {
    std::vector<Slot> old(std::max<size_t>(64, slots_.size() * 2), Slot{0, kNone});
    old.swap(slots_);
    mask_ = slots_.size() - 1;
    for (const Slot& slot : old)
      if (slot.record != kNone) place(slot.hash, slot.record);
  }
  std::vector<Slot> slots_;
  size_t size_ = 0, mask_ = 0;
};

uint64_t hash_of(std::string_view key) { return std::hash<std::string_view>{}(key); }

// Whether a segment starts with ' ' + non-space: every segment but a text's first. Such
// segments can be tokenized joined back to back (each junction is an exact cut); a first
// segment cannot follow anything (" " + " x" would pre-tokenize as "  x").
bool joinable(std::string_view key) {
  return key.size() > 1 && key[0] == ' ' &&
         !is_space(decode_utf8(reinterpret_cast<const unsigned char*>(key.data()) + 1));
}

class SegmentCache {
 public:
  SegmentCache(py::array_t<int64_t, py::array::c_style | py::array::forcecast> token_nbytes,
               size_t max_cached)
      : nbytes_(token_nbytes.data(), token_nbytes.data() + token_nbytes.size()),
        max_cached_(max_cached) {}

  size_t size() const { return table_.size(); }

  void clear() {
    table_.release();
    records_.release();
  }

  // (ids int32 [sum of lengths], lengths int64 [len(texts)]): each text's ids back to back.
  py::tuple encode_batch(const py::list& texts, const py::object& tokenize) {
    if (table_.size() > max_cached_ || records_.bytes() > kMaxRecordBytes) clear();
    start_batch();
    try {
      for (size_t t = 0; t < texts.size(); ++t)
        look_up(utf8_of(PyList_GET_ITEM(texts.ptr(), t), t));
      if (!misses_.empty()) resolve(tokenize);
    } catch (...) {
      clear();   // a failed batch may have cached part of a bad tokenization
      throw;
    }
    return assemble();
  }

 private:
  static constexpr size_t kMaxRecordBytes = size_t(1) << 30;
  struct Miss {
    uint64_t pending;   // record in pending_ (its key)
    uint64_t hash;
    uint64_t record;    // record in records_, once tokenized
  };
  struct Patch {
    size_t at;          // the miss's ids go before out_[at]
    uint32_t miss;
  };

  void start_batch() {
    pending_.clear();
    pending_table_.clear();
    misses_.clear();
    out_.clear();
    patches_.clear();
    text_out_end_.clear();
    text_patch_end_.clear();
  }

  // Copies known segments' ids to out_; new segments become misses (once each) and patches.
  void look_up(std::string_view text) {
    for_each_segment(text.data(), text.size(), [&](size_t begin, size_t end) {
      if (begin == end) return;   // an empty first segment has no ids
      std::string_view key = text.substr(begin, end - begin);
      uint64_t hash = hash_of(key);
      uint64_t record = table_.find(hash, key, records_);
      if (record != Table::kNone) {
        const int32_t* ids = records_.ids(record);
        out_.insert(out_.end(), ids, ids + records_.value(record));
        return;
      }
      uint64_t pending = pending_table_.find(hash, key, pending_);
      if (pending == Table::kNone) {
        pending = pending_.add(key, static_cast<uint32_t>(misses_.size()));
        pending_table_.insert(hash, pending);
        misses_.push_back({pending, hash, Table::kNone});
      }
      patches_.push_back({out_.size(), pending_.value(pending)});
    });
    text_out_end_.push_back(out_.size());
    text_patch_end_.push_back(patches_.size());
  }

  // Tokenizes the misses: first segments one call each, all the others in one joined call.
  void resolve(const py::object& tokenize) {
    std::vector<uint32_t> joined;
    for (uint32_t m = 0; m < misses_.size(); ++m) {
      if (joinable(pending_.key(misses_[m].pending)))
        joined.push_back(m);
      else
        tokenize_joined({m}, tokenize);
    }
    if (!joined.empty()) tokenize_joined(joined, tokenize);
  }

  void tokenize_joined(const std::vector<uint32_t>& misses, const py::object& tokenize) {
    std::string text;
    for (uint32_t m : misses) text.append(pending_.key(misses_[m].pending));
    py::object result = tokenize(decode(text));
    py::object seq = py::reinterpret_steal<py::object>(
        PySequence_Fast(result.ptr(), "tokenize must return a sequence of ids"));
    if (!seq) throw py::error_already_set();
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    size_t n = static_cast<size_t>(PySequence_Fast_GET_SIZE(seq.ptr())), t = 0;
    std::vector<int32_t> ids;
    for (uint32_t m : misses) {   // cut where the tokens' bytes reach the key's
      std::string_view key = pending_.key(misses_[m].pending);
      size_t covered = 0;
      ids.clear();
      while (covered < key.size() && t < n) {
        long long id = PyLong_AsLongLong(items[t++]);
        if (id == -1 && PyErr_Occurred()) throw py::error_already_set();
        if (id < 0 || id >= static_cast<long long>(nbytes_.size()))
          throw py::value_error("the tokenizer returned id " + std::to_string(id) +
                                ", outside its vocabulary of " + std::to_string(nbytes_.size()));
        covered += static_cast<size_t>(nbytes_[id]);
        ids.push_back(static_cast<int32_t>(id));
      }
      if (covered != key.size()) throw std::runtime_error("a token crossed an exact cut");
      Miss& miss = misses_[m];
      miss.record = records_.add(key, static_cast<uint32_t>(ids.size()), ids.data(), ids.size());
      table_.insert(miss.hash, miss.record);
    }
    if (t != n) throw std::runtime_error("the tokenizer returned more bytes than it was given");
  }

  // The batch's ids: out_ with each patch's ids spliced in, and each text's length.
  py::tuple assemble() const {
    size_t total = out_.size();
    for (const Patch& p : patches_) total += records_.value(misses_[p.miss].record);
    py::array_t<int32_t> ids(static_cast<py::ssize_t>(total));
    py::array_t<int64_t> lengths(static_cast<py::ssize_t>(text_out_end_.size()));
    int32_t* w = ids.mutable_data();
    int64_t* len = lengths.mutable_data();
    auto copy = [&w](const int32_t* from, size_t n) {
      if (n) std::memcpy(w, from, n * sizeof(int32_t));
      w += n;
    };
    size_t o = 0, p = 0;
    for (size_t t = 0; t < text_out_end_.size(); ++t) {
      const int32_t* text_start = w;
      for (; p < text_patch_end_[t]; ++p) {
        copy(out_.data() + o, patches_[p].at - o);
        o = patches_[p].at;
        uint64_t record = misses_[patches_[p].miss].record;
        copy(records_.ids(record), records_.value(record));
      }
      copy(out_.data() + o, text_out_end_[t] - o);
      o = text_out_end_[t];
      len[t] = w - text_start;
    }
    return py::make_tuple(std::move(ids), std::move(lengths));
  }

  std::vector<int64_t> nbytes_;   // UTF-8 bytes of each token id (one per GPT-2 symbol)
  size_t max_cached_;
  Records records_;               // cached segments: key, number of ids, ids
  Table table_;
  // One batch's work, kept between batches to reuse the memory.
  Records pending_;               // new segments: key, index in misses_
  Table pending_table_;
  std::vector<Miss> misses_;
  std::vector<int32_t> out_;      // known segments' ids, in order
  std::vector<Patch> patches_;
  std::vector<size_t> text_out_end_, text_patch_end_;
};

}  // namespace

PYBIND11_MODULE(_segment_cache, m) {
  m.doc() = "Segment -> GPT-2 ids cache for bulk preprocessing (see piece_cache.py).";
  m.def("is_space", [](uint32_t cp) { return is_space(cp); },
        "Python's str.isspace for one code point.");
  m.def(
      "split_segments",
      [](const py::str& text) {
        std::string_view s = utf8_of(text.ptr(), 0);
        py::list out;
        for_each_segment(s.data(), s.size(), [&](size_t begin, size_t end) {
          out.append(decode(s.substr(begin, end - begin)));
        });
        return out;
      },
      "The text's segments, as piece_cache.split_segments cuts them.");
  py::class_<SegmentCache>(m, "SegmentCache")
      .def(py::init<py::array_t<int64_t, py::array::c_style | py::array::forcecast>, size_t>(),
           py::arg("token_nbytes"), py::arg("max_cached"))
      .def("encode_batch", &SegmentCache::encode_batch, py::arg("texts"), py::arg("tokenize"))
      .def("clear", &SegmentCache::clear)
      .def("__len__", &SegmentCache::size);
}
