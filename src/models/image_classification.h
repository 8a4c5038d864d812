// The classifier of transformers' image-classification heads: nn.Linear(hidden, num_labels), or
// nn.Identity when num_labels is 0. (The loss they share is classification_loss in common.h.)
#pragma once

#include <cstdint>

#include "core/ops.h"
#include "core/weights.h"

namespace vf {

class ClassifierHead {
 public:
  // w holds "weight" [num_labels, hidden] and "bias" [num_labels] (nothing when num_labels == 0).
  ClassifierHead(int64_t hidden, int64_t num_labels, const Weights& w);
  Tensor forward(const Tensor& x) const;  // [B, hidden] -> [B, num_labels]

 private:
  Linear linear_;
};

}  // namespace vf
