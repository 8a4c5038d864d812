#include "models/swin.h"

#include <cmath>

#include "core/attention.h"
#include "core/errors.h"
#include "models/common.h"

namespace vf {

// ---- config -------------------------------------------------------------------------------------

std::vector<std::string> swin_stage_names(const SwinConfig& cfg) {
  std::vector<std::string> names = {"stem"};
  for (size_t i = 1; i <= cfg.depths.size(); ++i) names.push_back("stage" + std::to_string(i));
  return names;
}

SwinConfig read_swin_config(const json& bc) {
  SwinConfig c;
  c.image_size = cfg_get<int64_t>(bc, "image_size", c.image_size);
  c.patch_size = cfg_get<int64_t>(bc, "patch_size", c.patch_size);
  c.num_channels = cfg_get<int64_t>(bc, "num_channels", c.num_channels);
  c.embed_dim = cfg_get<int64_t>(bc, "embed_dim", c.embed_dim);
  c.depths = cfg_get<std::vector<int64_t>>(bc, "depths", c.depths);
  c.num_heads = cfg_get<std::vector<int64_t>>(bc, "num_heads", c.num_heads);
  c.window_size = cfg_get<int64_t>(bc, "window_size", c.window_size);
  c.mlp_ratio = cfg_get<double>(bc, "mlp_ratio", c.mlp_ratio);
  c.qkv_bias = cfg_get<bool>(bc, "qkv_bias", c.qkv_bias);
  c.hidden_act = cfg_get<std::string>(bc, "hidden_act", c.hidden_act);
  c.use_absolute_embeddings = cfg_get<bool>(bc, "use_absolute_embeddings", c.use_absolute_embeddings);
  c.layer_norm_eps = cfg_get<float>(bc, "layer_norm_eps", c.layer_norm_eps);

  const std::string where = "config.json backbone_config (swin): ";
  if (c.patch_size <= 0 || c.num_channels <= 0 || c.embed_dim <= 0 || c.depths.empty())
    throw ModelError(where + "patch_size, num_channels, embed_dim and depths must be positive / non-empty");
  if (c.depths.size() != c.num_heads.size())
    throw ModelError(where + "depths and num_heads differ in length");
  if (c.depths.size() > 8 || c.embed_dim > (int64_t{1} << 20) || c.patch_size > 4096)
    throw ModelError(where + "more than 8 stages, embed_dim past 2^20 or patch_size past 4096");
  // Window attention holds heads x window^4 scores per window; every Swin checkpoint uses 7 or 12.
  if (c.window_size <= 0 || c.window_size > 32) throw ModelError(where + "window_size must be in 1..32");
  if (!(c.mlp_ratio > 0.0) || c.mlp_ratio > 64.0) throw ModelError(where + "mlp_ratio must be in (0, 64]");
  for (size_t i = 0; i < c.depths.size(); ++i) {
    const int64_t dim = c.embed_dim << i;
    if (c.depths[i] < 0 || c.num_heads[i] <= 0 || dim % c.num_heads[i] != 0)
      throw ModelError(where + "stage " + std::to_string(i) + ": " + std::to_string(c.num_heads[i]) +
                       " heads do not divide the hidden size " + std::to_string(dim));
  }
  // SwinEmbeddings adds a [1, num_patches + 1, C] table to the [B, num_patches, C] patch tokens,
  // which fails in the reference for every input; nothing to reproduce.
  if (c.use_absolute_embeddings)
    throw ModelError(where + "use_absolute_embeddings is not supported (the reference's table has num_patches + 1 "
                             "rows for num_patches tokens and fails)");
  act_from_name(c.hidden_act);  // refuses unknown names now rather than at the first forward
  for (int i : backbone_out_indices(bc, swin_stage_names(c))) c.out_indices.push_back(i);
  return c;
}

// ---- window helpers -----------------------------------------------------------------------------

Tensor swin_relative_position_index(int64_t window) {
  const int64_t N = window * window;
  Tensor idx = Tensor::empty({N, N}, DType::I64);
  int64_t* p = idx.data<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j)
      p[i * N + j] = (i / window - j / window + window - 1) * (2 * window - 1) + (i % window - j % window + window - 1);
  return idx;
}

