// DETR (transformers' models/detr/modeling_detr.py), and the pieces the rest of the DETR family
// builds on: the front end (backbone + position embedding + input projection), multi-head
// attention with position embeddings, the encoder, the prediction MLP and the panoptic mask head.
// Conditional DETR (conditional_detr.cpp) reuses all of them and only brings its own decoder.
//
// Sequences are [B, L, d_model] (the reference's batch-first layout); feature maps are
// channels-last [B, h, w, C], so a flattened map is a plain reshape.
#pragma once

#include <string>
#include <vector>

#include "core/config.h"
#include "core/ops.h"
#include "models/detr_backbone.h"
#include "models/detr_loss.h"
#include "models/model.h"

namespace vf {

// DetrConfig, defaults of the config class (transformers 4.37 docs). Conditional DETR extends it.
struct DetrConfig {
  DetrBackboneConfig backbone;
  int64_t num_channels = 3;
  int64_t num_queries = 100;
  int64_t encoder_layers = 6, encoder_ffn_dim = 2048, encoder_attention_heads = 8;
  int64_t decoder_layers = 6, decoder_ffn_dim = 2048, decoder_attention_heads = 8;
  std::string activation_function = "relu";
  int64_t d_model = 256;
  bool auxiliary_loss = false;
  std::string position_embedding_type = "sine";  // or "learned"
  int64_t num_labels = 91;
  // Loss weights and matcher costs.
  double class_cost = 1, bbox_cost = 5, giou_cost = 2;
  double mask_loss_coefficient = 1, dice_loss_coefficient = 1;
  double bbox_loss_coefficient = 5, giou_loss_coefficient = 2;
  double eos_coefficient = 0.1;

  static DetrConfig from_json(const json& cfg);
};

// Reads the fields DetrConfig shares with the family's other configs (Conditional DETR).
void read_detr_config_fields(const json& cfg, DetrConfig& c);

// Where a checkpoint keeps the base model and the detection heads. The base model is "" in a
// XModel checkpoint, "model." in XForObjectDetection, "<seg_root>.model." in XForSegmentation
// (seg_root "detr" / "conditional_detr"), whose heads sit under "<seg_root>."; a checkpoint of
// another head class loads too, as in the reference.
struct DetrCheckpointLayout {
  Weights base;   // the base model (backbone, input_projection, encoder, decoder, ...)
  Weights heads;  // class_labels_classifier, bbox_predictor
};
DetrCheckpointLayout detr_checkpoint_layout(const Weights& w, const std::string& seg_root, bool segmentation);

// ---- attention ----------------------------------------------------------------------------------

// softmax(q k^T * scaling + mask) v, per head. q [B, Lq, H*dk], k [B, Lk, H*dk], v [B, Lk, H*dv];
// key_mask: uint8 [B, Lk] (1 = attend) or undefined. Returns [B, Lq, H*dv] (heads concatenated).
// `attn_weights` (when given) receives the probabilities [B, H, Lq, Lk], as the reference returns
// them with output_attentions (after the softmax; dropout is a no-op at inference).
Tensor multihead_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t num_heads, float scaling,
                           const Tensor& key_mask, Tensor* attn_weights = nullptr);

// DetrAttention: q_proj, k_proj, v_proj, out_proj. Position embeddings are added to the queries'
// and keys' inputs, never to the values'.
class DetrAttention {
 public:
  DetrAttention() = default;
  DetrAttention(const Weights& w, int64_t d_model, int64_t num_heads);
  // hidden [B, Lq, D] (+ position_embeddings); key_value_states [B, Lk, D] (+ key_position_embeddings)
  // for cross-attention, undefined for self-attention. `residual` (same shape as the output) is
  // added after out_proj. `attn_weights`: see multihead_attention.
  Tensor forward(const Tensor& hidden, const Tensor& position_embeddings, const Tensor& key_value_states,
                 const Tensor& key_position_embeddings, const Tensor& key_mask, const Tensor* residual,
                 Tensor* attn_weights = nullptr) const;

