#include "models/detr.h"

#include "core/attention.h"
#include "core/errors.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace vf {

// ---- config -------------------------------------------------------------------------------------

void read_detr_config_fields(const json& cfg, DetrConfig& c) {
  c.num_channels = cfg_get<int64_t>(cfg, "num_channels", c.num_channels);
  c.num_queries = cfg_get<int64_t>(cfg, "num_queries", c.num_queries);
  c.encoder_layers = cfg_get<int64_t>(cfg, "encoder_layers", c.encoder_layers);
  c.encoder_ffn_dim = cfg_get<int64_t>(cfg, "encoder_ffn_dim", c.encoder_ffn_dim);
  c.encoder_attention_heads = cfg_get<int64_t>(cfg, "encoder_attention_heads", c.encoder_attention_heads);
  c.decoder_layers = cfg_get<int64_t>(cfg, "decoder_layers", c.decoder_layers);
  c.decoder_ffn_dim = cfg_get<int64_t>(cfg, "decoder_ffn_dim", c.decoder_ffn_dim);
  c.decoder_attention_heads = cfg_get<int64_t>(cfg, "decoder_attention_heads", c.decoder_attention_heads);
  c.activation_function = cfg_get<std::string>(cfg, "activation_function", c.activation_function);
  c.d_model = cfg_get<int64_t>(cfg, "d_model", c.d_model);
  c.auxiliary_loss = cfg_get<bool>(cfg, "auxiliary_loss", c.auxiliary_loss);
  c.position_embedding_type = cfg_get<std::string>(cfg, "position_embedding_type", c.position_embedding_type);
  c.class_cost = cfg_get<double>(cfg, "class_cost", c.class_cost);
  c.bbox_cost = cfg_get<double>(cfg, "bbox_cost", c.bbox_cost);
  c.giou_cost = cfg_get<double>(cfg, "giou_cost", c.giou_cost);
  c.mask_loss_coefficient = cfg_get<double>(cfg, "mask_loss_coefficient", c.mask_loss_coefficient);
  c.dice_loss_coefficient = cfg_get<double>(cfg, "dice_loss_coefficient", c.dice_loss_coefficient);
  c.bbox_loss_coefficient = cfg_get<double>(cfg, "bbox_loss_coefficient", c.bbox_loss_coefficient);
  c.giou_loss_coefficient = cfg_get<double>(cfg, "giou_loss_coefficient", c.giou_loss_coefficient);
  c.eos_coefficient = cfg_get<double>(cfg, "eos_coefficient", c.eos_coefficient);
  // PretrainedConfig: num_labels is len(id2label) when given, else the num_labels key (default 2).
  auto labels = read_id2label(cfg);
  c.num_labels = !labels.empty() ? static_cast<int64_t>(labels.size()) : cfg_get<int64_t>(cfg, "num_labels", 2);
  c.backbone = read_detr_backbone_config(cfg, {1, 2, 3, 4}, {"stage4"});

  if (c.d_model <= 0 || c.encoder_attention_heads <= 0 || c.decoder_attention_heads <= 0 ||
      c.d_model % c.encoder_attention_heads || c.d_model % c.decoder_attention_heads)
    throw ModelError("config: d_model " + std::to_string(c.d_model) + " is not divisible by the attention heads");
  if (c.position_embedding_type != "sine" && c.position_embedding_type != "learned")
    throw ModelError("config: position_embedding_type '" + c.position_embedding_type + "' is not 'sine' or 'learned'");
  if (c.num_queries <= 0) throw ModelError("config: num_queries must be positive");
}

DetrConfig DetrConfig::from_json(const json& cfg) {
  DetrConfig c;
  read_detr_config_fields(cfg, c);
  return c;
}

DetrCheckpointLayout detr_checkpoint_layout(const Weights& w, const std::string& seg_root, bool segmentation) {
  const std::string probe = "query_position_embeddings.weight";
  std::vector<std::string> roots = {"", seg_root};  // where class_labels_classifier would sit
  if (segmentation) std::swap(roots[0], roots[1]);
  for (auto& root : roots) {
    Weights r = root.empty() ? w : w.pp(root);
    if (r.has("model." + probe)) return {r.pp("model"), r};
  }
  return {w, w};  // a base-model checkpoint (or none that fits: the missing names get reported)
}