Tensor swin_shifted_window_mask(int64_t H, int64_t W, int64_t window, int64_t shift) {
  if (shift <= 0) return Tensor();
  if (H % window != 0 || W % window != 0 || shift >= window)
    throw Error("swin_shifted_window_mask: " + std::to_string(H) + "x" + std::to_string(W) +
                " is not a grid of windows of " + std::to_string(window));
  // img_mask's region label of a row / column: the slices (0, -window), (-window, -shift), (-shift, None).
  auto region = [&](int64_t x, int64_t n) { return x < n - window ? 0 : (x < n - shift ? 1 : 2); };
  const int64_t nh = H / window, nw = W / window, N = window * window;
  Tensor mask = Tensor::empty({nh * nw, N, N});
  float* m = mask.f32();
  std::vector<int> label(N);
  for (int64_t a = 0; a < nh; ++a)
    for (int64_t c = 0; c < nw; ++c) {
      for (int64_t t = 0; t < N; ++t) label[t] = 3 * region(a * window + t / window, H) + region(c * window + t % window, W);
      float* mw = m + (a * nw + c) * N * N;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) mw[i * N + j] = label[i] == label[j] ? 0.0f : -100.0f;
    }
  return mask;
}

// ---- modules ------------------------------------------------------------------------------------

namespace {

// nn.LayerNorm's default eps: SwinEmbeddings.norm, SwinPatchMerging.norm and the backbone's
// hidden_states_norms are built without config.layer_norm_eps.
constexpr float kTorchLayerNormEps = 1e-5f;

struct LayerNorm {
  Tensor weight, bias;
  float eps = kTorchLayerNormEps;
  LayerNorm() = default;
  LayerNorm(const Weights& w, int64_t dim, float e) : weight(w.get("weight", {dim})), bias(w.get("bias", {dim})), eps(e) {}
  Tensor forward(const Tensor& x) const { return layer_norm(x, weight, bias, eps); }
};

Linear load_linear(const Weights& w, int64_t out, int64_t in, bool with_bias = true, Act act = Act::None) {
  return Linear(w.get("weight", {out, in}), with_bias ? w.get("bias", {out}) : Tensor(), act);
}

// Pads the bottom and right of a channels-last map up to multiples of `mh` x `mw` with zeros.
Tensor pad_to_multiple(const Tensor& x, int64_t mh, int64_t mw) {
  const int pb = static_cast<int>((mh - x.size(1) % mh) % mh), pr = static_cast<int>((mw - x.size(2) % mw) % mw);
  return pb || pr ? pad_nhwc(x, 0, 0, pb, pr) : x;
}

struct SwinPatchEmbeddings {
  int64_t patch_size = 0;
  Conv2d projection;

  SwinPatchEmbeddings(const SwinConfig& cfg, const Weights& w) : patch_size(cfg.patch_size) {
    Conv2dOptions o;
    o.stride_h = o.stride_w = static_cast<int>(cfg.patch_size);
    Weights pw = w.pp("projection");
    projection = Conv2d(pw.get("weight", {cfg.embed_dim, cfg.num_channels, cfg.patch_size, cfg.patch_size}),
                        pw.get("bias", {cfg.embed_dim}), o);
  }
  // pixel_values [B, C, H, W] -> [B, ceil(H / patch), ceil(W / patch), embed_dim] (maybe_pad: zeros
  // on the bottom and right up to a multiple of the patch).
  Tensor forward(const Tensor& pixel_values) const {
    return projection.forward(pad_to_multiple(nchw_to_nhwc(pixel_values), patch_size, patch_size));
  }
};

struct SwinEmbeddings {
  SwinPatchEmbeddings patch_embeddings;
  LayerNorm norm;

  SwinEmbeddings(const SwinConfig& cfg, const Weights& w)
      : patch_embeddings(cfg, w.pp("patch_embeddings")), norm(w.pp("norm"), cfg.embed_dim, kTorchLayerNormEps) {}
  Tensor forward(const Tensor& pixel_values) const { return norm.forward(patch_embeddings.forward(pixel_values)); }
};

struct SwinSelfAttention {
  int64_t num_heads = 0;
  Linear qkv;                       // query | key | value in one product
  Tensor relative_position_bias;    // [heads, window^2, window^2], gathered from the table at load

