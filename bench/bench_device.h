// The device the benchmarks run on: VF_DEVICE (cpu, cuda, cuda:N, emu), the CPU when unset.
#pragma once

#include <cstdlib>

#include "core/device.h"

namespace vf_bench {

inline vf::Device bench_device() {
  const char* d = std::getenv("VF_DEVICE");
  return d && *d ? vf::Device::parse(d) : vf::Device::cpu();
}

}  // namespace vf_bench