// ---- attention ----------------------------------------------------------------------------------

namespace {
// The reference's additive key padding mask as float32 of `shape` (0 on valid keys, finfo.min on
// padded ones), on the host.
Tensor key_mask_bias(const Tensor& key_mask, const Shape& shape) {
  const Tensor m = key_mask.cpu();
  Tensor bias = Tensor::empty(shape);
  if (bias.numel() != m.numel()) throw Error("key mask " + shape_str(m.shape()) + " for scores " + shape_str(shape));
  const uint8_t* pm = m.data<uint8_t>();
  float* pb = bias.f32();
  for (int64_t i = 0; i < bias.numel(); ++i) pb[i] = pm[i] ? 0.0f : std::numeric_limits<float>::lowest();
  return bias;
}
}  // namespace

Tensor multihead_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t num_heads, float scaling,
                           const Tensor& key_mask, Tensor* attn_weights) {
  // The fused kernel reads the heads in place and never holds more than a block of scores per
  // thread (the reference's [B, H, Lq, Lk] exists only when the weights are asked for).
  AttentionOptions opt;
  opt.scale = scaling;
  opt.key_mask = key_mask;
  opt.probs = attn_weights;
  return multi_head_attention(q, k, v, num_heads, opt);
}

DetrAttention::DetrAttention(const Weights& w, int64_t d_model, int64_t num_heads) : num_heads_(num_heads) {
  auto lin = [&](const std::string& name) {
    return Linear(w.get(name + ".weight", {d_model, d_model}), w.get(name + ".bias", {d_model}));
  };
  q_proj_ = lin("q_proj");
  k_proj_ = lin("k_proj");
  v_proj_ = lin("v_proj");
  out_proj_ = lin("out_proj");
  scaling_ = 1.0f / std::sqrt(static_cast<float>(d_model / num_heads));
}

Tensor DetrAttention::forward(const Tensor& hidden, const Tensor& position_embeddings, const Tensor& key_value_states,
                              const Tensor& key_position_embeddings, const Tensor& key_mask,
                              const Tensor* residual, Tensor* attn_weights) const {
  const Tensor& kv = key_value_states.defined() ? key_value_states : hidden;
  const Tensor& kv_pos = key_value_states.defined() ? key_position_embeddings : position_embeddings;
  Tensor q_in = position_embeddings.defined() ? add(hidden, position_embeddings) : hidden;
  Tensor k_in = kv_pos.defined() ? (key_value_states.defined() ? add(kv, kv_pos) : q_in) : kv;
  Tensor attn = multihead_attention(q_proj_.forward(q_in), k_proj_.forward(k_in), v_proj_.forward(kv), num_heads_,
                                    scaling_, key_mask, attn_weights);
  return out_proj_.forward(attn, residual);
}

DetrFeedForward::DetrFeedForward(const Weights& w, int64_t d_model, int64_t ffn_dim, Act act)
    : fc1(w.get("fc1.weight", {ffn_dim, d_model}), w.get("fc1.bias", {ffn_dim}), act),
      fc2(w.get("fc2.weight", {d_model, ffn_dim}), w.get("fc2.bias", {d_model})) {}

Tensor DetrFeedForward::forward(Tensor x) const {
  const Tensor hidden = fc1.forward_to_layer(x);
  return fc2.forward(hidden, std::move(x));
}

LayerNorm::LayerNorm(const Weights& w, int64_t dim) : weight(w.get("weight", {dim})), bias(w.get("bias", {dim})) {}

// ---- encoder ------------------------------------------------------------------------------------

DetrEncoderLayer::DetrEncoderLayer(const Weights& w, const DetrConfig& cfg)
    : self_attn_(w.pp("self_attn"), cfg.d_model, cfg.encoder_attention_heads),
      self_attn_layer_norm_(w.pp("self_attn_layer_norm"), cfg.d_model),
      final_layer_norm_(w.pp("final_layer_norm"), cfg.d_model),
      mlp_(w, cfg.d_model, cfg.encoder_ffn_dim, act_from_name(cfg.activation_function)) {}

Tensor DetrEncoderLayer::forward(const Tensor& hidden, const Tensor& key_mask,
                                 const Tensor& spatial_position_embeddings, Tensor* attn_weights) const {
  Tensor h = self_attn_.forward(hidden, spatial_position_embeddings, Tensor(), Tensor(), key_mask, &hidden,
                                attn_weights);
  h = self_attn_layer_norm_.forward(h);
  return final_layer_norm_.forward(mlp_.forward(std::move(h)));
}