  SwinSelfAttention(const SwinConfig& cfg, const Weights& w, int64_t dim, int64_t heads) : num_heads(heads) {
    const int64_t ws = cfg.window_size, N = ws * ws;
    std::vector<Tensor> weights, biases;
    for (const char* name : {"query", "key", "value"}) {
      weights.push_back(w.pp(name).get("weight", {dim, dim}));
      if (cfg.qkv_bias) biases.push_back(w.pp(name).get("bias", {dim}));
    }
    qkv = Linear(cat(weights, 0), cfg.qkv_bias ? cat(biases, 0) : Tensor());
    Tensor table = w.get("relative_position_bias_table", {(2 * ws - 1) * (2 * ws - 1), heads});
    w.ignore("relative_position_index");  // a buffer some checkpoints carry; rebuilt here
    Tensor index = swin_relative_position_index(ws);
    relative_position_bias = Tensor::empty({heads, N, N});
    const float* t = table.f32();
    const int64_t* idx = index.data<int64_t>();
    float* b = relative_position_bias.f32();
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t k = 0; k < N * N; ++k) b[h * N * N + k] = t[idx[k] * heads + h];
  }
};

struct SwinAttention {
  SwinSelfAttention self;
  Linear output_dense;  // SwinSelfOutput.dense

  SwinAttention(const SwinConfig& cfg, const Weights& w, int64_t dim, int64_t heads)
      : self(cfg, w.pp("self"), dim, heads), output_dense(load_linear(w.pp("output").pp("dense"), dim, dim)) {}

  // windows [B * nW, window^2, C] -> [B * nW, window^2, C]. `mask` as swin_shifted_window_mask or
  // undefined.
  Tensor forward(const Tensor& windows, const Tensor& mask) const {
    const int64_t head_dim = windows.size(2) / self.num_heads;
    AttentionOptions opt;
    opt.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    opt.bias = self.relative_position_bias;
    opt.batch_bias = mask;
    return output_dense.forward(multi_head_attention_packed(self.qkv.forward(windows), self.num_heads, opt));
  }
};

struct SwinIntermediate {
  Linear dense;  // activation fused
  SwinIntermediate(const SwinConfig& cfg, const Weights& w, int64_t dim)
      : dense(load_linear(w.pp("dense"), static_cast<int64_t>(cfg.mlp_ratio * dim), dim, true,
                          act_from_name(cfg.hidden_act))) {}
};

struct SwinOutput {
  Linear dense;
  SwinOutput(const SwinConfig& cfg, const Weights& w, int64_t dim)
      : dense(load_linear(w.pp("dense"), dim, static_cast<int64_t>(cfg.mlp_ratio * dim))) {}
};

struct SwinLayer {
  int64_t window = 0, shift = 0;
  LayerNorm layernorm_before;
  SwinAttention attention;
  LayerNorm layernorm_after;
  SwinIntermediate intermediate;
  SwinOutput output;

  SwinLayer(const SwinConfig& cfg, const Weights& w, int64_t dim, int64_t heads, int64_t shift_size)
      : window(cfg.window_size),
        shift(shift_size),
        layernorm_before(w.pp("layernorm_before"), dim, cfg.layer_norm_eps),
        attention(cfg, w.pp("attention"), dim, heads),
        layernorm_after(w.pp("layernorm_after"), dim, cfg.layer_norm_eps),
        intermediate(cfg, w.pp("intermediate"), dim),
        output(cfg, w.pp("output"), dim) {}

  // x [B, H, W, C] -> same. `mask` is the shifted-window mask of the padded map when shift > 0.
  // Drop path is the identity in eval.
  Tensor forward(const Tensor& x, const Tensor& mask) const {
    const int64_t H = x.size(1), W = x.size(2);
    // Padding comes after the norm: the padded tokens are zeros, as in the reference.
    Tensor h = pad_to_multiple(layernorm_before.forward(x), window, window);
    const int64_t Hp = h.size(1), Wp = h.size(2);
    Tensor attn = attention.forward(window_partition(h, window, shift), shift > 0 ? mask : Tensor());
    Tensor hidden = window_reverse(attn, window, Hp, Wp, shift, H, W);
    add_inplace(hidden, x);
    Tensor y = intermediate.dense.forward(layernorm_after.forward(hidden));
    return output.dense.forward(y, &hidden);
  }
};

// x [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]: the 2x2 neighbourhoods concatenated in the
// reference's order (0::2,0::2), (1::2,0::2), (0::2,1::2), (1::2,1::2), i.e. column offset major.
struct SwinPatchMerging {
  LayerNorm norm;
  Linear reduction;

  SwinPatchMerging(const Weights& w, int64_t dim)
      : norm(w.pp("norm"), 4 * dim, kTorchLayerNormEps), reduction(load_linear(w.pp("reduction"), 2 * dim, 4 * dim, false)) {}