 private:
  Linear q_proj_, k_proj_, v_proj_, out_proj_;
  int64_t num_heads_ = 0;
  float scaling_ = 1;
};

// fc1 -> activation -> fc2, plus the residual, as every DETR-family layer's feed-forward block.
struct DetrFeedForward {
  Linear fc1, fc2;
  DetrFeedForward() = default;
  DetrFeedForward(const Weights& w, int64_t d_model, int64_t ffn_dim, Act act);
  Tensor forward(Tensor x) const;  // x + fc2(act(fc1(x))), in x's storage when the caller hands it over
};

struct LayerNorm {
  Tensor weight, bias;
  float eps = 1e-5f;
  LayerNorm() = default;
  LayerNorm(const Weights& w, int64_t dim);
  Tensor forward(const Tensor& x) const { return layer_norm(x, weight, bias, eps); }
};

// ---- encoder ------------------------------------------------------------------------------------

class DetrEncoderLayer {
 public:
  DetrEncoderLayer() = default;
  DetrEncoderLayer(const Weights& w, const DetrConfig& cfg);
  Tensor forward(const Tensor& hidden, const Tensor& key_mask, const Tensor& spatial_position_embeddings,
                 Tensor* attn_weights = nullptr) const;

 private:
  DetrAttention self_attn_;
  LayerNorm self_attn_layer_norm_, final_layer_norm_;
  DetrFeedForward mlp_;
};

struct DetrEncoderOutput {
  Tensor last_hidden_state;                // [B, hw, D]
  std::vector<Tensor> hidden_states;       // input + each layer's output, when asked for
  std::vector<Tensor> attentions;          // each layer's self-attention [B, heads, hw, hw], when asked for
};

class DetrEncoder {
 public:
  DetrEncoder() = default;
  DetrEncoder(const Weights& w, const DetrConfig& cfg);
  DetrEncoderOutput forward(const Tensor& inputs_embeds, const Tensor& key_mask,
                            const Tensor& spatial_position_embeddings, bool output_hidden_states,
                            bool output_attentions = false) const;

 private:
  std::vector<DetrEncoderLayer> layers_;
};

// ---- decoder ------------------------------------------------------------------------------------

class DetrDecoderLayer {
 public:
  DetrDecoderLayer() = default;
  DetrDecoderLayer(const Weights& w, const DetrConfig& cfg);
  Tensor forward(const Tensor& hidden, const Tensor& spatial_position_embeddings,
                 const Tensor& object_queries_position_embeddings, const Tensor& encoder_hidden_states,
                 const Tensor& encoder_key_mask, Tensor* self_attn_weights = nullptr,
                 Tensor* cross_attn_weights = nullptr) const;

 private:
  DetrAttention self_attn_, encoder_attn_;
  LayerNorm self_attn_layer_norm_, encoder_attn_layer_norm_, final_layer_norm_;
  DetrFeedForward mlp_;
};

struct DetrDecoderOutput {
  Tensor last_hidden_state;                // [B, Q, D], after the decoder's layernorm
  std::vector<Tensor> hidden_states;       // input + each layer's output (the last one normalised)
  Tensor intermediate_hidden_states;       // [layers, B, Q, D] when config.auxiliary_loss
  std::vector<Tensor> attentions;          // per layer, when asked for: self-attention [B, heads, Q, Q]
  std::vector<Tensor> cross_attentions;    // and cross-attention over the encoder [B, heads, Q, hw]
};

class DetrDecoder {
 public:
  DetrDecoder() = default;
  DetrDecoder(const Weights& w, const DetrConfig& cfg);
  DetrDecoderOutput forward(const Tensor& inputs_embeds, const Tensor& encoder_hidden_states,
                            const Tensor& encoder_key_mask, const Tensor& spatial_position_embeddings,
                            const Tensor& object_queries_position_embeddings, bool output_hidden_states,
                            bool output_attentions = false) const;

