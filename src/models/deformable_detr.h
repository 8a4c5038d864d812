// Deformable DETR (modeling_deformable_detr.py), and the modules DETA (deta.h) builds on.
//
// Readable beside the reference: the same module names in the same order. The Hub's tensor names
// are those of transformers 4.x (`model.backbone.conv_encoder.model.*`, `fc1`, `out_proj`), which
// every published checkpoint uses. Internally feature maps are channels-last and the flattened
// multi-scale sequence is [B, S, d_model] with S = sum of h*w over the levels.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/deformable_attention.h"
#include "core/ops.h"
#include "core/tensor.h"
#include "core/weights.h"
#include "models/detr_backbone.h"
#include "models/model.h"

namespace vf {

// DeformableDetrConfig (4.37 defaults). DETA's config (deta.h) is this plus its two assigner
// switches, read with its own defaults.
struct DeformableDetrConfig {
  DetrBackboneConfig backbone_config;
  int64_t num_channels = 3;
  int64_t num_queries = 300;
  int64_t max_position_embeddings = 1024;
  int64_t encoder_layers = 6;
  int64_t encoder_ffn_dim = 1024;
  int64_t encoder_attention_heads = 8;
  int64_t decoder_layers = 6;
  int64_t decoder_ffn_dim = 1024;
  int64_t decoder_attention_heads = 8;
  double encoder_layerdrop = 0.0;
  bool is_encoder_decoder = true;
  std::string activation_function = "relu";
  int64_t d_model = 256;
  double dropout = 0.1;
  double attention_dropout = 0.0;
  double activation_dropout = 0.0;
  double init_std = 0.02;
  double init_xavier_std = 1.0;
  bool return_intermediate = true;
  bool auxiliary_loss = false;
  std::string position_embedding_type = "sine";
  bool use_timm_backbone = true;
  std::string backbone = "resnet50";
  bool use_pretrained_backbone = true;
  bool dilation = false;
  int64_t num_feature_levels = 4;
  int64_t encoder_n_points = 4;
  int64_t decoder_n_points = 4;
  bool two_stage = false;
  int64_t two_stage_num_proposals = 300;
  bool with_box_refine = false;
  double class_cost = 1;
  double bbox_cost = 5;
  double giou_cost = 2;
  double mask_loss_coefficient = 1;
  double dice_loss_coefficient = 1;
  double bbox_loss_coefficient = 5;
  double giou_loss_coefficient = 2;
  double eos_coefficient = 0.1;
  double focal_alpha = 0.25;
  bool disable_custom_kernels = false;
  int64_t num_labels = 2;  // PretrainedConfig: from id2label when given
  // DETA only (DetaConfig); Deformable DETR has neither.
  bool assign_first_stage = false;
  bool assign_second_stage = false;
};

// Reads config.json over `defaults` (Deformable DETR's or DETA's). `timm_out_indices` and
// `default_out_features` are what the family's config passes to its backbone.
DeformableDetrConfig read_deformable_detr_config(const json& config, const DeformableDetrConfig& defaults,
                                                 bool timm_default,
                                                 const std::vector<std::string>& default_out_features);

struct MultiScaleLayout;

// Chooses the two-stage proposals: `logits` [B, S] (the first class's logit of every position),
// `coord_logits` [B, S, 4], k per image -> int64 [B, k] of their indices on their device, in the
// order the decoder gets them (a device op: nothing is read back, so the forward can be recorded).
using ProposalSelector = std::function<Tensor(const Tensor& logits, const Tensor& coord_logits,
                                              const MultiScaleLayout& layout, int64_t k)>;

// What DETA changes in the architecture; Deformable DETR keeps the defaults.
struct DeformableDetrVariant {
  std::string name = "DeformableDetr";                        // for error messages
  std::string backbone_path = "backbone.conv_encoder.model";  // the backbone network under `model.`
  // Two-stage queries add pix_trans_norm(pix_trans(top-k encoder features)) (DETA).
  bool pix_trans = false;
  // Two-stage proposal selection; empty: the top-k of the first class logit (Deformable DETR).
  ProposalSelector select_proposals;
  bool return_output_proposals = false;
};

// nn.Linear(d_model, ...) x3 with ReLU between: DeformableDetrMLPPredictionHead.
class DeformableDetrMLPPredictionHead {
 public:
  DeformableDetrMLPPredictionHead() = default;
  DeformableDetrMLPPredictionHead(const Weights& w, int64_t input_dim, int64_t hidden_dim, int64_t output_dim,
                                  int64_t num_layers);
  Tensor forward(const Tensor& x) const;