DetrEncoder::DetrEncoder(const Weights& w, const DetrConfig& cfg) {
  for (int64_t i = 0; i < cfg.encoder_layers; ++i) layers_.emplace_back(w.pp("layers").pp(i), cfg);
}

DetrEncoderOutput DetrEncoder::forward(const Tensor& inputs_embeds, const Tensor& key_mask,
                                       const Tensor& spatial_position_embeddings, bool output_hidden_states,
                                       bool output_attentions) const {
  DetrEncoderOutput out;
  Tensor h = inputs_embeds;
  if (output_hidden_states) out.hidden_states.push_back(h);
  for (auto& layer : layers_) {
    Tensor weights;
    h = layer.forward(h, key_mask, spatial_position_embeddings, output_attentions ? &weights : nullptr);
    if (output_hidden_states) out.hidden_states.push_back(h);
    if (output_attentions) out.attentions.push_back(weights);
  }
  out.last_hidden_state = h;
  return out;
}

// ---- decoder ------------------------------------------------------------------------------------

DetrDecoderLayer::DetrDecoderLayer(const Weights& w, const DetrConfig& cfg)
    : self_attn_(w.pp("self_attn"), cfg.d_model, cfg.decoder_attention_heads),
      encoder_attn_(w.pp("encoder_attn"), cfg.d_model, cfg.decoder_attention_heads),
      self_attn_layer_norm_(w.pp("self_attn_layer_norm"), cfg.d_model),
      encoder_attn_layer_norm_(w.pp("encoder_attn_layer_norm"), cfg.d_model),
      final_layer_norm_(w.pp("final_layer_norm"), cfg.d_model),
      mlp_(w, cfg.d_model, cfg.decoder_ffn_dim, act_from_name(cfg.activation_function)) {}

Tensor DetrDecoderLayer::forward(const Tensor& hidden, const Tensor& spatial_position_embeddings,
                                 const Tensor& object_queries_position_embeddings,
                                 const Tensor& encoder_hidden_states, const Tensor& encoder_key_mask,
                                 Tensor* self_attn_weights, Tensor* cross_attn_weights) const {
  Tensor h = self_attn_.forward(hidden, object_queries_position_embeddings, Tensor(), Tensor(), Tensor(), &hidden,
                                self_attn_weights);
  h = self_attn_layer_norm_.forward(h);
  Tensor c = encoder_attn_.forward(h, object_queries_position_embeddings, encoder_hidden_states,
                                   spatial_position_embeddings, encoder_key_mask, &h, cross_attn_weights);
  c = encoder_attn_layer_norm_.forward(c);
  return final_layer_norm_.forward(mlp_.forward(std::move(c)));
}

DetrDecoder::DetrDecoder(const Weights& w, const DetrConfig& cfg)
    : layernorm_(w.pp("layernorm"), cfg.d_model), auxiliary_loss_(cfg.auxiliary_loss) {
  for (int64_t i = 0; i < cfg.decoder_layers; ++i) layers_.emplace_back(w.pp("layers").pp(i), cfg);
}

DetrDecoderOutput DetrDecoder::forward(const Tensor& inputs_embeds, const Tensor& encoder_hidden_states,
                                       const Tensor& encoder_key_mask, const Tensor& spatial_position_embeddings,
                                       const Tensor& object_queries_position_embeddings,
                                       bool output_hidden_states, bool output_attentions) const {
  DetrDecoderOutput out;
  Tensor h = inputs_embeds;
  std::vector<Tensor> intermediate;
  if (output_hidden_states) out.hidden_states.push_back(h);
  for (auto& layer : layers_) {
    Tensor self_weights, cross_weights;
    h = layer.forward(h, spatial_position_embeddings, object_queries_position_embeddings, encoder_hidden_states,
                      encoder_key_mask, output_attentions ? &self_weights : nullptr,
                      output_attentions ? &cross_weights : nullptr);
    if (output_hidden_states) out.hidden_states.push_back(h);
    if (output_attentions) {
      out.attentions.push_back(self_weights);
      out.cross_attentions.push_back(cross_weights);
    }
    if (auxiliary_loss_) {
      // The reference normalises the running state itself here (not a copy) when auxiliary_loss is on.
      h = layernorm_.forward(h);
      intermediate.push_back(h.reshape({1, h.size(0), h.size(1), h.size(2)}));
    }
  }
  out.last_hidden_state = layernorm_.forward(h);
  // The reference's hidden_states end with the normalised output, not the last layer's.
  if (output_hidden_states) out.hidden_states.back() = out.last_hidden_state;
  if (auxiliary_loss_ && !intermediate.empty()) out.intermediate_hidden_states = cat(intermediate, 0);
  return out;
}

