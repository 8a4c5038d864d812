// DeiT, module by module as transformers' modeling_deit.py (the Hub checkpoints' names are those of
// the 4.x file: encoder.layer.N.attention.attention.query, ...). Token sequences are [B, L, C].
#include "models/deit.h"

#include <cmath>
#include <memory>
#include <optional>
#include <vector>

#include "core/attention.h"
#include "core/ops.h"
#include "models/common.h"
#include "models/image_classification.h"
#include "models/model.h"

namespace vf {

namespace {
std::pair<int64_t, int64_t> int_or_pair(const json& cfg, const std::string& key, int64_t fallback) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return {fallback, fallback};
  if (it->is_number_integer()) return {it->get<int64_t>(), it->get<int64_t>()};
  auto v = cfg_get<std::vector<int64_t>>(cfg, key, {});
  if (v.size() != 2) throw ModelError("config key '" + key + "' must be an int or a pair [h, w], got " + it->dump());
  return {v[0], v[1]};
}
}  // namespace

DeiTConfig DeiTConfig::from_json(const json& cfg) {
  DeiTConfig c;
  c.hidden_size = cfg_get<int64_t>(cfg, "hidden_size", c.hidden_size);
  c.num_hidden_layers = cfg_get<int64_t>(cfg, "num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = cfg_get<int64_t>(cfg, "num_attention_heads", c.num_attention_heads);
  c.intermediate_size = cfg_get<int64_t>(cfg, "intermediate_size", c.intermediate_size);
  c.hidden_act = cfg_get<std::string>(cfg, "hidden_act", c.hidden_act);
  c.hidden_dropout_prob = cfg_get<float>(cfg, "hidden_dropout_prob", c.hidden_dropout_prob);
  c.attention_probs_dropout_prob = cfg_get<float>(cfg, "attention_probs_dropout_prob", c.attention_probs_dropout_prob);
  c.initializer_range = cfg_get<float>(cfg, "initializer_range", c.initializer_range);
  c.layer_norm_eps = cfg_get<float>(cfg, "layer_norm_eps", c.layer_norm_eps);
  std::tie(c.image_size_h, c.image_size_w) = int_or_pair(cfg, "image_size", 224);
  std::tie(c.patch_size_h, c.patch_size_w) = int_or_pair(cfg, "patch_size", 16);
  c.num_channels = cfg_get<int64_t>(cfg, "num_channels", c.num_channels);
  c.qkv_bias = cfg_get<bool>(cfg, "qkv_bias", c.qkv_bias);
  c.encoder_stride = cfg_get<int64_t>(cfg, "encoder_stride", c.encoder_stride);
  c.pooler_output_size = cfg_get<int64_t>(cfg, "pooler_output_size", 0);
  if (c.pooler_output_size <= 0) c.pooler_output_size = c.hidden_size;  // None (or 0) -> hidden_size
  c.pooler_act = cfg_get<std::string>(cfg, "pooler_act", c.pooler_act);

  if (c.hidden_size <= 0 || c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads != 0)
    throw ModelError("DeiT config: hidden_size " + std::to_string(c.hidden_size) +
                " is not a multiple of num_attention_heads " + std::to_string(c.num_attention_heads));
  if (c.patch_size_h <= 0 || c.patch_size_w <= 0 || c.image_size_h < c.patch_size_h || c.image_size_w < c.patch_size_w)
    throw ModelError("DeiT config: image_size " + std::to_string(c.image_size_h) + "x" + std::to_string(c.image_size_w) +
                " and patch_size " + std::to_string(c.patch_size_h) + "x" + std::to_string(c.patch_size_w) +
                " give no patches");
  if (c.num_hidden_layers < 0 || c.intermediate_size <= 0 || c.num_channels <= 0 || c.encoder_stride <= 0)
    throw ModelError("DeiT config: num_hidden_layers, intermediate_size, num_channels and encoder_stride must be positive");
  return c;
}

namespace {

// Per-layer head masks from ModelInputs::head_mask ([num_heads] for every layer, or
// [num_layers, num_heads]), as PreTrainedModel.get_head_mask spreads it.
std::vector<Tensor> split_head_mask(const Tensor& head_mask, int64_t layers, int64_t heads) {
  std::vector<Tensor> r(layers);
  if (!head_mask.defined()) return r;
  Tensor hm = head_mask.dtype() == DType::F32 ? head_mask : head_mask.to(DType::F32);
  if (hm.dim() == 1 && hm.size(0) == heads) {
    for (auto& t : r) t = hm;
  } else if (hm.dim() == 2 && hm.size(0) == layers && hm.size(1) == heads) {
    for (int64_t i = 0; i < layers; ++i) r[i] = hm[i];
  } else {
    throw Error("head_mask has shape " + shape_str(head_mask.shape()) + "; expected [" + std::to_string(heads) +
                "] or [" + std::to_string(layers) + ", " + std::to_string(heads) + "]");
  }
  return r;
}

// bool_masked_pos of any integer or bool dtype as one byte per patch.
std::vector<uint8_t> mask_bytes(const Tensor& m) {
  std::vector<uint8_t> r(m.numel());
  if (m.dtype() == DType::Bool || m.dtype() == DType::U8) {
    const uint8_t* p = static_cast<const uint8_t*>(m.raw());
    for (size_t i = 0; i < r.size(); ++i) r[i] = p[i] != 0;
  } else {
    Tensor t = m.to(DType::I64);
    for (size_t i = 0; i < r.size(); ++i) r[i] = t.data<int64_t>()[i] != 0;
  }
  return r;
}

// Token `index` of every sequence: [B, L, C] -> [B, C].
Tensor token(const Tensor& x, int64_t index) { return narrow(x, 1, index, 1).reshape({x.size(0), x.size(2)}); }

// ---- DeiTPatchEmbeddings: a conv with kernel = stride = patch, i.e. one matrix product over the
// flattened patches (channel, row, column order, as the conv weight is laid out).
struct DeiTPatchEmbeddings {
  int64_t num_channels, ph, pw, hidden;
  Linear projection;

  DeiTPatchEmbeddings(const DeiTConfig& c, const Weights& w)
      : num_channels(c.num_channels), ph(c.patch_size_h), pw(c.patch_size_w), hidden(c.hidden_size) {
    Tensor weight = w.pp("projection").get("weight", {hidden, num_channels, ph, pw});
    Tensor bias = w.pp("projection").get("bias", {hidden});
    projection = Linear(weight.reshape({hidden, num_channels * ph * pw}), bias);
  }

  // pixel_values [B, ch, H, W] -> [B, (H/ph)*(W/pw), hidden]
  Tensor forward(const Tensor& pixel_values) const {
    if (pixel_values.size(1) != num_channels)
      throw Error("Make sure that the channel dimension of the pixel values match with the one set in the "
                  "configuration. Expected " + std::to_string(num_channels) + " but got " +
                  std::to_string(pixel_values.size(1)) + ".");
    const int64_t B = pixel_values.size(0), H = pixel_values.size(2), W = pixel_values.size(3);
    const int64_t gh = H / ph, gw = W / pw, K = num_channels * ph * pw;
    Tensor x = pixel_values;
    if (H != gh * ph) x = narrow(x, 2, 0, gh * ph);  // the conv drops a partial last patch
    if (W != gw * pw) x = narrow(x, 3, 0, gw * pw);
    // [B, ch, gh, ph, gw, pw] -> [B, gh, gw, ch, ph, pw]
    Tensor patches = permute(x.reshape({B, num_channels, gh, ph, gw, pw}), {0, 2, 4, 1, 3, 5}).reshape({B, gh * gw, K});
    return projection.forward(patches);
  }
};

// ---- DeiTEmbeddings: [CLS] and distillation tokens, patch embeddings (masked ones replaced by the
// mask token), plus position embeddings.
struct DeiTEmbeddings {
  DeiTConfig config;
  Tensor cls_token, distillation_token, mask_token, position_embeddings;  // [C], [C], [C] or none, [N+2, C]
  DeiTPatchEmbeddings patch_embeddings;
  int64_t num_patches;

  DeiTEmbeddings(const DeiTConfig& c, const Weights& w, bool use_mask_token)
      : config(c), patch_embeddings(c, w.pp("patch_embeddings")) {
    const int64_t C = c.hidden_size;
    num_patches = (c.image_size_h / c.patch_size_h) * (c.image_size_w / c.patch_size_w);
    cls_token = w.get("cls_token", {1, 1, C}).reshape({C});
    if (use_mask_token) mask_token = w.get("mask_token", {1, 1, C}).reshape({C});
    position_embeddings = w.get("position_embeddings", {1, num_patches + 2, C}).reshape({num_patches + 2, C});
    distillation_token = w.get("distillation_token", {1, 1, C}).reshape({C});
  }

  // The position embeddings for an input of H x W pixels and N patches: bicubic interpolation of
  // the patch part on its square grid (the two token rows stay), unless the patch count already
  // matches and the input is square, as the reference's interpolate_pos_encoding.
  Tensor interpolate_pos_encoding(int64_t N, int64_t H, int64_t W) const {
    const int64_t num_positions = position_embeddings.size(0) - 2, C = position_embeddings.size(1);
    if (N == num_positions && H == W) return position_embeddings;
    const auto side = static_cast<int64_t>(std::sqrt(static_cast<double>(num_positions)));
    if (side * side != num_positions)
      throw ModelError("interpolate_pos_encoding: " + std::to_string(num_positions) +
                       " position embeddings do not form a square grid");
    const int64_t nh = H / config.patch_size_h, nw = W / config.patch_size_w;
    Tensor grid = nhwc_to_nchw(position_embeddings.slice0(2, num_positions + 2).reshape({1, side, side, C}));
    Tensor patch_pos = nchw_to_nhwc(interpolate_bicubic(grid, nh, nw)).reshape({nh * nw, C});
    return cat({position_embeddings.slice0(0, 2), patch_pos}, 0);
  }

  Tensor forward(const Tensor& pixel_values, const Tensor& bool_masked_pos, bool interpolate) const {
    const int64_t H = pixel_values.size(2), W = pixel_values.size(3);
    Tensor patches = patch_embeddings.forward(pixel_values);
    // Without interpolate_pos_encoding the reference accepts only the configured size.
    if (!interpolate && (H != config.image_size_h || W != config.image_size_w))
      throw Error("Input image size (" + std::to_string(H) + "*" + std::to_string(W) + ") doesn't match model (" +
                  std::to_string(config.image_size_h) + "*" + std::to_string(config.image_size_w) + ").");
    const int64_t B = patches.size(0), N = patches.size(1), C = patches.size(2);
    const Tensor position = interpolate ? interpolate_pos_encoding(N, H, W) : position_embeddings;
    if (position.size(0) != N + 2)
      throw Error("DeiT: " + std::to_string(N) + " patches but " + std::to_string(position.size(0) - 2) +
                  " position embeddings");

    std::vector<uint8_t> masked;
    if (bool_masked_pos.defined()) {
      if (!mask_token.defined())
        throw Error("bool_masked_pos was given but this DeiT model has no mask token (only DeiTForMaskedImageModeling "
                    "has one)");
      if (bool_masked_pos.numel() != B * N)
        throw Error("bool_masked_pos has shape " + shape_str(bool_masked_pos.shape()) + "; expected [" +
                    std::to_string(B) + ", " + std::to_string(N) + "]");
      masked = mask_bytes(bool_masked_pos);
    }

    Tensor tokens = patches;
    if (!masked.empty()) {
      // Masked patches become the mask token: patches * (1 - m) + mask_token * m.
      Tensor m = Tensor::empty({B, N, 1}), keep = Tensor::empty({B, N, 1});
      for (int64_t i = 0; i < B * N; ++i) {
        m.f32()[i] = masked[i] ? 1.0f : 0.0f;
        keep.f32()[i] = masked[i] ? 0.0f : 1.0f;
      }
      tokens = add(mul(patches, keep), mul(mask_token.reshape({1, 1, C}), m));
    }
    std::vector<Tensor> heads(static_cast<size_t>(B), cat({cls_token.reshape({1, 1, C}), distillation_token.reshape({1, 1, C})}, 1));
    Tensor out = add(cat({cat(heads, 0), tokens}, 1), position);
    return out;  // dropout: identity at inference
  }
};

// ---- DeiTSelfAttention: query, key and value run as one fused projection; the attention kernel
// reads the heads straight from its output.
struct DeiTSelfAttention {
  int64_t num_heads;
  float scale;
  Linear qkv;

  DeiTSelfAttention(const DeiTConfig& c, const Weights& w) : num_heads(c.num_attention_heads) {
    const int64_t C = c.hidden_size;
    scale = 1.0f / std::sqrt(static_cast<float>(C / num_heads));
    std::vector<Tensor> ws, bs;
    for (const char* name : {"query", "key", "value"}) {
      ws.push_back(w.pp(name).get("weight", {C, C}));
      if (c.qkv_bias) bs.push_back(w.pp(name).get("bias", {C}));
    }
    qkv = Linear(cat(ws, 0), c.qkv_bias ? cat(bs, 0) : Tensor());
  }

  // The context in `out_dtype`: what the output projection reads without a conversion.
  Tensor forward(const Tensor& x, const Tensor& head_mask, Tensor* probs, DType out_dtype) const {
    AttentionOptions opt;
    opt.scale = scale;
    opt.head_mask = head_mask;
    opt.probs = probs;
    opt.out_dtype = out_dtype;
    // x: [B, L, hidden]. Q|K|V in the layer's compute dtype, which attention reads as it is.
    return multi_head_attention_packed(qkv.forward_to_attention(x), num_heads, opt);
  }
};

// ---- DeiTSelfOutput (dense; the residual is added here, fused into the product)
struct DeiTSelfOutput {
  Linear dense;
  DeiTSelfOutput(const DeiTConfig& c, const Weights& w)
      : dense(w.pp("dense").get("weight", {c.hidden_size, c.hidden_size}), w.pp("dense").get("bias", {c.hidden_size})) {}
  Tensor forward(const Tensor& x, Tensor residual) const { return dense.forward(x, std::move(residual)); }
};

struct DeiTAttention {
  DeiTSelfAttention attention;
  DeiTSelfOutput output;
  DeiTAttention(const DeiTConfig& c, const Weights& w) : attention(c, w.pp("attention")), output(c, w.pp("output")) {}
  DType input_dtype() const { return attention.qkv.input_dtype(); }
  // Returns residual + attention output (in the residual's storage when it is handed over).
  Tensor forward(const Tensor& x, Tensor residual, const Tensor& head_mask, Tensor* probs) const {
    return output.forward(attention.forward(x, head_mask, probs, output.dense.input_dtype()), std::move(residual));
  }
};

struct DeiTIntermediate {
  Linear dense;
  DeiTIntermediate(const DeiTConfig& c, const Weights& w)
      : dense(w.pp("dense").get("weight", {c.intermediate_size, c.hidden_size}),
              w.pp("dense").get("bias", {c.intermediate_size}), act_from_name(c.hidden_act)) {}
  Tensor forward(const Tensor& x) const { return dense.forward_to_layer(x); }  // read by DeiTOutput only
};

struct DeiTOutput {
  Linear dense;
  DeiTOutput(const DeiTConfig& c, const Weights& w)
      : dense(w.pp("dense").get("weight", {c.hidden_size, c.intermediate_size}), w.pp("dense").get("bias", {c.hidden_size})) {}
  Tensor forward(const Tensor& x, Tensor residual) const { return dense.forward(x, std::move(residual)); }
};

// ---- DeiTLayer: pre-norm attention and MLP blocks, each with its residual.
struct DeiTLayer {
  float eps;
  Tensor ln_before_w, ln_before_b, ln_after_w, ln_after_b;
  DeiTAttention attention;
  DeiTIntermediate intermediate;
  DeiTOutput output;

  DeiTLayer(const DeiTConfig& c, const Weights& w)
      : eps(c.layer_norm_eps), attention(c, w.pp("attention")), intermediate(c, w.pp("intermediate")),
        output(c, w.pp("output")) {
    ln_before_w = w.pp("layernorm_before").get("weight", {c.hidden_size});
    ln_before_b = w.pp("layernorm_before").get("bias", {c.hidden_size});
    ln_after_w = w.pp("layernorm_after").get("weight", {c.hidden_size});
    ln_after_b = w.pp("layernorm_after").get("bias", {c.hidden_size});
  }

  // The residual sums accumulate in the residual stream's storage where the caller hands it over.
  Tensor forward(Tensor hidden_states, const Tensor& head_mask, Tensor* probs) const {
    // Each norm is read only by the next linear layer: written in the dtype that layer takes.
    const Tensor normed = layer_norm(hidden_states, ln_before_w, ln_before_b, eps, attention.input_dtype());
    Tensor h = attention.forward(normed, std::move(hidden_states), head_mask, probs);
    const Tensor hidden = intermediate.forward(layer_norm(h, ln_after_w, ln_after_b, eps, intermediate.dense.input_dtype()));
    return output.forward(hidden, std::move(h));
  }
};

struct EncoderOutput {
  Tensor last_hidden_state;
  std::vector<Tensor> hidden_states, attentions;
};

struct DeiTEncoder {
  std::vector<DeiTLayer> layer;
  int64_t num_heads;

  DeiTEncoder(const DeiTConfig& c, const Weights& w) : num_heads(c.num_attention_heads) {
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) layer.emplace_back(c, w.pp("layer").pp(i));
  }

  EncoderOutput forward(Tensor h, const Tensor& head_mask, bool output_hidden_states, bool output_attentions) const {
    EncoderOutput r;
    auto masks = split_head_mask(head_mask, static_cast<int64_t>(layer.size()), num_heads);
    for (size_t i = 0; i < layer.size(); ++i) {
      if (output_hidden_states) r.hidden_states.push_back(h);
      Tensor probs;
      h = layer[i].forward(std::move(h), masks[i], output_attentions ? &probs : nullptr);
      if (output_attentions) r.attentions.push_back(probs);
    }
    if (output_hidden_states) r.hidden_states.push_back(h);
    r.last_hidden_state = h;
    return r;
  }
};

// ---- DeiTPooler: dense + activation on the [CLS] token.
struct DeiTPooler {
  Linear dense;
  DeiTPooler(const DeiTConfig& c, const Weights& w)
      : dense(w.pp("dense").get("weight", {c.pooler_output_size, c.hidden_size}),
              w.pp("dense").get("bias", {c.pooler_output_size}), act_from_name(c.pooler_act)) {}
  Tensor forward(const Tensor& sequence_output) const { return dense.forward(token(sequence_output, 0)); }
};

Tensor checked_pixel_values(const ModelInputs& in) {
  const Tensor& p = in.pixel_values;
  if (!p.defined()) throw Error("You have to specify pixel_values");
  if (p.dim() != 4) throw Error("pixel_values must be [batch, channels, height, width], got " + shape_str(p.shape()));
  return p.dtype() == DType::F32 ? p : p.to(DType::F32);
}

// ---- DeiTModel
class DeiTModel : public Model {
 public:
  struct Output {
    Tensor last_hidden_state, pooler_output;
    std::vector<Tensor> hidden_states, attentions;
  };

  DeiTModel(const DeiTConfig& c, const Weights& w, bool add_pooling_layer, bool use_mask_token)
      : config_(c), embeddings_(config_, w.pp("embeddings"), use_mask_token), encoder_(config_, w.pp("encoder")) {
    layernorm_w_ = w.pp("layernorm").get("weight", {c.hidden_size});
    layernorm_b_ = w.pp("layernorm").get("bias", {c.hidden_size});
    if (add_pooling_layer) pooler_.emplace(config_, w.pp("pooler"));
  }

  Output run(const ModelInputs& in) const {
    Tensor pixel_values = checked_pixel_values(in);
    Tensor embedding_output = embeddings_.forward(pixel_values, in.bool_masked_pos, in.interpolate_pos_encoding);
    EncoderOutput enc = encoder_.forward(embedding_output, in.head_mask, in.output_hidden_states, in.output_attentions);
    Output r;
    r.last_hidden_state = layer_norm(enc.last_hidden_state, layernorm_w_, layernorm_b_, config_.layer_norm_eps);
    if (pooler_) r.pooler_output = pooler_->forward(r.last_hidden_state);
    r.hidden_states = std::move(enc.hidden_states);
    r.attentions = std::move(enc.attentions);
    return r;
  }

  ModelOutput forward(const ModelInputs& in) const override {
    Output o = run(in);
    ModelOutput out;
    out.set("last_hidden_state", o.last_hidden_state);
    if (o.pooler_output.defined()) out.set("pooler_output", o.pooler_output);
    out.set_list("hidden_states", o.hidden_states);
    out.set_list("attentions", o.attentions);
    return out;
  }

  const DeiTConfig& config() const { return config_; }

 private:
  DeiTConfig config_;
  DeiTEmbeddings embeddings_;
  DeiTEncoder encoder_;
  Tensor layernorm_w_, layernorm_b_;
  std::optional<DeiTPooler> pooler_;
};

// ---- DeiTForMaskedImageModeling: SimMIM decoder, a 1x1 conv to encoder_stride^2 * channels and a
// pixel shuffle back to image resolution; masked L1 loss when bool_masked_pos is given.
class DeiTForMaskedImageModeling : public Model {
 public:
  DeiTForMaskedImageModeling(const DeiTConfig& c, const Weights& w, const Weights& base)
      : deit_(c, base, /*add_pooling_layer=*/false, /*use_mask_token=*/true) {
    const int64_t out = c.encoder_stride * c.encoder_stride * c.num_channels;
    decoder_ = Linear(w.pp("decoder").pp(0).get("weight", {out, c.hidden_size, 1, 1}).reshape({out, c.hidden_size}),
                      w.pp("decoder").pp(0).get("bias", {out}));
  }

  ModelOutput forward(const ModelInputs& in) const override {
    const DeiTConfig& c = deit_.config();
    DeiTModel::Output o = deit_.run(in);
    // Patch tokens (the [CLS] and distillation tokens dropped) are already an NHWC feature map.
    const Tensor& seq = o.last_hidden_state;
    const int64_t B = seq.size(0), L = seq.size(1) - 2;
    const int64_t side = static_cast<int64_t>(std::sqrt(static_cast<double>(L)));
    if (side * side != L)
      throw Error("DeiTForMaskedImageModeling needs a square grid of patches, got " + std::to_string(L));
    Tensor decoded = decoder_.forward(narrow(seq, 1, 2, L));  // [B, side*side, s*s*ch]

    // PixelShuffle(s): channel (c, i, j) of patch (y, x) -> pixel (c, y*s + i, x*s + j).
    const int64_t s = c.encoder_stride, ch = c.num_channels, H = side * s, W = side * s;
    // [B, side, side, ch, s, s] -> [B, ch, side, s, side, s]
    Tensor recon = permute(decoded.reshape({B, side, side, ch, s, s}), {0, 3, 1, 4, 2, 5}).reshape({B, ch, H, W});

    ModelOutput out;
    if (in.bool_masked_pos.defined())
      out.set("loss", masked_l1_loss(checked_pixel_values(in), recon, in.bool_masked_pos));
    out.set("reconstruction", recon);
    out.set_list("hidden_states", o.hidden_states);
    out.set_list("attentions", o.attentions);
    return out;
  }

 private:
  // sum(|pixels - reconstruction| * mask) / (sum(mask) + 1e-5) / num_channels, the mask being
  // bool_masked_pos upsampled by patch_size (one channel, broadcast over the channels).
  Tensor masked_l1_loss(const Tensor& pixel_values_in, const Tensor& recon_in, const Tensor& bool_masked_pos) const {
    const Tensor pixel_values = pixel_values_in.cpu(), recon = recon_in.cpu();  // the loss runs on the host
    const DeiTConfig& c = deit_.config();
    const int64_t size = c.image_size_h / c.patch_size_h, p = c.patch_size_h;
    const int64_t B = recon.size(0), ch = recon.size(1), H = recon.size(2), W = recon.size(3);
    if (pixel_values.shape() != recon.shape() || size * p != H || size * p != W || bool_masked_pos.numel() != B * size * size)
      throw Error("DeiTForMaskedImageModeling loss: pixel_values " + shape_str(pixel_values.shape()) +
                  ", reconstruction " + shape_str(recon.shape()) + " and a " + std::to_string(size) + "x" +
                  std::to_string(size) + " mask of " + std::to_string(p) + "-pixel patches do not line up");
    std::vector<uint8_t> m = mask_bytes(bool_masked_pos);
    const float* x = pixel_values.f32();
    const float* y = recon.f32();
    double total = 0, count = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t Y = 0; Y < H; ++Y)
        for (int64_t X = 0; X < W; ++X) {
          if (!m[(b * size + Y / p) * size + X / p]) continue;
          count += 1;
          for (int64_t k = 0; k < ch; ++k) {
            int64_t idx = ((b * ch + k) * H + Y) * W + X;
            total += std::fabs(static_cast<double>(x[idx]) - y[idx]);
          }
        }
    Tensor loss = Tensor::empty({});
    loss.f32()[0] = static_cast<float>(total / (count + 1e-5) / static_cast<double>(ch));
    return loss;
  }

  DeiTModel deit_;
  Linear decoder_;
};

