// Conv2d, Linear and matmul on oneDNN.
//
// Each weighted layer keeps its weights in the layout the chosen primitive wants (reordered once,
// the first time an input shape is seen) and caches its primitives per input shape: forward() only
// executes. Bias, the residual sum and the activation run as post-ops of the same primitive.
//
// A layer built while load_compute_dtype() is BF16 holds its weights in bfloat16 only and computes
// on bfloat16 inputs with float32 accumulation, bias, sum and activation; its input and output stay
// float32 tensors (the input is rounded to bfloat16 by a reorder before each run), except that
// forward_to_layer() writes bfloat16 for a next weighted layer, which then reads it as it is.
#include <omp.h>

#include <dnnl.hpp>
#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "core/backend.h"
#include "core/file_pages.h"
#include "core/onednn.h"
#include "core/shapes.h"
#include "core/ops.h"

namespace vf {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

using onednn::ArgSets;
using onednn::unbound;

dnnl::engine& engine() { return onednn::cpu_engine(); }

// oneDNN executes on the calling thread's OpenMP team; one stream serves every call.
dnnl::stream& stream() {
  static dnnl::stream s(engine());
  return s;
}

bool append_act(dnnl::post_ops& po, Act act) {
  switch (act) {
    case Act::None: return true;
    case Act::Relu: po.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f); return true;
    case Act::Gelu: po.append_eltwise(1.f, dnnl::algorithm::eltwise_gelu_erf, 0.f, 0.f); return true;
    case Act::GeluTanh: po.append_eltwise(1.f, dnnl::algorithm::eltwise_gelu_tanh, 0.f, 0.f); return true;
    case Act::Silu: po.append_eltwise(1.f, dnnl::algorithm::eltwise_swish, 1.f, 0.f); return true;
    case Act::Sigmoid: po.append_eltwise(1.f, dnnl::algorithm::eltwise_logistic, 0.f, 0.f); return true;
    case Act::Tanh: po.append_eltwise(1.f, dnnl::algorithm::eltwise_tanh, 0.f, 0.f); return true;
    default: return false;  // applied by act_inplace afterwards
  }
}

// The channel-blocked layout of this CPU's direct convolution kernels: 16 channels (one AVX-512
// register) per block, 8 on AVX2 (and a layout a convolution may refuse elsewhere).
tag channel_blocked_tag() {
  static const tag t = static_cast<unsigned>(dnnl::get_effective_cpu_isa()) >=
                               static_cast<unsigned>(dnnl::cpu_isa::avx512_core)
                           ? tag::nChw16c
                           : tag::nChw8c;
  return t;
}
int64_t channel_block(tag t) { return t == tag::nChw16c ? 16 : 8; }

// What the weighted layers built now compute in on the CPU (check_compute_dtype let only these through).
dt cpu_compute_type() { return load_compute_dtype() == DType::BF16 ? dt::bf16 : dt::f32; }

// The input of a bfloat16 layer, rounded (nearest even) into a pooled bfloat16 buffer; a float32
// layer runs on `src` itself. The layouts are plain and the same on both sides, so the rounding is
// Tensor::to's, across threads (bf16_from_float: the AVX512-BF16 instruction that oneDNN's reorder
// also runs, where the build targets it); oneDNN's reorder took 42 us at 16 threads on the device for
// the 224x224 image entering ConvNeXt's stem.
struct SourceConversion {
  memory::desc md;  // the primitive's source, in the layer's compute dtype (the layout of x)

  SourceConversion() = default;
  explicit SourceConversion(const memory::desc& compute_md) : md(compute_md) {}
  // The primitive's source (argument DNNL_ARG_SRC of `prim_args`, described by `md`) pointed at x:
  // a bfloat16 x (a bfloat16 layer's forward_to_layer output) as it is; a float32 x rounded into
  // `holder`, or as it is for a float32 layer.
  void bind(ArgSets::Lease& prim_args, const Tensor& x, Tensor& holder) const {
    if (x.dtype() == DType::BF16 || md.data_type() == dt::f32) {
      prim_args.bind(DNNL_ARG_SRC, x.raw());
      return;
    }
    holder = x.to(DType::BF16);
    prim_args.bind(DNNL_ARG_SRC, holder.raw());
  }
};

// Room for `md`, from the buffer pool.
Tensor storage_for(const memory::desc& md) { return Tensor::empty({int64_t((md.get_size() + 3) / 4)}); }