// ---- front end ----------------------------------------------------------------------------------

DetrConvModel::DetrConvModel(const Weights& w, const DetrConfig& cfg, bool all_levels) : all_levels_(all_levels) {
  Weights bw = w.pp("backbone");
  conv_encoder_ = DetrConvEncoder(cfg.backbone, bw.pp("conv_encoder").pp("model"));
  const int64_t half = cfg.d_model / 2;
  if (cfg.position_embedding_type == "learned") {
    // Hub checkpoints keep it inside the backbone wrapper (DetrConvModel); newer ones on the model.
    Weights pw = bw.has("position_embedding.row_embeddings.weight") ? bw.pp("position_embedding")
                                                                    : w.pp("position_embedding");
    learned_ = LearnedPositionEmbedding(pw, half);
  } else {
    sine_.num_position_features = half;
    sine_.normalize = true;
  }
  const int64_t c = conv_encoder_.intermediate_channel_sizes().back();
  input_projection_ = Conv2d(w.get("input_projection.weight", {cfg.d_model, c, 1, 1}),
                             w.get("input_projection.bias", {cfg.d_model}), Conv2dOptions{});
}

DetrFrontOutput DetrConvModel::forward(const Tensor& pixel_values, const Tensor& pixel_mask) const {
  DetrFrontOutput out;
  out.features = conv_encoder_.forward(pixel_values, pixel_mask, /*last_level_only=*/!all_levels_);
  const DetrFeatureMap& last = out.features.back();
  const int64_t B = last.features.size(0), h = last.features.size(1), w = last.features.size(2);
  out.projected_feature_map = input_projection_.forward(last.features);
  const int64_t D = out.projected_feature_map.size(3);
  out.flattened_features = out.projected_feature_map.reshape({B, h * w, D});
  Tensor pos = learned_.defined() ? learned_.forward(B, h, w)
                                  : sine_position_embedding(last.mask, sine_, last.features.device());
  out.spatial_position_embeddings = pos.reshape({B, h * w, pos.size(3)});
  out.flattened_mask = last.mask.reshape({B, h * w});
  return out;
}

// ---- DetrModel ----------------------------------------------------------------------------------

DetrModel::DetrModel(const Weights& w, const DetrConfig& cfg, bool all_levels)
    : backbone_(w, cfg, all_levels),
      query_position_embeddings_(w.get("query_position_embeddings.weight", {cfg.num_queries, cfg.d_model})),
      encoder_(w.pp("encoder"), cfg),
      decoder_(w.pp("decoder"), cfg) {}

DetrModelOutputs DetrModel::forward(const Tensor& pixel_values, const Tensor& pixel_mask, bool output_hidden_states,
                                    bool output_attentions) const {
  DetrModelOutputs out;
  out.front = backbone_.forward(pixel_values, pixel_mask);
  out.encoder = encoder_.forward(out.front.flattened_features, out.front.flattened_mask,
                                 out.front.spatial_position_embeddings, output_hidden_states, output_attentions);
  const int64_t B = pixel_values.size(0), Q = query_position_embeddings_.size(0), D = query_position_embeddings_.size(1);
  Tensor query_pos = repeat_over_batch(query_position_embeddings_, B, out.encoder.last_hidden_state.device());
  Tensor queries = Tensor::zeros({B, Q, D}, DType::F32, out.encoder.last_hidden_state.device());
  out.decoder = decoder_.forward(queries, out.encoder.last_hidden_state, out.front.flattened_mask,
                                 out.front.spatial_position_embeddings, query_pos, output_hidden_states,
                                 output_attentions);
  return out;
}

