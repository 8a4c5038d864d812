#include "models/deformable_detr.h"

#include "core/errors.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/attention.h"
#include "core/boxes.h"
#include "models/detr_loss.h"

namespace vf {

// ---- config ---------------------------------------------------------------------------------------

DeformableDetrConfig read_deformable_detr_config(const json& c, const DeformableDetrConfig& d, bool timm_default,
                                                 const std::vector<std::string>& default_out_features) {
  DeformableDetrConfig cfg = d;
#define VF_GET(field) cfg.field = cfg_get<decltype(cfg.field)>(c, #field, d.field)
  VF_GET(num_channels);
  VF_GET(num_queries);
  VF_GET(max_position_embeddings);
  VF_GET(encoder_layers);
  VF_GET(encoder_ffn_dim);
  VF_GET(encoder_attention_heads);
  VF_GET(decoder_layers);
  VF_GET(decoder_ffn_dim);
  VF_GET(decoder_attention_heads);
  VF_GET(encoder_layerdrop);
  VF_GET(is_encoder_decoder);
  VF_GET(activation_function);
  VF_GET(d_model);
  VF_GET(dropout);
  VF_GET(attention_dropout);
  VF_GET(activation_dropout);
  VF_GET(init_std);
  VF_GET(init_xavier_std);
  VF_GET(return_intermediate);
  VF_GET(auxiliary_loss);
  VF_GET(position_embedding_type);
  VF_GET(backbone);
  VF_GET(use_pretrained_backbone);
  VF_GET(dilation);
  VF_GET(num_feature_levels);
  VF_GET(encoder_n_points);
  VF_GET(decoder_n_points);
  VF_GET(two_stage);
  VF_GET(two_stage_num_proposals);
  VF_GET(with_box_refine);
  VF_GET(class_cost);
  VF_GET(bbox_cost);
  VF_GET(giou_cost);
  VF_GET(mask_loss_coefficient);
  VF_GET(dice_loss_coefficient);
  VF_GET(bbox_loss_coefficient);
  VF_GET(giou_loss_coefficient);
  VF_GET(eos_coefficient);
  VF_GET(focal_alpha);
  VF_GET(disable_custom_kernels);
  VF_GET(assign_first_stage);
  VF_GET(assign_second_stage);
#undef VF_GET
  cfg.use_timm_backbone = cfg_get<bool>(c, "use_timm_backbone", timm_default);
  auto id2label = read_id2label(c);
  cfg.num_labels = !id2label.empty() ? static_cast<int64_t>(id2label.size()) : cfg_get<int64_t>(c, "num_labels", d.num_labels);

  if (cfg.num_feature_levels < 1) throw ModelError("config num_feature_levels must be >= 1");
  std::vector<int> timm_out_indices = cfg.num_feature_levels > 1 ? std::vector<int>{2, 3, 4} : std::vector<int>{4};
  cfg.backbone_config = read_detr_backbone_config(c, timm_out_indices, default_out_features, timm_default);

  if (cfg.two_stage && !cfg.with_box_refine) throw ModelError("config: if two_stage is true, with_box_refine must be true");
  if (cfg.d_model <= 0 || cfg.d_model % 2) throw ModelError("config d_model must be a positive even number");
  for (int64_t heads : {cfg.encoder_attention_heads, cfg.decoder_attention_heads})
    if (heads <= 0 || cfg.d_model % heads)
      throw ModelError("config: d_model " + std::to_string(cfg.d_model) + " is not divisible by " + std::to_string(heads) +
                  " attention heads");
  if (cfg.d_model % 32) throw ModelError("config d_model must be a multiple of 32 (GroupNorm(32, d_model))");
  if (cfg.encoder_n_points < 1 || cfg.decoder_n_points < 1) throw ModelError("config n_points must be >= 1");
  if (cfg.position_embedding_type != "sine" && cfg.position_embedding_type != "learned")
    throw ModelError("config position_embedding_type '" + cfg.position_embedding_type + "' is not supported");
  if (cfg.num_labels < 1) throw ModelError("config has no labels");
  return cfg;
}

// ---- small helpers -------------------------------------------------------------------------------

namespace {

Tensor layout_value_keep(const MultiScaleLayout& layout) {
  const Tensor& m = layout.mask_flatten;
  Tensor keep = Tensor::empty({m.size(0), m.size(1), 1});
  for (int64_t i = 0; i < m.numel(); ++i) keep.f32()[i] = m.data<uint8_t>()[i] ? 1.0f : 0.0f;
  return keep;
}

Tensor layout_level_sizes(const MultiScaleLayout& layout) {
  const int64_t L = static_cast<int64_t>(layout.levels.size());
  Tensor sizes = Tensor::empty({L, 1, 2});
  for (int64_t l = 0; l < L; ++l) {
    sizes.f32()[2 * l] = static_cast<float>(layout.levels[l].width);
    sizes.f32()[2 * l + 1] = static_cast<float>(layout.levels[l].height);
  }
  return sizes;
}

// sigmoid(x) in a new tensor, on x's device.
Tensor sigmoid(const Tensor& x) {
  Tensor y = x.clone();
  act_inplace(y, Act::Sigmoid);
  return y;
}

Linear load_linear(const Weights& w, int64_t in, int64_t out, Act act = Act::None) {
  return Linear(w.get("weight", {out, in}), w.get("bias", {out}), act);
}

LayerNormWeights load_layer_norm(const Weights& w, int64_t dim) {
  return {w.get("weight", {dim}), w.get("bias", {dim})};
}

// Stacks [B, ...] tensors along a new dim 1: [B, n, ...].
Tensor stack_dim1(const std::vector<Tensor>& xs) {
  std::vector<Tensor> r;
  for (auto& x : xs) {
    Shape s = x.shape();
    s.insert(s.begin() + 1, 1);
    r.push_back(x.reshape(s));
  }
  return cat(r, 1);
}

}  // namespace

// ---- heads ----------------------------------------------------------------------------------------

DeformableDetrMLPPredictionHead::DeformableDetrMLPPredictionHead(const Weights& w, int64_t input_dim,
                                                                 int64_t hidden_dim, int64_t output_dim,
                                                                 int64_t num_layers) {
  for (int64_t i = 0; i < num_layers; ++i) {
    int64_t in = i == 0 ? input_dim : hidden_dim;
    int64_t out = i == num_layers - 1 ? output_dim : hidden_dim;
    layers_.push_back(load_linear(w.pp("layers").pp(i), in, out, i < num_layers - 1 ? Act::Relu : Act::None));
  }
}

Tensor DeformableDetrMLPPredictionHead::forward(const Tensor& x) const {
  Tensor h = x;
  for (auto& l : layers_) h = l.forward(h);
  return h;
}

std::shared_ptr<DeformableDetrHeads> load_deformable_detr_heads(const Weights& root, const DeformableDetrConfig& cfg) {
  auto heads = std::make_shared<DeformableDetrHeads>();
  const int64_t num_pred = cfg.two_stage ? cfg.decoder_layers + 1 : cfg.decoder_layers;
  const int64_t C = cfg.d_model;
  // Every name a head may be stored under: its own, the decoder's alias, and (heads shared) index 0.
  auto candidates = [&](const std::string& head, int64_t i) {
    std::vector<Weights> r = {root.pp(head).pp(i), root.pp("model").pp("decoder").pp(head).pp(i)};
    if (!cfg.with_box_refine && i != 0) {
      r.push_back(root.pp(head).pp(0));
      r.push_back(root.pp("model").pp("decoder").pp(head).pp(0));
    }
    return r;
  };
  const std::vector<std::string> class_names = {"weight", "bias"};
  std::vector<std::string> bbox_names;
  for (int k = 0; k < 3; ++k)
    for (const char* n : {"weight", "bias"}) bbox_names.push_back("layers." + std::to_string(k) + "." + n);
  for (int64_t i = 0; i < num_pred; ++i) {
    for (int which = 0; which < 2; ++which) {
      const std::string head = which == 0 ? "class_embed" : "bbox_embed";
      const auto& names = which == 0 ? class_names : bbox_names;
      auto cands = candidates(head, i);
      Weights chosen = cands[0];
      for (auto& c : cands)
        if (c.has(names[0])) { chosen = c; break; }
      if (which == 0)
        heads->class_embed.push_back(load_linear(chosen, C, cfg.num_labels));
      else
        heads->bbox_embed.emplace_back(chosen, C, C, 4, 3);
      for (auto& c : cands)
        for (auto& n : names) c.ignore(n);
    }
  }
  return heads;
}

// ---- multiscale deformable attention ---------------------------------------------------------------

DeformableDetrMultiscaleDeformableAttention::DeformableDetrMultiscaleDeformableAttention(const Weights& w,
                                                                                       int64_t d_model,
                                                                                       int64_t n_levels,
                                                                                       int64_t n_heads,
                                                                                       int64_t n_points)
    : d_model_(d_model), n_levels_(n_levels), n_heads_(n_heads), n_points_(n_points) {
  sampling_offsets_ = load_linear(w.pp("sampling_offsets"), d_model, n_heads * n_levels * n_points * 2);
  attention_weights_ = load_linear(w.pp("attention_weights"), d_model, n_heads * n_levels * n_points);
  value_proj_ = load_linear(w.pp("value_proj"), d_model, d_model);
  output_proj_ = load_linear(w.pp("output_proj"), d_model, d_model);
}

Tensor DeformableDetrMultiscaleDeformableAttention::forward(const Tensor& hidden_states,
                                                            const Tensor& position_embeddings,
                                                            const Tensor& encoder_hidden_states,
                                                            const MultiScaleLayout& layout,
                                                            const Tensor& reference_points,
                                                            const Tensor* residual,
                                                            Tensor* attention_weights) const {
  const int64_t B = hidden_states.size(0), Q = hidden_states.size(1);
  const int64_t S = encoder_hidden_states.size(1);
  const int64_t NH = n_heads_, NL = n_levels_, NP = n_points_, D = d_model_ / n_heads_;
  if (static_cast<int64_t>(layout.levels.size()) != NL)
    throw Error("deformable attention: " + std::to_string(layout.levels.size()) + " feature levels, the model has " +
                std::to_string(NL));
  const int64_t nc = reference_points.size(-1);
  if (reference_points.dim() != 4 || reference_points.size(0) != B || reference_points.size(1) != Q ||
      reference_points.size(2) != NL || (nc != 2 && nc != 4))
    throw Error("deformable attention: reference points " + shape_str(reference_points.shape()) +
                " (last dim must be 2 or 4)");

  Tensor query = position_embeddings.defined() ? add(hidden_states, position_embeddings) : hidden_states;

  Tensor value = value_proj_.forward(encoder_hidden_states);
  if (layout.mask_flatten.defined() && !value.is_cpu()) {
    // Padded positions' values are zeroed.
    value = mul(value.reshape({B, S, d_model_}), layout.value_keep.defined() ? layout.value_keep : layout_value_keep(layout));
  } else if (layout.mask_flatten.defined()) {
    const uint8_t* m = layout.mask_flatten.data<uint8_t>();
    float* v = value.f32();
#pragma omp parallel for
    for (int64_t i = 0; i < B * S; ++i)
      if (!m[i]) std::fill_n(v + i * d_model_, d_model_, 0.f);
  }

  Tensor offsets = sampling_offsets_.forward(query);  // [B, Q, NH*NL*NP*2]
  Tensor weights = attention_weights_.forward(query).reshape({B * Q * NH, NL * NP});
  softmax_lastdim_inplace(weights);

  // sampling_locations [B, Q, NH, NL, NP, 2]: the reference point moved by the offsets, scaled by
  // the level's size (2-d points) or by half the reference box over n_points (4-d boxes).
  Tensor locations;
  if (!offsets.is_cpu()) {
    // The same arithmetic as the loop below, as broadcasting ops.
    Tensor off = offsets.reshape({B, Q, NH, NL, NP, 2});
    Tensor ref = reference_points.reshape({B, Q, 1, NL, 1, nc});
    Tensor ref_xy = nc == 2 ? ref : narrow(ref, 5, 0, 2);
    if (nc == 2) {
      const Tensor level_sizes = layout.level_sizes.defined() ? layout.level_sizes : layout_level_sizes(layout);
      locations = add(ref_xy, div(off, level_sizes));
    } else {
      Tensor moved = mul(div(off, Tensor::from<float>({1}, {static_cast<float>(NP)})), narrow(ref, 5, 2, 2));
      locations = add(ref_xy, scale(moved, 0.5f));
    }
  } else {
    locations = Tensor::empty({B, Q, NH, NL, NP, 2});
    const float* off = offsets.f32();
    const float* ref = reference_points.f32();
    float* loc = locations.f32();
    const float np_f = static_cast<float>(NP);
#pragma omp parallel for
    for (int64_t bq = 0; bq < B * Q; ++bq) {
      const float* r = ref + bq * NL * nc;
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t l = 0; l < NL; ++l) {
          const float* rl = r + l * nc;
          const float wl = static_cast<float>(layout.levels[l].width), hl = static_cast<float>(layout.levels[l].height);
          for (int64_t p = 0; p < NP; ++p) {
            const int64_t k = 2 * (((bq * NH + h) * NL + l) * NP + p);
            if (nc == 2) {
              loc[k] = rl[0] + off[k] / wl;
              loc[k + 1] = rl[1] + off[k + 1] / hl;
            } else {
              loc[k] = rl[0] + off[k] / np_f * rl[2] * 0.5f;
              loc[k + 1] = rl[1] + off[k + 1] / np_f * rl[3] * 0.5f;
            }
          }
        }
    }

  }
  Tensor level_point_weights = weights.reshape({B, Q, NH, NL, NP});
  Tensor out = ms_deform_attn(value.reshape({B, S, NH, D}), layout.levels, locations, level_point_weights);
  if (attention_weights) *attention_weights = level_point_weights;
  return output_proj_.forward(out, residual);
}

