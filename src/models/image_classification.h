// What transformers' image-classification heads share: the classifier (a Linear, or nn.Identity
// when num_labels is 0) and the loss (loss/loss_utils.py ForSequenceClassificationLoss; CvT writes
// the same inline): the problem type comes from the config, else from num_labels and the labels' dtype.
#pragma once

#include <cstdint>
#include <string>

#include "core/config.h"
#include "core/ops.h"
#include "core/weights.h"
#include "core/tensor.h"

namespace vf {

struct ClassificationLossConfig {
  int64_t num_labels = 2;
  std::string problem_type;  // "regression", "single_label_classification", "multi_label_classification" or ""

  static ClassificationLossConfig from_json(const json& config);
};

// PretrainedConfig's num_labels: the key when present, else len(id2label), else 2.
int64_t config_num_labels(const json& config);

// `classifier`: Linear(hidden, num_labels) from w ("weight", "bias"), or the identity when
// num_labels == 0.
class ClassifierHead {
 public:
  ClassifierHead(int64_t hidden, int64_t num_labels, const Weights& w);
  Tensor forward(const Tensor& x) const;  // [B, hidden] -> [B, num_labels]

 private:
  Linear linear_;
};

// logits [B, num_labels]; labels int64/int32 class indices [B] (-100 ignored), or float32 targets.
// num_labels == 1 -> MSE; int labels -> cross-entropy (mean over non-ignored); else BCE-with-logits.
// Returns a scalar (shape []).
Tensor image_classification_loss(const Tensor& logits, const Tensor& labels, const ClassificationLossConfig& cfg);

}  // namespace vf