Tensor repeat_over_batch(const Tensor& weight, int64_t batch, Device device) {
  const Tensor w = weight.on(device);
  Tensor out = Tensor::empty({batch, weight.size(0), weight.size(1)}, DType::F32, device);
  for (int64_t b = 0; b < batch; ++b) out[b].copy_from(w);
  return out;
}

void write_detr_base_outputs(const DetrEncoderOutput& encoder, const DetrDecoderOutput& decoder, ModelOutput& out) {
  out.set("last_hidden_state", decoder.last_hidden_state);
  if (!decoder.hidden_states.empty()) out.set_list("decoder_hidden_states", decoder.hidden_states);
  if (!decoder.attentions.empty()) out.set_list("decoder_attentions", decoder.attentions);
  if (!decoder.cross_attentions.empty()) out.set_list("cross_attentions", decoder.cross_attentions);
  out.set("encoder_last_hidden_state", encoder.last_hidden_state);
  if (!encoder.hidden_states.empty()) out.set_list("encoder_hidden_states", encoder.hidden_states);
  if (!encoder.attentions.empty()) out.set_list("encoder_attentions", encoder.attentions);
}

// ---- heads --------------------------------------------------------------------------------------

DetrMLPPredictionHead::DetrMLPPredictionHead(const Weights& w, int64_t input_dim, int64_t hidden_dim,
                                             int64_t output_dim, int num_layers) {
  for (int i = 0; i < num_layers; ++i) {
    const int64_t in = i == 0 ? input_dim : hidden_dim;
    const int64_t out = i == num_layers - 1 ? output_dim : hidden_dim;
    Weights lw = w.pp("layers").pp(i);
    layers_.emplace_back(lw.get("weight", {out, in}), lw.get("bias", {out}),
                         i < num_layers - 1 ? Act::Relu : Act::None);
  }
}

Tensor DetrMLPPredictionHead::forward(const Tensor& x) const {
  Tensor h = x;
  for (auto& l : layers_) h = l.forward(h);
  return h;
}

void sigmoid_inplace(Tensor& x) { act_inplace(x, Act::Sigmoid); }

DetrMHAttentionMap::DetrMHAttentionMap(const Weights& w, int64_t d_model, int64_t num_heads)
    : q_linear_(w.get("q_linear.weight", {d_model, d_model}), w.get("q_linear.bias", {d_model})),
      k_linear_(w.get("k_linear.weight", {d_model, d_model}), w.get("k_linear.bias", {d_model})),
      num_heads_(num_heads),
      scaling_(1.0f / std::sqrt(static_cast<float>(d_model / num_heads))) {}

Tensor DetrMHAttentionMap::forward(const Tensor& queries, const Tensor& memory, const Tensor& key_mask, int64_t h,
                                   int64_t w) const {
  const int64_t B = queries.size(0), Q = queries.size(1), D = queries.size(2), H = num_heads_, dh = D / H;
  const int64_t L = memory.size(1);
  // (q * scaling) k^T per head: [B, H, Q, L].
  Tensor q = permute(q_linear_.forward(queries).reshape({B, Q, H, dh}), {0, 2, 1, 3});
  Tensor k = permute(k_linear_.forward(memory).reshape({B, L, H, dh}), {0, 2, 1, 3});
  Tensor scores = matmul(scale(q, scaling_), k, /*trans_b=*/true);
  // -> [B, Q, L, H]: softmax runs over heads and positions together, and this order is the mask
  // head's channels-last input.
  Tensor s = permute(scores, {0, 2, 3, 1});
  if (key_mask.defined() && !s.is_cpu()) {
    s = add(s, key_mask_bias(key_mask, {B, 1, L, 1}).to(s.device()));
  } else if (key_mask.defined()) {
    const uint8_t* m = key_mask.data<uint8_t>();
    float* p = s.f32();
    const float lowest = std::numeric_limits<float>::lowest();
#pragma omp parallel for collapse(2)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t qi = 0; qi < Q; ++qi)
        for (int64_t l = 0; l < L; ++l)
          if (!m[b * L + l])
            for (int64_t n = 0; n < H; ++n) p[((b * Q + qi) * L + l) * H + n] = lowest;
  }
  Tensor flat = s.reshape({B, Q, L * H});
  softmax_lastdim_inplace(flat);
  return flat.reshape({B * Q, h, w, H});
}

