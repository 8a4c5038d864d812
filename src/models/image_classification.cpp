#include "models/image_classification.h"

namespace vf {

ClassifierHead::ClassifierHead(int64_t hidden, int64_t num_labels, const Weights& w) {
  if (num_labels > 0) linear_ = Linear(w.get("weight", {num_labels, hidden}), w.get("bias", {num_labels}));
}

Tensor ClassifierHead::forward(const Tensor& x) const { return linear_.defined() ? linear_.forward(x) : x.clone(); }

}  // namespace vf
