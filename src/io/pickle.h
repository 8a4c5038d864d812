// An allow-list unpickler for PyTorch state dicts. It interprets the pickle opcodes a state dict
// needs and builds plain values; it never imports or calls anything. The only globals accepted are
// collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter(_with_state) and the
// typed storage classes (torch.FloatStorage, ...); any other global is an error naming it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace vf::pickle {

struct Value;
using ValuePtr = std::shared_ptr<Value>;

enum class Kind { None, Bool, Int, BigInt, Float, Str, Bytes, Tuple, List, Dict, Global, Storage, Tensor };
const char* kind_name(Kind k);

// A storage a persistent id refers to: `key` names its bytes in the container (zip entry
// data/<key>, or a legacy file's storage record); a view starts `offset` elements into it.
struct StorageRef {
  std::string key;
  DType dtype = DType::F32;
  int64_t offset = 0;   // elements (legacy view storages)
  int64_t numel = -1;   // elements, when the persistent id says (-1: unknown)
};

// A tensor as pickled: a strided view of a storage, not yet materialised.
struct TensorRef {
  StorageRef storage;
  int64_t offset = 0;  // elements
  Shape size;
  Shape stride;
};

struct Value {
  Kind kind = Kind::None;
  int64_t i = 0;          // Bool, Int
  double f = 0;           // Float
  std::string s;          // Str, Bytes, Global ("module.name"), BigInt (little-endian two's complement bytes)
  std::vector<ValuePtr> items;                       // Tuple, List
  std::vector<std::pair<ValuePtr, ValuePtr>> dict;   // Dict, in insertion order
  std::unordered_map<std::string, size_t> dict_index;
  std::shared_ptr<StorageRef> storage;               // Storage
  std::shared_ptr<TensorRef> tensor;                 // Tensor
  int depth = 0;                                     // container nesting below this value
};

// Turns a persistent id (the tuple after BINPERSID) into a Storage value.
using PersistentLoad = std::function<ValuePtr(const ValuePtr& pid)>;

struct Limits {
  size_t max_stack = 1 << 20;  // values on the stack (and in open MARK frames)
  size_t max_memo = 1 << 20;   // memo entries
  size_t max_marks = 512;      // nested MARKs
  int max_depth = 128;         // container nesting
  // Containers alive at once (a state dict needs a few per tensor); those in reference cycles
  // stay alive until the end, so a pickle that makes and drops cyclic lists is refused here.
  size_t max_live_containers = 1 << 21;
};

// The result of unpickling: `root` and everything it refers to. Containers may refer to each
// other in cycles (a hostile pickle can make a list contain itself); the destructor breaks them,
// so keep the Pickle alive while using `root`. Values the pickle machine drops are freed as it
// drops them (only weak references to containers are kept, pruned as they expire), so memory
// follows what the pickle keeps, not what it builds.
class Pickle {
 public:
  Pickle() = default;
  Pickle(const Pickle&) = delete;
  Pickle& operator=(const Pickle&) = delete;
  Pickle(Pickle&&) = default;
  ~Pickle();
  ValuePtr root;
  std::vector<std::weak_ptr<Value>> containers;  // the Tuples/Lists/Dicts made (expired ones pruned)
};

// Unpickles one pickle starting at data[pos]; on return `pos` is just past its STOP.
// `origin` names the file in errors ("<origin>: pickle: ...").
Pickle unpickle(const uint8_t* data, size_t size, size_t& pos, const std::string& origin,
                const PersistentLoad& persistent_load, const Limits& limits = {});

// The dtype of a storage class global ("torch.FloatStorage"), or false.
bool storage_global_dtype(const std::string& global, DType* out);

}  // namespace vf::pickle