// The layers' primitives take their scratchpad at each run (scratchpad_mode::user), from the buffer
// pool, rather than oneDNN's own, allocated when a primitive is made and held for as long as it (or,
// where kernels share one, any primitive) lives (Winograd's transformed tiles, 8-40 MB a layer of
// ResNet-50 at 800x1066): a scratchpad then shares the pool's memory with the maps that are dead
// while it is used.
dnnl::primitive_attr user_scratchpad(dnnl::primitive_attr attr) {
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Runs `prim` on `args`, with a scratchpad of `scratchpad` (the primitive's; empty when it needs
// none) from the pool for this run, and waits for it.
void execute(const dnnl::primitive& prim, const memory::desc& scratchpad, std::unordered_map<int, memory> args) {
  Tensor room;
  if (scratchpad.get_size() > 0) {
    room = storage_for(scratchpad);
    args.emplace(DNNL_ARG_SCRATCHPAD, memory(scratchpad, engine(), room.raw()));
  }
  prim.execute(stream(), args);
  stream().wait();
}

// The same on a leased set of arguments (ArgSets), whose scratchpad argument, if any, is bound here.
void execute(const dnnl::primitive& prim, const memory::desc& scratchpad, ArgSets::Lease& args) {
  Tensor room;
  if (scratchpad.get_size() > 0) {
    room = storage_for(scratchpad);
    args.bind(DNNL_ARG_SCRATCHPAD, room.raw());
  }
  prim.execute(stream(), args.args());
  stream().wait();
}

// A weighted layer's primitive (Linear, NHWC Conv2d) run from x into y (dst_md), with its weights and
// bias (bias_md at `bias`), on a set of arguments kept by the primitive (`sets`); x reaches it through
// `to_compute`. The descriptors are used only when a new set is made.
void run_weighted(const dnnl::primitive& prim, const memory::desc& scratchpad, ArgSets& sets,
                  const SourceConversion& to_compute, const memory& weights, const memory::desc& bias_md,
                  const void* bias, const memory::desc& dst_md, const Tensor& x, Tensor& y) {
  ArgSets::Lease args = sets.take([&] {
    ArgSets::Args a{{DNNL_ARG_SRC, unbound(to_compute.md)},
                    {DNNL_ARG_WEIGHTS, weights},
                    {DNNL_ARG_BIAS, memory(bias_md, engine(), const_cast<void*>(bias))},
                    {DNNL_ARG_DST, unbound(dst_md)}};
    if (scratchpad.get_size() > 0) a.emplace(DNNL_ARG_SCRATCHPAD, unbound(scratchpad));
    return a;
  });
  Tensor x_compute;
  to_compute.bind(args, x, x_compute);
  args.bind(DNNL_ARG_DST, y.raw());
  execute(prim, scratchpad, args);
}

std::mutex& dnnl_mutex() {
  static std::mutex m;
  return m;
}

// A layer's weights, in the layouts its primitives want. The checkpoint's tensor (a view of the
// memory-mapped file, or a generated or folded buffer) is used in place when a primitive takes the
// plain layout; when one wants another layout, the reordered copy replaces it: the original is
// released (and the file pages it had touched are handed back), so the weights are held once.
struct PreparedWeights {
  Tensor source;       // the plain tensor, until a reorder replaces it
  memory plain;        // `source` described in its plain layout; then the first reordered copy
  bool plain_in_use = false;  // a primitive runs on `source` itself: it stays
  std::vector<std::pair<memory::desc, memory>> by_desc;
  // The reordered copies' storage: tensors (of the buffer pool, 2 MB huge pages where large), not
  // oneDNN's own allocations, which fault in 4 KB pages: a ResNet-50's weights are ~40k faults.
  std::vector<Tensor> storage;

  bool has(const memory::desc& want) const {
    for (auto& [d, m] : by_desc)
      if (d == want) return true;
    return false;
  }

  memory::desc plain_desc;  // the layout `source` had

  void init(Tensor t, const memory::desc& plain_layout) {
    plain_desc = plain_layout;
    source = std::move(t);
    plain = memory(plain_layout, engine(), source.raw());
    by_desc.emplace_back(plain_layout, plain);
  }
  memory get(const memory::desc& want) {
    for (auto& [d, m] : by_desc)
      if (d == want) {
        if (source.defined()) plain_in_use = true;
        return m;
      }
    storage.push_back(storage_for(want));
    memory m(want, engine(), storage.back().raw());
    memory src = plain;
    try {
      dnnl::reorder::primitive_desc direct(engine(), src.get_desc(), engine(), want);
      // Between two blocked layouts oneDNN may have only its reference reorder, 10-50x slower than
      // its jit ones out of and into the plain layout: through a plain copy then.
      if (src.get_desc() != plain_desc && std::string(direct.impl_info_str()).rfind("simple", 0) == 0)
        throw dnnl::error(dnnl_unimplemented, "only the reference reorder");
      dnnl::reorder(direct).execute(stream(), src, m);
    } catch (const dnnl::error&) {
      // oneDNN reorders into its Winograd layouts from the plain layout only: through a plain copy.
      Tensor tmp_room = storage_for(plain_desc);
      memory tmp(plain_desc, engine(), tmp_room.raw());
      dnnl::reorder(src, tmp).execute(stream(), src, tmp);
      dnnl::reorder(tmp, m).execute(stream(), tmp, m);
      stream().wait();  // before tmp_room goes back to the pool
    }
    stream().wait();
    if (source.defined() && !plain_in_use) {
      // The plain weights are no longer needed: the copy is the reference from now on (any later
      // layout is reordered from it).
      by_desc.clear();
      release_file_pages(source);
      source = Tensor();
      plain = m;
    }
    by_desc.emplace_back(want, m);
    return m;
  }
};

// A layer built for a device: inputs on that device run there; a CPU input is copied over and its
// result back (correct, if slow: the models keep their activations on the device). On the emulated
// device the layer is the CPU one, run on the same memory; a CPU input takes the same round trip
// as on a GPU, so that tests see it (device_to_host_copies()).
// `run_on_cpu(x, residual)` is the layer's host computation.
template <class RunOnCpu>
Tensor forward_off_cpu(const RunOnCpu& run_on_cpu, const std::shared_ptr<DeviceLayer>& device_layer,
                       Device layer_device, const Tensor& x, const Tensor* residual, bool to_layer = false) {
  if (x.is_cpu() && !layer_device.is_cpu()) {
    Tensor r = residual ? residual->to(layer_device) : Tensor();
    return forward_off_cpu(run_on_cpu, device_layer, layer_device, x.to(layer_device), residual ? &r : nullptr).cpu();
  }
  if (device_layer) {
    if (x.device() != layer_device)
      throw Error("a layer loaded for " + layer_device.str() + " got an input on " + x.device().str());
    return to_layer && !residual ? device_layer->forward_to_layer(x) : device_layer->forward(x, residual);
  }
  Tensor r = residual ? residual->retagged(Device::cpu()) : Tensor();
  Tensor y = run_on_cpu(x.retagged(Device::cpu()), residual ? &r : nullptr);
  return y.retagged(x.device());
}

// A convolution with one output channel (DETR's mask head ends in one, 16 -> 1 at a quarter of the
// image, for every query) is a dot product per output pixel: oneDNN's kernels, which vectorise over
// output channels, run it at ~16 GFLOP/s. Here each output pixel sums, per kernel row, one contiguous
// run of the NHWC input (the row's taps times the channels) against the weights laid out [kh][kw][C]
// the same way: sixteen running sums (one vector register) over the whole window, then added in
// halves, a remainder of fewer than sixteen after them; the same order at any thread count.
// x [N, H, W, C] float32; y [N, OH, OW, 1].
void conv2d_one_output_nhwc(const Tensor& x, const Tensor& w_hwc, float bias, int64_t kh, int64_t kw,
                            const Conv2dOptions& opt, const ConvGeometry& g, float* y) {
  typedef float f16v __attribute__((vector_size(64)));
  typedef float f8v __attribute__((vector_size(32)));
  typedef float f4v __attribute__((vector_size(16)));
  constexpr int64_t kLanes = 16;
  const auto load = [](const float* p) {
    f16v v;
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  const auto sum_lanes = [](f16v v) {
    f8v a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    f4v b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
  };
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  const int64_t oh = g.out_h, ow = g.out_w;
  const float* xp = x.f32();
  const float* wp = w_hwc.f32();
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < n; ++b)
    for (int64_t oy = 0; oy < oh; ++oy) {
      float* yrow = y + (b * oh + oy) * ow;
      for (int64_t ox = 0; ox < ow; ++ox) {
        f16v acc = {};
        float rest = 0.f;
        const int64_t ix0 = ox * opt.stride_w - g.pad_left;
        const int64_t kx0 = std::max<int64_t>(0, -ix0), kx1 = std::min<int64_t>(kw, w - ix0);
        for (int64_t ky = 0; ky < kh; ++ky) {
          const int64_t iy = oy * opt.stride_h - g.pad_top + ky;
          if (iy < 0 || iy >= h || kx0 >= kx1) continue;
          const float* a = xp + ((b * h + iy) * w + ix0 + kx0) * c;
          const float* k = wp + (ky * kw + kx0) * c;
          const int64_t len = (kx1 - kx0) * c;
          int64_t j = 0;
          for (; j + kLanes <= len; j += kLanes) acc += load(a + j) * load(k + j);
          for (; j < len; ++j) rest += a[j] * k[j];
        }
        yrow[ox] = (sum_lanes(acc) + rest) + bias;
      }
    }
}

}  // namespace

// ---- Conv2d --------------------------------------------------------------------------------------

struct Conv2d::Impl {
  std::shared_ptr<DeviceLayer> device_layer;  // built for load_device() when that is a GPU
  Device device;
  Tensor bias;  // [out]; the weight (OIHW, grouped: GOIHW view) lives in `prepared`
  Conv2dOptions opt;
  int64_t out, in, kh, kw;
  PreparedWeights prepared;
  // Winograd (F(2x2,3x3) / F(4x4,3x3)) for the 3x3 stride-1 float32 convolutions it applies to:
  // 1.7-2x fewer cycles than the direct kernels on the maps of ResNet-style backbones, within a few
  // ulps of them. Its weights are 1.8-4x larger, on top of the direct layout's (kept: oneDNN makes a
  // Winograd layout only from a plain one, which can be had from the direct layout but not from
  // another Winograd one, and each map size may want its own); the deepest, widest layers (more
  // than 256 channels, small maps, the largest weights) gain nothing and stay direct.
  bool winograd = false;
  // One output channel, float32, undilated, ungrouped: vf's own kernel (conv2d_one_output_nhwc) on
  // these weights, [kh][kw][in]; no oneDNN primitive.
  Tensor one_output_weights;
  dt compute = dt::f32;  // or bf16 (cpu_compute_type() at load)
  struct Prim {
    dnnl::convolution_forward prim;
    memory::desc scratchpad;
    memory weights;
    int64_t oh, ow;
    // The primitive reads and writes the layouts it picked (src_blocked, dst_blocked): always for
    // BlockedMaps; for NHWC tensors only Winograd, with the input and output reordered around it.
    bool blocked = false;
    memory::desc src_blocked, dst_blocked;
    dnnl::reorder to_blocked, from_blocked;
    SourceConversion to_compute;  // float32 NHWC -> what a bfloat16 primitive reads
    std::shared_ptr<ArgSets> args = std::make_shared<ArgSets>();  // of the NHWC (not Winograd) primitive
  };
  std::map<std::tuple<int64_t, int64_t, int64_t, bool, bool, bool, bool>, Prim> cache;
  std::mutex mu;

  // A strided 1x1 convolution with no padding: on blocked maps it runs with a stride of 1 on its input
  // subsampled (Conv2d::forward on BlockedMaps).
  static bool subsamples(const Conv2dOptions& o, int64_t kh, int64_t kw) {
    return kh == 1 && kw == 1 && (o.stride_h > 1 || o.stride_w > 1) && !o.dynamic_same && o.pad_top == 0 &&
           o.pad_left == 0 && o.pad_bottom == 0 && o.pad_right == 0;
  }

  static bool winograd_applies(const Conv2dOptions& o, int64_t out, int64_t in, int64_t kh, int64_t kw) {
    return o.groups == 1 && kh == 3 && kw == 3 && o.stride_h == 1 && o.stride_w == 1 && o.dilation_h == 1 &&
           o.dilation_w == 1 && !o.dynamic_same && in % 16 == 0 && out % 16 == 0 && in <= 256 && out <= 256;
  }

  // On NHWC maps Winograd reads and writes oneDNN's channel blocks through a reorder on each side,
  // whose cost grows with in + out a pixel while the multiplications it saves grow with in * out:
  // below 2048 the reorders cost more than Winograd saves. DETR's mask head, 32 -> 16 channels at
  // 200x301, 4 queries a call (the panoptic golden case, 2 pinned threads on the development VM,
  // 2026-12-04): Winograd 5.9 ms a call and 2.9 ms of reorders, the direct kernel 6.75 ms; the
  // whole `vf check` 1.82-1.95 s and 642-647 MiB against 1.98-2.47 s and 672-676 MiB. Blocked maps
  // need no reorder and keep Winograd at every size it applies to.
  static bool winograd_pays_on_nhwc(int64_t out, int64_t in) { return in * out >= 2048; }

  // The Winograd primitive for this input, or false where oneDNN has none for it.
  // nhwc_around: for NHWC maps, with the reorders to and from the blocked layouts.
  bool winograd_prim(Prim& p, int64_t n, int64_t h, int64_t w, const ConvGeometry& g, const dnnl::primitive_attr& attr,
                     bool nhwc_around) {
    memory::desc any_src({n, in, h, w}, dt::f32, tag::any);
    memory::desc any_dst({n, out, g.out_h, g.out_w}, dt::f32, tag::any);
    memory::desc w_md(weight_dims(), dt::f32, tag::any);
    memory::desc b_md({out}, dt::f32, tag::x);
    try {
      dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_winograd,
                                        any_src, w_md, b_md, any_dst, {1, 1}, {0, 0}, {g.pad_top, g.pad_left},
                                        {g.pad_bottom, g.pad_right});
      dnnl::convolution_forward::primitive_desc pd(d, user_scratchpad(attr), engine());
      // Of oneDNN's Winograd kernels for this size, one whose weights are already held, if any; else
      // its first choice (a fresh descriptor: next_impl() moves the one it is called on).
      while (!prepared.has(pd.weights_desc()))
        if (!pd.next_impl()) {
          pd = dnnl::convolution_forward::primitive_desc(d, user_scratchpad(attr), engine());
          break;
        }
      memory::desc nhwc_src({n, in, h, w}, dt::f32, tag::nhwc);
      memory::desc nhwc_dst({n, out, g.out_h, g.out_w}, dt::f32, tag::nhwc);
      p.prim = dnnl::convolution_forward(pd);
      p.scratchpad = pd.scratchpad_desc();
      p.weights = prepared.get(pd.weights_desc());
      p.blocked = true;
      p.src_blocked = pd.src_desc();
      p.dst_blocked = pd.dst_desc();
      if (nhwc_around) {
        p.to_blocked = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), nhwc_src, engine(), p.src_blocked));
        p.from_blocked = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), p.dst_blocked, engine(), nhwc_dst));
      }
      return true;
    } catch (const dnnl::error&) {
      return false;
    }
  }

  memory::dims weight_dims() const {
    if (opt.groups == 1) return {out, in, kh, kw};
    return {opt.groups, out / opt.groups, in / opt.groups, kh, kw};
  }

  // compute_dst: the output in the compute dtype (forward_to_layer) rather than float32.
  // blocked: source and output in the layouts the primitive picks (BlockedMap), float32 layers only.
  // subsampled: a strided 1x1 convolution run with a stride of 1 on its input already subsampled
  // (h and w are then that input's).
  Prim& prim_for(int64_t n, int64_t h, int64_t w, bool residual, bool compute_dst = false, bool blocked = false,
                 bool subsampled = false) {
    std::lock_guard<std::mutex> lock(mu);
    auto key = std::make_tuple(n, h, w, residual, compute_dst, blocked, subsampled);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;

    Conv2dOptions unit_stride = opt;
    unit_stride.stride_h = unit_stride.stride_w = 1;
    const Conv2dOptions& o = subsampled ? unit_stride : opt;
    const ConvGeometry g = conv_geometry(o, kh, kw, h, w);
    const int pt = g.pad_top, pl = g.pad_left, pb = g.pad_bottom, pr = g.pad_right;
    const int64_t oh = g.out_h, ow = g.out_w;

    // A chain of blocked maps asks for the channel-blocked layout: with tag::any on both sides
    // oneDNN 2.6 picks its NHWC kernels (brgconv) on AVX-512, slower on ResNet-50's 1x1
    // convolutions than its nChw16c ones (issue 14), and Winograd's layout is nChw16c: one layout
    // for the whole chain needs no reorder. An input of a few channels (the stem's image) stays in
    // the layout the kernel reads; a convolution with no blocked kernel takes the ones oneDNN picks.
    const tag blocked_tag = channel_blocked_tag();
    const tag src_tag = !blocked ? tag::nhwc : in % channel_block(blocked_tag) == 0 ? blocked_tag : tag::any;
    const tag dst_tag = !blocked ? tag::nhwc : blocked_tag;
    memory::desc src_md({n, in, h, w}, compute, src_tag);
    memory::desc dst_md({n, out, oh, ow}, compute_dst ? compute : dt::f32, dst_tag);
    memory::desc w_md(weight_dims(), compute, tag::any);
    memory::desc b_md({out}, dt::f32, tag::x);
    dnnl::post_ops po;
    if (residual) po.append_sum(1.f);
    append_act(po, opt.act);
    dnnl::primitive_attr attr;
    attr.set_post_ops(po);
    if (winograd && !residual && (blocked || winograd_pays_on_nhwc(out, in))) {
      Prim p;
      p.oh = oh;
      p.ow = ow;
      if (winograd_prim(p, n, h, w, g, attr, !blocked)) return cache.emplace(key, std::move(p)).first->second;
    }
    auto direct_desc = [&](const memory::desc& src, const memory::desc& dst) {
      return dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                             dnnl::algorithm::convolution_direct, src, w_md, b_md, dst,
                                             {o.stride_h, o.stride_w}, {o.dilation_h - 1, o.dilation_w - 1},
                                             {pt, pl}, {pb, pr});
    };
    auto direct = [&](const memory::desc& src, const memory::desc& dst) {
      return dnnl::convolution_forward::primitive_desc(direct_desc(src, dst), user_scratchpad(attr), engine());
    };
    dnnl::convolution_forward::primitive_desc pd;
    try {
      pd = direct(src_md, dst_md);
    } catch (const dnnl::error&) {
      if (!blocked) throw;
      pd = direct(memory::desc({n, in, h, w}, compute, tag::any), memory::desc({n, out, oh, ow}, dt::f32, tag::any));
    }
    // A kernel wider than 1x1 that has only oneDNN's general direct kernel ("jit:") on channel blocks
    // (not Winograd: a stride of 2, more than 256 channels) runs faster on NHWC maps with its brgemm
    // kernel; and one with only the reference kernel there (groups of channels that are not whole
    // blocks: ResNeXt's 3x3s) runs whatever NHWC kernel is not the reference. Such a layer reads and
    // writes NHWC, the maps reordered around it.
    const auto starts = [](const char* impl, const char* prefix) { return std::string(impl).rfind(prefix, 0) == 0; };
    const bool general = kh * kw > 1 && starts(pd.impl_info_str(), "jit:"), reference = starts(pd.impl_info_str(), "ref");
    if (blocked && src_tag == blocked_tag && (general || reference)) {
      try {
        auto nhwc = direct(memory::desc({n, in, h, w}, compute, tag::nhwc), memory::desc({n, out, oh, ow}, dt::f32, tag::nhwc));
        if (starts(nhwc.impl_info_str(), "brg") || (reference && !starts(nhwc.impl_info_str(), "ref"))) pd = nhwc;
      } catch (const dnnl::error&) {
      }
    }
    // A strided 1x1 convolution (on blocked maps, one with padding; the others subsample their input
    // first): oneDNN's 1x1 kernels copy the subsampled input into their
    // scratchpad, once per thread (110 MB at 16 threads for ResNet-50's third-stage shortcut at
    // 800x1066), where its general direct kernels read the strided input in place, as fast (about
    // 10 ms for each of ResNet-50's three strided shortcuts at 2 threads on the development VM). The
    // first implementation that is not a 1x1 one and reads and writes the same layouts is taken (a
    // reference kernel, far slower, never). The rule is by kind, not by the scratchpad's size, so
    // that every batch size gets the same kernel: a batch gives each image what it alone gives.
    const auto is_1x1 = [](const char* impl) { return std::string(impl).find("1x1") != std::string::npos; };
    if (kh == 1 && kw == 1 && (o.stride_h > 1 || o.stride_w > 1) && is_1x1(pd.impl_info_str())) {
      // A fresh one (next_impl() moves it), of a description that outlives the search.
      const auto d = direct_desc(pd.src_desc(), pd.dst_desc());
      dnnl::convolution_forward::primitive_desc next(d, user_scratchpad(attr), engine());
      while (next.next_impl()) {
        if (std::string(next.impl_info_str()).rfind("ref", 0) == 0) break;
        if (!is_1x1(next.impl_info_str()) && next.weights_desc() == pd.weights_desc() &&
            next.src_desc() == pd.src_desc() && next.dst_desc() == pd.dst_desc()) {
          pd = next;
          break;
        }
      }
    }
    Prim p;
    p.prim = dnnl::convolution_forward(pd);
    p.scratchpad = pd.scratchpad_desc();
    p.weights = prepared.get(pd.weights_desc());
    p.oh = oh;
    p.ow = ow;
    if (blocked) {
      p.blocked = true;
      p.src_blocked = pd.src_desc();
      p.dst_blocked = pd.dst_desc();
    } else {
      p.to_compute = SourceConversion(src_md);
    }
    return cache.emplace(key, std::move(p)).first->second;
  }
};

