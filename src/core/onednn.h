// What the CPU kernels on oneDNN share (dnnl_ops.cpp's layers, attention.cpp's products): the engine,
// and the argument sets a primitive keeps for its calls.
#pragma once

#include <dnnl.hpp>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace vf::onednn {

// The process's CPU engine (an inline function's static: one over every translation unit).
inline dnnl::engine& cpu_engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

// A memory object for `md` without a buffer yet (an ArgSets set points it at one per call).
inline dnnl::memory unbound(const dnnl::memory::desc& md) { return dnnl::memory(md, cpu_engine(), DNNL_MEMORY_NONE); }

// A primitive's execute() arguments with their memory objects, made once and pointed at each call's
// buffers (set_data_handle; the layouts they are used for are plain, so there is no padding to zero).
// Made per call, the objects and the map were most of a small layer's own time (malloc and
// descriptor set-up: ~1 of the 2 us of a 4 x 16 x 16 Linear on the VM), spent by the calling thread
// while the rest of the team waits. A call takes a set and gives it back when done (a thread running
// many calls, as attention's blocks, keeps one for all of them): there are as many as calls have run
// on the primitive at once.
class ArgSets {
 public:
  using Args = std::unordered_map<int, dnnl::memory>;
  class Lease {
   public:
    Lease(ArgSets& owner, std::unique_ptr<Args> args) : owner_(owner), args_(std::move(args)) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { owner_.give_back(std::move(args_)); }
    void bind(int arg, const void* data) { args_->at(arg).set_data_handle(const_cast<void*>(data)); }
    const Args& args() const { return *args_; }

   private:
    ArgSets& owner_;
    std::unique_ptr<Args> args_;
  };
  // A set: an idle one, or make() (the arguments with their descriptors) when none is idle.
  template <class Make>
  Lease take(const Make& make) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        std::unique_ptr<Args> args = std::move(idle_.back());
        idle_.pop_back();
        return Lease(*this, std::move(args));
      }
    }
    return Lease(*this, std::make_unique<Args>(make()));
  }

 private:
  void give_back(std::unique_ptr<Args> args) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.push_back(std::move(args));
  }
  std::mutex mu_;
  std::vector<std::unique_ptr<Args>> idle_;
};

}  // namespace vf::onednn
