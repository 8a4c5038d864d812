#pragma once

#include <string>

#include "core/device.h"
#include "core/tensor.h"

namespace vf::check {

// Runs one golden case folder; returns the process exit code (0 pass, 1 fail, 2 unsupported).
// The model runs on `device` (the comparisons on the host, with the same tolerances).
// dtype other than float32: the model computes in it (see core/device.h).
int run_check(const std::string& case_dir, const std::string& images_dir, Device device = Device::cpu(),
              DType dtype = DType::F32);

}  // namespace vf::check