  Tensor forward(const Tensor& x) const {
    Tensor p = pad_to_multiple(x, 2, 2);  // maybe_pad: odd sizes get a zero row / column
    const int64_t B = p.size(0), H2 = p.size(1) / 2, W2 = p.size(2) / 2, C = p.size(3);
    Tensor merged = permute(p.reshape({B, H2, 2, W2, 2, C}), {0, 1, 3, 4, 2, 5}).reshape({B, H2, W2, 4 * C});
    return reduction.forward(norm.forward(merged));
  }
};

struct SwinStage {
  std::vector<SwinLayer> blocks;
  std::unique_ptr<SwinPatchMerging> downsample;

  SwinStage(const SwinConfig& cfg, const Weights& w, int64_t dim, int64_t depth, int64_t heads, bool with_downsample) {
    Weights bw = w.pp("blocks");
    for (int64_t i = 0; i < depth; ++i)
      blocks.emplace_back(cfg, bw.pp(i), dim, heads, i % 2 == 0 ? 0 : cfg.window_size / 2);
    if (with_downsample) downsample = std::make_unique<SwinPatchMerging>(w.pp("downsample"), dim);
  }

  // The stage's output before its patch merging (what SwinBackbone returns).
  Tensor forward_blocks(const Tensor& x) const {
    const int64_t ws = blocks.empty() ? 1 : blocks[0].window;
    const int64_t Hp = (x.size(1) + ws - 1) / ws * ws, Wp = (x.size(2) + ws - 1) / ws * ws;
    // Every shifted block of the stage shares one map size and shift, hence one mask.
    Tensor mask;
    for (auto& blk : blocks)
      if (blk.shift > 0 && !mask.defined()) mask = swin_shifted_window_mask(Hp, Wp, ws, blk.shift);
    Tensor h = x;
    for (auto& blk : blocks) h = blk.forward(h, mask);
    return h;
  }
};

}  // namespace

struct SwinBackbone::Impl {
  std::unique_ptr<SwinEmbeddings> embeddings;
  std::vector<SwinStage> layers;  // SwinEncoder.layers
  std::vector<int> out_indices;
  std::vector<LayerNorm> hidden_states_norms;  // one per out index
};

SwinBackbone::SwinBackbone(const SwinConfig& cfg, const Weights& w) {
  auto impl = std::make_shared<Impl>();
  impl->embeddings = std::make_unique<SwinEmbeddings>(cfg, w.pp("embeddings"));
  const int64_t n = static_cast<int64_t>(cfg.depths.size());
  Weights lw = w.pp("encoder").pp("layers");
  for (int64_t i = 0; i < n; ++i)
    impl->layers.emplace_back(cfg, lw.pp(i), cfg.embed_dim << i, cfg.depths[i], cfg.num_heads[i], i < n - 1);
  // num_features: embed_dim for the stem, embed_dim * 2^(k-1) for stageK.
  const auto names = swin_stage_names(cfg);
  if (cfg.out_indices.empty()) throw ModelError("Swin backbone: no output stage selected");
  for (int idx : cfg.out_indices) {
    if (idx < 0 || idx > n) throw ModelError("Swin backbone: out index " + std::to_string(idx) + " is out of range");
    const int64_t ch = idx == 0 ? cfg.embed_dim : cfg.embed_dim << (idx - 1);
    channels_.push_back(ch);
    impl->out_indices.push_back(idx);
    impl->hidden_states_norms.emplace_back(w.pp("hidden_states_norms").pp(names[idx]), ch, kTorchLayerNormEps);
  }
  impl_ = std::move(impl);
}

std::vector<Tensor> SwinBackbone::forward(const Tensor& pixel_values) const {
  if (!impl_) throw Error("SwinBackbone: not built");
  if (pixel_values.dim() != 4) throw Error("pixel_values must be [B, C, H, W], got " + shape_str(pixel_values.shape()));
  const Impl& m = *impl_;
  const int last = m.out_indices.back();
  std::vector<Tensor> stages(last + 1);  // stages[0]: embeddings; stages[k]: encoder layer k-1 before merging
  Tensor x = m.embeddings->forward(pixel_values);
  stages[0] = x;
  for (int k = 1; k <= last; ++k) {
    const SwinStage& stage = m.layers[k - 1];
    stages[k] = stage.forward_blocks(x);
    if (k < last) x = stage.downsample->forward(stages[k]);
  }
  std::vector<Tensor> out;
  for (size_t i = 0; i < m.out_indices.size(); ++i) out.push_back(m.hidden_states_norms[i].forward(stages[m.out_indices[i]]));
  return out;
}

}  // namespace vf
