#include "io/pickle.h"

#include "core/errors.h"

#include <algorithm>
#include <cstring>
#include <set>

namespace vf::pickle {

namespace {

struct StorageClass {
  const char* name;
  DType dtype;
};
constexpr StorageClass kStorageClasses[] = {
    {"torch.FloatStorage", DType::F32},  {"torch.DoubleStorage", DType::F64}, {"torch.HalfStorage", DType::F16},
    {"torch.BFloat16Storage", DType::BF16}, {"torch.LongStorage", DType::I64}, {"torch.IntStorage", DType::I32},
    {"torch.ShortStorage", DType::I16},  {"torch.CharStorage", DType::I8},    {"torch.ByteStorage", DType::U8},
    {"torch.BoolStorage", DType::Bool},
};

constexpr const char* kOrderedDict = "collections.OrderedDict";
constexpr const char* kRebuildTensorV2 = "torch._utils._rebuild_tensor_v2";
constexpr const char* kRebuildParameter = "torch._utils._rebuild_parameter";
constexpr const char* kRebuildParameterWithState = "torch._utils._rebuild_parameter_with_state";

bool global_allowed(const std::string& g) {
  DType unused;
  return g == kOrderedDict || g == kRebuildTensorV2 || g == kRebuildParameter || g == kRebuildParameterWithState ||
         storage_global_dtype(g, &unused);
}

// For error messages: printable, bounded.
std::string printable(const std::string& s, size_t max = 200) {
  std::string r;
  for (size_t i = 0; i < s.size() && i < max; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    r += (c >= 32 && c < 127) ? static_cast<char>(c) : '?';
  }
  if (s.size() > max) r += "...";
  return r;
}

std::string opcode_str(uint8_t op) {
  char buf[16];
  if (op >= 32 && op < 127)
    std::snprintf(buf, sizeof buf, "0x%02x '%c'", op, op);
  else
    std::snprintf(buf, sizeof buf, "0x%02x", op);
  return buf;
}

class Unpickler {
 public:
  Unpickler(const uint8_t* data, size_t size, size_t pos, const std::string& origin, const PersistentLoad& pl,
            const Limits& limits, Pickle& out)
      : data_(data), size_(size), pos_(pos), origin_(origin), persistent_load_(pl), limits_(limits), out_(out) {}

  ValuePtr run();
  size_t pos() const { return pos_; }

