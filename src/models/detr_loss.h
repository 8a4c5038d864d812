// The DETR family's training losses (transformers loss/loss_for_object_detection.py,
// loss/loss_deformable_detr.py, and the 4.x DETA loss): Hungarian matching of queries to targets,
// then class, box (L1 + GIoU), cardinality and mask (focal + dice) terms, repeated over auxiliary
// decoder layers ("_0", "_1", ...) and DETA's encoder proposals ("_enc").
//
// The variants, by reference class:
//   DetrForObjectDetection / DetrForSegmentation      softmax matcher, cross-entropy with the
//       no-object class weighted by eos_coefficient, cardinality = queries whose argmax is not no-object
//   ConditionalDetrForObjectDetection, DeformableDetrForObjectDetection   focal matcher (alpha 0.25,
//       gamma 2), sigmoid focal class loss (focal_alpha), cardinality = queries with max sigmoid > 0.5
//   ConditionalDetrForSegmentation                    softmax matcher with the focal losses (as the reference)
//   DetaForObjectDetection                            focal matcher and loss, argmax cardinality, and the
//       DETA assigners (IoU-based, top-4 per target) when assign_first_stage / assign_second_stage
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/detection_target.h"
#include "core/tensor.h"

namespace vf {

enum class DetrMatchCost { Softmax, Focal };
enum class DetrClassLoss { CrossEntropy, Focal };
enum class DetrCardinality { ArgmaxNotLast, SigmoidAboveHalf };

struct DetrLossConfig {
  DetrMatchCost match_cost = DetrMatchCost::Softmax;
  DetrClassLoss class_loss = DetrClassLoss::CrossEntropy;
  DetrCardinality cardinality = DetrCardinality::ArgmaxNotLast;
  double class_cost = 1, bbox_cost = 5, giou_cost = 2;
  double eos_coefficient = 0.1;
  double focal_alpha = 0.25;
  // The weights of the total. loss_ce always weighs 1 in the reference (Conditional DETR's
  // cls_loss_coefficient is not used by it).
  double bbox_loss_coefficient = 5, giou_loss_coefficient = 2;
  double mask_loss_coefficient = 1, dice_loss_coefficient = 1;
  bool masks = false;           // *ForSegmentation: loss_mask and loss_dice
  bool auxiliary_loss = false;  // weigh the "_i" (and DETA's "_enc") terms into the total
  int64_t decoder_layers = 6;
  // DETA
  bool deta = false;
  bool assign_first_stage = false;
  bool assign_second_stage = false;
  int64_t num_queries = 300;
};

// The loss settings of `architecture` (e.g. "DetrForObjectDetection") from its config (defaults of
// the 4.37 config classes).
DetrLossConfig detr_loss_config(const json& config, const std::string& architecture);

// One set of predictions to supervise.
struct DetrLossPrediction {
  Tensor logits;      // [B, Q, C] (DETR: C = classes + 1)
  Tensor pred_boxes;  // [B, Q, 4] normalised (cx, cy, w, h)
  Tensor pred_masks;  // [B, Q, H, W] mask logits (segmentation, last layer only)
  Tensor init_reference;  // DETA second-stage assigner: [B, Q, 4] reference boxes (cx, cy, w, h)
  Tensor anchors;         // DETA first-stage assigner: [B, S, 4] sigmoid(output_proposals)
};

struct DetrLossInputs {
  DetrLossPrediction outputs;             // the last decoder layer
  std::vector<DetrLossPrediction> auxiliary;  // earlier decoder layers, first to last (auxiliary_loss)
  std::optional<DetrLossPrediction> enc_outputs;  // DETA two-stage proposals (logits, boxes, anchors)
  std::vector<DetectionTarget> targets;   // one per image: class_labels, boxes (cx, cy, w, h), masks
};

struct DetrLossOutput {
  // Scalars as float32 [1] tensors (the goldens store the reference's 0-dim tensors that way).
  Tensor loss;
  std::vector<std::pair<std::string, Tensor>> loss_dict;  // in the reference's key order
};

DetrLossOutput detr_loss(const DetrLossInputs& in, const DetrLossConfig& cfg);

// The Hungarian matching alone: per image, (query, target) pairs sorted by query.
std::vector<std::vector<std::pair<int64_t, int64_t>>> detr_hungarian_match(const DetrLossPrediction& p,
                                                                           const std::vector<DetectionTarget>& targets,
                                                                           const DetrLossConfig& cfg);

}  // namespace vf
