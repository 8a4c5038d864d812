// Multi-scale deformable attention sampling: the core of Deformable DETR's MSDeformAttn.
//
// Equivalent to the reference's `multi_scale_deformable_attention` (PyTorch path): for every query,
// head, level and point, the head's value map of that level is sampled bilinearly at a normalised
// location (grid_sample, align_corners=False, zero padding), and the samples are summed with the
// attention weights. Done here in one pass without materialising the per-level sampled tensors.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace vf {

// One feature level inside the flattened value sequence.
struct DeformLevel {
  int64_t height = 0;
  int64_t width = 0;
  int64_t start = 0;  // first index of this level in the sequence (level_start_index)
};

// The levels of `shapes` (height, width) laid out one after the other from index 0.
std::vector<DeformLevel> deform_levels(const std::vector<std::pair<int64_t, int64_t>>& shapes);

// value:               [B, S, heads, head_dim], S = sum of height*width over the levels
// sampling_locations:  [B, Q, heads, levels, points, 2]  (x, y) in [0, 1], the padded map's frame
// attention_weights:   [B, Q, heads, levels, points]
// returns              [B, Q, heads * head_dim]
Tensor ms_deform_attn(const Tensor& value, const std::vector<DeformLevel>& levels,
                      const Tensor& sampling_locations, const Tensor& attention_weights);

}  // namespace vf
