#include "core/cuda/timing.h"

namespace vf::cuda {

namespace {

__global__ void hold_kernel(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

}  // namespace

void hold_stream(cudaStream_t s, int microseconds) {
  hold_kernel<<<1, 1, 0, s>>>(static_cast<unsigned long long>(microseconds) * 1000ull);
}

}  // namespace vf::cuda
