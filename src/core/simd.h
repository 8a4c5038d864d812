// Sixteen floats as one value, for the row loops of the norms: one AVX-512 register where the target
// has AVX-512 (GCC splits it into narrower registers elsewhere), whatever width GCC's tuning would
// pick for a loop it vectorises itself (256 bits on the -march=native of today's AVX-512 CPUs; and a
// `simd reduction` over bfloat16 it leaves as a chain of scalar adds). Loads and stores read and write
// float32 or bfloat16 memory.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/bfloat16.h"

namespace vf::simd {

constexpr int64_t kLanes = 16;
using F16 = float __attribute__((vector_size(kLanes * sizeof(float))));
using F8 = float __attribute__((vector_size(8 * sizeof(float))));
using D8 = double __attribute__((vector_size(8 * sizeof(double))));

inline F16 splat(float v) { return F16{} + v; }
inline F8 low(F16 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
inline F8 high(F16 v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }

inline F16 load(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// Sixteen bfloat16 widened exactly (their bits in the high half of a float's).
inline F16 load(const uint16_t* p) {
  using U16 = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  using U32 = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  U16 h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<F16>(__builtin_convertvector(h, U32) << 16);
}

inline void store(float* p, F16 v) { std::memcpy(p, &v, sizeof v); }
// Rounded as bf16_from_float rounds.
inline void store(uint16_t* p, F16 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(reinterpret_cast<__m512>(v)));
#else
  float f[kLanes];
  std::memcpy(f, &v, sizeof v);
  bf16_from_float(f, p, kLanes);
#endif
}

// One value, for the elements past a row's last whole vector.
inline void put(float* p, float v) { *p = v; }
inline void put(uint16_t* p, float v) { *p = bf16_from_float(v); }

// The lanes' sum, in a fixed order (the halves added pairwise).
inline float sum(F16 v) {
  using F4 = float __attribute__((vector_size(4 * sizeof(float))));
  const F8 h8 = low(v) + high(v);
  const F4 h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// acc[0..16) += v, in double.
inline void add_to(double* acc, F16 v) {
  const F8 halves[2] = {low(v), high(v)};
  for (int h = 0; h < 2; ++h) {
    D8 d;
    std::memcpy(&d, acc + 8 * h, sizeof d);
    d += __builtin_convertvector(halves[h], D8);
    std::memcpy(acc + 8 * h, &d, sizeof d);
  }
}

// x[0] + ... + x[n-1] in double: in sixteen lanes over the whole vectors (independent additions, not
// one chain of n), the lanes and then the rest added in a fixed order.
inline double sum_in_double(const float* x, int64_t n) {
  D8 lo{}, hi{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const F16 v = load(x + i);
    lo += __builtin_convertvector(low(v), D8);
    hi += __builtin_convertvector(high(v), D8);
  }
  const D8 both = lo + hi;
  double s = ((both[0] + both[4]) + (both[2] + both[6])) + ((both[1] + both[5]) + (both[3] + both[7]));
  for (; i < n; ++i) s += x[i];
  return s;
}

}  // namespace vf::simd