Conv2d::Conv2d(const Tensor& weight, const Tensor& bias, const Conv2dOptions& opt) {
  if (weight.dim() != 4) throw Error("conv2d weight must be 4-D, got " + shape_str(weight.shape()));
  if (opt.groups < 1 || weight.numel() == 0)
    throw Error("conv2d: weight " + shape_str(weight.shape()) + " with " + std::to_string(opt.groups) +
                " groups (sizes and groups must be positive)");
  auto impl = std::make_shared<Impl>();
  impl->opt = opt;
  impl->out = weight.size(0);
  impl->in = weight.size(1) * opt.groups;
  impl->kh = weight.size(2);
  impl->kw = weight.size(3);
  if (impl->out % opt.groups) throw Error("conv2d: out channels not divisible by groups");
  impl->bias = bias.defined() ? bias : Tensor::zeros({impl->out});
  if (impl->bias.numel() != impl->out) throw Error("conv2d: bias of " + shape_str(bias.shape()));
  out_ = impl->out;
  in_ = impl->in;
  impl->device = load_device();
  if (Device d = load_device(); d.is_cuda()) {
    impl->device_layer = backend(d).make_conv2d(weight, impl->bias, opt);
    release_file_pages(weight);
    impl->bias = Tensor();
    impl_ = std::move(impl);
    return;
  }
  impl->compute = cpu_compute_type();
  if (impl->out == 1 && opt.groups == 1 && opt.dilation_h == 1 && opt.dilation_w == 1 && impl->compute == dt::f32) {
    // [1, in, kh, kw] -> [kh, kw, in]: the input's order along a kernel row
    impl->one_output_weights = permute(weight, {0, 2, 3, 1}).reshape({impl->kh, impl->kw, impl->in});
    release_file_pages(weight);
    impl_ = std::move(impl);
    return;
  }
  auto plain_tag = opt.groups == 1 ? tag::oihw : tag::goihw;
  impl->prepared.init(weight, memory::desc(impl->weight_dims(), dt::f32, plain_tag));
  // Layout changes happen at load: a primitive for a nominal input (one image, a little larger than
  // the kernel) picks the weights' layout, in practice the one every input size gets; a size that
  // wants another one gets its own copy at its first run. (Winograd's layouts depend on the map's
  // size: they are made at the first run of each, from the direct layout chosen here.)
  const bool blocked = opt.blocked_maps && impl->compute == dt::f32;
  impl->prim_for(1, (impl->kh - 1) * opt.dilation_h + 1 + 8, (impl->kw - 1) * opt.dilation_w + 1 + 8, false, false,
                 blocked, blocked && Impl::subsamples(opt, impl->kh, impl->kw));
  // VF_CONV_WINOGRAD=0: direct convolutions only (to compare; Winograd's gain depends on the CPU).
  static const bool winograd_allowed = [] {
    const char* e = std::getenv("VF_CONV_WINOGRAD");
    return !(e && std::string(e) == "0");
  }();
  impl->winograd = winograd_allowed && impl->compute == dt::f32 &&
                   Impl::winograd_applies(opt, impl->out, impl->in, impl->kh, impl->kw);
  out_ = impl->out;
  in_ = impl->in;
  impl_ = std::move(impl);
}