// ---- decoder self-attention -----------------------------------------------------------------------

DeformableDetrSelfAttention::DeformableDetrSelfAttention(const Weights& w, int64_t hidden_size, int64_t num_heads)
    : hidden_size_(hidden_size), num_heads_(num_heads) {
  k_proj_ = load_linear(w.pp("k_proj"), hidden_size, hidden_size);
  v_proj_ = load_linear(w.pp("v_proj"), hidden_size, hidden_size);
  q_proj_ = load_linear(w.pp("q_proj"), hidden_size, hidden_size);
  // 4.x checkpoints name the output projection out_proj (5.x: o_proj).
  out_proj_ = load_linear(w.has("out_proj.weight") || !w.has("o_proj.weight") ? w.pp("out_proj") : w.pp("o_proj"),
                          hidden_size, hidden_size);
}

Tensor DeformableDetrSelfAttention::forward(const Tensor& hidden_states, const Tensor& position_embeddings,
                                            const Tensor* residual, Tensor* attn_weights) const {
  const int64_t hd = hidden_size_ / num_heads_;
  Tensor qk_in = position_embeddings.defined() ? add(hidden_states, position_embeddings) : hidden_states;
  AttentionOptions opt;
  opt.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  opt.probs = attn_weights;
  Tensor o = multi_head_attention(q_proj_.forward(qk_in), k_proj_.forward(qk_in), v_proj_.forward(hidden_states),
                                  num_heads_, opt);
  return out_proj_.forward(o, residual);
}

