// PyTorch checkpoints written by torch.save (pytorch_model.bin): the zip format (torch >= 1.6:
// archive/data.pkl + archive/data/<key>), read with an allow-list unpickler that never executes
// anything: only the globals a state dict of tensors needs are accepted.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "core/weights.h"

namespace vf {

// The state dict's tensors in pickle order (contiguous; non-contiguous views are materialised).
std::vector<std::pair<std::string, Tensor>> read_torch_checkpoint(const std::string& path);

// The same for a checkpoint already in memory: `origin` names it in errors, `owner` keeps `data`
// alive (tensors may wrap it, and may be written to, so `data` must be writable).
std::vector<std::pair<std::string, Tensor>> read_torch_checkpoint(uint8_t* data, size_t size, const std::string& origin,
                                                                  std::shared_ptr<void> owner);

// Adds every tensor of the checkpoint to `store`.
void load_torch_checkpoint(const std::string& path, WeightStore& store);

}  // namespace vf
