// Weights by their Hub names, read through a prefix-scoped view.
//
// A module is built from `Weights w` scoped to its prefix (`w.pp("encoder").pp("layer").pp(i)`), so
// each checkpoint name appears once, where the module that owns it is built. Every tensor a model
// asks for is checked against the shape the config implies; missing ones are collected and reported
// together once the model is built; tensors nobody asked for are reported as unexpected.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace vf {

class WeightStore {
 public:
  void add(const std::string& name, Tensor t);
  // A tensor produced on first use (a strided checkpoint view that must be copied): its shape is
  // known without producing it, so that a shape the model does not expect is refused before
  // anything of that size is allocated (a stride-0 view of one element can claim gigabytes).
  using Maker = std::function<Tensor()>;
  void add_lazy(const std::string& name, Shape shape, Maker make);
  // Copies the entry `name` of `other` (lazy or not).
  void add_from(const WeightStore& other, const std::string& name);
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  bool has_prefix(const std::string& prefix) const;
  // Produces a lazy tensor if needed.
  const Tensor* find(const std::string& name) const;
  // The shape of `name` without producing it (nullptr when absent).
  const Shape* shape_of(const std::string& name) const;
  std::vector<std::string> names() const;
  size_t size() const { return tensors_.size(); }

  // Bookkeeping for the load report.
  void note_used(const std::string& name) const;
  // Throws a ModelError once the missing tensors add up to more than a model could hold (a
  // config.json that does not match the checkpoint, or a hostile one implying huge sizes).
  void note_missing(const std::string& name, const Shape& shape) const;
  // Throws an Error naming every missing tensor.
  void check_complete() const;
  // For models built from a config alone (benchmarks, demos): a missing tensor is produced by
  // `fill` instead of being reported.
  using Filler = std::function<Tensor(const std::string& name, const Shape& shape)>;
  void set_missing_filler(Filler fill) { filler_ = std::move(fill); }
  const Filler& missing_filler() const { return filler_; }

  // Names present in the checkpoint but never read.
  std::vector<std::string> unused() const;

 private:
  struct Entry {
    Tensor tensor;  // undefined until a lazy entry is produced
    Shape shape;
    Maker make;
  };
  std::map<std::string, Entry> tensors_;
  mutable std::mutex make_mu_;
  mutable std::mutex mu_;
  mutable std::set<std::string> used_;
  mutable std::vector<std::string> missing_;
  Filler filler_;
  mutable int64_t missing_elements_ = 0;
};

class Weights {
 public:
  Weights() = default;
  explicit Weights(std::shared_ptr<const WeightStore> store, std::string prefix = "")
      : store_(std::move(store)), prefix_(std::move(prefix)) {}

  Weights pp(const std::string& name) const;
  Weights pp(int64_t index) const { return pp(std::to_string(index)); }

  // The tensor `prefix.name` as float32 with exactly this shape. A missing tensor is recorded (and
  // a zero tensor returned) so that the load can report every missing name at once.
  Tensor get(const std::string& name, const Shape& shape) const;
  // As get(), without a shape check (integer buffers, optional tensors of free shape).
  Tensor get_unchecked(const std::string& name) const;
  bool has(const std::string& name) const;
  // Whether any tensor lives under `prefix.name.` (a submodule is present in the checkpoint).
  bool has_module(const std::string& name) const;
  // Marks the tensor as consumed (an alias of a tied tensor, an ignored buffer).
  void ignore(const std::string& name) const;
  std::string path(const std::string& name) const { return prefix_.empty() ? name : prefix_ + "." + name; }
  const std::string& prefix() const { return prefix_; }

 private:
  std::shared_ptr<const WeightStore> store_;
  std::string prefix_;
};

}  // namespace vf
