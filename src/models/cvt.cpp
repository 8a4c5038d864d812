// CvT, module by module as transformers' modeling_cvt.py. Feature maps are NHWC ([B, H, W, C]),
// which is also the token layout [B, H*W, C]: going between the two is a reshape. The reference's
// NCHW appears only in the returned hidden states.
#include "models/cvt.h"

#include <cmath>
#include <memory>
#include <optional>
#include <vector>

#include "core/attention.h"
#include "core/file_pages.h"
#include "core/ops.h"
#include "models/common.h"
#include "models/image_classification.h"
#include "models/model.h"

namespace vf {

namespace {

template <class T>
std::vector<T> stage_list(const json& cfg, const std::string& key, const std::vector<T>& fallback) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return fallback;
  if (!it->is_array()) throw ModelError("config key '" + key + "' must be a list (one entry per stage), got " + it->dump());
  return cfg_get<std::vector<T>>(cfg, key, fallback);
}

}  // namespace

CvtConfig CvtConfig::from_json(const json& cfg) {
  CvtConfig c;
  c.num_channels = cfg_get<int64_t>(cfg, "num_channels", c.num_channels);
  c.patch_sizes = stage_list(cfg, "patch_sizes", c.patch_sizes);
  c.patch_stride = stage_list(cfg, "patch_stride", c.patch_stride);
  c.patch_padding = stage_list(cfg, "patch_padding", c.patch_padding);
  c.embed_dim = stage_list(cfg, "embed_dim", c.embed_dim);
  c.num_heads = stage_list(cfg, "num_heads", c.num_heads);
  c.depth = stage_list(cfg, "depth", c.depth);
  c.mlp_ratio = stage_list(cfg, "mlp_ratio", c.mlp_ratio);
  c.attention_drop_rate = stage_list(cfg, "attention_drop_rate", c.attention_drop_rate);
  c.drop_rate = stage_list(cfg, "drop_rate", c.drop_rate);
  c.drop_path_rate = stage_list(cfg, "drop_path_rate", c.drop_path_rate);
  c.qkv_bias = stage_list(cfg, "qkv_bias", c.qkv_bias);
  c.cls_token = stage_list(cfg, "cls_token", c.cls_token);
  c.qkv_projection_method = stage_list(cfg, "qkv_projection_method", c.qkv_projection_method);
  c.kernel_qkv = stage_list(cfg, "kernel_qkv", c.kernel_qkv);
  c.padding_kv = stage_list(cfg, "padding_kv", c.padding_kv);
  c.stride_kv = stage_list(cfg, "stride_kv", c.stride_kv);
  c.padding_q = stage_list(cfg, "padding_q", c.padding_q);
  c.stride_q = stage_list(cfg, "stride_q", c.stride_q);
  c.initializer_range = cfg_get<double>(cfg, "initializer_range", c.initializer_range);
  c.layer_norm_eps = cfg_get<double>(cfg, "layer_norm_eps", c.layer_norm_eps);

  const size_t n = c.depth.size();
  if (n == 0) throw ModelError("Cvt config: depth is empty (no stages)");
  auto need = [&](size_t have, const char* key) {
    if (have < n)
      throw ModelError(std::string("Cvt config: '") + key + "' has " + std::to_string(have) + " entries for " +
                  std::to_string(n) + " stages");
  };
  need(c.patch_sizes.size(), "patch_sizes");
  need(c.patch_stride.size(), "patch_stride");
  need(c.patch_padding.size(), "patch_padding");
  need(c.embed_dim.size(), "embed_dim");
  need(c.num_heads.size(), "num_heads");
  need(c.mlp_ratio.size(), "mlp_ratio");
  need(c.qkv_bias.size(), "qkv_bias");
  need(c.cls_token.size(), "cls_token");
  need(c.qkv_projection_method.size(), "qkv_projection_method");
  need(c.kernel_qkv.size(), "kernel_qkv");
  need(c.padding_kv.size(), "padding_kv");
  need(c.stride_kv.size(), "stride_kv");
  need(c.padding_q.size(), "padding_q");
  need(c.stride_q.size(), "stride_q");
  for (size_t s = 0; s < n; ++s) {
    if (c.embed_dim[s] <= 0 || c.num_heads[s] <= 0 || c.embed_dim[s] % c.num_heads[s] != 0)
      throw ModelError("Cvt config: stage " + std::to_string(s) + " embed_dim " + std::to_string(c.embed_dim[s]) +
                  " is not a multiple of num_heads " + std::to_string(c.num_heads[s]));
    const std::string& m = c.qkv_projection_method[s];
    if (m != "dw_bn" && m != "avg" && m != "linear")
      throw ModelError("Cvt config: stage " + std::to_string(s) + " qkv_projection_method '" + m +
                  "' is not one of dw_bn, avg, linear");
    if (c.depth[s] < 0 || c.patch_sizes[s] <= 0 || c.patch_stride[s] <= 0 || c.kernel_qkv[s] <= 0 ||
        c.stride_kv[s] <= 0 || c.stride_q[s] <= 0)
      throw ModelError("Cvt config: stage " + std::to_string(s) + " has a non-positive size, stride or depth");
  }
  return c;
}

