#include "core/deformable_attention.h"

#include "core/backend.h"

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

namespace {

// Adds a * (bilinear sample of the head's value map at (x, y)) to out[0..D). kD > 0 fixes D at
// compile time. The weights of the four neighbours are those of grid_sample's CPU kernel.
template <int kD>
inline void accumulate_sample(const float* vl, int64_t H, int64_t W, int64_t row, int64_t D, float x, float y,
                              float a, float* out) {
  if (kD > 0) D = kD;
  if (!(x > -1.f && x < static_cast<float>(W) && y > -1.f && y < static_cast<float>(H))) return;  // all zero
  const float x0f = std::floor(x), y0f = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  const float fx = x - x0f, fy = y - y0f;  // distances to the west / north neighbours
  const float c[4] = {(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx};  // nw, ne, sw, se
  const bool in_x[2] = {x0 >= 0, x0 + 1 < W}, in_y[2] = {y0 >= 0, y0 + 1 < H};
  for (int j = 0; j < 4; ++j) {
    const int dx = j & 1, dy = j >> 1;
    if (!in_x[dx] || !in_y[dy]) continue;  // zero padding
    const float* src = vl + ((y0 + dy) * W + (x0 + dx)) * row;
    const float cj = c[j] * a;
    for (int64_t d = 0; d < D; ++d) out[d] += src[d] * cj;
  }
}

template <int kD>
void sample_all(const Tensor& value, const std::vector<DeformLevel>& levels, const Tensor& sampling_locations,
                const Tensor& attention_weights, Tensor& out) {
  const int64_t B = value.size(0), S = value.size(1), NH = value.size(2), D = value.size(3);
  const int64_t NL = static_cast<int64_t>(levels.size());
  const int64_t Q = sampling_locations.size(1), NP = sampling_locations.size(4);
  const float* v = value.f32();
  const float* loc = sampling_locations.f32();
  const float* aw = attention_weights.f32();
  float* o = out.f32();
  const int64_t row = NH * D;  // floats between two positions of the value sequence
#pragma omp parallel for schedule(static)
  for (int64_t bq = 0; bq < B * Q; ++bq) {
    const float* vb = v + (bq / Q) * S * row;
    float* ob = o + bq * row;
    std::fill_n(ob, row, 0.f);
    for (int64_t h = 0; h < NH; ++h) {
      for (int64_t l = 0; l < NL; ++l) {
        const int64_t H = levels[l].height, W = levels[l].width;
        const float* vl = vb + levels[l].start * row + h * D;
        // grid_sample(align_corners=False) unnormalises g = 2*loc - 1 as (g + 1) * size/2 - 0.5.
        const float scale_x = static_cast<float>(W) / 2, scale_y = static_cast<float>(H) / 2;
        for (int64_t p = 0; p < NP; ++p) {
          const int64_t k = ((bq * NH + h) * NL + l) * NP + p;
          const float gx = 2 * loc[2 * k] - 1, gy = 2 * loc[2 * k + 1] - 1;
          accumulate_sample<kD>(vl, H, W, row, D, (gx + 1) * scale_x - 0.5f, (gy + 1) * scale_y - 0.5f, aw[k],
                                ob + h * D);
        }
      }
    }
  }
}

}  // namespace

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

  if (Device d = op_device({&value, &sampling_locations, &attention_weights}); !d.is_cpu())
    return backend(d).ms_deform_attn(value, levels, sampling_locations, attention_weights);
  Tensor out = Tensor::empty({B, Q, NH * D});
  switch (D) {  // the head sizes of the published configs, with the channel loop unrolled
    case 32: sample_all<32>(value, levels, sampling_locations, attention_weights, out); break;
    case 16: sample_all<16>(value, levels, sampling_locations, attention_weights, out); break;
    case 64: sample_all<64>(value, levels, sampling_locations, attention_weights, out); break;
    default: sample_all<0>(value, levels, sampling_locations, attention_weights, out); break;
  }
  return out;
}

}  // namespace vf