Tensor Conv2d::forward(const Tensor& x, Tensor&& residual) const {
  if (!residual.sole_owner() || residual.dtype() != DType::F32) return forward(x, &residual);
  Tensor y = std::move(residual);
  return forward(x, &y, /*in_place=*/true);
}

Tensor Conv2d::forward_to_layer(const Tensor& x, Tensor&& residual) const {
  if (!residual.sole_owner() || residual.dtype() != input_dtype()) return forward(x, &residual, false, true);
  Tensor y = std::move(residual);
  return forward(x, &y, /*in_place=*/true, /*to_layer=*/true);
}

Tensor Conv2d::forward(const Tensor& x, const Tensor* residual) const { return forward(x, residual, false); }

Tensor Conv2d::forward_to_layer(const Tensor& x) const { return forward(x, nullptr, false, true); }

DType Conv2d::input_dtype() const {
  return impl_ && !impl_->device_layer && impl_->compute == dt::bf16 ? DType::BF16 : DType::F32;
}

Tensor Conv2d::forward(const Tensor& x, const Tensor* residual, bool in_place, bool to_layer) const {
  if (x.dim() != 4 || x.size(3) != in_)
    throw Error("conv2d expects [N, H, W, " + std::to_string(in_) + "], got " + shape_str(x.shape()));
  if (x.dtype() == DType::BF16 && (impl_->compute != dt::bf16 || impl_->device_layer || !x.is_cpu()))
    return forward(x.to(DType::F32), residual, in_place, to_layer);  // from a bf16 layer of another kind
  if (x.is_cpu() && impl_->device.is_cpu()) return forward_cpu(x, residual, in_place, to_layer);
  auto on_cpu = [this](const Tensor& xc, const Tensor* rc) { return forward_cpu(xc, rc, false, false); };
  if (residual && residual->dtype() != DType::F32) {
    const Tensor r = residual->to(DType::F32);
    return forward_off_cpu(on_cpu, impl_->device_layer, impl_->device, x, &r);
  }
  return forward_off_cpu(on_cpu, impl_->device_layer, impl_->device, x, residual);
}