namespace {

// nn.LayerNorm(embed_dim) everywhere in CvT: PyTorch's default eps, not config.layer_norm_eps.
constexpr float kLayerNormEps = 1e-5f;
// nn.BatchNorm2d's default eps.
constexpr float kBatchNormEps = 1e-5f;

struct LayerNorm {
  Tensor weight, bias;
  LayerNorm(int64_t dim, const Weights& w) : weight(w.get("weight", {dim})), bias(w.get("bias", {dim})) {}
  // out_dtype: what the layers that read the result take without a conversion (bfloat16 for a
  // bfloat16 projection), else float32.
  Tensor forward(const Tensor& x, DType out_dtype = DType::F32) const {
    return layer_norm(x, weight, bias, kLayerNormEps, out_dtype);
  }
};

// ---- CvtConvEmbeddings: conv (patch_size, stride, padding), then LayerNorm over channels.
struct CvtConvEmbeddings {
  Conv2d projection;
  LayerNorm normalization;

  CvtConvEmbeddings(int64_t patch_size, int64_t num_channels, int64_t embed_dim, int64_t stride, int64_t padding,
                    const Weights& w)
      : normalization(embed_dim, w.pp("normalization")) {
    Conv2dOptions opt;
    opt.stride_h = opt.stride_w = static_cast<int>(stride);
    opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = static_cast<int>(padding);
    projection = Conv2d(w.pp("projection").get("weight", {embed_dim, num_channels, patch_size, patch_size}),
                        w.pp("projection").get("bias", {embed_dim}), opt);
  }
  // [B, H, W, in] -> [B, h, w, embed_dim]
  Tensor forward(const Tensor& x) const { return normalization.forward(projection.forward(x)); }
};

// ---- CvtEmbeddings (its dropout is the identity at inference)
struct CvtEmbeddings {
  CvtConvEmbeddings convolution_embeddings;
  CvtEmbeddings(int64_t patch_size, int64_t num_channels, int64_t embed_dim, int64_t stride, int64_t padding,
                const Weights& w)
      : convolution_embeddings(patch_size, num_channels, embed_dim, stride, padding, w.pp("convolution_embeddings")) {}
  Tensor forward(const Tensor& x) const { return convolution_embeddings.forward(x); }
};

// ---- CvtSelfAttentionConvProjection: depthwise conv (no bias) + BatchNorm, the BatchNorm folded
// into the conv's weight and bias at load.
struct CvtSelfAttentionConvProjection {
  Conv2d convolution;

