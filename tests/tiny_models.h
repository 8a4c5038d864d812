// Small models the tests build from vendored files (no checkpoint is vendored for them).
#pragma once

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "io/file.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "io/synthetic.h"
#include "test_util.h"

namespace vf::test {

// A model folder from a folder of config files and synthetic weights (weights.json, as the golden
// cases with "weights": "synthetic" have them): the config files copied and model.safetensors
// written from the weights, in the scratch folder `scratch` (one per test suite). ctest runs every
// test in a process of its own, two at a time, so tests of one suite rebuild the same folder while
// another reads it: each file is replaced whole (written atomically, as the safetensors writer
// writes), never seen half-copied. A plain overwriting copy of config.json made
// CliVf.SegmentFolderInBatches fail once under ctest -j2.
inline std::string synthetic_model_dir(const std::string& src, const std::string& scratch) {
  const std::string dir = temp_dir(scratch);
  for (const char* f : {"config.json", "preprocessor_config.json"})
    write_file_atomically(dir + "/" + f, read_bytes(src + "/" + f));
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
