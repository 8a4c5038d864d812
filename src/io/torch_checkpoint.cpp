#include "io/torch_checkpoint.h"

#include "core/errors.h"

#include <cstring>
#include <map>

#include "io/mapped_file.h"
#include "io/pickle.h"
#include "io/zip.h"

namespace vf {

namespace {

using pickle::Kind;
using pickle::ValuePtr;

// Bytes of one storage in the file.
struct StorageBytes {
  const uint8_t* data = nullptr;
  uint64_t nbytes = 0;
};

template <class T>
void strided_copy(const T* src, T* dst, const Shape& size, const Shape& stride) {
  const size_t nd = size.size();
  if (nd == 0) {
    dst[0] = src[0];
    return;
  }
  const int64_t inner = size[nd - 1], inner_stride = stride[nd - 1];
  std::vector<int64_t> idx(nd, 0);
  int64_t outer = 1;
  for (size_t d = 0; d + 1 < nd; ++d) outer *= size[d];
  for (int64_t o = 0; o < outer; ++o) {
    int64_t base = 0;
    for (size_t d = 0; d + 1 < nd; ++d) base += idx[d] * stride[d];
    for (int64_t i = 0; i < inner; ++i) *dst++ = src[base + i * inner_stride];
    for (size_t d = nd - 1; d-- > 0;) {
      if (++idx[d] < size[d]) break;
      idx[d] = 0;
    }
  }
}

// A pickled tensor (a strided view of a storage) as a contiguous Tensor: wraps the mapping when
// the view is contiguous and aligned, copies otherwise. Every index is checked against the storage.
// With `copy` false, a view that needs a copy is only checked and comes back undefined.
Tensor materialise(const pickle::TensorRef& ref, const StorageBytes& st, const std::shared_ptr<void>& owner,
                   const std::string& origin, const std::string& name, bool copy = true) {
  auto fail = [&](const std::string& what) {
    return InputError(origin + ": tensor '" + name + "': " + what);
  };
  const DType dt = ref.storage.dtype;
  const uint64_t esize = dtype_size(dt);
  if (st.nbytes % esize) throw fail("storage of " + std::to_string(st.nbytes) + " bytes is not a whole number of " + dtype_name(dt));
  int64_t available = static_cast<int64_t>(st.nbytes / esize);
  int64_t view_offset = ref.storage.offset;
  if (view_offset < 0 || view_offset > available) throw fail("storage view offset out of range");
  available -= view_offset;
  if (ref.storage.numel >= 0) {
    if (ref.storage.numel > available)
      throw fail("storage declares " + std::to_string(ref.storage.numel) + " elements, the file holds " +
                 std::to_string(available));
    available = ref.storage.numel;
  }
  for (size_t d = 0; d < ref.size.size(); ++d)
    if (ref.size[d] < 0 || ref.stride[d] < 0)
      throw fail("negative size or stride (size " + shape_str(ref.size) + ", stride " + shape_str(ref.stride) + ")");
  if (ref.offset < 0) throw fail("negative storage offset");
  int64_t numel;
  try {
    numel = shape_numel(ref.size);
  } catch (const Error& e) {
    throw fail(e.what());
  }
  if (numel > 0) {
    int64_t last = ref.offset;  // the largest element index the view touches
    for (size_t d = 0; d < ref.size.size(); ++d) {
      int64_t step;
      if (__builtin_mul_overflow(ref.size[d] - 1, ref.stride[d], &step) || __builtin_add_overflow(last, step, &last))
        throw fail("size " + shape_str(ref.size) + " with stride " + shape_str(ref.stride) + " overflows");
    }
    if (last >= available)
      throw fail("view (offset " + std::to_string(ref.offset) + ", size " + shape_str(ref.size) + ", stride " +
                 shape_str(ref.stride) + ") reaches element " + std::to_string(last) + " of a storage of " +
                 std::to_string(available) + " elements");
  }
  bool contiguous = true;
  int64_t expect = 1;
  for (size_t d = ref.size.size(); d-- > 0;) {
    if (ref.size[d] != 1 && ref.stride[d] != expect) contiguous = false;
    expect *= ref.size[d];
  }
  if (numel == 0) return Tensor::empty(ref.size, dt);
  const uint8_t* src = st.data + (view_offset + ref.offset) * esize;
  if (contiguous && reinterpret_cast<uintptr_t>(src) % esize == 0)
    return Tensor::wrap(const_cast<uint8_t*>(src), ref.size, dt, owner);
  if (!copy) return Tensor();
  Tensor t = Tensor::empty(ref.size, dt);
  if (contiguous) {
    std::memcpy(t.raw(), src, t.nbytes());
    return t;
  }
  // Non-contiguous views are at least esize-aligned in a torch file; copy through an aligned
  // buffer otherwise.
  std::vector<uint64_t> aligned;
  if (reinterpret_cast<uintptr_t>(src) % esize) {
    uint64_t span = (static_cast<uint64_t>(available) - static_cast<uint64_t>(ref.offset)) * esize;
    aligned.resize(span / 8 + 1);
    std::memcpy(aligned.data(), src, span);
    src = reinterpret_cast<const uint8_t*>(aligned.data());
  }
  switch (esize) {
    case 1: strided_copy(src, static_cast<uint8_t*>(t.raw()), ref.size, ref.stride); break;
    case 2: strided_copy(reinterpret_cast<const uint16_t*>(src), static_cast<uint16_t*>(t.raw()), ref.size, ref.stride); break;
    case 4: strided_copy(reinterpret_cast<const uint32_t*>(src), static_cast<uint32_t*>(t.raw()), ref.size, ref.stride); break;
    case 8: strided_copy(reinterpret_cast<const uint64_t*>(src), static_cast<uint64_t*>(t.raw()), ref.size, ref.stride); break;
    default: throw fail("unexpected element size");
  }
  return t;
}

// The state dict at the root of the pickle: {str: tensor}. With `lazy`, the views that need a
// copy go there as lazy entries (copied once the model has checked their shape) instead.
template <class Resolve>
std::vector<std::pair<std::string, Tensor>> collect(const pickle::Pickle& p, const std::string& origin,
                                                    const std::shared_ptr<void>& owner, Resolve&& resolve,
                                                    WeightStore* lazy) {
  if (p.root->kind != Kind::Dict)
    throw InputError(origin + ": the checkpoint holds a " + std::string(pickle::kind_name(p.root->kind)) +
                ", expected a state dict (a dict of tensors)");
  std::vector<std::pair<std::string, Tensor>> out;
  out.reserve(p.root->dict.size());
  for (auto& [k, v] : p.root->dict) {
    if (k->kind != Kind::Str) throw InputError(origin + ": state dict key is a " + std::string(pickle::kind_name(k->kind)) + ", not a string");
    if (v->kind != Kind::Tensor)
      throw InputError(origin + ": state dict entry '" + k->s + "' is a " + pickle::kind_name(v->kind) + ", not a tensor");
    StorageBytes st = resolve(v->tensor->storage, k->s);
    Tensor t = materialise(*v->tensor, st, owner, origin, k->s, /*copy=*/lazy == nullptr);
    if (t.defined()) {
      out.emplace_back(k->s, std::move(t));
    } else {
      if (lazy->has(k->s)) throw InputError(origin + ": tensor '" + k->s + "' is already loaded (from another file?)");
      lazy->add_lazy(k->s, v->tensor->size,
                     [ref = *v->tensor, st, owner, origin, name = k->s] { return materialise(ref, st, owner, origin, name); });
    }
  }
  return out;
}

// A storage class global ("torch.FloatStorage") as a dtype.
DType storage_dtype(const ValuePtr& v, const std::string& origin) {
  DType dt;
  if (v->kind != Kind::Global || !pickle::storage_global_dtype(v->s, &dt))
    throw InputError(origin + ": persistent id names " + (v->kind == Kind::Global ? "'" + v->s + "'" : std::string("a ") + pickle::kind_name(v->kind)) +
                ", not a storage type");
  return dt;
}

// torch >= 1.6: a zip archive <prefix>/data.pkl + <prefix>/data/<key> (+ version, byteorder).
std::vector<std::pair<std::string, Tensor>> read_zip(const MappedFile& file, const std::string& path, WeightStore* lazy) {
  ZipReader zip(file.data, file.size, path);
  std::string prefix;
  for (auto& e : zip.entries()) {
    size_t slash = e.name.find('/');
    if (slash != std::string::npos && e.name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      prefix = e.name.substr(0, slash + 1);
      break;
    }
  }
  if (prefix.empty()) throw InputError(path + ": zip archive has no <name>/data.pkl: not a torch.save checkpoint");
  if (const ZipEntry* bo = zip.find(prefix + "byteorder")) {
    std::string order(reinterpret_cast<const char*>(zip.stored(bo->name).data), bo->size);
    if (order != "little") throw InputError(path + ": checkpoint byte order '" + order + "' is not supported (only little)");
  }
  const ZipEntry& pkl = zip.stored(prefix + "data.pkl");

  auto persistent_load = [&](const ValuePtr& pid) -> ValuePtr {
    // ('storage', storage_type, key, location, numel)
    if (pid->kind != Kind::Tuple || pid->items.size() != 5 || pid->items[0]->kind != Kind::Str ||
        pid->items[0]->s != "storage" || pid->items[2]->kind != Kind::Str || pid->items[4]->kind != Kind::Int ||
        pid->items[4]->i < 0)
      throw InputError(path + ": unexpected persistent id (expected ('storage', type, key, location, numel))");
    auto v = std::make_shared<pickle::Value>();
    v->kind = Kind::Storage;
    v->storage = std::make_shared<pickle::StorageRef>();
    v->storage->dtype = storage_dtype(pid->items[1], path);
    v->storage->key = pid->items[2]->s;
    v->storage->numel = pid->items[4]->i;
    return v;
  };
  size_t pos = 0;
  pickle::Pickle p = pickle::unpickle(pkl.data, pkl.size, pos, path + " (" + pkl.name + ")", persistent_load);
  std::map<std::string, DType> seen;
  return collect(p, path, file.owner, [&](const pickle::StorageRef& s, const std::string& name) {
    auto [it, fresh] = seen.emplace(s.key, s.dtype);
    if (!fresh && it->second != s.dtype)
      throw InputError(path + ": storage '" + s.key + "' is used as both " + dtype_name(it->second) + " and " + dtype_name(s.dtype));
    const ZipEntry* e = zip.find(prefix + "data/" + s.key);
    if (!e) throw InputError(path + ": tensor '" + name + "': storage entry '" + prefix + "data/" + s.key + "' is missing");
    const ZipEntry& se = zip.stored(e->name);
    return StorageBytes{se.data, se.size};
  }, lazy);
}

// torch < 1.6: pickles of the magic number, protocol version, system info, the object, the list of
// storage keys; then each storage as <int64 element count><bytes>.
std::vector<std::pair<std::string, Tensor>> read_legacy(const MappedFile& file, const std::string& path, WeightStore* lazy) {
  static const char kMagic[] = "\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";  // 0x1950a86a20f9469cfc6c, little-endian
  size_t pos = 0;
  auto no_pid = pickle::PersistentLoad();
  {
    pickle::Pickle magic = pickle::unpickle(file.data, file.size, pos, path, no_pid);
    if (magic.root->kind != Kind::BigInt || magic.root->s != std::string(kMagic, 10))
      throw InputError(path + ": not a torch.save file (no magic number)");
  }
  {
    pickle::Pickle version = pickle::unpickle(file.data, file.size, pos, path, no_pid);
    if (version.root->kind != Kind::Int || version.root->i != 1001)
      throw InputError(path + ": unsupported legacy torch.save protocol version");
  }
  {
    pickle::Pickle sys_info = pickle::unpickle(file.data, file.size, pos, path, no_pid);
    if (sys_info.root->kind == Kind::Dict)
      for (auto& [k, v] : sys_info.root->dict)
        if (k->kind == Kind::Str && k->s == "little_endian" && v->kind == Kind::Bool && !v->i)
          throw InputError(path + ": big-endian checkpoints are not supported");
  }
  struct Root {
    DType dtype;
    int64_t numel;
    StorageBytes bytes;
  };
  std::map<std::string, Root> roots;
  auto persistent_load = [&](const ValuePtr& pid) -> ValuePtr {
    // ('storage', storage_type, root_key, location, numel, view_metadata)
    const auto& it = pid->items;
    if (pid->kind != Kind::Tuple || it.size() != 6 || it[0]->kind != Kind::Str || it[0]->s != "storage" ||
        it[2]->kind != Kind::Str || it[4]->kind != Kind::Int || it[4]->i < 0)
      throw InputError(path + ": unexpected persistent id (expected ('storage', type, key, location, numel, view))");
    auto v = std::make_shared<pickle::Value>();
    v->kind = Kind::Storage;
    v->storage = std::make_shared<pickle::StorageRef>();
    auto& s = *v->storage;
    s.dtype = storage_dtype(it[1], path);
    s.key = it[2]->s;
    auto [r, fresh] = roots.emplace(s.key, Root{s.dtype, it[4]->i, {}});
    if (!fresh && (r->second.dtype != s.dtype || r->second.numel != it[4]->i))
      throw InputError(path + ": storage '" + s.key + "' is declared twice differently");
    if (it[5]->kind == Kind::Tuple) {  // (view_key, offset, view_size)
      const auto& vm = it[5]->items;
      if (vm.size() != 3 || vm[1]->kind != Kind::Int || vm[2]->kind != Kind::Int || vm[1]->i < 0 || vm[2]->i < 0 ||
          vm[1]->i > it[4]->i || vm[2]->i > it[4]->i - vm[1]->i)
        throw InputError(path + ": storage view of '" + s.key + "' is out of range");
      s.offset = vm[1]->i;
      s.numel = vm[2]->i;
    } else if (it[5]->kind != Kind::None) {
      throw InputError(path + ": unexpected storage view metadata");
    }
    return v;
  };
  pickle::Pickle main = pickle::unpickle(file.data, file.size, pos, path, persistent_load);
  pickle::Pickle keys = pickle::unpickle(file.data, file.size, pos, path, no_pid);
  if (keys.root->kind != Kind::List) throw InputError(path + ": the storage key list is missing");
  for (auto& k : keys.root->items) {
    if (k->kind != Kind::Str) throw InputError(path + ": storage key is not a string");
    auto r = roots.find(k->s);
    if (r == roots.end()) throw InputError(path + ": storage '" + k->s + "' is listed but never used");
    if (file.size - pos < 8) throw InputError(path + ": storage '" + k->s + "' is cut off (truncated file?)");
    uint64_t numel = 0;
    for (int i = 7; i >= 0; --i) numel = (numel << 8) | file.data[pos + i];
    pos += 8;
    if (numel != static_cast<uint64_t>(r->second.numel))
      throw InputError(path + ": storage '" + k->s + "' holds " + std::to_string(numel) + " elements, the pickle says " +
                  std::to_string(r->second.numel));
    uint64_t nbytes = numel * dtype_size(r->second.dtype);
    if (nbytes / dtype_size(r->second.dtype) != numel || nbytes > file.size - pos)
      throw InputError(path + ": storage '" + k->s + "' runs past the end of the file (truncated?)");
    r->second.bytes = StorageBytes{file.data + pos, nbytes};
    pos += nbytes;
  }
  return collect(main, path, file.owner, [&](const pickle::StorageRef& s, const std::string& name) {
    auto r = roots.find(s.key);
    if (r == roots.end() || (r->second.numel > 0 && !r->second.bytes.data))
      throw InputError(path + ": tensor '" + name + "': storage '" + s.key + "' has no data in the file");
    return r->second.bytes;
  }, lazy);
}

std::vector<std::pair<std::string, Tensor>> read_any(uint8_t* data, size_t size, const std::string& origin,
                                                     std::shared_ptr<void> owner, WeightStore* lazy) {
  MappedFile file;
  file.data = data;
  file.size = size;
  file.owner = std::move(owner);
  if (size >= 4 && data[0] == 'P' && data[1] == 'K') return read_zip(file, origin, lazy);
  if (size >= 2 && data[0] == 0x80) return read_legacy(file, origin, lazy);
  throw InputError(origin + ": not a torch.save checkpoint (neither a zip archive nor a legacy pickle)");
}

}  // namespace

std::vector<std::pair<std::string, Tensor>> read_torch_checkpoint(uint8_t* data, size_t size, const std::string& origin,
                                                                  std::shared_ptr<void> owner) {
  return read_any(data, size, origin, std::move(owner), nullptr);
}

std::vector<std::pair<std::string, Tensor>> read_torch_checkpoint(const std::string& path) {
  MappedFile file = MappedFile::open(path);
  return read_torch_checkpoint(const_cast<uint8_t*>(file.data), file.size, path, file.owner);
}

void load_torch_checkpoint(const std::string& path, WeightStore& store) {
  MappedFile file = MappedFile::open(path);
  // Views that need a copy stay lazy: the model checks their shapes first.
  for (auto& [name, t] : read_any(const_cast<uint8_t*>(file.data), file.size, path, file.owner, &store)) {
    if (store.has(name)) throw InputError(path + ": tensor '" + name + "' is already loaded (from another file?)");
    store.add(name, std::move(t));
  }
}

}  // namespace vf