// ---- encoder / decoder layers ------------------------------------------------------------------------

DeformableDetrEncoderLayer::DeformableDetrEncoderLayer(const Weights& w, const DeformableDetrConfig& cfg) {
  const int64_t C = cfg.d_model;
  self_attn_ = DeformableDetrMultiscaleDeformableAttention(w.pp("self_attn"), C, cfg.num_feature_levels,
                                                           cfg.encoder_attention_heads, cfg.encoder_n_points);
  self_attn_layer_norm_ = load_layer_norm(w.pp("self_attn_layer_norm"), C);
  // 4.x names fc1/fc2 directly on the layer (5.x: mlp.fc1).
  Weights mlp = w.has("fc1.weight") || !w.has("mlp.fc1.weight") ? w : w.pp("mlp");
  fc1_ = load_linear(mlp.pp("fc1"), C, cfg.encoder_ffn_dim, act_from_name(cfg.activation_function));
  fc2_ = load_linear(mlp.pp("fc2"), cfg.encoder_ffn_dim, C);
  final_layer_norm_ = load_layer_norm(w.pp("final_layer_norm"), C);
}

Tensor DeformableDetrEncoderLayer::forward(const Tensor& hidden_states, const Tensor& position_embeddings,
                                           const Tensor& reference_points, const MultiScaleLayout& layout,
                                           Tensor* attn_weights) const {
  Tensor h = self_attn_.forward(hidden_states, position_embeddings, hidden_states, layout, reference_points,
                                &hidden_states, attn_weights);
  h = self_attn_layer_norm_(h);
  Tensor f = fc2_.forward(fc1_.forward_to_layer(h), &h);
  return final_layer_norm_(f);
}

DeformableDetrDecoderLayer::DeformableDetrDecoderLayer(const Weights& w, const DeformableDetrConfig& cfg) {
  const int64_t C = cfg.d_model;
  self_attn_ = DeformableDetrSelfAttention(w.pp("self_attn"), C, cfg.decoder_attention_heads);
  self_attn_layer_norm_ = load_layer_norm(w.pp("self_attn_layer_norm"), C);
  encoder_attn_ = DeformableDetrMultiscaleDeformableAttention(w.pp("encoder_attn"), C, cfg.num_feature_levels,
                                                              cfg.decoder_attention_heads, cfg.decoder_n_points);
  encoder_attn_layer_norm_ = load_layer_norm(w.pp("encoder_attn_layer_norm"), C);
  Weights mlp = w.has("fc1.weight") || !w.has("mlp.fc1.weight") ? w : w.pp("mlp");
  fc1_ = load_linear(mlp.pp("fc1"), C, cfg.decoder_ffn_dim, act_from_name(cfg.activation_function));
  fc2_ = load_linear(mlp.pp("fc2"), cfg.decoder_ffn_dim, C);
  final_layer_norm_ = load_layer_norm(w.pp("final_layer_norm"), C);
}

