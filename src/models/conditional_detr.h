// Conditional DETR (transformers' models/conditional_detr/modeling_conditional_detr.py): DETR's
// backbone, encoder and mask head (models/detr.h) with the conditional cross-attention decoder,
// whose queries carry a sine embedding of a reference point learned from the query embeddings.
#pragma once

#include <string>
#include <vector>

#include "models/detr.h"

namespace vf {

// ConditionalDetrConfig: DetrConfig's fields with their own defaults, plus the focal loss terms.
struct ConditionalDetrConfig : DetrConfig {
  double cls_loss_coefficient = 2;
  double focal_alpha = 0.25;
  ConditionalDetrConfig() {
    num_queries = 300;
    class_cost = 2;
  }
  static ConditionalDetrConfig from_json(const json& cfg);
};

// gen_sine_position_embeddings: each coordinate of pos [B, Q, n] (normalised to [0, 1]) as
// num_pos_feats interleaved sin/cos features of coord * 2 pi / 10000^(2 (i // 2) / num_pos_feats),
// x and y swapped (DETR's [y, x] order) -> [B, Q, n * num_pos_feats].
Tensor encode_sinusoidal_position_embedding(const Tensor& pos, int64_t num_pos_feats, float temperature = 10000.0f);

class ConditionalDetrDecoderLayer {
 public:
  ConditionalDetrDecoderLayer() = default;
  ConditionalDetrDecoderLayer(const Weights& w, const ConditionalDetrConfig& cfg, bool is_first);
  Tensor forward(const Tensor& hidden, const Tensor& spatial_position_embeddings,
                 const Tensor& query_position_embeddings, const Tensor& query_sine_embed,
                 const Tensor& encoder_hidden_states, const Tensor& encoder_key_mask,
                 Tensor* self_attn_weights = nullptr, Tensor* cross_attn_weights = nullptr) const;

 private:
  // Self-attention: content and position projections of the queries and keys are summed.
  Linear sa_qcontent_proj_, sa_qpos_proj_, sa_kcontent_proj_, sa_kpos_proj_, sa_v_proj_, self_attn_out_proj_;
  // Cross-attention: position projections are concatenated to each head (head dim doubles).
  Linear ca_qcontent_proj_, ca_qpos_proj_, ca_kcontent_proj_, ca_kpos_proj_, ca_v_proj_, ca_qpos_sine_proj_,
      encoder_attn_out_proj_;
  LayerNorm self_attn_layer_norm_, encoder_attn_layer_norm_, final_layer_norm_;
  DetrFeedForward mlp_;
  int64_t num_heads_ = 0;
  bool is_first_ = false;
};

struct ConditionalDetrDecoderOutput : DetrDecoderOutput {
  Tensor reference_points;  // [B, Q, 2], sigmoid of ref_point_head(query position embeddings)
};

class ConditionalDetrDecoder {
 public:
  ConditionalDetrDecoder() = default;
  ConditionalDetrDecoder(const Weights& w, const ConditionalDetrConfig& cfg);
  ConditionalDetrDecoderOutput forward(const Tensor& inputs_embeds, const Tensor& encoder_hidden_states,
                                       const Tensor& encoder_key_mask, const Tensor& spatial_position_embeddings,
                                       const Tensor& object_queries_position_embeddings,
                                       bool output_hidden_states, bool output_attentions = false) const;

 private:
  std::vector<ConditionalDetrDecoderLayer> layers_;
  LayerNorm layernorm_;
  DetrMLPPredictionHead query_scale_, ref_point_head_;
  int64_t d_model_ = 0;
  bool auxiliary_loss_ = false;
};

struct ConditionalDetrModelOutputs {
  DetrFrontOutput front;
  DetrEncoderOutput encoder;
  ConditionalDetrDecoderOutput decoder;
};

class ConditionalDetrModel {
 public:
  ConditionalDetrModel() = default;
  // all_levels: for a segmentation head (DetrConvModel).
  ConditionalDetrModel(const Weights& w, const ConditionalDetrConfig& cfg, bool all_levels = false);
  ConditionalDetrModelOutputs forward(const Tensor& pixel_values, const Tensor& pixel_mask,
                                      bool output_hidden_states, bool output_attentions = false) const;
  const DetrConvModel& backbone() const { return backbone_; }

 private:
  DetrConvModel backbone_;
  Tensor query_position_embeddings_;
  DetrEncoder encoder_;
  ConditionalDetrDecoder decoder_;
};

}  // namespace vf
