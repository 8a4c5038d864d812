// float32 -> bfloat16 for ops that write the input of a bfloat16 layer themselves (instead of a
// float32 map that the layer's reorder rounds in a pass of its own).
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace vf {

// A bfloat16 (its bits) widened to float32, exactly; a float32 as it is (for code over either).
inline float as_float(uint16_t v) { return std::bit_cast<float>(uint32_t(v) << 16); }
inline float as_float(float v) { return v; }

// Rounded to nearest even, NaN kept a (quiet) NaN: what oneDNN's float32 -> bfloat16 reorder gives.
inline uint16_t bf16_from_float(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// n values. Where the compiler targets AVX512-BF16 this is the instruction oneDNN's reorder runs on
// such a CPU (which also reads denormal inputs as zero); elsewhere the rounding above.
inline void bf16_from_float(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 m = __mmask16((1u << (n - i)) - 1u);
    _mm256_mask_storeu_epi16(y + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + i)));
  }
#else
  for (; i < n; ++i) y[i] = bf16_from_float(x[i]);
#endif
}

}  // namespace vf