Tensor Conv2d::forward_cpu(const Tensor& x, const Tensor* residual, bool in_place, bool to_layer) const {
  int64_t n = x.size(0), h = x.size(1), w = x.size(2);
  if (impl_->one_output_weights.defined()) {
    const ConvGeometry g = conv_geometry(impl_->opt, impl_->kh, impl_->kw, h, w);
    const Shape out_shape{n, g.out_h, g.out_w, 1};
    if (residual && residual->shape() != out_shape)
      throw Error("conv2d residual has shape " + shape_str(residual->shape()));
    Tensor y = Tensor::empty(out_shape);
    conv2d_one_output_nhwc(x, impl_->one_output_weights, impl_->bias.f32()[0], impl_->kh, impl_->kw, impl_->opt, g,
                           y.f32());
    if (residual) y = add(y, residual->dtype() == DType::F32 ? *residual : residual->to(DType::F32));
    act_inplace(y, impl_->opt.act);
    return y;
  }
  dnnl::post_ops fusable;
  const bool compute_dst = to_layer && impl_->compute != dt::f32 && append_act(fusable, impl_->opt.act);
  auto& p = impl_->prim_for(n, h, w, residual != nullptr, compute_dst);
  Tensor y;
  if (residual) {
    if (residual->shape() != Shape{n, p.oh, p.ow, out_})
      throw Error("conv2d residual has shape " + shape_str(residual->shape()));
    // The sum accumulates in the output, which has the output's dtype (the compute dtype for
    // forward_to_layer on a bfloat16 layer, else float32).
    const DType out_dtype = compute_dst ? DType::BF16 : DType::F32;
    if (residual->dtype() != out_dtype) y = residual->to(out_dtype);
    else y = in_place ? *residual : residual->clone();
  }
  if (p.blocked) {  // Winograd (float32 only): never with a residual
    memory src(memory::desc({n, in_, h, w}, dt::f32, tag::nhwc), engine(), const_cast<void*>(x.raw()));
    memory bias(memory::desc({out_}, dt::f32, tag::x), engine(), impl_->bias.raw());
    Tensor yb = Tensor::empty({int64_t((p.dst_blocked.get_size() + 3) / 4)});
    memory dst_b(p.dst_blocked, engine(), yb.raw());
    {
      Tensor xb = Tensor::empty({int64_t((p.src_blocked.get_size() + 3) / 4)});
      memory src_b(p.src_blocked, engine(), xb.raw());
      p.to_blocked.execute(stream(), src, src_b);
      execute(p.prim, p.scratchpad,
              {{DNNL_ARG_SRC, src_b}, {DNNL_ARG_WEIGHTS, p.weights}, {DNNL_ARG_BIAS, bias}, {DNNL_ARG_DST, dst_b}});
    }  // the blocked input goes back to the pool before the output is taken: it can reuse the buffer
    y = Tensor::empty({n, p.oh, p.ow, out_});
    memory dst(memory::desc({n, out_, p.oh, p.ow}, dt::f32, tag::nhwc), engine(), y.raw());
    p.from_blocked.execute(stream(), dst_b, dst);
  } else {
    if (!residual) y = Tensor::empty({n, p.oh, p.ow, out_}, compute_dst ? DType::BF16 : DType::F32);
    run_weighted(p.prim, p.scratchpad, *p.args, p.to_compute, p.weights, memory::desc({out_}, dt::f32, tag::x),
                 impl_->bias.raw(), memory::desc({n, out_, p.oh, p.ow}, compute_dst ? impl_->compute : dt::f32, tag::nhwc),
                 x, y);
  }
  stream().wait();
  Act a = impl_->opt.act;
  dnnl::post_ops probe;
  if (!append_act(probe, a)) act_inplace(y, a);
  return y;
}

// ---- blocked maps --------------------------------------------------------------------------------

struct BlockedMap::Layout {
  memory::desc md;
};

namespace {

// A map's bytes as oneDNN memory (float32; a blocked map's own descriptor).
memory::desc plain_desc(const Shape& nhwc, tag t) {
  return memory::desc({nhwc[0], nhwc[3], nhwc[1], nhwc[2]}, dt::f32, t);
}

}  // namespace

BlockedMap BlockedMap::from_nhwc(Tensor x) {
  if (x.dim() != 4) throw Error("BlockedMap::from_nhwc expects [N, H, W, C], got " + shape_str(x.shape()));
  BlockedMap m;
  m.shape_ = x.shape();
  m.data_ = std::move(x);
  return m;
}

