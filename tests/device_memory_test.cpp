// device_memory_stats on the devices every build has, and the 16-bit compute dtypes' refusal where no
// GPU can take them (the CUDA side: tests/cuda).
#include <gtest/gtest.h>

#include "core/device.h"
#include "core/errors.h"
#include "core/tensor.h"

namespace vf {
namespace {

TEST(DeviceMemory, HostDevicesReportNoGpuMemory) {
  for (Device d : {Device::cpu(), Device::emulated()}) {
    Tensor t = Tensor::empty({1 << 16}, DType::F32, d);
    DeviceMemoryStats s = device_memory_stats(d, /*reset_peak=*/true);
    EXPECT_EQ(s.in_use, 0u) << d.str();
    EXPECT_EQ(s.peak, 0u) << d.str();
  }
}

TEST(DeviceMemory, CudaDtypeRefusedWithoutAGpu) {
  if (cuda_available()) GTEST_SKIP() << "a GPU is visible";
  EXPECT_THROW(check_compute_dtype(Device::cuda(), DType::BF16), Error);
  EXPECT_NO_THROW(check_compute_dtype(Device::cuda(), DType::F32));
}

}  // namespace
}  // namespace vf
