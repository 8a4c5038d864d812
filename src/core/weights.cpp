#include "core/weights.h"

#include "core/errors.h"

namespace vf {

namespace {
// The zero placeholders returned for missing tensors, in all (256 MiB of float32), and their count.
constexpr int64_t kMaxMissingPlaceholder = int64_t(1) << 26;
constexpr size_t kMaxMissingTensors = 100000;
}  // namespace

void WeightStore::add(const std::string& name, Tensor t) {
  Shape shape = t.shape();
  tensors_[name] = Entry{std::move(t), std::move(shape), nullptr};
}

void WeightStore::add_lazy(const std::string& name, Shape shape, Maker make) {
  tensors_[name] = Entry{Tensor(), std::move(shape), std::move(make)};
}

void WeightStore::add_from(const WeightStore& other, const std::string& name) {
  auto it = other.tensors_.find(name);
  if (it == other.tensors_.end()) return;
  std::lock_guard<std::mutex> lock(other.make_mu_);
  tensors_[name] = it->second;
}

const Tensor* WeightStore::find(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return nullptr;
  std::lock_guard<std::mutex> lock(make_mu_);
  Entry& e = const_cast<Entry&>(it->second);
  if (!e.tensor.defined() && e.make) {
    e.tensor = e.make();
    e.make = nullptr;
  }
  return &e.tensor;
}

const Shape* WeightStore::shape_of(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second.shape;
}

bool WeightStore::has_prefix(const std::string& prefix) const {
  auto it = tensors_.lower_bound(prefix);
  return it != tensors_.end() && it->first.compare(0, prefix.size(), prefix) == 0;
}

std::vector<std::string> WeightStore::names() const {
  std::vector<std::string> r;
  for (auto& [k, v] : tensors_) r.push_back(k);
  return r;
}

void WeightStore::note_used(const std::string& name) const {
  std::lock_guard<std::mutex> lock(mu_);
  used_.insert(name);
}

void WeightStore::note_missing(const std::string& name, const Shape& shape) const {
  std::lock_guard<std::mutex> lock(mu_);
  missing_.push_back(name + " " + shape_str(shape));
  const int64_t n = shape_numel(shape);
  missing_elements_ = n > kMaxMissingPlaceholder ? kMaxMissingPlaceholder + 1 : missing_elements_ + n;
  if (missing_elements_ > kMaxMissingPlaceholder || missing_.size() > kMaxMissingTensors)
    throw ModelError(std::to_string(missing_.size()) + " tensor(s) missing from the checkpoint (" + missing_.front() +
                     ", ..., " + missing_.back() + ") would need placeholders of more than " +
                     std::to_string(kMaxMissingPlaceholder) + " elements or " + std::to_string(kMaxMissingTensors) +
                     " tensors: config.json does not describe this checkpoint (or implies absurd sizes)");
}

void WeightStore::check_complete() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (missing_.empty()) return;
  std::string msg = std::to_string(missing_.size()) + " tensor(s) missing from the checkpoint:";
  size_t shown = 0;
  for (auto& m : missing_) {
    if (++shown > 20) { msg += " ..."; break; }
    msg += " " + m + (shown < missing_.size() ? "," : "");
  }
  throw ModelError(msg);
}

std::vector<std::string> WeightStore::unused() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> r;
  for (auto& [k, v] : tensors_)
    if (!used_.count(k)) r.push_back(k);
  return r;
}

Weights Weights::pp(const std::string& name) const { return Weights(store_, path(name)); }

bool Weights::has(const std::string& name) const { return store_ && store_->has(path(name)); }

bool Weights::has_module(const std::string& name) const { return store_ && store_->has_prefix(path(name) + "."); }

void Weights::ignore(const std::string& name) const {
  if (has(name)) store_->note_used(path(name));
}

Tensor Weights::get_unchecked(const std::string& name) const {
  std::string full = path(name);
  const Tensor* t = store_ ? store_->find(full) : nullptr;
  if (!t) throw ModelError("missing tensor " + full);
  store_->note_used(full);
  return t->dtype() == DType::F32 ? *t : t->to(DType::F32);
}

Tensor Weights::get(const std::string& name, const Shape& shape) const {
  std::string full = path(name);
  // Expected shapes come from config.json: a zero or negative size there (hidden_sizes [0, ...])
  // would build empty layers that divide by their width later.
  for (int64_t d : shape)
    if (d <= 0)
      throw ModelError("config.json implies tensor " + full + " of shape " + shape_str(shape) +
                       " (every size must be positive)");
  const Shape* found = store_ ? store_->shape_of(full) : nullptr;
  if (!found) {
    if (store_ && store_->missing_filler()) return store_->missing_filler()(full, shape);
    if (store_) store_->note_missing(full, shape);
    // A placeholder so that the load can go on and report every missing name (note_missing
    // refuses placeholders of absurd total size before they are allocated).
    return Tensor::zeros(shape);
  }
  store_->note_used(full);
  // Checked before the tensor is produced (a lazy one may claim far more than the file holds).
  if (*found != shape)
    throw ModelError("tensor " + full + " has shape " + shape_str(*found) + ", the config implies " + shape_str(shape));
  const Tensor* t = store_->find(full);
  return t->dtype() == DType::F32 ? *t : t->to(DType::F32);
}

}  // namespace vf