  CvtSelfAttentionConvProjection(int64_t embed_dim, int64_t kernel_size, int64_t padding, int64_t stride,
                                 const Weights& w) {
    const int64_t C = embed_dim, k = kernel_size;
    Tensor original = w.pp("convolution").get("weight", {C, 1, k, k});
    Tensor weight = original.clone();
    release_file_pages(original);  // the folded copy replaces it
    Weights bn = w.pp("normalization");
    Tensor gamma = bn.get("weight", {C}), beta = bn.get("bias", {C});
    Tensor mean = bn.get("running_mean", {C}), var = bn.get("running_var", {C});
    bn.ignore("num_batches_tracked");
    Tensor bias = Tensor::empty({C});
    for (int64_t c = 0; c < C; ++c) {
      const double s = gamma.f32()[c] / std::sqrt(static_cast<double>(var.f32()[c]) + kBatchNormEps);
      for (int64_t i = 0; i < k * k; ++i) weight.f32()[c * k * k + i] = static_cast<float>(weight.f32()[c * k * k + i] * s);
      bias.f32()[c] = static_cast<float>(beta.f32()[c] - mean.f32()[c] * s);
    }
    Conv2dOptions opt;
    opt.stride_h = opt.stride_w = static_cast<int>(stride);
    opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = static_cast<int>(padding);
    opt.groups = static_cast<int>(C);
    convolution = Conv2d(weight, bias, opt);
  }
  // Read only by the linear projection after it: in the layer's compute dtype (forward_to_layer).
  Tensor forward(const Tensor& x) const { return convolution.forward_to_layer(x); }
};

// ---- CvtSelfAttentionProjection: the conv projection ("dw_bn"), then the linear projection
// (b c h w -> b (h w) c), which for NHWC maps is a reshape. Any other method ("avg" for key and
// value; the query of "avg" is "linear") has only the linear projection here. Note: transformers
// builds no conv for those and then fails in forward (it calls the missing conv); this keeps the
// module's evident meaning, a projection without the conv.
struct CvtSelfAttentionProjection {
  std::optional<CvtSelfAttentionConvProjection> convolution_projection;

  CvtSelfAttentionProjection(int64_t embed_dim, int64_t kernel_size, int64_t padding, int64_t stride,
                             const std::string& projection_method, const Weights& w) {
    if (projection_method == "dw_bn")
      convolution_projection.emplace(embed_dim, kernel_size, padding, stride, w.pp("convolution_projection"));
  }
  // What forward() reads without a conversion: the conv's input dtype, or `linear`'s where there is
  // no conv.
  DType input_dtype(const Linear& linear) const {
    return convolution_projection ? convolution_projection->convolution.input_dtype() : linear.input_dtype();
  }
  // [B, h, w, C] -> [B, h'*w', C]
  Tensor forward(const Tensor& x) const {
    Tensor y = convolution_projection ? convolution_projection->forward(x) : x;
    return y.reshape({y.size(0), y.size(1) * y.size(2), y.size(3)});
  }
};

// ---- CvtSelfAttention
struct CvtSelfAttention {
  int64_t num_heads, embed_dim;
  bool with_cls_token;
  float scale;
  CvtSelfAttentionProjection convolution_projection_query, convolution_projection_key, convolution_projection_value;
  Linear projection_query, projection_key, projection_value;

  static Linear linear(int64_t dim, bool bias, const Weights& w) {
    return Linear(w.get("weight", {dim, dim}), bias ? w.get("bias", {dim}) : Tensor());
  }