DetrMaskHeadSmallConv::DetrMaskHeadSmallConv(const Weights& w, int64_t input_channels,
                                             const std::vector<int64_t>& fpn_channels, int64_t hidden_size, Act act)
    : act_(act) {
  if (input_channels % 8 != 0)
    throw ModelError("mask head: input_channels must be divisible by 8, got " + std::to_string(input_channels));
  if (fpn_channels.size() != 3) throw ModelError("mask head: needs 3 FPN levels from the backbone");
  const int64_t dims[6] = {input_channels, hidden_size / 2, hidden_size / 4, hidden_size / 8, hidden_size / 16, 0};
  Conv2dOptions same3;
  same3.pad_top = same3.pad_left = same3.pad_bottom = same3.pad_right = 1;
  // lay1: input -> input, lay2: input -> D/2, lay3..5: halving.
  const int64_t ins[5] = {input_channels, input_channels, dims[1], dims[2], dims[3]};
  const int64_t outs[5] = {input_channels, dims[1], dims[2], dims[3], dims[4]};
  for (int i = 0; i < 5; ++i) {
    std::string n = std::to_string(i + 1);
    Tensor weight = w.get("lay" + n + ".weight", {outs[i], ins[i], 3, 3});
    Tensor bias = w.get("lay" + n + ".bias", {outs[i]});
    if (i == 0) {
      const int64_t d = hidden_size;
      lay1_features_ = Conv2d(narrow(weight, 1, 0, d), bias, same3);
      lay1_attention_ = Conv2d(narrow(weight, 1, d, input_channels - d), Tensor(), same3);
      lay_.emplace_back();
    } else {
      lay_.emplace_back(weight, bias, same3);
    }
    gn_w_.push_back(w.get("gn" + n + ".weight", {outs[i]}));
    gn_b_.push_back(w.get("gn" + n + ".bias", {outs[i]}));
    gn_groups_.push_back(static_cast<int>(std::min<int64_t>(8, outs[i])));
  }
  for (int i = 0; i < 3; ++i) {
    std::string n = std::to_string(i + 1);
    adapter_.emplace_back(w.get("adapter" + n + ".weight", {outs[i + 1], fpn_channels[i], 1, 1}),
                          w.get("adapter" + n + ".bias", {outs[i + 1]}), Conv2dOptions{});
  }
  out_lay_ = Conv2d(w.get("out_lay.weight", {1, dims[4], 3, 3}), w.get("out_lay.bias", {1}), same3);
}

Tensor DetrMaskHeadSmallConv::forward(const Tensor& features, const Tensor& attention_masks,
                                      const std::vector<Tensor>& fpn_features) const {
  const int64_t B = features.size(0), h = features.size(1), w = features.size(2);
  const int64_t BQ = attention_masks.size(0), Q = BQ / B;
  auto norm = [&](int i, const Tensor& in) { return group_norm_nhwc(in, gn_groups_[i], gn_w_[i], gn_b_[i], 1e-5f, act_); };
  // lay1(cat([features, attention_masks])) = lay1_features(features) + lay1_attention(attention_masks).
  Tensor per_image = lay1_features_.forward(features);  // [B, h, w, C1]
  const int64_t C1 = per_image.size(3);
  // The adapters run once per image; their outputs are shared by the image's queries.
  std::vector<Tensor> fpn;
  for (int s = 0; s < 3; ++s) fpn.push_back(adapter_[s].forward(fpn_features[s]));
  const int64_t out_h = fpn[2].size(1), out_w = fpn[2].size(2), plane = out_h * out_w;
  // Every query's maps reach the finest FPN resolution (1/4 of the input): for all queries at once
  // they would take gigabytes and most of the time would go to first touches of fresh pages. The
  // queries are independent (convolutions and group norms act per map), so they run in chunks
  // whose largest map stays within a few tens of MB, and each chunk reuses the previous one's
  // buffers from the pool.
  constexpr int64_t kChunkBytes = int64_t(32) << 20;
  const int64_t per_query = plane * fpn[2].size(3) * int64_t(sizeof(float));
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / std::max<int64_t>(per_query, 1), 1, std::max<int64_t>(Q, 1));
  Tensor out = Tensor::empty({B, Q, out_h, out_w}, DType::F32, per_image.device());
  Tensor out_rows = out.reshape({B * Q, plane});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q0 = 0; q0 < Q; q0 += chunk) {
      const int64_t n = std::min(chunk, Q - q0);
      Tensor shared = Tensor::empty({n, h, w, C1}, DType::F32, per_image.device());
      for (int64_t i = 0; i < n; ++i) shared[i].copy_from(per_image[b]);
      Tensor masks = attention_masks.slice0(b * Q + q0, b * Q + q0 + n);
      Tensor x = norm(0, lay1_attention_.forward(masks, &shared));
      x = norm(1, lay_[1].forward(x));
      for (int s = 0; s < 3; ++s)
        x = norm(2 + s, lay_[2 + s].forward(upsample_nearest_add(x, fpn[s].slice0(b, b + 1), n)));
      Tensor o = out_lay_.forward(x);  // [n, H', W', 1]
      out_rows.slice0(b * Q + q0, b * Q + q0 + n).copy_from(o);
    }
  return out;
}

