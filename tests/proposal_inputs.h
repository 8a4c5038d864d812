// Inputs for the proposal-selection tests (tests/proposals_test.cpp on the CPU and the emulated
// device, tests/cuda on a GPU): logits [B, S] and coord_logits [B, S, 4] full of ties. Logits on a
// coarse grid (a few NaN); boxes from a few distinct coordinates (equal boxes, IoU 1), some far
// outside [0, 1] after the sigmoid's clamp (degenerate boxes of area 0, IoU NaN).
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <utility>

#include "core/tensor.h"

namespace vf::test {

inline std::pair<Tensor, Tensor> tie_heavy(int64_t B, int64_t S, uint32_t seed, double nan_fraction) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> level(-6, 6), coord(-3, 3);
  std::uniform_real_distribution<double> u(0, 1);
  Tensor logits = Tensor::empty({B, S}), coords = Tensor::empty({B, S, 4});
  for (int64_t i = 0; i < B * S; ++i) {
    logits.f32()[i] = u(gen) < nan_fraction ? std::nanf("") : 0.5f * static_cast<float>(level(gen));
    for (int c = 0; c < 4; ++c) coords.f32()[4 * i + c] = c < 2 ? 0.7f * coord(gen) : -1.0f + 0.5f * coord(gen);
    if (u(gen) < 0.02) coords.f32()[4 * i + 2] = 40.0f;  // w = 1: a box clamped at the border
  }
  return {logits, coords};
}

}  // namespace vf::test
