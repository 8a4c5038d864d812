#include "io/synthetic.h"

#include <cmath>

namespace vf {

uint64_t fnv1a64(const std::string& bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  uint64_t z = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

Tensor synthesize_tensor(const std::string& name, const Shape& shape, double center, int exp) {
  Tensor t = Tensor::empty(shape, DType::F32);
  float* p = t.f32();
  const int64_t n = t.numel();
  const uint64_t seed = fnv1a64(name);
  const float c = static_cast<float>(center);
  // k * 2^(exp-23) for an integer |k| <= 2^23, exact in double; its conversion to float rounds once,
  // as ldexp on the float k would (the same value, without a libm call per element).
  const double step = std::ldexp(1.0, exp - 23);
#pragma omp parallel for if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = splitmix64(seed + static_cast<uint64_t>(i));
    int k = static_cast<int>(z >> 40) - 8388608;
    // The only other rounding is the one addition.
    p[i] = c + static_cast<float>(static_cast<double>(k) * step);
  }
  return t;
}

std::shared_ptr<WeightStore> synthesize_weights(const json& weights_json) {
  if (!weights_json.is_array()) throw Error("weights.json: expected a list of {name, shape, center, exp}");
  auto store = std::make_shared<WeightStore>();
  for (size_t i = 0; i < weights_json.size(); ++i) {
    const json& w = weights_json[i];
    const std::string where = "weights.json entry " + std::to_string(i);
    try {
      if (!w.is_object()) throw Error("not an object");
      std::string name = w.at("name").get<std::string>();
      Shape shape = w.at("shape").get<Shape>();
      double center = w.at("center").get<double>();
      int exp = w.at("exp").get<int>();
      if (store->has(name)) throw Error("tensor '" + name + "' listed twice");
      store->add(name, synthesize_tensor(name, shape, center, exp));
    } catch (const json::exception& e) {
      throw Error(where + ": " + e.what());
    } catch (const Error& e) {
      throw Error(where + ": " + e.what());
    }
  }
  return store;
}

}  // namespace vf
