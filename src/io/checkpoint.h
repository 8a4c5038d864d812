// Finding and loading a model folder's weights, whatever format the Hub shipped them in.
#pragma once

#include <memory>
#include <string>

#include "core/weights.h"

namespace vf {

// Loads the first of model.safetensors, model.safetensors.index.json (sharded), pytorch_model.bin,
// pytorch_model.bin.index.json found in `model_dir`. Throws vf::Error when there is none.
std::shared_ptr<WeightStore> load_checkpoint(const std::string& model_dir);

// Loads one weights file: a shard index (*.json), a safetensors file or a torch.save file (told
// apart by their first bytes).
std::shared_ptr<WeightStore> load_weights_file(const std::string& path);

}  // namespace vf