Tensor DeformableDetrDecoderLayer::forward(const Tensor& hidden_states, const Tensor& position_embeddings,
                                           const Tensor& reference_points, const MultiScaleLayout& layout,
                                           const Tensor& encoder_hidden_states, Tensor* self_attn_weights,
                                           Tensor* cross_attn_weights) const {
  Tensor h = self_attn_.forward(hidden_states, position_embeddings, &hidden_states, self_attn_weights);
  h = self_attn_layer_norm_(h);
  Tensor c = encoder_attn_.forward(h, position_embeddings, encoder_hidden_states, layout, reference_points, &h,
                                   cross_attn_weights);
  c = encoder_attn_layer_norm_(c);
  Tensor f = fc2_.forward(fc1_.forward_to_layer(c), &c);
  return final_layer_norm_(f);
}

// ---- encoder ---------------------------------------------------------------------------------------

DeformableDetrEncoder::DeformableDetrEncoder(const Weights& w, const DeformableDetrConfig& cfg) {
  for (int64_t i = 0; i < cfg.encoder_layers; ++i) layers_.emplace_back(w.pp("layers").pp(i), cfg);
}

Tensor DeformableDetrEncoder::get_reference_points(const MultiScaleLayout& layout, int64_t B) {
  const int64_t L = static_cast<int64_t>(layout.levels.size());
  const int64_t S = layout.levels.back().start + layout.levels.back().height * layout.levels.back().width;
  const float* vr = layout.valid_ratios.f32();  // [B, L, 2]
  Tensor ref = Tensor::empty({B, S, L, 2});
  float* r = ref.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      const auto& lv = layout.levels[l];
      // linspace(0.5, size - 0.5, size) is exactly i + 0.5.
      const float den_y = vr[(b * L + l) * 2 + 1] * static_cast<float>(lv.height);
      const float den_x = vr[(b * L + l) * 2 + 0] * static_cast<float>(lv.width);
      for (int64_t y = 0; y < lv.height; ++y)
        for (int64_t x = 0; x < lv.width; ++x) {
          const float rx = (static_cast<float>(x) + 0.5f) / den_x, ry = (static_cast<float>(y) + 0.5f) / den_y;
          float* out = r + ((b * S + lv.start + y * lv.width + x) * L) * 2;
          for (int64_t l2 = 0; l2 < L; ++l2) {
            out[2 * l2] = rx * vr[(b * L + l2) * 2 + 0];
            out[2 * l2 + 1] = ry * vr[(b * L + l2) * 2 + 1];
          }
        }
    }
  return ref;
}

Tensor DeformableDetrEncoder::forward(const Tensor& inputs_embeds, const Tensor& position_embeddings,
                                      const MultiScaleLayout& layout, std::vector<Tensor>* hidden_states,
                                      std::vector<Tensor>* attentions) const {
  Tensor reference_points = get_reference_points(layout, inputs_embeds.size(0));
  Tensor h = inputs_embeds;
  if (hidden_states) hidden_states->push_back(h);
  for (auto& layer : layers_) {
    Tensor weights;
    h = layer.forward(h, position_embeddings, reference_points, layout, attentions ? &weights : nullptr);
    if (hidden_states) hidden_states->push_back(h);
    if (attentions) attentions->push_back(weights);
  }
  return h;
}

// ---- decoder ---------------------------------------------------------------------------------------

DeformableDetrDecoder::DeformableDetrDecoder(const Weights& w, const DeformableDetrConfig& cfg) {
  for (int64_t i = 0; i < cfg.decoder_layers; ++i) layers_.emplace_back(w.pp("layers").pp(i), cfg);
}

DeformableDetrDecoderOutput DeformableDetrDecoder::forward(
    const Tensor& inputs_embeds, const Tensor& query_position_embeddings, const Tensor& encoder_hidden_states,
    const MultiScaleLayout& layout, const Tensor& reference_points_in,
    const std::vector<DeformableDetrMLPPredictionHead>* bbox_embed, bool output_hidden_states,
    bool output_attentions) const {
  DeformableDetrDecoderOutput out;
  const int64_t B = inputs_embeds.size(0), Q = inputs_embeds.size(1);
  const int64_t L = static_cast<int64_t>(layout.levels.size());
  // valid_ratios [B, L, 2] as [B, 1, L, nc] (repeated for box sizes), per nc met.
  Tensor ratios_for[5];
  auto ratios = [&](int64_t nc) -> const Tensor& {
    Tensor& r = ratios_for[nc];
    if (!r.defined()) {
      const Tensor vr = layout.valid_ratios.cpu();
      r = Tensor::empty({B, 1, L, nc});
      for (int64_t i = 0; i < B * L; ++i)
        for (int64_t c = 0; c < nc; ++c) r.f32()[i * nc + c] = vr.f32()[i * 2 + (c % 2)];
    }
    return r;
  };
  Tensor hidden = inputs_embeds;
  Tensor reference_points = reference_points_in;
  if (output_hidden_states) out.hidden_states.push_back(hidden);
  std::vector<Tensor> intermediate, intermediate_reference_points;

  for (size_t idx = 0; idx < layers_.size(); ++idx) {
    const int64_t nc = reference_points.size(-1);
    if (nc != 2 && nc != 4) throw Error("decoder: reference points' last dimension must be 2 or 4");
    // reference_points[:, :, None] * valid_ratios[:, None] (the ratios repeated for box sizes).
    Tensor ref_input = mul(reference_points.reshape({B, Q, 1, nc}), ratios(nc));  // [B, Q, L, nc]

    Tensor self_weights, cross_weights;
    hidden = layers_[idx].forward(hidden, query_position_embeddings, ref_input, layout, encoder_hidden_states,
                                  output_attentions ? &self_weights : nullptr,
                                  output_attentions ? &cross_weights : nullptr);
    if (output_attentions) {
      out.attentions.push_back(self_weights);
      out.cross_attentions.push_back(cross_weights);
    }

    if (bbox_embed) {
      // Iterative box refinement: the layer's box head moves the reference (in logit space).
      reference_points = refine_boxes((*bbox_embed)[idx].forward(hidden), reference_points);
    }
    if (output_hidden_states) out.hidden_states.push_back(hidden);
    intermediate.push_back(hidden);
    intermediate_reference_points.push_back(reference_points);
  }
  for (size_t i = 1; i < intermediate_reference_points.size(); ++i)
    if (intermediate_reference_points[i].shape() != intermediate_reference_points[0].shape())
      throw Error("decoder: box refinement turned 2-d reference points into boxes between layers; the reference "
                  "cannot stack these either (use two_stage or one decoder layer)");
  out.last_hidden_state = hidden;
  out.intermediate_hidden_states = stack_dim1(intermediate);
  out.intermediate_reference_points = stack_dim1(intermediate_reference_points);
  return out;
}