BlockedMap BlockedMap::from_nchw(Tensor x) {
  if (x.dim() != 4) throw Error("BlockedMap::from_nchw expects [N, C, H, W], got " + shape_str(x.shape()));
  BlockedMap m;
  m.shape_ = {x.size(0), x.size(2), x.size(3), x.size(1)};
  m.form_ = Form::Nchw;
  m.data_ = std::move(x);
  return m;
}

Tensor BlockedMap::to_nhwc() const {
  switch (form_) {
    case Form::Nhwc: return data_.dtype() == DType::F32 ? data_ : data_.to(DType::F32);
    case Form::Nchw: return nchw_to_nhwc(data_.dtype() == DType::F32 ? data_ : data_.to(DType::F32));
    case Form::Blocked: break;
  }
  Tensor y = Tensor::empty(shape_);
  memory src(layout_->md, engine(), const_cast<void*>(data_.raw()));
  memory dst(plain_desc(shape_, tag::nhwc), engine(), y.raw());
  dnnl::reorder(src, dst).execute(stream(), src, dst);
  stream().wait();
  return y;
}

namespace {

// The channel block of a map's layout when its bytes are [N][C/B][H][W][B] (oneDNN's nChwBc; nhwc
// is that with one block of all C channels, nchw with blocks of one), read from the descriptor; 0
// for any other layout. The tag that describes it goes to `t`.
int64_t channel_block_of(const memory::desc& md, tag& t) {
  const auto& d = md.data;
  if (d.ndims != 4 || d.data_type != dnnl_f32 || d.format_kind != dnnl_blocked) return 0;
  const auto& b = d.format_desc.blocking;
  const memory::dims dims = md.dims();
  int64_t block = 0;
  if (b.inner_nblks == 0) {
    block = b.strides[1] == 1 ? dims[1] : 1;
    t = block == 1 ? tag::nchw : tag::nhwc;
  } else if (b.inner_nblks == 1 && b.inner_idxs[0] == 1) {
    block = b.inner_blks[0];
    t = block == 16 ? tag::nChw16c : block == 8 ? tag::nChw8c : block == 4 ? tag::nChw4c : tag::undef;
  }
  // Dense and in that order (not merely the same blocks): the descriptor the tag makes is this one.
  if (block == 0 || t == tag::undef || memory::desc(dims, dt::f32, t) != md) return 0;
  return block;
}

// Every (sh, sw)-th pixel of a channel-blocked map `full` ([N][C/B][H][W][B], the layout of `want` at the
// full size) into a map of `want`'s size and layout: pixel (y, x) from (y * sh, x * sw). `holder` keeps
// `full` alive while it is read and then the copy.
memory subsampled(const memory& full, const memory::desc& want, int64_t sh, int64_t sw, Tensor& holder) {
  tag t = tag::undef;
  const int64_t block = channel_block_of(want, t);
  const memory::dims fd = full.get_desc().dims(), wd = want.dims();
  const int64_t maps = wd[0] * (want.data.padded_dims[1] / block), h = fd[2], w = fd[3], oh = wd[2], ow = wd[3];
  Tensor copy = storage_for(want);
  const float* in = static_cast<const float*>(full.get_data_handle());
  float* out = copy.f32();
#pragma omp parallel for collapse(2)
  for (int64_t m = 0; m < maps; ++m)
    for (int64_t y = 0; y < oh; ++y) {
      const float* in_row = in + (m * h + y * sh) * w * block;
      float* out_row = out + (m * oh + y) * ow * block;
      for (int64_t x = 0; x < ow; ++x) std::memcpy(out_row + x * block, in_row + x * sw * block, block * sizeof(float));
    }
  holder = std::move(copy);
  return memory(want, engine(), holder.raw());
}

}  // namespace

BlockedMap Conv2d::forward(const BlockedMap& x) const { return forward(x, nullptr, false); }

BlockedMap Conv2d::forward(const BlockedMap& x, BlockedMap&& residual) const { return forward(x, &residual, false); }

BlockedMap Conv2d::forward_to_layer(const BlockedMap& x) const { return forward(x, nullptr, true); }

BlockedMap Conv2d::forward_to_layer(const BlockedMap& x, BlockedMap&& residual) const {
  return forward(x, &residual, true);
}

BlockedMap Conv2d::forward(const BlockedMap& x, BlockedMap* residual, bool to_layer) const {
  if (x.shape_.size() != 4 || x.shape_[3] != in_)
    throw Error("conv2d expects [N, H, W, " + std::to_string(in_) + "], got " + shape_str(x.shape_));
  dnnl::post_ops fusable;
  const bool blocked = impl_->device.is_cpu() && x.data_.is_cpu() && x.data_.dtype() == DType::F32 &&
                       impl_->compute == dt::f32 && !impl_->one_output_weights.defined() &&
                       append_act(fusable, impl_->opt.act) &&
                       (!residual || (residual->data_.is_cpu() && residual->data_.dtype() == DType::F32));
  if (!blocked) {  // the NHWC path, as it is
    // An NHWC map is read in its own dtype: a 16-bit map from a layer's forward_to_layer goes to the
    // next layer as it is (widening it here would undo what forward_to_layer saved).
    const Tensor xs = x.form_ == BlockedMap::Form::Nhwc ? x.data_ : x.to_nhwc();
    if (!residual) return BlockedMap::from_nhwc(to_layer ? forward_to_layer(xs) : forward(xs));
    Tensor r = residual->form_ == BlockedMap::Form::Nhwc ? residual->data_ : residual->to_nhwc();
    *residual = BlockedMap();  // the caller handed it over: the sum may accumulate in place
    return BlockedMap::from_nhwc(to_layer ? forward_to_layer(xs, std::move(r)) : forward(xs, std::move(r)));
  }
  const int64_t n = x.shape_[0], h = x.shape_[1], w = x.shape_[2];
  // A strided 1x1 convolution with no padding reads every stride-th pixel: it runs with a stride of 1
  // (oneDNN's 1x1 kernel) on those pixels, copied once (a quarter of the map at a stride of 2). oneDNN's
  // own strided 1x1 kernels copy them once per thread; its general ones, reading in place, are up to
  // twice as slow on ResNet's shortcuts.
  const Conv2dOptions& o = impl_->opt;
  tag sub_tag = tag::undef;
  const Impl::Prim* sub = nullptr;
  if (Impl::subsamples(o, impl_->kh, impl_->kw)) {
    const ConvGeometry g = conv_geometry(o, impl_->kh, impl_->kw, h, w);
    sub = &impl_->prim_for(n, g.out_h, g.out_w, residual != nullptr, false, /*blocked=*/true, /*subsampled=*/true);
    if (channel_block_of(sub->src_blocked, sub_tag) == 0) sub = nullptr;  // a layout this copy does not know
  }
  auto& p = sub ? *sub : impl_->prim_for(n, h, w, residual != nullptr, false, /*blocked=*/true);
  const Shape out_shape{n, p.oh, p.ow, out_};

  // The source in the primitive's layout: the map itself when it has it, else a reordered copy.
  auto as_memory = [](const BlockedMap& m) {
    const memory::desc md = m.form_ == BlockedMap::Form::Blocked ? m.layout_->md
                            : plain_desc(m.shape_, m.form_ == BlockedMap::Form::Nhwc ? tag::nhwc : tag::nchw);
    return memory(md, engine(), const_cast<void*>(m.data_.raw()));
  };
  auto in_layout = [&](const BlockedMap& m, const memory::desc& want, Tensor& holder) {
    memory src = as_memory(m);
    if (src.get_desc() == want) return src;
    holder = storage_for(want);
    memory dst(want, engine(), holder.raw());
    dnnl::reorder(src, dst).execute(stream(), src, dst);
    return dst;
  };

  BlockedMap y;
  y.form_ = BlockedMap::Form::Blocked;
  y.shape_ = out_shape;
  y.layout_ = std::make_shared<const BlockedMap::Layout>(BlockedMap::Layout{p.dst_blocked});
  if (residual) {
    if (residual->shape_ != out_shape) throw Error("conv2d residual has shape " + shape_str(residual->shape_));
    Tensor holder;
    memory r = in_layout(*residual, p.dst_blocked, holder);
    if (holder.defined()) {
      y.data_ = std::move(holder);
    } else if (residual->data_.sole_owner()) {
      y.data_ = std::move(residual->data_);
    } else {
      y.data_ = residual->data_.clone();
    }
    *residual = BlockedMap();
  } else {
    y.data_ = storage_for(p.dst_blocked);
  }
  Tensor x_holder;
  memory src = sub ? subsampled(in_layout(x, memory::desc({n, in_, h, w}, dt::f32, sub_tag), x_holder), p.src_blocked,
                                o.stride_h, o.stride_w, x_holder)
                   : in_layout(x, p.src_blocked, x_holder);
  memory bias(memory::desc({out_}, dt::f32, tag::x), engine(), impl_->bias.raw());
  memory dst(p.dst_blocked, engine(), y.data_.raw());
  execute(p.prim, p.scratchpad,
          {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, p.weights}, {DNNL_ARG_BIAS, bias}, {DNNL_ARG_DST, dst}});
  return y;
}

