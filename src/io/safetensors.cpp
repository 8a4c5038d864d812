#include "io/safetensors.h"

#include "core/errors.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_set>

#include "io/file.h"
#include "io/json.h"
#include "io/mapped_file.h"

namespace vf {

namespace {

// As the reference (safetensors/src/tensor.rs, MAX_HEADER_SIZE).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DtypeName {
  const char* name;
  DType dtype;
};
constexpr DtypeName kDtypes[] = {
    {"F64", DType::F64}, {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16},
    {"I64", DType::I64}, {"I32", DType::I32}, {"I16", DType::I16}, {"I8", DType::I8},
    {"U8", DType::U8},   {"BOOL", DType::Bool},
};

bool parse_dtype(const std::string& s, DType* out) {
  for (auto& d : kDtypes)
    if (s == d.name) {
      *out = d.dtype;
      return true;
    }
  return false;
}

std::string supported_dtypes() {
  std::string r;
  for (auto& d : kDtypes) r += (r.empty() ? "" : " ") + std::string(d.name);
  return r;
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A non-negative JSON integer (nlohmann parses those as unsigned).
bool as_u64(const nlohmann::json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t begin, end;
};

}  // namespace

const char* safetensors_dtype_name(DType t) {
  for (auto& d : kDtypes)
    if (d.dtype == t) return d.name;
  return "?";
}

std::vector<std::pair<std::string, Tensor>> read_safetensors(const std::string& path) {
  MappedFile file = MappedFile::open(path);
  return parse_safetensors(file.data, file.size, path, file.owner);
}

std::vector<std::pair<std::string, Tensor>> parse_safetensors(const uint8_t* bytes, size_t size,
                                                              const std::string& origin,
                                                              std::shared_ptr<void> owner) {
  const std::string& path = origin;
  auto fail = [&](const std::string& what) -> InputError { return InputError(path + ": invalid safetensors file: " + what); };

  if (size < 8)
    throw fail("the file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  uint64_t n = read_u64_le(bytes);
  // The length is not echoed: for a file that is not safetensors (a link to a secret, say) it
  // would print the file's first 8 bytes.
  if (n > kMaxHeaderBytes)
    throw fail("the header length (first 8 bytes) exceeds the limit of " + std::to_string(kMaxHeaderBytes) +
               " bytes (a corrupt or non-safetensors file?)");
  if (n > size - 8)
    throw fail("the header length (first 8 bytes) runs past the end of the file (" + std::to_string(size) +
               " bytes; truncated or not a safetensors file?)");
  const uint64_t data_size = size - 8 - n;
  const uint8_t* data = bytes + 8 + n;

  // Checked in one linear pass (syntax, nesting, the order and uniqueness of the tensor names),
  // then parsed into a sorted object without callbacks: an ordered_json, or nlohmann's parser
  // callbacks, are quadratic in the number of tensors.
  std::vector<std::string> order;
  std::unordered_set<std::string> names;
  std::string duplicate;
  auto on_key = [&](const std::string& k) {
    if (names.insert(k).second)
      order.push_back(k);
    else if (duplicate.empty())
      duplicate = k;
  };
  std::string error;
  size_t error_byte = 0;
  if (!scan_json(bytes + 8, bytes + 8 + n, 16, on_key, &error, &error_byte)) {
    if (error.rfind("nested deeper", 0) == 0)
      throw fail("header JSON is " + error + " (expected {name: {dtype, shape, data_offsets}})");
    throw fail("header is not valid JSON (at byte " + std::to_string(error_byte) + " of the header): " + error);
  }
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + n);
  } catch (const nlohmann::json::exception& e) {
    throw fail(std::string("header is not valid JSON: ") + e.what());
  }
  if (!duplicate.empty()) throw fail("tensor '" + duplicate + "' appears twice in the header");
  if (!header.is_object()) throw fail("header is not a JSON object");

