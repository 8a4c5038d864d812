// Synthetic weights of the golden cases (../shared/goldens/README.md, "Synthetic weights"): every
// float tensor listed in weights.json is filled from a hash of its name, reproducibly in any language.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/weights.h"
#include "io/json.h"

namespace vf {

// weights_json: the parsed weights.json, a list of {name, shape, center, exp}.
std::shared_ptr<WeightStore> synthesize_weights(const json& weights_json);

// One tensor: element i = float32(center) + ldexp(float32(k_i), exp - 23), k_i from splitmix64.
Tensor synthesize_tensor(const std::string& name, const Shape& shape, double center, int exp);

uint64_t fnv1a64(const std::string& bytes);
uint64_t splitmix64(uint64_t x);

}  // namespace vf