// ---- model -----------------------------------------------------------------------------------------

void DeformableDetrModelOutput::append_to(ModelOutput& out, bool with_output_proposals) const {
  out.set("init_reference_points", init_reference_points);
  out.set("last_hidden_state", last_hidden_state);
  out.set("intermediate_hidden_states", intermediate_hidden_states);
  out.set("intermediate_reference_points", intermediate_reference_points);
  if (!decoder_hidden_states.empty()) out.set_list("decoder_hidden_states", decoder_hidden_states);
  if (!decoder_attentions.empty()) out.set_list("decoder_attentions", decoder_attentions);
  if (!cross_attentions.empty()) out.set_list("cross_attentions", cross_attentions);
  out.set("encoder_last_hidden_state", encoder_last_hidden_state);
  if (!encoder_hidden_states.empty()) out.set_list("encoder_hidden_states", encoder_hidden_states);
  if (!encoder_attentions.empty()) out.set_list("encoder_attentions", encoder_attentions);
  if (enc_outputs_class.defined()) out.set("enc_outputs_class", enc_outputs_class);
  if (enc_outputs_coord_logits.defined()) out.set("enc_outputs_coord_logits", enc_outputs_coord_logits);
  if (with_output_proposals && output_proposals.defined()) out.set("output_proposals", output_proposals);
}

DeformableDetrModel::DeformableDetrModel(const DeformableDetrConfig& cfg, const DeformableDetrVariant& variant,
                                         const Weights& w, std::shared_ptr<const DeformableDetrHeads> heads)
    : cfg_(cfg), variant_(variant), heads_(std::move(heads)) {
  const int64_t C = cfg.d_model, L = cfg.num_feature_levels;
  // Checkpoints saved by transformers 5 drop DeformableDetrConvModel's conv_encoder level.
  std::string backbone_path = variant.backbone_path;
  auto has_stem = [&](const std::string& path) {
    return w.pp(path).has("conv1.weight") || w.pp(path).has("embedder.embedder.convolution.weight") ||
           w.pp(path).has("embeddings.patch_embeddings.projection.weight");
  };
  if (!has_stem(backbone_path) && has_stem("backbone.model")) backbone_path = "backbone.model";
  backbone_ = DetrConvEncoder(cfg.backbone_config, w.pp(backbone_path));

  if (cfg.position_embedding_type == "learned") {
    // 4.x: model.backbone.position_embedding; 5.x: model.position_embedding.
    Weights pe = w.has("backbone.position_embedding.row_embeddings.weight") ||
                         !w.has("position_embedding.row_embeddings.weight")
                     ? w.pp("backbone").pp("position_embedding")
                     : w.pp("position_embedding");
    learned_position_embedding_ = LearnedPositionEmbedding(pe, C / 2);
  }

  // input_proj: 1x1 conv + GroupNorm per backbone level, then 3x3 stride-2 convs for extra levels.
  const auto& channels = backbone_.intermediate_channel_sizes();
  const int64_t n_backbone = static_cast<int64_t>(channels.size());
  if (n_backbone == 0) throw ModelError(variant.name + ": the backbone returns no feature maps");
  auto proj = [&](int64_t level, int64_t in, int k, int stride, int pad) {
    Weights p = w.pp("input_proj").pp(level);
    Conv2dOptions opt;
    opt.stride_h = opt.stride_w = stride;
    opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = pad;
    InputProj ip;
    ip.conv = Conv2d(p.pp("0").get("weight", {C, in, k, k}), p.pp("0").get("bias", {C}), opt);
    ip.gn_weight = p.pp("1").get("weight", {C});
    ip.gn_bias = p.pp("1").get("bias", {C});
    input_proj_.push_back(ip);
  };
  if (L > 1) {
    if (n_backbone > L)
      throw ModelError(variant.name + ": the backbone returns " + std::to_string(n_backbone) + " feature maps, more than num_feature_levels " +
                  std::to_string(L));
    for (int64_t l = 0; l < n_backbone; ++l) proj(l, channels[l], 1, 1, 0);
    int64_t in = channels.back();
    for (int64_t l = n_backbone; l < L; ++l) {
      proj(l, in, 3, 2, 1);
      in = C;
    }
  } else {
    if (n_backbone != 1)
      throw ModelError(variant.name + ": num_feature_levels is 1 but the backbone returns " + std::to_string(n_backbone) +
                  " feature maps");
    proj(0, channels.back(), 1, 1, 0);
  }

  if (!cfg.two_stage) query_position_embeddings_ = w.pp("query_position_embeddings").get("weight", {cfg.num_queries, 2 * C});
  encoder_ = DeformableDetrEncoder(w.pp("encoder"), cfg);
  decoder_ = DeformableDetrDecoder(w.pp("decoder"), cfg);
  level_embed_ = w.get("level_embed", {L, C});
  if (cfg.two_stage) {
    enc_output_ = load_linear(w.pp("enc_output"), C, C);
    enc_output_norm_ = load_layer_norm(w.pp("enc_output_norm"), C);
    pos_trans_ = load_linear(w.pp("pos_trans"), 2 * C, 2 * C);
    pos_trans_norm_ = load_layer_norm(w.pp("pos_trans_norm"), 2 * C);
    if (variant.pix_trans) {
      pix_trans_ = load_linear(w.pp("pix_trans"), C, C);
      pix_trans_norm_ = load_layer_norm(w.pp("pix_trans_norm"), C);
    }
  } else {
    reference_points_ = load_linear(w.pp("reference_points"), C, 2);
  }
}