BlockedMap max_pool2d(const BlockedMap& x, int kernel, int stride, int pad) {
  tag t = tag::undef;
  const int64_t block = x.form_ == BlockedMap::Form::Blocked ? channel_block_of(x.layout_->md, t) : 0;
  if (block == 0)
    return BlockedMap::from_nhwc(max_pool2d_nhwc(x.to_nhwc(), kernel, stride, pad, pad, pad, pad));
  // [N][C/B][H][W][B] is N * C/B maps of B channels in NHWC: max_pool2d_nhwc pools them in place,
  // with PyTorch's rule (a NaN in the window is the maximum, which oneDNN's pooling does not
  // promise), and its output [N * C/B][OH][OW][B] is the same layout. Channels padded up to a
  // multiple of B hold zeros (oneDNN's rule for blocked layouts) and pool to zeros.
  const int64_t n = x.shape_[0], h = x.shape_[1], w = x.shape_[2], c = x.shape_[3];
  const int64_t blocks = x.layout_->md.data.padded_dims[1] / block;
  Tensor pooled = max_pool2d_nhwc(x.data_.reshape({n * blocks, h, w, block}), kernel, stride, pad, pad, pad, pad);
  BlockedMap y;
  y.form_ = BlockedMap::Form::Blocked;
  y.shape_ = {n, pooled.size(1), pooled.size(2), c};
  y.layout_ = std::make_shared<const BlockedMap::Layout>(
      BlockedMap::Layout{memory::desc({n, c, pooled.size(1), pooled.size(2)}, dt::f32, t)});
  y.data_ = pooled.reshape({-1});
  return y;
}

// ---- Linear --------------------------------------------------------------------------------------

struct Linear::Impl {
  std::shared_ptr<DeviceLayer> device_layer;  // built for load_device() when that is a GPU
  Device device;
  int64_t out, in;
  Tensor bias;  // [out]; the weight [out, in] lives in `prepared`
  Act act;
  PreparedWeights prepared;  // viewed as [in, out] (tag ba)
  dt compute = dt::f32;  // or bf16 (cpu_compute_type() at load)
  struct Prim {
    dnnl::matmul prim;
    memory::desc scratchpad;
    memory weights;
    SourceConversion to_compute;
    std::shared_ptr<ArgSets> args = std::make_shared<ArgSets>();
  };
  std::map<std::tuple<int64_t, bool, bool>, Prim> cache;
  std::mutex mu;

  // compute_dst: the output in the compute dtype (forward_to_layer) rather than float32.
  Prim& prim_for(int64_t m, bool residual, bool compute_dst = false) {
    std::lock_guard<std::mutex> lock(mu);
    auto key = std::make_tuple(m, residual, compute_dst);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    memory::desc src_md({m, in}, compute, tag::ab);
    memory::desc w_md({in, out}, compute, tag::any);
    memory::desc b_md({1, out}, dt::f32, tag::ab);
    memory::desc dst_md({m, out}, compute_dst ? compute : dt::f32, tag::ab);
    dnnl::post_ops po;
    append_act(po, act);
    if (residual) po.append_sum(1.f);
    dnnl::primitive_attr attr;
    attr.set_post_ops(po);
    dnnl::matmul::desc d(src_md, w_md, b_md, dst_md);
    dnnl::matmul::primitive_desc pd(d, user_scratchpad(attr), engine());
    Prim p{dnnl::matmul(pd), pd.scratchpad_desc(), prepared.get(pd.weights_desc()),
           SourceConversion(src_md)};
    return cache.emplace(key, std::move(p)).first->second;
  }
};

Linear::Linear(const Tensor& weight, const Tensor& bias, Act act) {
  if (weight.dim() != 2) throw Error("linear weight must be 2-D, got " + shape_str(weight.shape()));
  auto impl = std::make_shared<Impl>();
  impl->act = act;
  out_ = impl->out = weight.size(0);
  in_ = impl->in = weight.size(1);
  impl->bias = bias.defined() ? bias : Tensor::zeros({out_});
  if (impl->bias.numel() != out_) throw Error("linear: bias of " + shape_str(bias.shape()));
  impl->device = load_device();
  if (Device d = load_device(); d.is_cuda()) {
    impl->device_layer = backend(d).make_linear(weight, impl->bias, act);
    release_file_pages(weight);
    impl->bias = Tensor();
    impl_ = std::move(impl);
    return;
  }
  impl->compute = cpu_compute_type();
  impl->prepared.init(weight, memory::desc({in_, out_}, dt::f32, tag::ba));
  dnnl::post_ops probe;
  if (!append_act(probe, act))
    throw Error("linear: activation cannot be fused; apply it separately");
  // Layout changes happen at load (see Conv2d): the layout for a nominal 64 rows.
  if (out_ > 0 && in_ > 0) impl->prim_for(64, false);
  impl_ = std::move(impl);
}

Tensor Linear::forward(const Tensor& x, const Tensor* residual) const { return forward(x, residual, false); }

Tensor Linear::forward_to_layer(const Tensor& x) const { return forward(x, nullptr, true); }

DType Linear::input_dtype() const {
  return impl_ && !impl_->device_layer && impl_->compute == dt::bf16 ? DType::BF16 : DType::F32;
}

Tensor Linear::forward_to_attention(const Tensor& x) const { return forward(x, nullptr, true); }

