#include "core/deformable_attention.h"

#include <cmath>
#include <string>

namespace vf {

std::vector<DeformLevel> deform_levels(const std::vector<std::pair<int64_t, int64_t>>& shapes) {
  std::vector<DeformLevel> levels;
  int64_t start = 0;
  for (auto& [h, w] : shapes) {
    levels.push_back({h, w, start});
    start += h * w;
  }
  return levels;
}

Tensor ms_deform_attn(const Tensor& value, const std::vector<DeformLevel>& levels,
                      const Tensor& sampling_locations, const Tensor& attention_weights) {
  if (value.dim() != 4) throw Error("ms_deform_attn: value must be [B, S, heads, head_dim], got " + shape_str(value.shape()));
  const int64_t B = value.size(0), S = value.size(1), NH = value.size(2), D = value.size(3);
  const int64_t NL = static_cast<int64_t>(levels.size());
  if (sampling_locations.dim() != 6 || sampling_locations.size(0) != B || sampling_locations.size(2) != NH ||
      sampling_locations.size(3) != NL || sampling_locations.size(5) != 2)
    throw Error("ms_deform_attn: sampling_locations " + shape_str(sampling_locations.shape()) +
                " does not match value " + shape_str(value.shape()) + " and " + std::to_string(NL) + " levels");
  const int64_t Q = sampling_locations.size(1), NP = sampling_locations.size(4);
  if (attention_weights.shape() != Shape{B, Q, NH, NL, NP})
    throw Error("ms_deform_attn: attention_weights " + shape_str(attention_weights.shape()) + ", expected " +
                shape_str({B, Q, NH, NL, NP}));
  int64_t total = 0;
  for (auto& l : levels) {
    if (l.start != total || l.height <= 0 || l.width <= 0) throw Error("ms_deform_attn: bad level layout");
    total += l.height * l.width;
  }
  if (total != S)
    throw Error("ms_deform_attn: the levels hold " + std::to_string(total) + " positions, value has " + std::to_string(S));

  Tensor out = Tensor::empty({B, Q, NH * D});
  const float* v = value.f32();
  const float* loc = sampling_locations.f32();
  const float* aw = attention_weights.f32();
  float* o = out.f32();
  const int64_t row = NH * D;  // floats between two positions of the value sequence

#pragma omp parallel
  {
    std::vector<float> sample(static_cast<size_t>(D));
#pragma omp for schedule(static)
    for (int64_t bq = 0; bq < B * Q; ++bq) {
      const int64_t b = bq / Q;
      const float* vb = v + b * S * row;
      float* ob = o + bq * row;
      for (int64_t i = 0; i < row; ++i) ob[i] = 0.f;
      for (int64_t h = 0; h < NH; ++h) {
        float* oh = ob + h * D;
        const float* vh = vb + h * D;
        for (int64_t l = 0; l < NL; ++l) {
          const int64_t H = levels[l].height, W = levels[l].width;
          const float* vl = vh + levels[l].start * row;
          // grid_sample(align_corners=False) unnormalises grid g = 2*loc - 1 as (g + 1) * size/2 - 0.5.
          const float scale_x = static_cast<float>(W) / 2, scale_y = static_cast<float>(H) / 2;
          for (int64_t p = 0; p < NP; ++p) {
            const int64_t k = (((bq * NH + h) * NL + l) * NP + p);
            const float gx = 2 * loc[2 * k] - 1, gy = 2 * loc[2 * k + 1] - 1;
            const float x = (gx + 1) * scale_x - 0.5f, y = (gy + 1) * scale_y - 0.5f;
            const float a = aw[k];
            if (!(x > -1.f && x < static_cast<float>(W) && y > -1.f && y < static_cast<float>(H))) continue;
            const float x0f = std::floor(x), y0f = std::floor(y);
            const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
            const float we = x - x0f, wn = y - y0f;  // distances to the west / north neighbours
            const float ww = 1 - we, ws = 1 - wn;
            const float c[4] = {ws * ww, ws * we, wn * ww, wn * we};  // nw, ne, sw, se
            const int64_t cx[4] = {x0, x0 + 1, x0, x0 + 1}, cy[4] = {y0, y0, y0 + 1, y0 + 1};
            for (int64_t d = 0; d < D; ++d) sample[d] = 0.f;
            for (int j = 0; j < 4; ++j) {
              if (cx[j] < 0 || cx[j] >= W || cy[j] < 0 || cy[j] >= H) continue;  // zero padding
              const float* src = vl + (cy[j] * W + cx[j]) * row;
              const float cj = c[j];
              for (int64_t d = 0; d < D; ++d) sample[d] += src[d] * cj;
            }
            for (int64_t d = 0; d < D; ++d) oh[d] += sample[d] * a;
          }
        }
      }
    }
  }
  return out;
}

}  // namespace vf