Tensor DeformableDetrModel::get_valid_ratio(const Tensor& mask) {
  const int64_t B = mask.size(0), H = mask.size(1), W = mask.size(2);
  const uint8_t* m = mask.data<uint8_t>();
  Tensor r = Tensor::empty({B, 2});
  for (int64_t b = 0; b < B; ++b) {
    int64_t vh = 0, vw = 0;
    for (int64_t y = 0; y < H; ++y) vh += m[(b * H + y) * W] != 0;
    for (int64_t x = 0; x < W; ++x) vw += m[b * H * W + x] != 0;
    r.f32()[b * 2] = static_cast<float>(vw) / static_cast<float>(W);
    r.f32()[b * 2 + 1] = static_cast<float>(vh) / static_cast<float>(H);
  }
  return r;
}

Tensor DeformableDetrModel::get_proposal_pos_embed(const Tensor& proposals) const {
  return sine_embed_coordinates(sigmoid(proposals), cfg_.d_model / 2, 10000.0f, /*swap_xy=*/false);
}

std::pair<Tensor, Tensor> DeformableDetrModel::gen_encoder_output_proposals(const Tensor& enc_output,
                                                                            const MultiScaleLayout& layout) const {
  const int64_t B = enc_output.size(0), S = enc_output.size(1), C = enc_output.size(2);
  const uint8_t* m = layout.mask_flatten.data<uint8_t>();
  Tensor proposals = Tensor::empty({B, S, 4});
  // On the CPU the dropped rows are zeroed in a copy; on a device, multiplied by a 0/1 keep mask.
  const bool host = enc_output.is_cpu();
  Tensor object_query = host ? enc_output.clone() : Tensor();
  Tensor keep = host ? Tensor() : Tensor::empty({B, S, 1});
  float* pr = proposals.f32();
  float* oq = host ? object_query.f32() : nullptr;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < static_cast<int64_t>(layout.levels.size()); ++l) {
    const auto& lv = layout.levels[l];
    const float wh = 0.05f * static_cast<float>(int64_t{1} << l);
    for (int64_t b = 0; b < B; ++b) {
      const uint8_t* ml = m + b * S + lv.start;
      int64_t valid_h = 0, valid_w = 0;
      for (int64_t y = 0; y < lv.height; ++y) valid_h += ml[y * lv.width] != 0;
      for (int64_t x = 0; x < lv.width; ++x) valid_w += ml[x] != 0;
      for (int64_t y = 0; y < lv.height; ++y)
        for (int64_t x = 0; x < lv.width; ++x) {
          const int64_t s = lv.start + y * lv.width + x;
          const float box[4] = {(static_cast<float>(x) + 0.5f) / static_cast<float>(valid_w),
                                (static_cast<float>(y) + 0.5f) / static_cast<float>(valid_h), wh, wh};
          bool valid = true;
          for (float v : box) valid = valid && v > 0.01f && v < 0.99f;
          const bool padding = m[b * S + s] == 0;
          float* out = pr + (b * S + s) * 4;
          for (int c = 0; c < 4; ++c) out[c] = (padding || !valid) ? inf : std::log(box[c] / (1 - box[c]));
          if (!host) keep.f32()[b * S + s] = (padding || !valid) ? 0.f : 1.f;
          else if (padding || !valid) std::fill_n(oq + (b * S + s) * C, C, 0.f);
        }
    }
  }
  if (!host) object_query = mul(enc_output, keep);
  object_query = enc_output_norm_(enc_output_.forward(object_query));
  return {object_query, proposals.to(enc_output.device())};
}

Tensor DeformableDetrModel::select_proposals(const Tensor& enc_outputs_class, const Tensor& enc_outputs_coord_logits,
                                            const MultiScaleLayout& layout) const {
  // The selection reads the first class's logits only, on their device.
  const int64_t B = enc_outputs_class.size(0), S = enc_outputs_class.size(1);
  const Tensor logit0 = narrow(enc_outputs_class, 2, 0, 1).reshape({B, S});
  const int64_t K = cfg_.two_stage_num_proposals;
  Tensor r = variant_.select_proposals ? variant_.select_proposals(logit0, enc_outputs_coord_logits, layout, K)
                                       : topk_rows(logit0, K);
  if (r.shape() != Shape{B, K})
    throw Error(variant_.name + ": proposal selection returned " + shape_str(r.shape()) + ", not [" +
                std::to_string(B) + ", " + std::to_string(K) + "]");
  return r;
}

