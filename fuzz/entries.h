// The fuzzed entry points, one per loader: each takes raw bytes as a stranger's file would hold
// them and runs them through the project's own parsing, the way a user's call would. They return
// normally or throw vf::Error; anything else (a crash, a sanitizer report, another exception type,
// a hang) is a bug. Shared by the libFuzzer harnesses (fuzz_*.cpp, built with -DVF_FUZZ=ON) and
// the regression replay test (tests/fuzz_regression_test.cpp, in the normal build).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace vf::fuzz {

// A safetensors file: header, offsets, every tensor's bytes read back.
void safetensors(const uint8_t* data, size_t size);
// A torch.save file (zip archive or legacy pickle stream) through the allow-list unpickler.
void torch_checkpoint(const uint8_t* data, size_t size);
// A config.json or preprocessor_config.json: parsed, then create_model with an empty weight store
// (missing tensors are reported by name) and create_image_processor.
void config(const uint8_t* data, size_t size);
// A JPEG or PNG file: decoded (EXIF orientation applied), then run through two processors
// (a DeiT-style resize + crop + normalize and a DETR-style shortest-edge resize + pad).
void image(const uint8_t* data, size_t size);
// A model.safetensors.index.json naming two small fixed shards in a scratch folder.
void shard_index(const uint8_t* data, size_t size);

struct Target {
  const char* name;  // the fuzzer's name: fuzz/fuzz_<name>.cpp, tests/fuzz/{corpus,regressions}/<name>/
  void (*run)(const uint8_t*, size_t);
};
const std::vector<Target>& targets();

}  // namespace vf::fuzz