// ---- DeiTForImageClassification: a linear head on the final [CLS] token.
class DeiTForImageClassification : public Model {
 public:
  DeiTForImageClassification(const DeiTConfig& c, const json& cfg, const Weights& w, const Weights& base)
      : deit_(c, base, /*add_pooling_layer=*/false, /*use_mask_token=*/false),
        config_(cfg),
        classifier_(c.hidden_size, config_num_labels(cfg), w.pp("classifier")) {}

  ModelOutput forward(const ModelInputs& in) const override {
    DeiTModel::Output o = deit_.run(in);
    Tensor logits = classifier_.forward(token(o.last_hidden_state, 0));
    ModelOutput out;
    if (in.labels.defined()) out.set("loss", classification_loss(logits, in.labels, config_));
    out.set("logits", logits);
    out.set_list("hidden_states", o.hidden_states);
    out.set_list("attentions", o.attentions);
    return out;
  }

 private:
  DeiTModel deit_;
  json config_;  // problem_type, for the loss
  ClassifierHead classifier_;
};

// ---- DeiTForImageClassificationWithTeacher: heads on the [CLS] and distillation tokens; logits
// are their mean (inference only, no loss, as the reference).
class DeiTForImageClassificationWithTeacher : public Model {
 public:
  DeiTForImageClassificationWithTeacher(const DeiTConfig& c, const json& cfg, const Weights& w, const Weights& base)
      : deit_(c, base, /*add_pooling_layer=*/false, /*use_mask_token=*/false),
        cls_classifier_(c.hidden_size, config_num_labels(cfg), w.pp("cls_classifier")),
        distillation_classifier_(c.hidden_size, config_num_labels(cfg), w.pp("distillation_classifier")) {}