DeformableDetrModelOutput DeformableDetrModel::run(const Tensor& pixel_values, const Tensor& pixel_mask_in,
                                                   bool output_hidden_states, bool output_attentions) const {
  if (pixel_values.dim() != 4 || pixel_values.size(1) != cfg_.num_channels)
    throw Error(variant_.name + ": pixel_values must be [B, " + std::to_string(cfg_.num_channels) + ", H, W], got " +
                shape_str(pixel_values.shape()));
  const int64_t B = pixel_values.size(0), C = cfg_.d_model, L = cfg_.num_feature_levels;
  Tensor pixel_mask = pixel_mask_in;
  if (!pixel_mask.defined()) {
    pixel_mask = Tensor::empty({B, pixel_values.size(2), pixel_values.size(3)}, DType::U8);
    std::fill_n(pixel_mask.data<uint8_t>(), pixel_mask.numel(), uint8_t{1});
  }

  // Backbone features, projected to d_model, then the extra strided levels.
  std::vector<DetrFeatureMap> features = backbone_.forward(pixel_values, pixel_mask);
  if (static_cast<int64_t>(features.size()) > static_cast<int64_t>(input_proj_.size()))
    throw Error(variant_.name + ": the backbone returned more feature maps than there are input projections");
  std::vector<Tensor> sources, masks;
  auto project = [&](size_t level, const Tensor& x) {
    Tensor y = input_proj_[level].conv.forward(x);
    return group_norm_nhwc(y, 32, input_proj_[level].gn_weight, input_proj_[level].gn_bias, 1e-5f);
  };
  for (size_t l = 0; l < features.size(); ++l) {
    sources.push_back(project(l, features[l].features));
    masks.push_back(features[l].mask);
  }
  for (int64_t l = static_cast<int64_t>(sources.size()); l < L; ++l) {
    Tensor src = project(l, l == static_cast<int64_t>(features.size()) ? features.back().features : sources.back());
    masks.push_back(downsample_pixel_mask(pixel_mask, src.size(1), src.size(2)));
    sources.push_back(src);
  }
  if (static_cast<int64_t>(sources.size()) != L)
    throw Error(variant_.name + ": " + std::to_string(sources.size()) + " feature levels, num_feature_levels is " +
                std::to_string(L));

  // Flatten the levels into one sequence: sources, position + level embeddings, masks.
  MultiScaleLayout layout;
  std::vector<std::pair<int64_t, int64_t>> shapes;
  std::vector<Tensor> source_flatten, lvl_pos_embed_flatten, valid_ratios;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t h = sources[l].size(1), w = sources[l].size(2);
    shapes.emplace_back(h, w);
    source_flatten.push_back(sources[l].reshape({B, h * w, C}));
    Tensor pos;
    if (cfg_.position_embedding_type == "sine") {
      SinePositionEmbeddingOptions opt;
      opt.num_position_features = C / 2;
      opt.normalize = true;
      opt.deformable_offset = true;
      pos = sine_position_embedding(masks[l], opt, sources[l].device());
    } else {
      pos = learned_position_embedding_.forward(B, h, w);
    }
    lvl_pos_embed_flatten.push_back(add(pos.reshape({B, h * w, C}), level_embed_[l].reshape({1, 1, C})));
    valid_ratios.push_back(get_valid_ratio(masks[l]).reshape({B, 1, 2}));
  }
  layout.levels = deform_levels(shapes);
  const int64_t S = layout.levels.back().start + shapes.back().first * shapes.back().second;
  layout.valid_ratios = cat(valid_ratios, 1);
  layout.mask_flatten = Tensor::empty({B, S}, DType::U8);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t hw = shapes[l].first * shapes[l].second;
    for (int64_t b = 0; b < B; ++b) {
      const uint8_t* src = masks[l].data<uint8_t>() + b * hw;
      uint8_t* dst = layout.mask_flatten.data<uint8_t>() + b * S + layout.levels[l].start;
      for (int64_t i = 0; i < hw; ++i) dst[i] = src[i] != 0;
    }
  }
  if (!pixel_values.is_cpu()) {
    layout.value_keep = layout_value_keep(layout);
    layout.level_sizes = layout_level_sizes(layout);
  }
  Tensor inputs_embeds = cat(source_flatten, 1);
  Tensor position_embeddings = cat(lvl_pos_embed_flatten, 1);

  DeformableDetrModelOutput out;
  Tensor memory = encoder_.forward(inputs_embeds, position_embeddings, layout,
                                   output_hidden_states ? &out.encoder_hidden_states : nullptr,
                                   output_attentions ? &out.encoder_attentions : nullptr);
  out.encoder_last_hidden_state = memory;

  // Decoder queries: two-stage proposals from the encoder, or learned queries.
  Tensor query_embed, target, reference_points;
  if (cfg_.two_stage) {
    if (!heads_ || heads_->class_embed.empty())
      throw Error(variant_.name + "Model: two_stage needs the detection heads (use the ForObjectDetection model)");
    auto [object_query, output_proposals] = gen_encoder_output_proposals(memory, layout);
    out.enc_outputs_class = heads_->class_embed.back().forward(object_query);
    out.enc_outputs_coord_logits = add(heads_->bbox_embed.back().forward(object_query), output_proposals);
    out.output_proposals = output_proposals;

    auto topk = select_proposals(out.enc_outputs_class, out.enc_outputs_coord_logits, layout);
    Tensor topk_coords_logits = gather_rows(out.enc_outputs_coord_logits, topk);
    reference_points = sigmoid(topk_coords_logits);
    Tensor pos_trans_out = pos_trans_norm_(pos_trans_.forward(get_proposal_pos_embed(topk_coords_logits)));
    query_embed = narrow(pos_trans_out, 2, 0, C);
    target = narrow(pos_trans_out, 2, C, C);
    if (variant_.pix_trans) {
      Tensor topk_feats = gather_rows(object_query, topk);
      target = add(target, pix_trans_norm_(pix_trans_.forward(topk_feats)));
    }
  } else {
    const int64_t NQ = cfg_.num_queries;
    const Tensor qpe = query_position_embeddings_.on(memory.device());
    Tensor qe = narrow(qpe, 1, 0, C);
    Tensor tg = narrow(qpe, 1, C, C);
    query_embed = cat(std::vector<Tensor>(B, qe.reshape({1, NQ, C})), 0);
    target = cat(std::vector<Tensor>(B, tg.reshape({1, NQ, C})), 0);
    reference_points = sigmoid(reference_points_.forward(query_embed));
  }
  out.init_reference_points = reference_points;

  const bool refine = cfg_.with_box_refine && heads_ && !heads_->bbox_embed.empty();
  DeformableDetrDecoderOutput dec = decoder_.forward(target, query_embed, memory, layout, reference_points,
                                                     refine ? &heads_->bbox_embed : nullptr, output_hidden_states,
                                                     output_attentions);
  out.last_hidden_state = dec.last_hidden_state;
  out.intermediate_hidden_states = dec.intermediate_hidden_states;
  out.intermediate_reference_points = dec.intermediate_reference_points;
  out.decoder_hidden_states = std::move(dec.hidden_states);
  out.decoder_attentions = std::move(dec.attentions);
  out.cross_attentions = std::move(dec.cross_attentions);
  return out;
}

ModelOutput DeformableDetrModel::forward(const ModelInputs& inputs) const {
  DeformableDetrModelOutput o =
      run(inputs.pixel_values, inputs.pixel_mask, inputs.output_hidden_states, inputs.output_attentions);
  ModelOutput out;
  o.append_to(out, variant_.return_output_proposals);
  return out;
}

// ---- object detection ---------------------------------------------------------------------------------

