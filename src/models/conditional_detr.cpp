#include "models/conditional_detr.h"

#include <algorithm>
#include <cmath>

#include "core/boxes.h"

namespace vf {

ConditionalDetrConfig ConditionalDetrConfig::from_json(const json& cfg) {
  ConditionalDetrConfig c;
  read_detr_config_fields(cfg, c);
  c.cls_loss_coefficient = cfg_get<double>(cfg, "cls_loss_coefficient", c.cls_loss_coefficient);
  c.focal_alpha = cfg_get<double>(cfg, "focal_alpha", c.focal_alpha);
  return c;
}

Tensor encode_sinusoidal_position_embedding(const Tensor& pos, int64_t num_pos_feats, float temperature) {
  return sine_embed_coordinates(pos, num_pos_feats, temperature, /*swap_xy=*/true);
}

// ---- decoder ------------------------------------------------------------------------------------

namespace {
Linear square_linear(const Weights& w, const std::string& name, int64_t d) {
  return Linear(w.get(name + ".weight", {d, d}), w.get(name + ".bias", {d}));
}

// [B, L, H*dh] and [B, L, H*dh] -> [B, L, H*2dh]: each head's features followed by the other's.
Tensor cat_per_head(const Tensor& a, const Tensor& b, int64_t heads) {
  const int64_t B = a.size(0), L = a.size(1), dh = a.size(2) / heads;
  return cat({a.reshape({B, L, heads, dh}), b.reshape({B, L, heads, dh})}, 3).reshape({B, L, heads * 2 * dh});
}
}  // namespace

ConditionalDetrDecoderLayer::ConditionalDetrDecoderLayer(const Weights& w, const ConditionalDetrConfig& cfg,
                                                         bool is_first)
    : self_attn_layer_norm_(w.pp("self_attn_layer_norm"), cfg.d_model),
      encoder_attn_layer_norm_(w.pp("encoder_attn_layer_norm"), cfg.d_model),
      final_layer_norm_(w.pp("final_layer_norm"), cfg.d_model),
      mlp_(w, cfg.d_model, cfg.decoder_ffn_dim, act_from_name(cfg.activation_function)),
      num_heads_(cfg.decoder_attention_heads),
      is_first_(is_first) {
  const int64_t d = cfg.d_model;
  sa_qcontent_proj_ = square_linear(w, "sa_qcontent_proj", d);
  sa_qpos_proj_ = square_linear(w, "sa_qpos_proj", d);
  sa_kcontent_proj_ = square_linear(w, "sa_kcontent_proj", d);
  sa_kpos_proj_ = square_linear(w, "sa_kpos_proj", d);
  sa_v_proj_ = square_linear(w, "sa_v_proj", d);
  self_attn_out_proj_ = square_linear(w.pp("self_attn"), "out_proj", d);
  ca_qcontent_proj_ = square_linear(w, "ca_qcontent_proj", d);
  // Only the first layer adds the query position to the cross-attention queries; later layers'
  // ca_qpos_proj is None in the reference (some checkpoints still carry it).
  if (is_first) {
    ca_qpos_proj_ = square_linear(w, "ca_qpos_proj", d);
  } else {
    w.ignore("ca_qpos_proj.weight");
    w.ignore("ca_qpos_proj.bias");
  }
  ca_kcontent_proj_ = square_linear(w, "ca_kcontent_proj", d);
  ca_kpos_proj_ = square_linear(w, "ca_kpos_proj", d);
  ca_v_proj_ = square_linear(w, "ca_v_proj", d);
  ca_qpos_sine_proj_ = square_linear(w, "ca_qpos_sine_proj", d);
  encoder_attn_out_proj_ = square_linear(w.pp("encoder_attn"), "out_proj", d);
}

Tensor ConditionalDetrDecoderLayer::forward(const Tensor& hidden, const Tensor& spatial_position_embeddings,
                                            const Tensor& query_position_embeddings, const Tensor& query_sine_embed,
                                            const Tensor& encoder_hidden_states,
                                            const Tensor& encoder_key_mask, Tensor* self_attn_weights,
                                            Tensor* cross_attn_weights) const {
  const int64_t d = hidden.size(2), dh = d / num_heads_;
  // ConditionalDetrDecoderSelfAttention
  Tensor q = sa_qpos_proj_.forward(query_position_embeddings);
  q = sa_qcontent_proj_.forward(hidden, &q);
  Tensor k = sa_kpos_proj_.forward(query_position_embeddings);
  k = sa_kcontent_proj_.forward(hidden, &k);
  Tensor v = sa_v_proj_.forward(hidden);
  Tensor attn = multihead_attention(q, k, v, num_heads_, 1.0f / std::sqrt(static_cast<float>(dh)), Tensor(),
                                    self_attn_weights);
  Tensor h = self_attn_layer_norm_.forward(self_attn_out_proj_.forward(attn, &hidden));

  // ConditionalDetrDecoderCrossAttention
  Tensor query = ca_qcontent_proj_.forward(h);
  Tensor key = ca_kcontent_proj_.forward(encoder_hidden_states);
  Tensor value = ca_v_proj_.forward(encoder_hidden_states);
  Tensor key_pos = ca_kpos_proj_.forward(spatial_position_embeddings);
  if (is_first_) {
    query = ca_qpos_proj_.forward(query_position_embeddings, &query);
    key = add(key, key_pos);
  }
  Tensor sine = ca_qpos_sine_proj_.forward(query_sine_embed);
  const float scaling = 1.0f / std::sqrt(static_cast<float>(2 * d / num_heads_));
  Tensor cross = multihead_attention(cat_per_head(query, sine, num_heads_), cat_per_head(key, key_pos, num_heads_),
                                     value, num_heads_, scaling, encoder_key_mask, cross_attn_weights);
  Tensor c = encoder_attn_layer_norm_.forward(encoder_attn_out_proj_.forward(cross, &h));
  return final_layer_norm_.forward(mlp_.forward(std::move(c)));
}

ConditionalDetrDecoder::ConditionalDetrDecoder(const Weights& w, const ConditionalDetrConfig& cfg)
    : layernorm_(w.pp("layernorm"), cfg.d_model),
      query_scale_(w.pp("query_scale"), cfg.d_model, cfg.d_model, cfg.d_model, 2),
      ref_point_head_(w.pp("ref_point_head"), cfg.d_model, cfg.d_model, 2, 2),
      d_model_(cfg.d_model),
      auxiliary_loss_(cfg.auxiliary_loss) {
  for (int64_t i = 0; i < cfg.decoder_layers; ++i) layers_.emplace_back(w.pp("layers").pp(i), cfg, i == 0);
}

ConditionalDetrDecoderOutput ConditionalDetrDecoder::forward(const Tensor& inputs_embeds,
                                                             const Tensor& encoder_hidden_states,
                                                             const Tensor& encoder_key_mask,
                                                             const Tensor& spatial_position_embeddings,
                                                             const Tensor& object_queries_position_embeddings,
                                                             bool output_hidden_states,
                                                             bool output_attentions) const {
  ConditionalDetrDecoderOutput out;
  out.reference_points = ref_point_head_.forward(object_queries_position_embeddings);
  sigmoid_inplace(out.reference_points);
  const Tensor sine_before = encode_sinusoidal_position_embedding(out.reference_points, d_model_ / 2);

  Tensor h = inputs_embeds;
  std::vector<Tensor> intermediate;
  if (output_hidden_states) out.hidden_states.push_back(h);
  for (size_t i = 0; i < layers_.size(); ++i) {
    // The first layer uses the sine embedding as is; later ones scale it by query_scale(h).
    Tensor query_sine_embed = i == 0 ? sine_before : mul(sine_before, query_scale_.forward(h));
    Tensor self_weights, cross_weights;
    h = layers_[i].forward(h, spatial_position_embeddings, object_queries_position_embeddings, query_sine_embed,
                           encoder_hidden_states, encoder_key_mask, output_attentions ? &self_weights : nullptr,
                           output_attentions ? &cross_weights : nullptr);
    if (output_hidden_states) out.hidden_states.push_back(h);
    if (output_attentions) {
      out.attentions.push_back(self_weights);
      out.cross_attentions.push_back(cross_weights);
    }
    if (auxiliary_loss_) {
      h = layernorm_.forward(h);
      intermediate.push_back(h.reshape({1, h.size(0), h.size(1), h.size(2)}));
    }
  }
  out.last_hidden_state = layernorm_.forward(h);
  if (output_hidden_states) out.hidden_states.back() = out.last_hidden_state;
  if (auxiliary_loss_ && !intermediate.empty()) out.intermediate_hidden_states = cat(intermediate, 0);
  return out;
}

// ---- ConditionalDetrModel -----------------------------------------------------------------------

ConditionalDetrModel::ConditionalDetrModel(const Weights& w, const ConditionalDetrConfig& cfg, bool all_levels)
    : backbone_(w, cfg, all_levels),
      query_position_embeddings_(w.get("query_position_embeddings.weight", {cfg.num_queries, cfg.d_model})),
      encoder_(w.pp("encoder"), cfg),
      decoder_(w.pp("decoder"), cfg) {}

ConditionalDetrModelOutputs ConditionalDetrModel::forward(const Tensor& pixel_values, const Tensor& pixel_mask,
                                                          bool output_hidden_states,
                                                          bool output_attentions) const {
  ConditionalDetrModelOutputs out;
  out.front = backbone_.forward(pixel_values, pixel_mask);
  out.encoder = encoder_.forward(out.front.flattened_features, out.front.flattened_mask,
                                 out.front.spatial_position_embeddings, output_hidden_states, output_attentions);
  const int64_t B = pixel_values.size(0);
  Tensor query_pos = repeat_over_batch(query_position_embeddings_, B, out.encoder.last_hidden_state.device());
  Tensor queries = Tensor::zeros(query_pos.shape(), DType::F32, out.encoder.last_hidden_state.device());
  out.decoder = decoder_.forward(queries, out.encoder.last_hidden_state, out.front.flattened_mask,
                                 out.front.spatial_position_embeddings, query_pos, output_hidden_states,
                                 output_attentions);
  return out;
}

// ---- the models ---------------------------------------------------------------------------------

namespace {

// ConditionalDetrModel, ConditionalDetrForObjectDetection, ConditionalDetrForSegmentation.
class ConditionalDetrRunner : public Model {
 public:
  ConditionalDetrRunner(const json& config, const std::string& arch, const Weights& w)
      : cfg_(ConditionalDetrConfig::from_json(config)),
        detection_(arch != "ConditionalDetrModel"),
        segmentation_(arch == "ConditionalDetrForSegmentation") {
    DetrCheckpointLayout ck = detr_checkpoint_layout(w, "conditional_detr", segmentation_);
    model_ = ConditionalDetrModel(ck.base, cfg_, /*all_levels=*/segmentation_);
    if (detection_) {
      // No "no object" class here: the focal loss scores every class independently.
      class_labels_classifier_ = Linear(ck.heads.get("class_labels_classifier.weight", {cfg_.num_labels, cfg_.d_model}),
                                        ck.heads.get("class_labels_classifier.bias", {cfg_.num_labels}));
      bbox_predictor_ = DetrMLPPredictionHead(ck.heads.pp("bbox_predictor"), cfg_.d_model, cfg_.d_model, 4, 3);
    }
    if (segmentation_) seg_head_ = DetrSegmentationHead(w, cfg_, model_.backbone().intermediate_channel_sizes());
    if (detection_) loss_cfg_ = detr_loss_config(config, arch);
  }

