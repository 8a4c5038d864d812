#include "io/torch_checkpoint.h"

namespace vf {

std::vector<std::pair<std::string, Tensor>> read_torch_checkpoint(const std::string& path) {
  throw Error(path + ": PyTorch checkpoints are not supported yet");
}

void load_torch_checkpoint(const std::string& path, WeightStore& store) {
  for (auto& [name, t] : read_torch_checkpoint(path)) store.add(name, std::move(t));
}

}  // namespace vf