DeformableDetrPredictions deformable_detr_predictions(const DeformableDetrHeads& heads,
                                                      const DeformableDetrModelOutput& o, bool all_levels) {
  DeformableDetrPredictions p;
  const int64_t B = o.intermediate_hidden_states.size(0), n = o.intermediate_hidden_states.size(1);
  const int64_t Q = o.intermediate_hidden_states.size(2), C = o.intermediate_hidden_states.size(3);
  if (static_cast<int64_t>(heads.class_embed.size()) < n) throw Error("detection heads: fewer heads than decoder layers");
  for (int64_t level = all_levels ? 0 : std::max<int64_t>(n - 1, 0); level < n; ++level) {
    Tensor hidden = narrow(o.intermediate_hidden_states, 1, level, 1).reshape({B, Q, C});
    Tensor reference = level == 0 ? o.init_reference_points
                                  : narrow(o.intermediate_reference_points, 1, level - 1, 1)
                                        .reshape({B, Q, o.intermediate_reference_points.size(-1)});
    Tensor coord = refine_boxes(heads.bbox_embed[level].forward(hidden), reference);  // [B, Q, 4]
    p.outputs_class.push_back(heads.class_embed[level].forward(hidden));
    p.outputs_coord.push_back(coord);
  }
  return p;
}

void deformable_detr_loss(const DeformableDetrConfig& cfg, bool deta, const DeformableDetrPredictions& p,
                          const DeformableDetrModelOutput& o, const std::vector<DetectionTarget>& targets,
                          ModelOutput& out) {
  DetrLossConfig lc;
  lc.match_cost = DetrMatchCost::Focal;
  lc.class_loss = DetrClassLoss::Focal;
  // Deformable DETR counts queries whose best sigmoid exceeds 0.5; DETA kept DETR's argmax rule.
  lc.cardinality = deta ? DetrCardinality::ArgmaxNotLast : DetrCardinality::SigmoidAboveHalf;
  lc.class_cost = cfg.class_cost;
  lc.bbox_cost = cfg.bbox_cost;
  lc.giou_cost = cfg.giou_cost;
  lc.eos_coefficient = cfg.eos_coefficient;
  lc.focal_alpha = cfg.focal_alpha;
  lc.bbox_loss_coefficient = cfg.bbox_loss_coefficient;
  lc.giou_loss_coefficient = cfg.giou_loss_coefficient;
  lc.mask_loss_coefficient = cfg.mask_loss_coefficient;
  lc.dice_loss_coefficient = cfg.dice_loss_coefficient;
  lc.auxiliary_loss = cfg.auxiliary_loss;
  lc.decoder_layers = cfg.decoder_layers;
  lc.deta = deta;
  lc.assign_first_stage = deta && cfg.assign_first_stage;
  lc.assign_second_stage = deta && cfg.assign_second_stage;
  lc.num_queries = cfg.num_queries;

  auto sigmoid_of = [](const Tensor& x) {
    Tensor y = x.cpu().clone();  // the loss runs on the host
    for (int64_t i = 0; i < y.numel(); ++i) y.f32()[i] = sigmoid(y.f32()[i]);
    return y;
  };
  DetrLossInputs in;
  in.outputs.logits = p.outputs_class.back();
  in.outputs.pred_boxes = p.outputs_coord.back();
  if (deta) in.outputs.init_reference = o.init_reference_points;
  if (cfg.auxiliary_loss)
    for (size_t i = 0; i + 1 < p.outputs_class.size(); ++i) {
      DetrLossPrediction a;
      a.logits = p.outputs_class[i];
      a.pred_boxes = p.outputs_coord[i];
      in.auxiliary.push_back(a);
    }
  if (deta && cfg.two_stage) {
    DetrLossPrediction e;
    e.logits = o.enc_outputs_class;
    e.pred_boxes = sigmoid_of(o.enc_outputs_coord_logits);
    e.anchors = sigmoid_of(o.output_proposals);
    in.enc_outputs = e;
  }
  in.targets = targets;
  DetrLossOutput r = detr_loss(in, lc);
  out.set("loss", r.loss);
  for (auto& [k, v] : r.loss_dict) out.set("loss_dict." + k, v);
  for (size_t i = 0; i < in.auxiliary.size(); ++i) {
    out.set("auxiliary_outputs." + std::to_string(i) + ".logits", in.auxiliary[i].logits);
    out.set("auxiliary_outputs." + std::to_string(i) + ".pred_boxes", in.auxiliary[i].pred_boxes);
  }
}

DeformableDetrForObjectDetection::DeformableDetrForObjectDetection(const DeformableDetrConfig& cfg, const Weights& w)
    : cfg_(cfg) {
  heads_ = load_deformable_detr_heads(w, cfg);
  model_ = std::make_unique<DeformableDetrModel>(cfg, DeformableDetrVariant{}, w.pp("model"), heads_);
}

ModelOutput DeformableDetrForObjectDetection::forward(const ModelInputs& inputs) const {
  DeformableDetrModelOutput o =
      model_->run(inputs.pixel_values, inputs.pixel_mask, inputs.output_hidden_states, inputs.output_attentions);
  DeformableDetrPredictions p = deformable_detr_predictions(*heads_, o, /*all_levels=*/!inputs.targets.empty());
  ModelOutput out;
  if (!inputs.targets.empty()) deformable_detr_loss(cfg_, /*deta=*/false, p, o, inputs.targets, out);
  out.set("logits", p.outputs_class.back());
  out.set("pred_boxes", p.outputs_coord.back());
  o.append_to(out, /*with_output_proposals=*/false);
  return out;
}

// ---- registration ----------------------------------------------------------------------------------------

namespace {
const DeformableDetrConfig& deformable_detr_defaults() {
  static const DeformableDetrConfig d;
  return d;
}
}  // namespace

void register_deformable_detr_models() {
  register_model({"deformable_detr",
                  {"DeformableDetrModel", "DeformableDetrForObjectDetection"},
                  [](const json& config, const std::string& arch, const Weights& w) -> std::unique_ptr<Model> {
                    DeformableDetrConfig cfg =
                        read_deformable_detr_config(config, deformable_detr_defaults(), true, {"stage4"});
                    if (arch == "DeformableDetrForObjectDetection")
                      return std::make_unique<DeformableDetrForObjectDetection>(cfg, w);
                    // A bare model loads from its own checkpoint or from a detection one ("model." prefix).
                    Weights mw = w.has("model.level_embed") ? w.pp("model") : w;
                    return std::make_unique<DeformableDetrModel>(cfg, DeformableDetrVariant{}, mw, nullptr);
                  }});
}

}  // namespace vf