 private:
  std::vector<Linear> layers_;
};

// The detection heads, one per decoder layer (plus one for the proposals when two-stage). The
// decoder refers to bbox_embed (box refinement) and to class_embed/bbox_embed's last entry
// (two-stage proposals), as the reference's `model.decoder.bbox_embed = self.bbox_embed` hack does.
struct DeformableDetrHeads {
  std::vector<Linear> class_embed;
  std::vector<DeformableDetrMLPPredictionHead> bbox_embed;
};

// Loads the heads from `root` (the checkpoint root): class_embed.N / bbox_embed.N, or their aliases
// model.decoder.class_embed.N / model.decoder.bbox_embed.N. Without box refinement all N are one
// module and a checkpoint may store only N = 0; every stored alias is marked as consumed.
std::shared_ptr<DeformableDetrHeads> load_deformable_detr_heads(const Weights& root, const DeformableDetrConfig& cfg);

// The flattened multi-scale layout: the levels and the per-level valid ratios of each image.
struct MultiScaleLayout {
  std::vector<DeformLevel> levels;
  Tensor valid_ratios;  // float32 [B, L, 2] (width ratio, height ratio)
  Tensor mask_flatten;  // uint8 [B, S], 1 on real positions
  // Built once per forward for a device forward (host tensors, uploaded once): float32 [B, S, 1],
  // 1 on real positions and 0 on padding; each level's (width, height) as float32 [L, 1, 2].
  Tensor value_keep, level_sizes;
};

// DeformableDetrMultiscaleDeformableAttention.
class DeformableDetrMultiscaleDeformableAttention {
 public:
  DeformableDetrMultiscaleDeformableAttention() = default;
  DeformableDetrMultiscaleDeformableAttention(const Weights& w, int64_t d_model, int64_t n_levels, int64_t n_heads,
                                              int64_t n_points);
  // hidden_states [B, Q, C] (+ position_embeddings) query the encoder sequence [B, S, C] around
  // reference_points [B, Q, L, 2 or 4]. Returns output_proj(...) + residual (when given).
  // `attention_weights` (when given) receives the sampling weights [B, Q, heads, levels, points],
  // softmaxed over levels x points per head: what the reference returns as this module's attentions.
  Tensor forward(const Tensor& hidden_states, const Tensor& position_embeddings, const Tensor& encoder_hidden_states,
                 const MultiScaleLayout& layout, const Tensor& reference_points, const Tensor* residual,
                 Tensor* attention_weights = nullptr) const;

 private:
  Linear sampling_offsets_, attention_weights_, value_proj_, output_proj_;
  int64_t d_model_ = 0, n_levels_ = 0, n_heads_ = 0, n_points_ = 0;
};

// DeformableDetrSelfAttention: multi-head attention, position embeddings added to queries and keys.
class DeformableDetrSelfAttention {
 public:
  DeformableDetrSelfAttention() = default;
  DeformableDetrSelfAttention(const Weights& w, int64_t hidden_size, int64_t num_heads);
  // `attn_weights` (when given) receives the probabilities [B, heads, Q, Q]; otherwise the fused
  // kernel never builds the score matrix.
  Tensor forward(const Tensor& hidden_states, const Tensor& position_embeddings, const Tensor* residual,
                 Tensor* attn_weights = nullptr) const;

 private:
  Linear q_proj_, k_proj_, v_proj_, out_proj_;
  int64_t hidden_size_ = 0, num_heads_ = 0;
};

struct LayerNormWeights {
  Tensor weight, bias;
  Tensor operator()(const Tensor& x) const { return layer_norm(x, weight, bias, 1e-5f); }
};

class DeformableDetrEncoderLayer {
 public:
  DeformableDetrEncoderLayer() = default;
  DeformableDetrEncoderLayer(const Weights& w, const DeformableDetrConfig& cfg);
  Tensor forward(const Tensor& hidden_states, const Tensor& position_embeddings, const Tensor& reference_points,
                 const MultiScaleLayout& layout, Tensor* attn_weights = nullptr) const;