  CvtSelfAttention(const CvtConfig& c, int64_t s, const Weights& w)
      : num_heads(c.num_heads[s]), embed_dim(c.embed_dim[s]), with_cls_token(c.cls_token[s]),
        // The reference scales by embed_dim ** -0.5 (the full width, not the head size).
        scale(static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.embed_dim[s])))),
        convolution_projection_query(embed_dim, c.kernel_qkv[s], c.padding_q[s], c.stride_q[s],
                                     c.qkv_projection_method[s] == "avg" ? "linear" : c.qkv_projection_method[s],
                                     w.pp("convolution_projection_query")),
        convolution_projection_key(embed_dim, c.kernel_qkv[s], c.padding_kv[s], c.stride_kv[s],
                                   c.qkv_projection_method[s], w.pp("convolution_projection_key")),
        convolution_projection_value(embed_dim, c.kernel_qkv[s], c.padding_kv[s], c.stride_kv[s],
                                     c.qkv_projection_method[s], w.pp("convolution_projection_value")),
        projection_query(linear(embed_dim, c.qkv_bias[s], w.pp("projection_query"))),
        projection_key(linear(embed_dim, c.qkv_bias[s], w.pp("projection_key"))),
        projection_value(linear(embed_dim, c.qkv_bias[s], w.pp("projection_value"))) {}

  // What forward() reads without a conversion: bfloat16 where all three projections compute in it.
  DType input_dtype() const {
    const DType q = convolution_projection_query.input_dtype(projection_query);
    const bool same = convolution_projection_key.input_dtype(projection_key) == q &&
                      convolution_projection_value.input_dtype(projection_value) == q;
    return same ? q : DType::F32;
  }

  // hidden_state [B, (1 +) h*w, C] -> context [B, (1 +) h'*w', C] in `out_dtype` (what the output
  // projection reads without a conversion)
  Tensor forward(const Tensor& hidden_state, int64_t height, int64_t width, DType out_dtype) const {
    const int64_t B = hidden_state.size(0), C = hidden_state.size(2), hw = height * width;
    Tensor cls_token, x = hidden_state;
    if (with_cls_token) {
      cls_token = narrow(hidden_state, 1, 0, 1);
      x = narrow(hidden_state, 1, 1, hw);
    }
    Tensor map = x.reshape({B, height, width, C});
    Tensor key = convolution_projection_key.forward(map);
    Tensor query = convolution_projection_query.forward(map);
    Tensor value = convolution_projection_value.forward(map);
    if (with_cls_token) {
      // The projections' maps come in their compute dtype (on a GPU a 16-bit layer's output is 16-bit
      // whatever it read); the token joins them in it.
      auto with_cls = [&](const Tensor& t) {
        return cat({cls_token.dtype() == t.dtype() ? cls_token : cls_token.to(t.dtype()), t}, 1);
      };
      query = with_cls(query);
      key = with_cls(key);
      value = with_cls(value);
    }
    AttentionOptions opt;
    opt.scale = scale;
    opt.out_dtype = out_dtype;
    // Q, K and V in the projections' compute dtype, which attention reads as it is.
    return multi_head_attention(projection_query.forward_to_attention(query), projection_key.forward_to_attention(key),
                                projection_value.forward_to_attention(value), num_heads, opt);
  }
};

// ---- CvtSelfOutput: dense; the residual of the layer is fused into it (forward's second argument).
struct CvtSelfOutput {
  Linear dense;
  CvtSelfOutput(int64_t dim, const Weights& w) : dense(w.pp("dense").get("weight", {dim, dim}), w.pp("dense").get("bias", {dim})) {}
  Tensor forward(const Tensor& x, Tensor residual) const { return dense.forward(x, std::move(residual)); }
};

struct CvtAttention {
  CvtSelfAttention attention;
  CvtSelfOutput output;
  CvtAttention(const CvtConfig& c, int64_t s, const Weights& w)
      : attention(c, s, w.pp("attention")), output(c.embed_dim[s], w.pp("output")) {}
  // residual + attention(x), in the residual's storage when it is handed over
  Tensor forward(const Tensor& x, int64_t height, int64_t width, Tensor residual) const {
    return output.forward(attention.forward(x, height, width, output.dense.input_dtype()), std::move(residual));
  }
};

struct CvtIntermediate {
  Linear dense;  // nn.GELU(): the exact (erf) form
  CvtIntermediate(int64_t dim, int64_t hidden, const Weights& w)
      : dense(w.pp("dense").get("weight", {hidden, dim}), w.pp("dense").get("bias", {hidden}), Act::Gelu) {}
  Tensor forward(const Tensor& x) const { return dense.forward_to_layer(x); }  // read by CvtOutput only
};

struct CvtOutput {
  Linear dense;
  CvtOutput(int64_t dim, int64_t hidden, const Weights& w)
      : dense(w.pp("dense").get("weight", {dim, hidden}), w.pp("dense").get("bias", {dim})) {}
  Tensor forward(const Tensor& x, Tensor input_tensor) const { return dense.forward(x, std::move(input_tensor)); }
};

// ---- CvtLayer: layernorm -> attention -> residual, layernorm -> MLP -> residual (drop path is the
// identity at inference).
struct CvtLayer {
  CvtAttention attention;
  CvtIntermediate intermediate;
  CvtOutput output;
  LayerNorm layernorm_before, layernorm_after;

