// Where a GPU forward's time goes, kernel by kernel, without changing the program: a CUDA injection
// library (the driver loads it at cuInit when CUDA_INJECTION64_PATH names it) that records every
// kernel and copy through CUPTI's activity API and prints, at exit, the GPU time per kernel name.
// Unlike VF_CUDA_TRACE it does not wait for each op, so graph replays are measured as they run.
//
//   CUDA_INJECTION64_PATH=$PWD/libvf_kernel_profile.so VF_DEVICE=cuda vf_bench --benchmark_filter=...
//
// VF_PROFILE_TOP (default 40) limits the rows. The table counts every launch of the process
// (warm-up and algorithm searches included), so read it beside the calls column: a kernel that runs
// once per forward has as many calls as forwards.
#include <cupti.h>
#include <cxxabi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Row {
  double ms = 0;
  long calls = 0;
};

std::mutex mu;
std::map<std::string, Row>& rows() {
  static auto* r = new std::map<std::string, Row>;  // outlives static destruction at exit
  return *r;
}

std::string demangled(const char* name) {
  if (!name) return "?";
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> d(abi::__cxa_demangle(name, nullptr, nullptr, &status), std::free);
  std::string s = status == 0 && d ? d.get() : name;
  // Template arguments make names unreadably long; the function and its first arguments say enough.
  return s.size() > 110 ? s.substr(0, 110) : s;
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = size_t(8) << 20;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, *size));
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      auto* k = reinterpret_cast<CUpti_ActivityKernel10*>(record);
      Row& r = rows()[demangled(k->name)];
      r.ms += double(k->end - k->start) * 1e-6;
      ++r.calls;
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      auto* m = reinterpret_cast<CUpti_ActivityMemcpy6*>(record);
      static const char* kinds[] = {"?", "HtoD", "DtoH", "HtoA", "AtoH", "AtoA", "AtoD", "DtoA", "DtoD", "HtoH", "PtoP"};
      const char* kind = m->copyKind < sizeof(kinds) / sizeof(*kinds) ? kinds[m->copyKind] : "?";
      Row& r = rows()[std::string("[memcpy ") + kind + "]"];
      r.ms += double(m->end - m->start) * 1e-6;
      ++r.calls;
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      auto* m = reinterpret_cast<CUpti_ActivityMemset4*>(record);
      Row& r = rows()["[memset]"];
      r.ms += double(m->end - m->start) * 1e-6;
      ++r.calls;
    }
  }
  std::free(buffer);
}

void report() {
  cuptiActivityFlushAll(1);
  std::lock_guard<std::mutex> lock(mu);
  std::vector<std::pair<double, std::string>> sorted;
  double total = 0;
  for (auto& [name, r] : rows()) sorted.push_back({r.ms, name}), total += r.ms;
  std::sort(sorted.rbegin(), sorted.rend());
  const char* top_env = std::getenv("VF_PROFILE_TOP");
  const size_t top = top_env ? size_t(std::atoi(top_env)) : 40;
  std::fprintf(stderr, "kernel profile: %.2f ms of GPU time in all\n", total);
  std::fprintf(stderr, "%10s %6s %9s %9s  %s\n", "ms", "%", "calls", "us/call", "kernel");
  for (size_t i = 0; i < sorted.size() && i < top; ++i) {
    const Row& r = rows()[sorted[i].second];
    std::fprintf(stderr, "%10.2f %5.1f%% %9ld %9.2f  %s\n", r.ms, 100.0 * r.ms / total, r.calls, 1e3 * r.ms / r.calls,
                 sorted[i].second.c_str());
  }
}

}  // namespace

// The driver calls this once, when CUDA starts in the process.
extern "C" int InitializeInjection() {
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) return 0;
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  std::atexit(report);
  return 1;
}