 private:
  DeformableDetrMultiscaleDeformableAttention self_attn_;
  LayerNormWeights self_attn_layer_norm_, final_layer_norm_;
  Linear fc1_, fc2_;
};

class DeformableDetrDecoderLayer {
 public:
  DeformableDetrDecoderLayer() = default;
  DeformableDetrDecoderLayer(const Weights& w, const DeformableDetrConfig& cfg);
  Tensor forward(const Tensor& hidden_states, const Tensor& position_embeddings, const Tensor& reference_points,
                 const MultiScaleLayout& layout, const Tensor& encoder_hidden_states,
                 Tensor* self_attn_weights = nullptr, Tensor* cross_attn_weights = nullptr) const;

 private:
  DeformableDetrSelfAttention self_attn_;
  LayerNormWeights self_attn_layer_norm_;
  DeformableDetrMultiscaleDeformableAttention encoder_attn_;
  LayerNormWeights encoder_attn_layer_norm_;
  Linear fc1_, fc2_;
  LayerNormWeights final_layer_norm_;
};

class DeformableDetrEncoder {
 public:
  DeformableDetrEncoder() = default;
  DeformableDetrEncoder(const Weights& w, const DeformableDetrConfig& cfg);
  // Returns the last hidden state; `hidden_states` (when given) gets the input and every layer's
  // output, `attentions` (when given) every layer's deformable attention weights.
  Tensor forward(const Tensor& inputs_embeds, const Tensor& position_embeddings, const MultiScaleLayout& layout,
                 std::vector<Tensor>* hidden_states, std::vector<Tensor>* attentions = nullptr) const;
  // [B, S, L, 2]: every position's centre, normalised by the valid area, seen from each level.
  static Tensor get_reference_points(const MultiScaleLayout& layout, int64_t batch);

 private:
  std::vector<DeformableDetrEncoderLayer> layers_;
};

struct DeformableDetrDecoderOutput {
  Tensor last_hidden_state;              // [B, Q, C]
  Tensor intermediate_hidden_states;     // [B, layers, Q, C]
  Tensor intermediate_reference_points;  // [B, layers, Q, 2 or 4]
  std::vector<Tensor> hidden_states;
  std::vector<Tensor> attentions;        // self-attention [B, heads, Q, Q] per layer, when asked for
  std::vector<Tensor> cross_attentions;  // deformable weights [B, Q, heads, levels, points] per layer
};

class DeformableDetrDecoder {
 public:
  DeformableDetrDecoder() = default;
  DeformableDetrDecoder(const Weights& w, const DeformableDetrConfig& cfg);
  // `bbox_embed` (box refinement) refines the reference points after every layer; null: fixed.
  DeformableDetrDecoderOutput forward(const Tensor& inputs_embeds, const Tensor& query_position_embeddings,
                                      const Tensor& encoder_hidden_states, const MultiScaleLayout& layout,
                                      const Tensor& reference_points,
                                      const std::vector<DeformableDetrMLPPredictionHead>* bbox_embed,
                                      bool output_hidden_states, bool output_attentions = false) const;

 private:
  std::vector<DeformableDetrDecoderLayer> layers_;
};

struct DeformableDetrModelOutput {
  Tensor init_reference_points;
  Tensor last_hidden_state;
  Tensor intermediate_hidden_states;
  Tensor intermediate_reference_points;
  std::vector<Tensor> decoder_hidden_states;
  std::vector<Tensor> decoder_attentions;  // output_attentions only (as the three lists below)
  std::vector<Tensor> cross_attentions;
  Tensor encoder_last_hidden_state;
  std::vector<Tensor> encoder_hidden_states;
  std::vector<Tensor> encoder_attentions;
  Tensor enc_outputs_class;         // two-stage only
  Tensor enc_outputs_coord_logits;  // two-stage only
  Tensor output_proposals;          // two-stage only (DETA returns it)
  // Flattens into `out` in the reference's field order.
  void append_to(ModelOutput& out, bool with_output_proposals) const;
};

// DeformableDetrModel: backbone, input projections, encoder, proposals / queries, decoder.
class DeformableDetrModel : public Model {
 public:
  // `w` is scoped to the model's own prefix ("model" inside ForObjectDetection, "" or "model" alone).
  // `heads` is shared with ForObjectDetection (null for the bare model: no box refinement, and
  // two-stage then has no proposal heads, as in the reference).
  DeformableDetrModel(const DeformableDetrConfig& cfg, const DeformableDetrVariant& variant, const Weights& w,
                      std::shared_ptr<const DeformableDetrHeads> heads);
  ModelOutput forward(const ModelInputs& inputs) const override;
  DeformableDetrModelOutput run(const Tensor& pixel_values, const Tensor& pixel_mask, bool output_hidden_states,
                                bool output_attentions = false) const;
  const DeformableDetrConfig& config() const { return cfg_; }