  static int64_t mlp_hidden(const CvtConfig& c, int64_t s) {
    return static_cast<int64_t>(static_cast<double>(c.embed_dim[s]) * c.mlp_ratio[s]);  // int(embed_dim * mlp_ratio)
  }

  CvtLayer(const CvtConfig& c, int64_t s, const Weights& w)
      : attention(c, s, w.pp("attention")),
        intermediate(c.embed_dim[s], mlp_hidden(c, s), w.pp("intermediate")),
        output(c.embed_dim[s], mlp_hidden(c, s), w.pp("output")),
        layernorm_before(c.embed_dim[s], w.pp("layernorm_before")),
        layernorm_after(c.embed_dim[s], w.pp("layernorm_after")) {}

  // The residual sums accumulate in the residual stream's storage where the caller hands it over.
  Tensor forward(Tensor hidden_state, int64_t height, int64_t width) const {
    const Tensor normed = layernorm_before.forward(hidden_state, attention.attention.input_dtype());
    Tensor h = attention.forward(normed, height, width, std::move(hidden_state));
    const Tensor hidden = intermediate.forward(layernorm_after.forward(h, intermediate.dense.input_dtype()));
    return output.forward(hidden, std::move(h));
  }
};

// ---- CvtStage: conv embedding, optional [CLS] token, layers.
struct CvtStage {
  bool with_cls_token;
  Tensor cls_token;  // [1, 1, C]
  CvtEmbeddings embedding;
  std::vector<CvtLayer> layers;

  CvtStage(const CvtConfig& c, int64_t s, const Weights& w)
      : with_cls_token(c.cls_token[s]),
        embedding(c.patch_sizes[s], s == 0 ? c.num_channels : c.embed_dim[s - 1], c.embed_dim[s], c.patch_stride[s],
                  c.patch_padding[s], w.pp("embedding")) {
    if (with_cls_token) {
      // The reference sizes every stage's token by the last stage's width (embed_dim[-1]).
      if (c.embed_dim.back() != c.embed_dim[s])
        throw ModelError("Cvt config: a [CLS] token in stage " + std::to_string(s) + " needs embed_dim " +
                    std::to_string(c.embed_dim.back()) + " (the reference sizes it by embed_dim[-1]), got " +
                    std::to_string(c.embed_dim[s]));
      cls_token = w.get("cls_token", {1, 1, c.embed_dim.back()});
    }
    for (int64_t i = 0; i < c.depth[s]; ++i) layers.emplace_back(c, s, w.pp("layers").pp(i));
  }

  // x [B, H, W, in] -> ([B, h, w, C], cls token [B, 1, C] or undefined)
  std::pair<Tensor, Tensor> forward(const Tensor& x) const {
    Tensor map = embedding.forward(x);
    const int64_t B = map.size(0), height = map.size(1), width = map.size(2), C = map.size(3);
    Tensor hidden = map.reshape({B, height * width, C});
    if (with_cls_token) {
      std::vector<Tensor> tokens(static_cast<size_t>(B), cls_token);  // the token, once per image
      hidden = cat({cat(tokens, 0), hidden}, 1);
    }
    for (const auto& layer : layers) hidden = layer.forward(std::move(hidden), height, width);
    Tensor cls_out;
    if (with_cls_token) {
      cls_out = narrow(hidden, 1, 0, 1);
      hidden = narrow(hidden, 1, 1, height * width);
    }
    return {hidden.reshape({B, height, width, C}), cls_out};
  }
};

// ---- CvtEncoder / CvtModel
struct CvtModelOutput {
  Tensor last_hidden_state;  // NHWC here; NCHW in the returned outputs
  Tensor cls_token_value;
  std::vector<Tensor> hidden_states;  // NCHW
};

struct CvtEncoder {
  std::vector<CvtStage> stages;
  CvtEncoder(const CvtConfig& c, const Weights& w) {
    for (int64_t s = 0; s < c.num_stages(); ++s) stages.emplace_back(c, s, w.pp("stages").pp(s));
  }
  CvtModelOutput forward(const Tensor& pixel_values_nhwc, bool output_hidden_states) const {
    CvtModelOutput r;
    Tensor hidden = pixel_values_nhwc;
    for (const auto& stage : stages) {
      std::tie(hidden, r.cls_token_value) = stage.forward(hidden);
      if (output_hidden_states) r.hidden_states.push_back(nhwc_to_nchw(hidden));
    }
    r.last_hidden_state = hidden;
    return r;
  }
};

