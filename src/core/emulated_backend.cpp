// The emulated device: host memory and the CPU kernels behind a device boundary. Each op looks at
// its inputs as CPU tensors (the same memory), runs the CPU op and hands the result back as a
// device tensor, so the models' code takes exactly the paths it takes on a GPU.
#include "core/backend.h"

#include <cstring>

#include "core/boxes.h"
#include "core/position.h"

namespace vf {

namespace {

Tensor host(const Tensor& t) { return t.defined() && !t.is_cpu() ? t.retagged(Device::cpu()) : t; }
Tensor dev(const Tensor& t) { return t.retagged(Device::emulated()); }

class EmulatedBackend final : public DeviceBackend {
 public:
  std::shared_ptr<void> allocate(size_t bytes) override {
    Tensor t = Tensor::empty({int64_t(bytes)}, DType::U8);
    void* p = t.raw();
    return std::shared_ptr<void>(p, [t](void*) mutable { t = Tensor(); });
  }
  void copy_to_device(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
  void copy_to_host(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
  void copy_on_device(void* dst, const void* src, size_t n) override { std::memcpy(dst, src, n); }
  void fill(Tensor& x, float value) override {
    Tensor h = host(x);
    h.fill(value);
  }
  Tensor convert(const Tensor& x, DType to) override { return dev(host(x).to(to)); }
  void synchronize() override {}

  std::shared_ptr<DeviceLayer> make_conv2d(const Tensor&, const Tensor&, const Conv2dOptions&) override {
    return nullptr;
  }
  std::shared_ptr<DeviceLayer> make_linear(const Tensor&, const Tensor&, Act) override { return nullptr; }

  void act_inplace(Tensor& x, Act a) override {
    Tensor h = host(x);
    vf::act_inplace(h, a);
  }
  Tensor matmul(const Tensor& a, const Tensor& b, bool trans_b, float alpha) override {
    return dev(vf::matmul(host(a), host(b), trans_b, alpha));
  }
  Tensor layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps) override {
    return dev(vf::layer_norm(host(x), host(w), host(b), eps));
  }
  Tensor group_norm_nhwc(const Tensor& x, int groups, const Tensor& w, const Tensor& b, float eps, Act a) override {
    return dev(vf::group_norm_nhwc(host(x), groups, host(w), host(b), eps, a));
  }
  Tensor channel_affine(const Tensor& x, const Tensor& scale, const Tensor& shift, Act a) override {
    return dev(vf::channel_affine(host(x), host(scale), host(shift), a));
  }
  Tensor grn_nhwc(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps) override {
    return dev(vf::grn_nhwc(host(x), host(gamma), host(beta), eps));
  }
  void softmax_lastdim_inplace(Tensor& x) override {
    Tensor h = host(x);
    vf::softmax_lastdim_inplace(h);
  }
  Tensor max_pool2d_nhwc(const Tensor& x, int k, int s, int pt, int pl, int pb, int pr, bool ceil_mode) override {
    return dev(vf::max_pool2d_nhwc(host(x), k, s, pt, pl, pb, pr, ceil_mode));
  }
  Tensor avg_pool2d_nhwc(const Tensor& x, int k, int s, int pad, bool count_include_pad) override {
    return dev(vf::avg_pool2d_nhwc(host(x), k, s, pad, count_include_pad));
  }
  Tensor global_avg_pool_nhwc(const Tensor& x) override { return dev(vf::global_avg_pool_nhwc(host(x))); }
  Tensor permute(const Tensor& x, const std::vector<int>& perm) override { return dev(vf::permute(host(x), perm)); }
  Tensor pad_nhwc(const Tensor& x, int top, int left, int bottom, int right, float value) override {
    return dev(vf::pad_nhwc(host(x), top, left, bottom, right, value));
  }
  Tensor window_partition(const Tensor& x, int64_t window, int64_t shift) override {
    return dev(vf::window_partition(host(x), window, shift));
  }
  Tensor window_reverse(const Tensor& w, int64_t window, int64_t H, int64_t W, int64_t shift, int64_t oh,
                        int64_t ow) override {
    return dev(vf::window_reverse(host(w), window, H, W, shift, oh, ow));
  }
  Tensor cat(const std::vector<Tensor>& xs, int64_t dim) override {
    std::vector<Tensor> h;
    for (auto& x : xs) h.push_back(host(x));
    return dev(vf::cat(h, dim));
  }
  Tensor narrow(const Tensor& x, int64_t dim, int64_t begin, int64_t length) override {
    return dev(vf::narrow(host(x), dim, begin, length));
  }
  Tensor gather_rows(const Tensor& x, const Tensor& idx) override {
    return dev(vf::gather_rows(host(x), host(idx)));
  }
  Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b) override {
    switch (op) {
      case BinaryOp::Add: return dev(vf::add(host(a), host(b)));
      case BinaryOp::Sub: return dev(vf::sub(host(a), host(b)));
      case BinaryOp::Mul: return dev(vf::mul(host(a), host(b)));
      case BinaryOp::Div: return dev(vf::div(host(a), host(b)));
    }
    return Tensor();
  }
  void add_inplace(Tensor& a, const Tensor& b) override {
    Tensor h = host(a);
    vf::add_inplace(h, host(b));
  }
  Tensor scale(const Tensor& x, float s) override { return dev(vf::scale(host(x), s)); }
  Tensor mul_lastdim(const Tensor& x, const Tensor& gamma) override {
    return dev(vf::mul_lastdim(host(x), host(gamma)));
  }
  Tensor interpolate(const Tensor& x, int64_t oh, int64_t ow, Interp mode) override {
    switch (mode) {
      case Interp::Nearest: return dev(vf::interpolate_nearest(host(x), oh, ow));
      case Interp::Bilinear: return dev(vf::interpolate_bilinear(host(x), oh, ow, false));
      case Interp::BilinearAlignCorners: return dev(vf::interpolate_bilinear(host(x), oh, ow, true));
      case Interp::Bicubic: return dev(vf::interpolate_bicubic(host(x), oh, ow));
    }
    return Tensor();
  }
  Tensor argmax_planes(const Tensor& x, const Tensor& plane_scale, DType out) override {
    return dev(vf::argmax_planes(host(x), host(plane_scale), out));
  }
  Tensor count_at_least(const Tensor& x, const Tensor& plane_scale, float threshold) override {
    return dev(vf::count_at_least(host(x), host(plane_scale), threshold));
  }
  Tensor bincount(const Tensor& idx, int64_t bins) override { return dev(vf::bincount(host(idx), bins)); }
  Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads,
                              const AttentionOptions& opt) override {
    AttentionOptions o = opt;
    o.head_mask = host(opt.head_mask);
    o.bias = host(opt.bias);
    o.batch_bias = host(opt.batch_bias);
    o.key_mask = host(opt.key_mask);
    Tensor y = dev(vf::multi_head_attention(host(q), host(k), host(v), heads, o));
    if (opt.probs && opt.probs->defined()) *opt.probs = dev(*opt.probs);
    return y;
  }
  Tensor multi_head_attention_packed(const Tensor& qkv, int64_t heads, const AttentionOptions& opt) override {
    const int64_t C = qkv.size(2) / 3;
    return multi_head_attention(vf::narrow(qkv, 2, 0, C), vf::narrow(qkv, 2, C, C), vf::narrow(qkv, 2, 2 * C, C),
                                heads, opt);
  }
  Tensor sine_expand(const Tensor& y, const Tensor& x, const Tensor& dim_t) override {
    return dev(vf::sine_expand(host(y), host(x), host(dim_t)));
  }
  Tensor inverse_sigmoid(const Tensor& x, float eps) override { return dev(vf::inverse_sigmoid(host(x), eps)); }
  Tensor refine_boxes(const Tensor& delta, const Tensor& reference, float eps) override {
    return dev(vf::refine_boxes(host(delta), host(reference), eps));
  }
  Tensor topk_rows(const Tensor& scores, int64_t k) override { return dev(vf::topk_rows(host(scores), k)); }
  Tensor level_nms_proposals(const Tensor& logits, const Tensor& coord_logits, const std::vector<int64_t>& level_sizes,
                             int64_t k, int64_t pre_nms_topk, double iou_threshold) override {
    return dev(vf::level_nms_proposals(host(logits), host(coord_logits), level_sizes, k, pre_nms_topk, iou_threshold));
  }
  Tensor ms_deform_attn(const Tensor& value, const std::vector<DeformLevel>& levels, const Tensor& loc,
                        const Tensor& weights) override {
    return dev(vf::ms_deform_attn(host(value), levels, host(loc), host(weights)));
  }
};

}  // namespace

DeviceBackend& emulated_backend() {
  static EmulatedBackend b;
  return b;
}

}  // namespace vf