  static Tensor get_valid_ratio(const Tensor& mask);  // uint8 [B, h, w] -> [B, 2]
  Tensor get_proposal_pos_embed(const Tensor& proposals) const;  // [B, K, 4] -> [B, K, 2*d_model]
  // Returns object_query [B, S, C] and output_proposals [B, S, 4] (logits; inf where invalid).
  std::pair<Tensor, Tensor> gen_encoder_output_proposals(const Tensor& enc_output, const MultiScaleLayout& layout) const;

 private:
  // The top-k proposal indices per image (int64 [B, K], on the host).
  Tensor select_proposals(const Tensor& enc_outputs_class, const Tensor& enc_outputs_coord_logits,
                          const MultiScaleLayout& layout) const;

  DeformableDetrConfig cfg_;
  DeformableDetrVariant variant_;
  DetrConvEncoder backbone_;
  LearnedPositionEmbedding learned_position_embedding_;
  struct InputProj {
    Conv2d conv;
    Tensor gn_weight, gn_bias;
  };
  std::vector<InputProj> input_proj_;
  Tensor query_position_embeddings_;  // [num_queries, 2*d_model] (not two-stage)
  DeformableDetrEncoder encoder_;
  DeformableDetrDecoder decoder_;
  Tensor level_embed_;  // [L, d_model]
  Linear enc_output_;
  LayerNormWeights enc_output_norm_;
  Linear pos_trans_;
  LayerNormWeights pos_trans_norm_;
  Linear pix_trans_;
  LayerNormWeights pix_trans_norm_;
  Linear reference_points_;
  std::shared_ptr<const DeformableDetrHeads> heads_;
};

// Per-layer class logits and boxes of ForObjectDetection (the reference's outputs_class /
// outputs_coord, stacked layer-first): [layers, B, Q, num_labels] and [layers, B, Q, 4].
struct DeformableDetrPredictions {
  std::vector<Tensor> outputs_class;
  std::vector<Tensor> outputs_coord;
};
// `all_levels` false: the last layer's only (what a forward without targets returns; the others
// feed the loss alone), whose entries are then the only ones.
DeformableDetrPredictions deformable_detr_predictions(const DeformableDetrHeads& heads,
                                                      const DeformableDetrModelOutput& outputs,
                                                      bool all_levels = true);

// The detection loss when `targets` are given: DeformableDetrForObjectDetectionLoss, or (`deta`) the
// 4.x DETA loss with its assigners and the two-stage "_enc" terms. Adds loss, loss_dict.* and, with
// auxiliary_loss, auxiliary_outputs.N.{logits,pred_boxes} to `out`.
void deformable_detr_loss(const DeformableDetrConfig& cfg, bool deta, const DeformableDetrPredictions& predictions,
                          const DeformableDetrModelOutput& outputs, const std::vector<DetectionTarget>& targets,
                          ModelOutput& out);

class DeformableDetrForObjectDetection : public Model {
 public:
  DeformableDetrForObjectDetection(const DeformableDetrConfig& cfg, const Weights& w);
  ModelOutput forward(const ModelInputs& inputs) const override;

 private:
  DeformableDetrConfig cfg_;
  std::shared_ptr<DeformableDetrHeads> heads_;
  std::unique_ptr<DeformableDetrModel> model_;
};

}  // namespace vf
