// Pieces every family shares: the classification loss of transformers' heads and the backbone
// stage selection (out_features / out_indices).
#pragma once

#include <string>
#include <vector>

#include "core/config.h"
#include "core/tensor.h"
#include "core/weights.h"

namespace vf {

// transformers' ForSequenceClassificationLoss (used by every image-classification head):
// problem_type from the config, else regression when num_labels == 1, single-label
// cross-entropy for integer labels, multi-label BCE-with-logits otherwise. Returns a [1] tensor.
Tensor classification_loss(const Tensor& logits, const Tensor& labels, const json& config);

// Backbone outputs: indices into stage_names chosen by config "out_features" / "out_indices",
// defaulting to the last stage, in stage order (BackboneConfigMixin's alignment rules).
std::vector<int> backbone_out_indices(const json& config, const std::vector<std::string>& stage_names);

// The weights of a base model inside a task model's checkpoint: `prefix.` when the checkpoint
// has it (a head's checkpoint loaded as the base model), else the root (transformers strips or
// adds base_model_prefix the same way).
Weights base_model_weights(const Weights& root, const std::string& prefix);

// config num_labels: len(id2label) when given, else "num_labels", else 2 (PretrainedConfig).
int config_num_labels(const json& config);

// [N, C] pooled features from NHWC for a model output shaped like the reference's [N, C, 1, 1].
Tensor as_nchw_1x1(const Tensor& pooled);

}  // namespace vf