DetrSegmentationHead::DetrSegmentationHead(const Weights& w, const DetrConfig& cfg,
                                           const std::vector<int64_t>& backbone_channels)
    : bbox_attention_(w.pp("bbox_attention"), cfg.d_model, cfg.encoder_attention_heads) {
  if (backbone_channels.size() < 4)
    throw ModelError("segmentation needs 4 backbone feature levels (out_features stage1..stage4), got " +
                std::to_string(backbone_channels.size()));
  // intermediate_channel_sizes[::-1][-3:]: the first three levels, coarsest first.
  std::vector<int64_t> fpn = {backbone_channels[2], backbone_channels[1], backbone_channels[0]};
  mask_head_ = DetrMaskHeadSmallConv(w.pp("mask_head"), cfg.d_model + cfg.encoder_attention_heads, fpn,
                                     cfg.d_model, act_from_name(cfg.activation_function));
}

Tensor DetrSegmentationHead::forward(const Tensor& sequence_output, const Tensor& encoder_last_hidden_state,
                                     const DetrFrontOutput& front) const {
  const Tensor& proj = front.projected_feature_map;
  Tensor bbox_mask = bbox_attention_.forward(sequence_output, encoder_last_hidden_state, front.flattened_mask,
                                             proj.size(1), proj.size(2));
  return mask_head_.forward(proj, bbox_mask,
                            {front.features[2].features, front.features[1].features, front.features[0].features});
}

Tensor upsample_nearest_add(const Tensor& x, const Tensor& y, int64_t repeat) {
  const int64_t NR = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t out_h = y.size(1), out_w = y.size(2);
  if (y.size(3) != C || y.size(0) * repeat != NR)
    throw Error("upsample_nearest_add: " + shape_str(x.shape()) + " and " + shape_str(y.shape()));
  if (!x.is_cpu()) {
    // The same nearest indices as interpolate_nearest, on NCHW; y broadcast over each run of `repeat` maps.
    Tensor up = nchw_to_nhwc(interpolate_nearest(nhwc_to_nchw(x), out_h, out_w));
    const int64_t B = y.size(0);
    return add(y.reshape({B, 1, out_h, out_w, C}), up.reshape({B, repeat, out_h, out_w, C})).reshape({NR, out_h, out_w, C});
  }
  std::vector<int64_t> ys(out_h), xs(out_w);
  for (int64_t i = 0; i < out_h; ++i) ys[i] = nearest_source_index(i, H, out_h);
  for (int64_t j = 0; j < out_w; ++j) xs[j] = nearest_source_index(j, W, out_w);
  Tensor out = Tensor::empty({NR, out_h, out_w, C});
  const float* px = x.f32();
  const float* py = y.f32();
  float* po = out.f32();
#pragma omp parallel for collapse(2)
  for (int64_t n = 0; n < NR; ++n)
    for (int64_t i = 0; i < out_h; ++i) {
      const float* yrow = py + ((n / repeat) * out_h + i) * out_w * C;
      const float* xrow = px + (n * H + ys[i]) * W * C;
      float* orow = po + (n * out_h + i) * out_w * C;
      for (int64_t j = 0; j < out_w; ++j) {
        const float* a = xrow + xs[j] * C;
        for (int64_t c = 0; c < C; ++c) orow[j * C + c] = yrow[j * C + c] + a[c];
      }
    }
  return out;
}