  std::vector<Entry> entries;
  entries.reserve(header.size());
  for (const std::string& name : order) {
    auto found = header.find(name);
    if (found == header.end()) continue;
    const nlohmann::json& info = *found;
    if (name == "__metadata__") {
      if (!info.is_object()) throw fail("__metadata__ is not a JSON object");
      for (auto& [k, v] : info.items())
        if (!v.is_string()) throw fail("__metadata__ value for '" + k + "' is not a string");
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!info.is_object()) throw fail(where + ": entry is not a JSON object");
    auto dt = info.find("dtype");
    auto sh = info.find("shape");
    auto off = info.find("data_offsets");
    if (dt == info.end() || !dt->is_string()) throw fail(where + ": missing or non-string 'dtype'");
    if (sh == info.end() || !sh->is_array()) throw fail(where + ": missing or non-array 'shape'");
    if (off == info.end() || !off->is_array() || off->size() != 2)
      throw fail(where + ": 'data_offsets' must be an array [begin, end]");
    Entry e;
    e.name = name;
    if (!parse_dtype(dt->get<std::string>(), &e.dtype))
      throw fail(where + ": unsupported dtype '" + dt->get<std::string>() + "' (supported: " + supported_dtypes() + ")");
    for (auto& d : *sh) {
      uint64_t v;
      if (!as_u64(d, &v) || v > static_cast<uint64_t>(INT64_MAX))
        throw fail(where + ": shape " + sh->dump() + " has an entry that is not a non-negative integer");
      e.shape.push_back(static_cast<int64_t>(v));
    }
    if (!as_u64((*off)[0], &e.begin) || !as_u64((*off)[1], &e.end))
      throw fail(where + ": data_offsets " + off->dump() + " are not non-negative integers");
    if (e.begin > e.end) throw fail(where + ": data_offsets " + off->dump() + " have begin > end");
    if (e.end > data_size)
      throw fail(where + ": data_offsets " + off->dump() + " run past the end of the data section (" +
                 std::to_string(data_size) + " bytes; truncated file?)");
    // numel * dtype size, overflow-checked.
    uint64_t bytes = dtype_size(e.dtype);
    for (int64_t d : e.shape) {
      if (d != 0 && bytes > UINT64_MAX / static_cast<uint64_t>(d))
        throw fail(where + ": shape " + shape_str(e.shape) + " overflows");
      bytes *= static_cast<uint64_t>(d);
    }
    if (bytes != e.end - e.begin)
      throw fail(where + ": " + std::string(dt->get<std::string>()) + " shape " + shape_str(e.shape) + " needs " +
                 std::to_string(bytes) + " bytes, data_offsets " + off->dump() + " hold " +
                 std::to_string(e.end - e.begin));
    entries.push_back(std::move(e));
  }

  // The data section must be covered exactly: sorted by offsets, each tensor starts where the
  // previous one ended, and the last ends at the end of the file.
  std::vector<const Entry*> sorted;
  for (auto& e : entries) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(), [](const Entry* a, const Entry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t pos = 0;
  const Entry* prev = nullptr;
  for (const Entry* e : sorted) {
    if (e->begin < pos)
      throw fail("tensor '" + e->name + "' (bytes " + std::to_string(e->begin) + ".." + std::to_string(e->end) +
                 ") overlaps tensor '" + prev->name + "' (bytes " + std::to_string(prev->begin) + ".." +
                 std::to_string(prev->end) + ")");
    if (e->begin > pos)
      throw fail("bytes " + std::to_string(pos) + ".." + std::to_string(e->begin) +
                 " of the data section belong to no tensor (before tensor '" + e->name + "')");
    pos = e->end;
    prev = e;
  }
  if (pos != data_size)
    throw fail("the tensors cover " + std::to_string(pos) + " bytes but the data section holds " +
               std::to_string(data_size) + " (trailing bytes)");

  std::vector<std::pair<std::string, Tensor>> out;
  out.reserve(entries.size());
  for (auto& e : entries) {
    void* p = const_cast<uint8_t*>(data + e.begin);
    Tensor t;
    if (reinterpret_cast<uintptr_t>(p) % dtype_size(e.dtype) == 0) {
      t = Tensor::wrap(p, e.shape, e.dtype, owner);
    } else {
      // A header length that is not a multiple of 8 leaves the bytes misaligned: copy them.
      t = Tensor::empty(e.shape, e.dtype);
      if (t.nbytes()) std::memcpy(t.raw(), p, t.nbytes());
    }
    out.emplace_back(std::move(e.name), std::move(t));
  }
  return out;
}

void load_safetensors(const std::string& path, WeightStore& store) {
  for (auto& [name, t] : read_safetensors(path)) {
    if (store.has(name)) throw InputError(path + ": tensor '" + name + "' is already loaded (from another file?)");
    store.add(name, std::move(t));
  }
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors) {
  // The header object is written entry by entry: an ordered_json would look each name up linearly.
  std::string h = "{";
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (auto& [name, t] : tensors) {
    if (name == "__metadata__") throw Error(path + ": '__metadata__' cannot be a tensor name");
    if (!seen.insert(name).second) throw Error(path + ": tensor name '" + name + "' appears twice");
    if (!t.defined()) throw Error(path + ": tensor '" + name + "' is undefined");
    uint64_t n = t.nbytes();
    nlohmann::ordered_json entry = {
        {"dtype", safetensors_dtype_name(t.dtype())}, {"shape", t.shape()}, {"data_offsets", {offset, offset + n}}};
    h += (h.size() > 1 ? "," : "") + nlohmann::json(name).dump() + ":" + entry.dump();
    offset += n;
  }
  h += "}";
  h.append((8 - h.size() % 8) % 8, ' ');  // as the reference: data starts 8-byte aligned

  AtomicOutputs out;
  std::FILE* f = out.add(path);
  uint8_t len[8];
  uint64_t hn = h.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(hn >> (8 * i));
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(h.data(), 1, h.size(), f) == h.size();
  for (auto& [name, t] : tensors)
    if (ok && t.nbytes()) ok = std::fwrite(t.raw(), 1, t.nbytes(), f) == t.nbytes();
  if (!ok) throw Error(path + ": write failed: " + std::strerror(errno));
  out.commit();
}

}  // namespace vf
