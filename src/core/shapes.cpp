#include "core/shapes.h"

#include <algorithm>
#include <string>

namespace vf {

MatmulShape matmul_shape(const Tensor& a, const Tensor& b, bool trans_b) {
  if (a.dim() < 2 || a.dim() != b.dim())
    throw Error("matmul: shapes " + shape_str(a.shape()) + " and " + shape_str(b.shape()));
  MatmulShape r;
  r.M = a.size(-2), r.K = a.size(-1);
  r.N = trans_b ? b.size(-2) : b.size(-1);
  const int64_t Kb = trans_b ? b.size(-1) : b.size(-2);
  if (r.K != Kb) throw Error("matmul: inner dims differ: " + shape_str(a.shape()) + " x " + shape_str(b.shape()));
  for (int64_t i = 0; i + 2 < a.dim(); ++i) {
    if (a.size(i) != b.size(i)) throw Error("matmul: batch dims differ");
    r.batch *= a.size(i);
    r.out.push_back(a.size(i));
  }
  r.out.push_back(r.M);
  r.out.push_back(r.N);
  return r;
}

BroadcastShape broadcast_shape(const Tensor& a, const Tensor& b, const char* name) {
  const int64_t d = std::max(a.dim(), b.dim());
  BroadcastShape r;
  r.out.assign(d, 1);
  r.a_strides.assign(d, 0);
  r.b_strides.assign(d, 0);
  int64_t stra = 1, strb = 1;
  for (int64_t i = d - 1; i >= 0; --i) {
    const int64_t ia = i - (d - a.dim()), ib = i - (d - b.dim());
    const int64_t da = ia >= 0 ? a.size(ia) : 1, db = ib >= 0 ? b.size(ib) : 1;
    if (da != db && da != 1 && db != 1)
      throw Error(std::string(name) + ": cannot broadcast " + shape_str(a.shape()) + " with " + shape_str(b.shape()));
    r.out[i] = std::max(da, db);
    r.a_strides[i] = da == 1 ? 0 : stra;
    r.b_strides[i] = db == 1 ? 0 : strb;
    stra *= da;
    strb *= db;
  }
  return r;
}

Shape cat_shape(const std::vector<Tensor>& xs, int64_t& dim) {
  if (xs.empty()) throw Error("cat of nothing");
  const int64_t d = xs[0].dim();
  if (dim < 0) dim += d;
  if (dim < 0 || dim >= d) throw Error("cat: dimension out of range for " + shape_str(xs[0].shape()));
  Shape out = xs[0].shape();
  out[dim] = 0;
  for (auto& t : xs) {
    if (t.dim() != d || t.dtype() != xs[0].dtype()) throw Error("cat: mismatched tensors");
    for (int64_t i = 0; i < d; ++i)
      if (i != dim && t.size(i) != xs[0].size(i))
        throw Error("cat: shapes " + shape_str(t.shape()) + " and " + shape_str(xs[0].shape()));
    out[dim] += t.size(dim);
  }
  return out;
}

Shape permute_shape(const Tensor& x, const std::vector<int>& perm, std::vector<int64_t>* src_strides) {
  const int64_t d = x.dim();
  if (static_cast<int64_t>(perm.size()) != d) throw Error("permute: wrong number of dims");
  Shape out(d);
  std::vector<int64_t> in_strides(d, 1);
  for (int64_t i = d - 2; i >= 0; --i) in_strides[i] = in_strides[i + 1] * x.size(i + 1);
  if (src_strides) src_strides->assign(d, 0);
  for (int64_t i = 0; i < d; ++i) {
    out[i] = x.size(perm[i]);
    if (src_strides) (*src_strides)[i] = in_strides[perm[i]];
  }
  return out;
}

int64_t max_pool_out_size(int64_t size, int k, int s, int lo, int hi, bool ceil_mode) {
  const int64_t num = size + lo + hi - k;
  int64_t o = (ceil_mode ? (num + s - 1) / s : num / s) + 1;
  if (ceil_mode && (o - 1) * s >= size + lo) --o;
  return o;
}

ConvGeometry conv_geometry(const Conv2dOptions& opt, int64_t kh, int64_t kw, int64_t h, int64_t w) {
  ConvGeometry g{opt.pad_top, opt.pad_left, opt.pad_bottom, opt.pad_right, 0, 0};
  if (opt.dynamic_same) {
    auto same = [](int64_t size, int64_t k, int s, int d, int& lo, int& hi) {
      const int64_t out = (size + s - 1) / s;
      const int64_t pad = std::max<int64_t>((out - 1) * s + (k - 1) * d + 1 - size, 0);
      lo = static_cast<int>(pad / 2);
      hi = static_cast<int>(pad - pad / 2);
    };
    same(h, kh, opt.stride_h, opt.dilation_h, g.pad_top, g.pad_bottom);
    same(w, kw, opt.stride_w, opt.dilation_w, g.pad_left, g.pad_right);
  }
  const int64_t ekh = (kh - 1) * opt.dilation_h + 1, ekw = (kw - 1) * opt.dilation_w + 1;
  g.out_h = (h + g.pad_top + g.pad_bottom - ekh) / opt.stride_h + 1;
  g.out_w = (w + g.pad_left + g.pad_right - ekw) / opt.stride_w + 1;
  if (g.out_h <= 0 || g.out_w <= 0)
    throw Error("conv2d: input " + std::to_string(h) + "x" + std::to_string(w) + " is smaller than the kernel");
  return g;
}

}  // namespace vf
