// The trigonometric half of the DETR family's sine position embedding, as an op (it is the costly
// half: 2 * F sines or cosines per position, where the cumulative sums before it are cheap).
#pragma once

#include "core/tensor.h"

namespace vf {

// y_embed, x_embed: float32 [N]; dim_t: float32 [F]. Returns [N, 2F]:
//   out[n, k]     = (k even ? sin : cos)(y_embed[n] / dim_t[k])
//   out[n, F + k] = (k even ? sin : cos)(x_embed[n] / dim_t[k])
// On the device of y_embed.
Tensor sine_expand(const Tensor& y_embed, const Tensor& x_embed, const Tensor& dim_t);

}  // namespace vf
