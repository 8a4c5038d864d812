// The safetensors format (https://github.com/huggingface/safetensors): an 8-byte little-endian
// header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {..}}, then the
// tensors' bytes. Reading validates the header as strictly as the reference implementation.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "core/weights.h"

namespace vf {

// Maps the file and returns its tensors in header order, wrapping the mapping (no copy, unless a
// tensor's bytes are misaligned for its dtype). Throws vf::Error naming the file and the problem.
std::vector<std::pair<std::string, Tensor>> read_safetensors(const std::string& path);

// The same for a file already in memory: `origin` names it in errors, `owner` keeps `data` alive
// (tensors wrap it when aligned, and may be written to, so `data` must be writable memory).
std::vector<std::pair<std::string, Tensor>> parse_safetensors(const uint8_t* data, size_t size,
                                                              const std::string& origin,
                                                              std::shared_ptr<void> owner);

// Adds every tensor of the file to `store`.
void load_safetensors(const std::string& path, WeightStore& store);

// Writes the tensors, in order, to a temporary file next to `path` and renames it into place, so
// that `path` is never left half-written.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors);

// "F32", "BF16", ... as written in a safetensors header.
const char* safetensors_dtype_name(DType t);

}  // namespace vf