 private:
  InputError fail(const std::string& what) const {
    return InputError(origin_ + ": pickle: " + what + " (opcode at byte " + std::to_string(op_pos_) + ")");
  }
  const uint8_t* take(size_t n) {
    if (n > size_ - pos_) throw fail("unexpected end of data (truncated file?)");
    const uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  uint64_t take_le(size_t n) {
    const uint8_t* p = take(n);
    uint64_t v = 0;
    for (size_t i = n; i-- > 0;) v = (v << 8) | p[i];
    return v;
  }
  std::string take_line() {
    const void* nl = std::memchr(data_ + pos_, '\n', std::min<size_t>(size_ - pos_, 4096));
    if (!nl) throw fail("GLOBAL name is not newline-terminated");
    size_t n = static_cast<const uint8_t*>(nl) - (data_ + pos_);
    std::string s(reinterpret_cast<const char*>(take(n)), n);
    take(1);
    return s;
  }

  ValuePtr make(Kind k) {
    if (k != Kind::Tuple && k != Kind::List && k != Kind::Dict) {
      auto v = std::make_shared<Value>();
      v->kind = k;
      return v;
    }
    // Not make_shared: a weak reference would keep the whole allocation alive.
    ValuePtr v(new Value);
    v->kind = k;
    auto& all = out_.containers;
    if (all.size() >= prune_at_) {
      std::erase_if(all, [](const std::weak_ptr<Value>& w) { return w.expired(); });
      prune_at_ = std::max<size_t>(1024, 2 * all.size());
      if (all.size() > limits_.max_live_containers)
        throw fail("more than " + std::to_string(limits_.max_live_containers) + " containers alive at once");
    }
    all.push_back(v);
    return v;
  }
  ValuePtr make_int(int64_t i) {
    auto v = make(Kind::Int);
    v->i = i;
    return v;
  }
  ValuePtr make_str(Kind k, size_t n) {
    auto v = make(k);
    v->s.assign(reinterpret_cast<const char*>(take(n)), n);
    return v;
  }

  void push(ValuePtr v) {
    if (stack_.size() >= limits_.max_stack) throw fail("stack exceeds " + std::to_string(limits_.max_stack) + " values");
    stack_.push_back(std::move(v));
  }
  ValuePtr pop() {
    if (stack_.size() <= mark_floor()) throw fail("pop from an empty stack");
    ValuePtr v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  ValuePtr& top() {
    if (stack_.size() <= mark_floor()) throw fail("empty stack");
    return stack_.back();
  }
  size_t mark_floor() const { return marks_.empty() ? 0 : marks_.back(); }
  std::vector<ValuePtr> pop_mark() {
    if (marks_.empty()) throw fail("no MARK on the stack");
    size_t m = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> items(std::make_move_iterator(stack_.begin() + m), std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }

  void add_child_depth(Value& c, const Value& child) {
    c.depth = std::max(c.depth, child.depth + 1);
    if (c.depth > limits_.max_depth) throw fail("containers nested deeper than " + std::to_string(limits_.max_depth));
  }
  ValuePtr make_seq(Kind k, std::vector<ValuePtr> items) {
    auto v = make(k);
    for (auto& it : items) add_child_depth(*v, *it);
    v->items = std::move(items);
    return v;
  }
  ValuePtr& need(ValuePtr& v, Kind k, const char* what) {
    if (v->kind != k) throw fail(std::string(what) + " expects a " + kind_name(k) + ", found a " + kind_name(v->kind));
    return v;
  }
  void dict_set(Value& d, ValuePtr k, ValuePtr v) {
    if (d.kind != Kind::Dict) throw fail(std::string("SETITEM on a ") + kind_name(d.kind) + ", not a dict");
    std::string key;
    switch (k->kind) {
      case Kind::Str: key = "s" + k->s; break;
      case Kind::Bytes: key = "b" + k->s; break;
      case Kind::Int: case Kind::Bool: key = "i" + std::to_string(k->i); break;
      case Kind::None: key = "n"; break;
      default: throw fail(std::string("dict key of type ") + kind_name(k->kind) + " is not supported");
    }
    add_child_depth(d, *v);
    auto it = d.dict_index.find(key);
    if (it != d.dict_index.end()) {
      d.dict[it->second].second = std::move(v);
    } else {
      d.dict_index.emplace(std::move(key), d.dict.size());
      d.dict.emplace_back(std::move(k), std::move(v));
    }
  }
  void memo_put(uint64_t index, const ValuePtr& v) {
    if (memo_.size() >= limits_.max_memo && !memo_.count(index))
      throw fail("memo exceeds " + std::to_string(limits_.max_memo) + " entries");
    memo_[index] = v;
  }
  ValuePtr memo_get(uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) throw fail("memo entry " + std::to_string(index) + " is not defined");
    return it->second;
  }

  ValuePtr global(const std::string& module, const std::string& name) {
    std::string g = module + "." + name;
    if (!global_allowed(g)) throw fail("pickle global '" + printable(g) + "' is not allowed");
    auto v = make(Kind::Global);
    v->s = g;
    return v;
  }
  ValuePtr reduce(const ValuePtr& callable, const ValuePtr& args);
  ValuePtr rebuild_tensor_v2(const std::vector<ValuePtr>& a);

  const uint8_t* data_;
  size_t size_, pos_, op_pos_ = 0;
  const std::string& origin_;
  const PersistentLoad& persistent_load_;
  const Limits& limits_;
  Pickle& out_;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, ValuePtr> memo_;
  size_t prune_at_ = 1024;
};

int64_t int_of(const ValuePtr& v, const std::string& what, const std::function<InputError(const std::string&)>& fail) {
  if (v->kind != Kind::Int) throw fail(what + " is a " + kind_name(v->kind) + ", expected an int");
  return v->i;
}

ValuePtr Unpickler::rebuild_tensor_v2(const std::vector<ValuePtr>& a) {
  auto f = [&](const std::string& w) { return fail(std::string(kRebuildTensorV2) + ": " + w); };
  if (a.size() < 4 || a.size() > 7) throw f("expected 4 to 7 arguments, got " + std::to_string(a.size()));
  if (a[0]->kind != Kind::Storage) throw f(std::string("argument 0 is a ") + kind_name(a[0]->kind) + ", expected a storage");
  auto t = std::make_shared<TensorRef>();
  t->storage = *a[0]->storage;
  t->offset = int_of(a[1], "storage_offset", f);
  if (a[2]->kind != Kind::Tuple || a[3]->kind != Kind::Tuple) throw f("size and stride must be tuples");
  if (a[2]->items.size() != a[3]->items.size()) throw f("size and stride have different lengths");
  if (a[2]->items.size() > 64) throw f("more than 64 dimensions");
  for (size_t i = 0; i < a[2]->items.size(); ++i) {
    t->size.push_back(int_of(a[2]->items[i], "size[" + std::to_string(i) + "]", f));
    t->stride.push_back(int_of(a[3]->items[i], "stride[" + std::to_string(i) + "]", f));
  }
  auto v = make(Kind::Tensor);
  v->tensor = std::move(t);
  return v;
}

ValuePtr Unpickler::reduce(const ValuePtr& callable, const ValuePtr& args) {
  if (callable->kind != Kind::Global) throw fail(std::string("REDUCE on a ") + kind_name(callable->kind) + ", not a global");
  if (args->kind != Kind::Tuple) throw fail(std::string("REDUCE arguments are a ") + kind_name(args->kind) + ", not a tuple");
  const std::string& g = callable->s;
  const auto& a = args->items;
  if (g == kOrderedDict) {
    if (!a.empty()) throw fail("collections.OrderedDict is only supported without arguments");
    return make(Kind::Dict);
  }
  if (g == kRebuildTensorV2) return rebuild_tensor_v2(a);
  if (g == kRebuildParameter || g == kRebuildParameterWithState) {
    size_t want = g == kRebuildParameter ? 3 : 4;
    if (a.size() != want || a[0]->kind != Kind::Tensor)
      throw fail(g + ": expected (tensor, requires_grad, backward_hooks" + (want == 4 ? ", state)" : ")"));
    return a[0];
  }
  throw fail("calling '" + g + "' is not allowed");
}

ValuePtr Unpickler::run() {
  for (;;) {
    op_pos_ = pos_;
    uint8_t op = *take(1);
    switch (op) {
      case 0x80: {  // PROTO
        uint8_t proto = *take(1);
        if (proto > 5) throw fail("unsupported pickle protocol " + std::to_string(proto));
        break;
      }
      case 0x95: take(8); break;  // FRAME: a length hint only
      case '.': {                 // STOP
        ValuePtr v = pop();
        return v;
      }
      case '(':
        if (marks_.size() >= limits_.max_marks) throw fail("more than " + std::to_string(limits_.max_marks) + " nested MARKs");
        marks_.push_back(stack_.size());
        break;
      case '0': pop(); break;
      case '1': pop_mark(); break;
      case '2': { ValuePtr v = top(); push(v); break; }
      case '}': push(make(Kind::Dict)); break;
      case ']': push(make(Kind::List)); break;
      case ')': push(make(Kind::Tuple)); break;
      case 't': push(make_seq(Kind::Tuple, pop_mark())); break;
      case 'l': push(make_seq(Kind::List, pop_mark())); break;
      case 0x85: case 0x86: case 0x87: {  // TUPLE1..3
        size_t n = op - 0x84u;
        std::vector<ValuePtr> items(n);
        for (size_t i = n; i-- > 0;) items[i] = pop();
        push(make_seq(Kind::Tuple, std::move(items)));
        break;
      }
      case 'd': {  // DICT
        auto items = pop_mark();
        if (items.size() % 2) throw fail("DICT with an odd number of items");
        auto d = make(Kind::Dict);
        for (size_t i = 0; i < items.size(); i += 2) dict_set(*d, items[i], items[i + 1]);
        push(d);
        break;
      }
      case 'a': {  // APPEND
        ValuePtr v = pop();
        Value& l = *need(top(), Kind::List, "APPEND");
        add_child_depth(l, *v);
        l.items.push_back(std::move(v));
        break;
      }
      case 'e': {  // APPENDS
        auto items = pop_mark();
        Value& l = *need(top(), Kind::List, "APPENDS");
        for (auto& v : items) {
          add_child_depth(l, *v);
          l.items.push_back(std::move(v));
        }
        break;
      }
      case 's': {  // SETITEM
        ValuePtr v = pop();
        ValuePtr k = pop();
        dict_set(*top(), std::move(k), std::move(v));
        break;
      }
      case 'u': {  // SETITEMS
        auto items = pop_mark();
        if (items.size() % 2) throw fail("SETITEMS with an odd number of items");
        Value& d = *top();
        for (size_t i = 0; i < items.size(); i += 2) dict_set(d, items[i], items[i + 1]);
        break;
      }
      case 'J': push(make_int(static_cast<int32_t>(take_le(4)))); break;  // BININT
      case 'K': push(make_int(*take(1))); break;                          // BININT1
      case 'M': push(make_int(static_cast<int64_t>(take_le(2)))); break;  // BININT2
      case 0x8a: case 0x8b: {  // LONG1, LONG4: little-endian two's complement
        uint64_t n = op == 0x8a ? *take(1) : take_le(4);
        if (n > 256) throw fail("integer of " + std::to_string(n) + " bytes is too large");
        const uint8_t* p = take(n);
        if (n <= 8) {
          uint64_t u = 0;
          for (size_t i = n; i-- > 0;) u = (u << 8) | p[i];
          if (n > 0 && n < 8 && (p[n - 1] & 0x80)) u |= ~uint64_t(0) << (8 * n);  // sign-extend
          push(make_int(static_cast<int64_t>(u)));
        } else {
          auto v = make(Kind::BigInt);
          v->s.assign(reinterpret_cast<const char*>(p), n);
          push(v);
        }
        break;
      }
      case 'G': {  // BINFLOAT: big-endian double
        const uint8_t* p = take(8);
        uint64_t u = 0;
        for (int i = 0; i < 8; ++i) u = (u << 8) | p[i];
        auto v = make(Kind::Float);
        std::memcpy(&v->f, &u, 8);
        push(v);
        break;
      }
      case 'X': push(make_str(Kind::Str, take_le(4))); break;     // BINUNICODE
      case 0x8c: push(make_str(Kind::Str, *take(1))); break;      // SHORT_BINUNICODE
      case 0x8d: push(make_str(Kind::Str, take_le(8))); break;    // BINUNICODE8
      case 'T': {                                                 // BINSTRING (Python 2 str)
        int32_t n = static_cast<int32_t>(take_le(4));
        if (n < 0) throw fail("negative BINSTRING length");
        push(make_str(Kind::Str, static_cast<size_t>(n)));
        break;
      }
      case 'U': push(make_str(Kind::Str, *take(1))); break;       // SHORT_BINSTRING
      case 'B': push(make_str(Kind::Bytes, take_le(4))); break;   // BINBYTES
      case 'C': push(make_str(Kind::Bytes, *take(1))); break;     // SHORT_BINBYTES
      case 0x8e: push(make_str(Kind::Bytes, take_le(8))); break;  // BINBYTES8
      case 'N': push(make(Kind::None)); break;
      case 0x88: case 0x89: {  // NEWTRUE, NEWFALSE
        auto v = make(Kind::Bool);
        v->i = op == 0x88;
        push(v);
        break;
      }
      case 'c': {  // GLOBAL "module\nname\n"
        std::string module = take_line();
        std::string name = take_line();
        push(global(module, name));
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        ValuePtr name = pop();
        ValuePtr module = pop();
        if (module->kind != Kind::Str || name->kind != Kind::Str) throw fail("STACK_GLOBAL expects two strings");
        push(global(module->s, name->s));
        break;
      }
      case 'R': {  // REDUCE
        ValuePtr args = pop();
        ValuePtr callable = pop();
        push(reduce(callable, args));
        break;
      }
      case 'b': {  // BUILD: object state (a state dict's _metadata, a tensor's python attributes) is not needed
        ValuePtr state = pop();
        Value& target = *top();
        if (target.kind != Kind::Dict && target.kind != Kind::Tensor)
          throw fail(std::string("BUILD on a ") + kind_name(target.kind) + " is not allowed");
        break;
      }
      case 'Q': {  // BINPERSID
        ValuePtr pid = pop();
        if (!persistent_load_) throw fail("persistent ids are not expected here");
        push(persistent_load_(pid));
        break;
      }
      case 'h': push(memo_get(*take(1))); break;        // BINGET
      case 'j': push(memo_get(take_le(4))); break;      // LONG_BINGET
      case 'q': memo_put(*take(1), top()); break;       // BINPUT
      case 'r': memo_put(take_le(4), top()); break;     // LONG_BINPUT
      case 0x94: memo_put(memo_.size(), top()); break;  // MEMOIZE
      default:
        throw fail("unsupported pickle opcode " + opcode_str(op));
    }
  }
}

}  // namespace

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::None: return "None";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::BigInt: return "int";
    case Kind::Float: return "float";
    case Kind::Str: return "str";
    case Kind::Bytes: return "bytes";
    case Kind::Tuple: return "tuple";
    case Kind::List: return "list";
    case Kind::Dict: return "dict";
    case Kind::Global: return "global";
    case Kind::Storage: return "storage";
    case Kind::Tensor: return "tensor";
  }
  return "?";
}

bool storage_global_dtype(const std::string& global, DType* out) {
  for (auto& c : kStorageClasses)
    if (global == c.name) {
      *out = c.dtype;
      return true;
    }
  return false;
}

Pickle::~Pickle() {
  root.reset();
  for (auto& w : containers)
    if (ValuePtr c = w.lock()) {
      c->items.clear();
      c->dict.clear();
    }
}

Pickle unpickle(const uint8_t* data, size_t size, size_t& pos, const std::string& origin,
                const PersistentLoad& persistent_load, const Limits& limits) {
  if (pos > size) throw InputError(origin + ": pickle: start offset past the end of the data");
  Pickle out;
  Unpickler u(data, size, pos, origin, persistent_load, limits, out);
  out.root = u.run();
  pos = u.pos();
  return out;
}

}  // namespace vf::pickle