void write_detr_loss(const std::vector<DetectionTarget>& targets, const DetrLossConfig& cfg,
                     DetrLossPrediction last, std::vector<DetrLossPrediction> auxiliary, ModelOutput& out) {
  DetrLossInputs in;
  in.outputs = std::move(last);
  if (cfg.auxiliary_loss) in.auxiliary = std::move(auxiliary);
  in.targets = targets;
  DetrLossOutput loss = detr_loss(in, cfg);
  out.set("loss", loss.loss);
  for (auto& [name, value] : loss.loss_dict) out.set("loss_dict." + name, value);
}

// ---- the models ---------------------------------------------------------------------------------

namespace {

// The transformers model classes as vf::Model: DetrModel, DetrForObjectDetection, DetrForSegmentation.
class DetrRunner : public Model {
 public:
  DetrRunner(const json& config, const std::string& arch, const Weights& w) : cfg_(DetrConfig::from_json(config)) {
    const bool segmentation = arch == "DetrForSegmentation";
    const bool detection = arch != "DetrModel";
    DetrCheckpointLayout ck = detr_checkpoint_layout(w, "detr", segmentation);
    model_ = DetrModel(ck.base, cfg_, /*all_levels=*/segmentation);
    if (detection) {
      const Weights& hw = ck.heads;
      class_labels_classifier_ = Linear(hw.get("class_labels_classifier.weight", {cfg_.num_labels + 1, cfg_.d_model}),
                                        hw.get("class_labels_classifier.bias", {cfg_.num_labels + 1}));
      bbox_predictor_ = DetrMLPPredictionHead(hw.pp("bbox_predictor"), cfg_.d_model, cfg_.d_model, 4, 3);
    }
    if (segmentation) seg_head_ = DetrSegmentationHead(w, cfg_, model_.backbone().intermediate_channel_sizes());
    if (detection) loss_cfg_ = detr_loss_config(config, arch);
    detection_ = detection;
    segmentation_ = segmentation;
  }

  ModelOutput forward(const ModelInputs& in) const override {
    DetrModelOutputs o = model_.forward(in.pixel_values, in.pixel_mask, in.output_hidden_states, in.output_attentions);
    ModelOutput out;
    write_detr_base_outputs(o.encoder, o.decoder, out);
    if (!detection_) {
      if (o.decoder.intermediate_hidden_states.defined())
        out.set("intermediate_hidden_states", o.decoder.intermediate_hidden_states);
      return out;
    }
    const Tensor& seq = o.decoder.last_hidden_state;
    out.set("logits", class_labels_classifier_.forward(seq));
    Tensor boxes = bbox_predictor_.forward(seq);
    sigmoid_inplace(boxes);
    out.set("pred_boxes", boxes);
    if (segmentation_) out.set("pred_masks", seg_head_.forward(seq, o.encoder.last_hidden_state, o.front));
    if (!in.targets.empty()) {
      std::vector<DetrLossPrediction> aux;
      const Tensor& inter = o.decoder.intermediate_hidden_states;
      for (int64_t l = 0; inter.defined() && l + 1 < inter.size(0); ++l) {
        Tensor aux_boxes = bbox_predictor_.forward(inter[l]);
        sigmoid_inplace(aux_boxes);
        aux.push_back({class_labels_classifier_.forward(inter[l]), aux_boxes, Tensor(), Tensor(), Tensor()});
      }
      write_detr_loss(in.targets, loss_cfg_,
                      {out.get("logits"), out.get("pred_boxes"),
                       segmentation_ ? out.get("pred_masks") : Tensor(), Tensor(), Tensor()},
                      std::move(aux), out);
    }
    return out;
  }

 private:
  DetrConfig cfg_;
  DetrLossConfig loss_cfg_;
  DetrModel model_;
  Linear class_labels_classifier_;
  DetrMLPPredictionHead bbox_predictor_;
  DetrSegmentationHead seg_head_;
  bool detection_ = false, segmentation_ = false;
};

}  // namespace

void register_detr_models() {
  register_model({"detr",
                  {"DetrModel", "DetrForObjectDetection", "DetrForSegmentation"},
                  [](const json& config, const std::string& arch, const Weights& w) -> std::unique_ptr<Model> {
                    return std::make_unique<DetrRunner>(config, arch, w);
                  }});
}

}  // namespace vf