class CvtModel : public Model {
 public:
  CvtModel(const CvtConfig& c, const Weights& w) : num_channels_(c.num_channels), encoder_(c, w.pp("encoder")) {}

  CvtModelOutput run(const ModelInputs& in) const {
    const Tensor& p = in.pixel_values;
    if (!p.defined()) throw Error("You have to specify pixel_values");
    if (p.dim() != 4 || p.size(1) != num_channels_)
      throw Error("pixel_values must be [batch, " + std::to_string(num_channels_) + ", height, width], got " +
                  shape_str(p.shape()));
    return encoder_.forward(nchw_to_nhwc(p.dtype() == DType::F32 ? p : p.to(DType::F32)), in.output_hidden_states);
  }

  ModelOutput forward(const ModelInputs& in) const override {
    CvtModelOutput o = run(in);
    ModelOutput out;
    out.set("last_hidden_state", nhwc_to_nchw(o.last_hidden_state));
    if (o.cls_token_value.defined()) out.set("cls_token_value", o.cls_token_value);
    out.set_list("hidden_states", o.hidden_states);
    return out;
  }

 private:
  int64_t num_channels_;
  CvtEncoder encoder_;
};

// ---- CvtForImageClassification: LayerNorm on the final [CLS] token (or on every token, then their
// mean), then the classifier.
class CvtForImageClassification : public Model {
 public:
  CvtForImageClassification(const CvtConfig& c, const json& cfg, const Weights& w, const Weights& base)
      : cvt_(c, base), use_cls_token_(c.cls_token.back()), layernorm_(c.embed_dim.back(), w.pp("layernorm")),
        config_(cfg),
        classifier_(c.embed_dim.back(), config_num_labels(cfg), w.pp("classifier")) {}

  ModelOutput forward(const ModelInputs& in) const override {
    CvtModelOutput o = cvt_.run(in);
    Tensor seq;
    if (use_cls_token_) {
      seq = layernorm_.forward(o.cls_token_value);  // [B, 1, C]
    } else {
      const Tensor& m = o.last_hidden_state;
      seq = layernorm_.forward(m.reshape({m.size(0), m.size(1) * m.size(2), m.size(3)}));
    }
    // sequence_output.mean(dim=1)
    const int64_t B = seq.size(0), T = seq.size(1), C = seq.size(2);
    Tensor mean = global_avg_pool_nhwc(seq.reshape({B, 1, T, C}));  // [B, C]
    Tensor logits = classifier_.forward(mean);
    ModelOutput out;
    if (in.labels.defined()) out.set("loss", classification_loss(logits, in.labels, config_));
    out.set("logits", logits);
    out.set_list("hidden_states", o.hidden_states);
    return out;
  }

 private:
  CvtModel cvt_;
  bool use_cls_token_;
  LayerNorm layernorm_;
  json config_;  // problem_type, for the loss
  ClassifierHead classifier_;
};

std::unique_ptr<Model> build_cvt(const json& cfg, const std::string& arch, const Weights& w) {
  CvtConfig c = CvtConfig::from_json(cfg);
  // Base-model checkpoints have no "cvt." prefix, those of the heads do; either loads into either.
  const std::string probe = "encoder.stages.0.embedding.convolution_embeddings.projection.weight";
  const bool prefixed = w.has("cvt." + probe);
  if (arch == "CvtModel") return std::make_unique<CvtModel>(c, prefixed ? w.pp("cvt") : w);
  if (arch == "CvtForImageClassification") {
    Weights base = prefixed || !w.has(probe) ? w.pp("cvt") : w;
    return std::make_unique<CvtForImageClassification>(c, cfg, w, base);
  }
  throw ModelError("Cvt has no architecture '" + arch + "'");
}

}  // namespace

void register_cvt_models() { register_model({"cvt", {"CvtModel", "CvtForImageClassification"}, build_cvt}); }

}  // namespace vf