 private:
  std::vector<DetrDecoderLayer> layers_;
  LayerNorm layernorm_;
  bool auxiliary_loss_ = false;
};

// ---- the front end shared by every DETR-like model --------------------------------------------

// What the backbone, the position embedding and the input projection hand to the transformer.
struct DetrFrontOutput {
  std::vector<DetrFeatureMap> features;  // every backbone level (the mask head's FPN reads them), or the last
  Tensor projected_feature_map;          // [B, h, w, D]: input_projection of the last level
  Tensor flattened_features;             // [B, h*w, D] (a view of projected_feature_map)
  Tensor spatial_position_embeddings;    // [B, h*w, D]
  Tensor flattened_mask;                 // uint8 [B, h*w]
};

// DetrConvModel (backbone + position embedding) with DetrModel's input_projection.
// `w` is scoped to the base model ("model." of a detection checkpoint). `all_levels`: the output
// keeps every backbone level, for a segmentation head; otherwise only the last, which the
// transformer reads (the others, 96 MB for DETR-R50 at 800x1066, are not kept through the forward).
class DetrConvModel {
 public:
  DetrConvModel() = default;
  DetrConvModel(const Weights& w, const DetrConfig& cfg, bool all_levels = false);
  DetrFrontOutput forward(const Tensor& pixel_values, const Tensor& pixel_mask) const;
  const std::vector<int64_t>& intermediate_channel_sizes() const { return conv_encoder_.intermediate_channel_sizes(); }

 private:
  DetrConvEncoder conv_encoder_;
  bool all_levels_ = false;
  LearnedPositionEmbedding learned_;  // position_embedding_type "learned"
  SinePositionEmbeddingOptions sine_;
  Conv2d input_projection_;
};

// ---- DetrModel ----------------------------------------------------------------------------------

struct DetrModelOutputs {
  DetrFrontOutput front;
  DetrEncoderOutput encoder;
  DetrDecoderOutput decoder;
};

// The base model's named outputs, as the goldens flatten them, in the reference's order:
// last_hidden_state, decoder_hidden_states.N, decoder_attentions.N, cross_attentions.N,
// encoder_last_hidden_state, encoder_hidden_states.N, encoder_attentions.N (the lists when asked for).
void write_detr_base_outputs(const DetrEncoderOutput& encoder, const DetrDecoderOutput& decoder, ModelOutput& out);

// weight [Q, D] repeated over the batch -> [batch, Q, D] on `device` (query_position_embeddings.weight.repeat).
Tensor repeat_over_batch(const Tensor& weight, int64_t batch, Device device);

class DetrModel {
 public:
  DetrModel() = default;
  // all_levels: for a segmentation head (DetrConvModel).
  DetrModel(const Weights& w, const DetrConfig& cfg, bool all_levels = false);
  DetrModelOutputs forward(const Tensor& pixel_values, const Tensor& pixel_mask, bool output_hidden_states,
                           bool output_attentions = false) const;
  const DetrConvModel& backbone() const { return backbone_; }

 private:
  DetrConvModel backbone_;
  Tensor query_position_embeddings_;  // [num_queries, D]
  DetrEncoder encoder_;
  DetrDecoder decoder_;
};

// ---- heads --------------------------------------------------------------------------------------

// A small MLP: Linear layers with ReLU between them (DetrMLPPredictionHead; `layers.N`).
class DetrMLPPredictionHead {
 public:
  DetrMLPPredictionHead() = default;
  DetrMLPPredictionHead(const Weights& w, int64_t input_dim, int64_t hidden_dim, int64_t output_dim, int num_layers);
  Tensor forward(const Tensor& x) const;

 private:
  std::vector<Linear> layers_;
};

void sigmoid_inplace(Tensor& x);