Tensor Linear::forward_to_layer(const Tensor& x, Tensor&& residual) const {
  if (input_dtype() != DType::BF16) return forward(x, std::move(residual));
  if (!residual.sole_owner() || residual.dtype() != DType::BF16 || residual.raw() == x.raw())
    return forward(x, &residual, /*to_layer=*/true);
  Tensor y = std::move(residual);
  return forward(x, &y, /*to_layer=*/true, /*in_place=*/true);
}

Tensor Linear::forward(const Tensor& x, Tensor&& residual) const {
  if (!residual.sole_owner() || residual.dtype() != DType::F32 || !residual.is_cpu() || residual.raw() == x.raw())
    return forward(x, &residual);
  Tensor y = std::move(residual);
  return forward(x, &y, /*to_layer=*/false, /*in_place=*/true);
}

Tensor Linear::forward(const Tensor& x, const Tensor* residual, bool to_layer, bool in_place) const {
  if (x.dim() < 1 || x.size(-1) != in_)
    throw Error("linear expects [..., " + std::to_string(in_) + "], got " + shape_str(x.shape()));
  // A 16-bit x from a layer of another kind is widened; from one of the same kind it is read as it is.
  const bool as_is = x.dtype() == DType::F32 ||
                     (impl_->device_layer ? !x.is_cpu() && x.dtype() == impl_->device_layer->input_dtype()
                                          : x.is_cpu() && x.dtype() == DType::BF16 && impl_->compute == dt::bf16);
  if (!as_is) return forward(x.to(DType::F32), residual, to_layer, in_place);
  if (x.is_cpu() && impl_->device.is_cpu()) return forward_cpu(x, residual, to_layer, in_place);
  auto on_cpu = [this](const Tensor& xc, const Tensor* rc) { return forward_cpu(xc, rc, false, false); };
  return forward_off_cpu(on_cpu, impl_->device_layer, impl_->device, x, residual, to_layer && !x.is_cpu());
}

Tensor Linear::forward_cpu(const Tensor& x, const Tensor* residual, bool to_layer, bool in_place) const {
  int64_t m = x.numel() / in_;
  Shape out_shape = x.shape();
  out_shape.back() = out_;
  const bool compute_dst = to_layer && impl_->compute != dt::f32;  // the activation is always fused
  Tensor y;
  if (residual) {
    if (residual->numel() != m * out_) throw Error("linear residual has shape " + shape_str(residual->shape()));
    // oneDNN's sum post-op adds into it; it has the output's dtype (the compute dtype for
    // forward_to_layer on a bfloat16 layer, else float32).
    const DType out_dtype = compute_dst ? DType::BF16 : DType::F32;
    if (residual->dtype() != out_dtype)
      y = residual->to(out_dtype).reshape(out_shape);
    else
      y = (in_place ? *residual : residual->clone()).reshape(out_shape);
  } else {
    y = Tensor::empty(out_shape, compute_dst ? DType::BF16 : DType::F32);
  }
  if (m == 0) return y;
  auto& p = impl_->prim_for(m, residual != nullptr, compute_dst);
  run_weighted(p.prim, p.scratchpad, *p.args, p.to_compute, p.weights, memory::desc({1, out_}, dt::f32, tag::ab),
               impl_->bias.raw(), memory::desc({m, out_}, compute_dst ? impl_->compute : dt::f32, tag::ab), x, y);
  return y;
}

// ---- batched matmul ------------------------------------------------------------------------------

Tensor matmul(const Tensor& a, const Tensor& b, bool trans_b, float alpha) {
  if (Device d = op_device({&a, &b}); !d.is_cpu()) return backend(d).matmul(a, b, trans_b, alpha);
  const MatmulShape ms = matmul_shape(a, b, trans_b);
  const int64_t batch = ms.batch, M = ms.M, N = ms.N, K = ms.K;
  const Shape& out_shape = ms.out;
  Tensor y = Tensor::empty(out_shape);
  if (y.numel() == 0) return y;
  if (K == 0) { y.fill(0); return y; }

  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, bool, float>,
                  std::pair<dnnl::matmul, memory::desc>>  // the primitive, its scratchpad
      cache;
  std::pair<dnnl::matmul, memory::desc> prim;
  {
    std::lock_guard<std::mutex> lock(dnnl_mutex());
    auto key = std::make_tuple(batch, M, K, N, trans_b, alpha);
    auto it = cache.find(key);
    if (it == cache.end()) {
      memory::desc a_md({batch, M, K}, dt::f32, tag::abc);
      memory::desc b_md({batch, K, N}, dt::f32, trans_b ? tag::acb : tag::abc);
      memory::desc c_md({batch, M, N}, dt::f32, tag::abc);
      dnnl::primitive_attr attr;
      if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
      dnnl::matmul::desc d(a_md, b_md, c_md);
      dnnl::matmul::primitive_desc pd(d, user_scratchpad(attr), engine());
      if (cache.size() > 512) cache.clear();
      it = cache.emplace(key, std::make_pair(dnnl::matmul(pd), pd.scratchpad_desc())).first;
    }
    prim = it->second;
  }
  memory am(memory::desc({batch, M, K}, dt::f32, tag::abc), engine(), const_cast<void*>(a.raw()));
  memory bm(memory::desc({batch, K, N}, dt::f32, trans_b ? tag::acb : tag::abc), engine(), const_cast<void*>(b.raw()));
  memory cm(memory::desc({batch, M, N}, dt::f32, tag::abc), engine(), y.raw());
  execute(prim.first, prim.second, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
  return y;
}

// ---- compute dtypes -------------------------------------------------------------------------------

// The CPU's part of check_compute_dtype (device.cpp). bfloat16 is offered where oneDNN has native
// bfloat16 kernels (AVX512-BF16 or AMX): on an older AVX-512 CPU it would emulate them, slower than
// float32, which defeats the purpose. oneDNN 2.6 has no float16 convolutions or matmuls for the CPU.
void check_cpu_compute_dtype(DType t) {
  if (t == DType::F32) return;
  if (t == DType::F16)
    throw Error("float16 is not offered on the CPU (oneDNN 2.6 has no float16 kernels for it): use bfloat16 "
                "on a CPU with AVX512-BF16 or AMX, or float32");
  if (t != DType::BF16) throw Error(std::string("the CPU cannot compute in ") + dtype_name(t));
  const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  const auto need = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_bf16);  // AMX's mask includes it
  if ((isa & need) != need) {
    const char* have = isa == static_cast<unsigned>(dnnl::cpu_isa::avx512_core_vnni) ? "avx512_core_vnni"
                       : isa == static_cast<unsigned>(dnnl::cpu_isa::avx512_core)    ? "avx512_core"
                       : isa == static_cast<unsigned>(dnnl::cpu_isa::avx2_vnni)      ? "avx2_vnni"
                       : isa == static_cast<unsigned>(dnnl::cpu_isa::avx2)           ? "avx2"
                                                                                     : "an older instruction set";
    throw Error(std::string("bfloat16 on the CPU needs AVX512-BF16 or AMX; oneDNN finds ") + have +
                " here (or DNNL_MAX_CPU_ISA limits it)");
  }
}

// ---- threads -------------------------------------------------------------------------------------

void set_num_threads(int n) {
  if (n <= 0) n = omp_get_num_procs();
  omp_set_num_threads(n);
}

int num_threads() { return omp_get_max_threads(); }

}  // namespace vf
