// Reading model and processor configs (parsed JSON) with the reference's defaults.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/tensor.h"

namespace vf {

using json = nlohmann::json;

// cfg.value(key, default) with a clear error when the key holds the wrong type. A JSON null
// counts as absent (the reference writes None for "use the default").
template <class T>
T cfg_get(const json& cfg, const std::string& key, const T& fallback) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return fallback;
  try {
    return it->get<T>();
  } catch (const std::exception& e) {
    throw ModelError("config key '" + key + "' has an unexpected value " + it->dump() + ": " + e.what());
  }
}

inline bool cfg_has(const json& cfg, const std::string& key) {
  auto it = cfg.find(key);
  return it != cfg.end() && !it->is_null();
}

}  // namespace vf