  ModelOutput forward(const ModelInputs& in) const override {
    ConditionalDetrModelOutputs o =
        model_.forward(in.pixel_values, in.pixel_mask, in.output_hidden_states, in.output_attentions);
    ModelOutput out;
    write_detr_base_outputs(o.encoder, o.decoder, out);
    if (!detection_) {
      if (o.decoder.intermediate_hidden_states.defined())
        out.set("intermediate_hidden_states", o.decoder.intermediate_hidden_states);
      // The reference returns them sequence-first: [Q, B, 2].
      out.set("reference_points", permute(o.decoder.reference_points, {1, 0, 2}));
      return out;
    }
    const Tensor& seq = o.decoder.last_hidden_state;
    out.set("logits", class_labels_classifier_.forward(seq));
    // ConditionalDetrForSegmentation leaves the reference points out of its boxes, as the reference does.
    const Tensor reference = segmentation_ ? Tensor() : o.decoder.reference_points;
    out.set("pred_boxes", predict_boxes(seq, reference));
    if (segmentation_) out.set("pred_masks", seg_head_.forward(seq, o.encoder.last_hidden_state, o.front));
    if (!in.targets.empty()) {
      std::vector<DetrLossPrediction> aux;
      const Tensor& inter = o.decoder.intermediate_hidden_states;
      for (int64_t l = 0; inter.defined() && l + 1 < inter.size(0); ++l)
        aux.push_back({class_labels_classifier_.forward(inter[l]), predict_boxes(inter[l], reference), Tensor(),
                       Tensor(), Tensor()});
      write_detr_loss(in.targets, loss_cfg_,
                      {out.get("logits"), out.get("pred_boxes"),
                       segmentation_ ? out.get("pred_masks") : Tensor(), Tensor(), Tensor()},
                      std::move(aux), out);
    }
    return out;
  }

 private:
  // sigmoid(bbox_predictor(h) + [inverse_sigmoid(reference), 0, 0]); no reference: sigmoid(bbox_predictor(h)).
  Tensor predict_boxes(const Tensor& h, const Tensor& reference) const {
    Tensor boxes = bbox_predictor_.forward(h);
    if (reference.defined()) return refine_boxes(boxes, reference);
    sigmoid_inplace(boxes);
    return boxes;
  }

  ConditionalDetrConfig cfg_;
  DetrLossConfig loss_cfg_;
  bool detection_, segmentation_;
  ConditionalDetrModel model_;
  Linear class_labels_classifier_;
  DetrMLPPredictionHead bbox_predictor_;
  DetrSegmentationHead seg_head_;
};

}  // namespace

void register_conditional_detr_models() {
  register_model({"conditional_detr",
                  {"ConditionalDetrModel", "ConditionalDetrForObjectDetection", "ConditionalDetrForSegmentation"},
                  [](const json& config, const std::string& arch, const Weights& w) -> std::unique_ptr<Model> {
                    return std::make_unique<ConditionalDetrRunner>(config, arch, w);
                  }});
}

}  // namespace vf
