// Reading model and processor configs (parsed JSON) with the reference's defaults.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "core/errors.h"
#include "core/tensor.h"

namespace vf {

using json = nlohmann::json;

namespace detail {

// The integer type a T holds at its leaves (T, or the elements of nested vectors); void if none.
template <class T> struct integer_leaf { using type = void; };
template <class T>
  requires(std::is_integral_v<T> && !std::is_same_v<T, bool>)
struct integer_leaf<T> { using type = T; };
template <class T> struct integer_leaf<std::vector<T>> { using type = typename integer_leaf<T>::type; };

}  // namespace detail

// Whether every number in `v` (recursing into arrays) converts to the integer type I without
// leaving its range: nlohmann's get<I>() casts a float like 1e300 unchecked (undefined behaviour).
template <class I>
bool json_integers_fit(const json& v) {
  if (v.is_array()) {
    for (const json& e : v)
      if (!json_integers_fit<I>(e)) return false;
    return true;
  }
  using L = std::numeric_limits<I>;
  if (v.is_number_float()) {
    const double d = v.get<double>(), upper = std::ldexp(1.0, L::digits);  // exclusive
    return std::isfinite(d) && d >= static_cast<double>(L::min()) && d < upper;
  }
  if (v.is_number_unsigned()) return v.get<uint64_t>() <= static_cast<uint64_t>(L::max());
  if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    return L::is_signed ? (i >= static_cast<int64_t>(L::min()) && static_cast<uint64_t>(std::max<int64_t>(i, 0)) <=
                                                                      static_cast<uint64_t>(L::max()))
                        : i >= 0;
  }
  return true;  // not a number: get<T>() reports the type mismatch
}

// v.get<T>() with a clear ModelError (naming `what`) when v holds the wrong type, or a number out of
// the range of T's integers.
template <class T>
T json_to(const json& v, const std::string& what) {
  using I = typename detail::integer_leaf<T>::type;
  if constexpr (!std::is_void_v<I>) {
    if (!json_integers_fit<I>(v))
      throw ModelError(what + " has a value out of range: " + v.dump().substr(0, 200));
  }
  try {
    return v.get<T>();
  } catch (const std::exception& e) {
    throw ModelError(what + " has an unexpected value " + v.dump().substr(0, 200) + ": " + e.what());
  }
}

// cfg.value(key, default) with a clear error when the key holds the wrong type or an integer out of
// range. A JSON null counts as absent (the reference writes None for "use the default").
template <class T>
T cfg_get(const json& cfg, const std::string& key, const T& fallback) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return fallback;
  return json_to<T>(*it, "config key '" + key + "'");
}

inline bool cfg_has(const json& cfg, const std::string& key) {
  auto it = cfg.find(key);
  return it != cfg.end() && !it->is_null();
}

}  // namespace vf