  ModelOutput forward(const ModelInputs& in) const override {
    DeiTModel::Output o = deit_.run(in);
    Tensor cls_logits = cls_classifier_.forward(token(o.last_hidden_state, 0));
    Tensor distillation_logits = distillation_classifier_.forward(token(o.last_hidden_state, 1));
    Tensor logits = scale(add(cls_logits, distillation_logits), 0.5f);
    ModelOutput out;
    out.set("logits", logits);
    out.set("cls_logits", cls_logits);
    out.set("distillation_logits", distillation_logits);
    out.set_list("hidden_states", o.hidden_states);
    out.set_list("attentions", o.attentions);
    return out;
  }

 private:
  DeiTModel deit_;
  ClassifierHead cls_classifier_, distillation_classifier_;
};

std::unique_ptr<Model> build_deit(const json& cfg, const std::string& arch, const Weights& w) {
  DeiTConfig c = DeiTConfig::from_json(cfg);
  // Checkpoints of the base model have no "deit." prefix, those of the heads do; either loads into
  // either (a head's missing weights are then reported as missing).
  const bool prefixed = w.has("deit.embeddings.cls_token");
  if (arch == "DeiTModel") {
    Weights base = prefixed ? w.pp("deit") : w;
    // Checkpoints saved without the pooler (every head's) leave it out: transformers would
    // initialise it randomly.
    bool pooler = base.has("pooler.dense.weight");
    return std::make_unique<DeiTModel>(c, base, pooler, /*use_mask_token=*/false);
  }
  Weights base = prefixed || !w.has("embeddings.cls_token") ? w.pp("deit") : w;
  for (const char* n : {"pooler.dense.weight", "pooler.dense.bias"}) base.ignore(n);
  if (arch == "DeiTForImageClassification") return std::make_unique<DeiTForImageClassification>(c, cfg, w, base);
  if (arch == "DeiTForImageClassificationWithTeacher")
    return std::make_unique<DeiTForImageClassificationWithTeacher>(c, cfg, w, base);
  if (arch == "DeiTForMaskedImageModeling") return std::make_unique<DeiTForMaskedImageModeling>(c, w, base);
  throw ModelError("DeiT has no architecture '" + arch + "'");
}

}  // namespace

void register_deit_models() {
  register_model({"deit",
                  {"DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher",
                   "DeiTForMaskedImageModeling"},
                  build_deit});
}

}  // namespace vf