// DetrMHAttentionMap (bbox_attention: q_linear, k_linear): the attention of every query over the
// encoder memory, softmaxed jointly over heads and positions, without values.
class DetrMHAttentionMap {
 public:
  DetrMHAttentionMap() = default;
  DetrMHAttentionMap(const Weights& w, int64_t d_model, int64_t num_heads);
  // queries [B, Q, D]; memory [B, h*w, D]; key_mask uint8 [B, h*w]. -> [B*Q, h, w, heads]
  // (channels-last: the reference's [B, Q, heads, h, w] as the mask head consumes it).
  Tensor forward(const Tensor& queries, const Tensor& memory, const Tensor& key_mask, int64_t h, int64_t w) const;

 private:
  Linear q_linear_, k_linear_;
  int64_t num_heads_ = 0;
  float scaling_ = 1;
};

// DetrMaskHeadSmallConv: lay1..lay5 with GroupNorm gn1..gn5, FPN adapters adapter1..3, out_lay.
class DetrMaskHeadSmallConv {
 public:
  DetrMaskHeadSmallConv() = default;
  // fpn_channels: channels of the FPN features, coarsest first (backbone levels -2, -3, -4).
  DetrMaskHeadSmallConv(const Weights& w, int64_t input_channels, const std::vector<int64_t>& fpn_channels,
                        int64_t hidden_size, Act act);
  // features [B, h, w, D]; attention_masks [B*Q, h, w, heads]; fpn_features: 3 maps [B, *, *, C],
  // coarsest first. -> mask logits [B, Q, H', W'] (H', W' of the finest FPN map).
  Tensor forward(const Tensor& features, const Tensor& attention_masks,
                 const std::vector<Tensor>& fpn_features) const;

 private:
  // lay1 runs on cat([features, attention maps]); convolution being linear, it splits into the
  // feature part (the same for every query of an image: computed once per image, with the bias)
  // and the attention part (per query, few channels).
  Conv2d lay1_features_, lay1_attention_;
  std::vector<Conv2d> lay_;     // lay2..lay5 (index 1..4; index 0 unused)
  std::vector<Tensor> gn_w_, gn_b_;
  std::vector<int> gn_groups_;
  std::vector<Conv2d> adapter_;  // adapter1..3
  Conv2d out_lay_;
  Act act_ = Act::Relu;
};

// bbox_attention + mask_head, as DetrForSegmentation (and Conditional DETR's) run them.
class DetrSegmentationHead {
 public:
  DetrSegmentationHead() = default;
  // `w` scoped to the segmentation model's root (holds mask_head.*, bbox_attention.*).
  DetrSegmentationHead(const Weights& w, const DetrConfig& cfg, const std::vector<int64_t>& backbone_channels);
  // -> pred_masks [B, Q, H', W'].
  Tensor forward(const Tensor& sequence_output, const Tensor& encoder_last_hidden_state,
                 const DetrFrontOutput& front) const;

 private:
  DetrMHAttentionMap bbox_attention_;
  DetrMaskHeadSmallConv mask_head_;
};

// Runs the DETR-family loss (models/detr_loss.h) and writes loss and loss_dict.* into `out`.
// `auxiliary`: predictions of every decoder layer but the last (used when cfg.auxiliary_loss).
void write_detr_loss(const std::vector<DetectionTarget>& targets, const DetrLossConfig& cfg,
                     DetrLossPrediction last, std::vector<DetrLossPrediction> auxiliary, ModelOutput& out);

// F.interpolate(x, size=(H, W), mode="nearest") + y for channels-last maps, where x holds
// `repeat` maps per map of y (the mask head's queries per image): x [N*repeat, h, w, C],
// y [N, H, W, C] -> [N*repeat, H, W, C].
Tensor upsample_nearest_add(const Tensor& x, const Tensor& y, int64_t repeat);

}  // namespace vf
