// DETA (transformers 4.x models/deprecated/deta/modeling_deta.py): Deformable DETR with
// two-stage proposals chosen per level through NMS, a pixel-feature term in the proposal queries,
// and IoU-based assignment in its loss. The modules are Deformable DETR's (deformable_detr.h),
// parametrised by DeformableDetrVariant; only what DETA does differently lives here.
#pragma once

#include <memory>
#include <vector>

#include "models/deformable_detr.h"

namespace vf {

// DetaConfig: DeformableDetrConfig's fields with DETA's defaults (num_queries 900, 5 feature levels,
// encoder_ffn_dim 2048, decoder_ffn_dim 1024, two_stage and with_box_refine on, both assigners on,
// no timm: a transformers ResNet-50 with out_features stage2..stage4 when backbone_config is absent).
DeformableDetrConfig read_deta_config(const json& config);

// DetaModel.forward's proposal choice with assign_first_stage (level_nms_proposals, core/boxes.h):
// per level the 1000 best positions (sigmoid of the first class logit), NMS at IoU 0.9 within each
// level, then at most k / levels per level in score order, topped up with the best of the rest; the
// plain top-k when NMS leaves fewer than k. logits [B, S], coord_logits [B, S, 4] -> int64 [B, k] on
// their device.
Tensor deta_first_stage_proposals(const Tensor& logits, const Tensor& coord_logits, const MultiScaleLayout& layout,
                                  int64_t k);

DeformableDetrVariant deta_variant(const DeformableDetrConfig& cfg);

class DetaModel : public DeformableDetrModel {
 public:
  DetaModel(const DeformableDetrConfig& cfg, const Weights& w, std::shared_ptr<const DeformableDetrHeads> heads)
      : DeformableDetrModel(cfg, deta_variant(cfg), w, std::move(heads)) {}
};

class DetaForObjectDetection : public Model {
 public:
  DetaForObjectDetection(const DeformableDetrConfig& cfg, const Weights& w);
  ModelOutput forward(const ModelInputs& inputs) const override;

 private:
  DeformableDetrConfig cfg_;
  std::shared_ptr<DeformableDetrHeads> heads_;
  std::unique_ptr<DetaModel> model_;
};

}  // namespace vf
