#include "core/position.h"

#include <cmath>

#include "core/backend.h"

namespace vf {

Tensor sine_expand(const Tensor& y_embed, const Tensor& x_embed, const Tensor& dim_t) {
  if (y_embed.dtype() != DType::F32 || x_embed.dtype() != DType::F32 || dim_t.dtype() != DType::F32 ||
      y_embed.dim() != 1 || x_embed.shape() != y_embed.shape() || dim_t.dim() != 1)
    throw Error("sine_expand: expected float32 [N], [N] and [F], got " + shape_str(y_embed.shape()) + ", " +
                shape_str(x_embed.shape()) + ", " + shape_str(dim_t.shape()));
  if (Device d = op_device({&y_embed, &x_embed, &dim_t}); !d.is_cpu())
    return backend(d).sine_expand(y_embed, x_embed, dim_t);
  const int64_t N = y_embed.size(0), F = dim_t.size(0);
  Tensor out = Tensor::empty({N, 2 * F});
  const float* ye = y_embed.f32();
  const float* xe = x_embed.f32();
  const float* dt = dim_t.f32();
  float* o = out.f32();
#pragma omp parallel for
  for (int64_t p = 0; p < N; ++p) {
    float* dst = o + p * 2 * F;
    for (int64_t k = 0; k < F; ++k) {
      const float vy = ye[p] / dt[k], vx = xe[p] / dt[k];
      dst[k] = (k % 2 == 0) ? std::sin(vy) : std::cos(vy);
      dst[F + k] = (k % 2 == 0) ? std::sin(vx) : std::cos(vx);
    }
  }
  return out;
}

}  // namespace vf
