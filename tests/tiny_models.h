// Small models the tests build from vendored files (no checkpoint is vendored for them).
#pragma once

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "io/json.h"
#include "io/safetensors.h"
#include "io/synthetic.h"
#include "test_util.h"

namespace vf::test {

// A model folder from a folder of config files and synthetic weights (weights.json, as the golden
// cases with "weights": "synthetic" have them): the config files copied and model.safetensors
// written from the weights, in the scratch folder `scratch` (one per test suite: suites may run in
// parallel).
inline std::string synthetic_model_dir(const std::string& src, const std::string& scratch) {
  namespace fs = std::filesystem;
  const std::string dir = temp_dir(scratch);
  for (const char* f : {"config.json", "preprocessor_config.json"})
    fs::copy_file(src + "/" + f, dir + "/" + f, fs::copy_options::overwrite_existing);
  auto store = synthesize_weights(read_json_file(src + "/weights.json"));
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const std::string& name : store->names()) tensors.emplace_back(name, *store->find(name));
  write_safetensors(dir + "/model.safetensors", tensors);
  return dir;
}

// A DETR panoptic model folder (DetrForSegmentation, the detr-tiny-seg golden case) from the
// vendored config files and synthetic weights.
inline std::string panoptic_model_dir(const std::string& scratch) {
  return synthetic_model_dir(std::string(VF_SOURCE_DIR) + "/tests/data/detr-tiny-seg", scratch);
}

}  // namespace vf::test
