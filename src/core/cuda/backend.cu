// The CUDA backend: device memory, copies, cuDNN convolutions, cuBLAS products, and the kernels of
// kernels.h behind the DeviceBackend interface.
//
// Exact float32: cuDNN convolutions run with CUDNN_FMA_MATH (no tensor-core TF32) on the algorithms
// that compute the direct sum (implicit GEMM, GEMM, direct; never FFT or Winograd), and cuBLAS in its
// default float32 math (no TF32; NVIDIA_TF32_OVERRIDE=0 is set before the libraries start).
//
// Every op of one GPU is enqueued on one stream, so memory handed back to the pool may be handed out
// again at once: whatever reads it next is ordered after whatever used it before. Copies to the
// host wait for the stream.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "core/backend.h"
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"
#include "core/errors.h"
#include "core/limits.h"

namespace vf {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t e, const char* what) {
  if (e != CUBLAS_STATUS_SUCCESS) throw Error(std::string("cuBLAS: ") + what + ": status " + std::to_string(int(e)));
}
void check(cudnnStatus_t e, const char* what) {
  if (e != CUDNN_STATUS_SUCCESS) throw Error(std::string("cuDNN: ") + what + ": " + cudnnGetErrorString(e));
}
// After a kernel launch: a bad configuration shows here, a fault at the next synchronisation.
void launched(const char* what) { check(cudaGetLastError(), what); }

const float* cf(const Tensor& t) { return static_cast<const float*>(t.raw()); }
float* mf(Tensor& t) { return static_cast<float*>(t.raw()); }

void require_f32(const Tensor& x, const char* op) {
  if (!x.defined()) throw Error(std::string(op) + ": undefined tensor");
  if (x.dtype() != DType::F32) throw Error(std::string(op) + ": expected float32, got " + dtype_name(x.dtype()));
}

// ---- memory pool ---------------------------------------------------------------------------------
// Size-bucketed like the host pool (tensor.cpp): a forward pass allocates the same sizes again and
// again, so after the first image cudaMalloc is never called.
class Pool {
 public:
  explicit Pool(int device) : device_(device) {}
  void* get(size_t& bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first / 2 <= bytes) {
        void* p = it->second;
        bytes = it->first;
        free_.erase(it);
        cached_ -= bytes;
        return p;
      }
    }
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {  // give the cache back and try once more
      cudaGetLastError();
      release();
      e = cudaMalloc(&p, bytes);
    }
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw Error("CUDA: out of GPU memory allocating " + std::to_string(bytes) + " bytes on cuda:" +
                  std::to_string(device_));
    }
    return p;
  }
  void put(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace(bytes, p);
    cached_ += bytes;
  }
  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    cudaDeviceSynchronize();
    for (auto& [n, p] : free_) cudaFree(p);
    free_.clear();
    cached_ = 0;
  }

 private:
  int device_;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

__global__ void head_pointers(const float** out, const float* base, int64_t B, int64_t H, int64_t batch_stride,
                              int64_t head_stride) {
  VF_GRID_STRIDE(i, B * H) out[i] = base + (i / H) * batch_stride + (i % H) * head_stride;
}

class CudaBackend;

// ---- Conv2d: cuDNN on NHWC, weights as [out, kh, kw, in/groups] ----------------------------------
class CudaConv final : public DeviceLayer {
 public:
  CudaConv(CudaBackend& be, const Tensor& weight, const Tensor& bias, const Conv2dOptions& opt);
  ~CudaConv() override;
  Tensor forward(const Tensor& x, const Tensor* residual) const override;

 private:
  struct Plan {
    cudnnTensorDescriptor_t x = nullptr, y = nullptr;
    cudnnConvolutionDescriptor_t conv = nullptr;
    cudnnConvolutionFwdAlgo_t algo{};
    size_t workspace = 0;
    int64_t oh = 0, ow = 0;
    int pt = 0, pl = 0, pb = 0, pr = 0;
    bool explicit_pad = false;  // cuDNN pads symmetrically only: pad the input first
  };
  Plan& plan_for(const Tensor& x) const;

  CudaBackend& be_;
  Tensor weight_, bias_;
  Conv2dOptions opt_;
  int64_t out_, in_, kh_, kw_;
  cudnnFilterDescriptor_t filter_ = nullptr;
  mutable std::mutex mu_;
  mutable std::map<std::tuple<int64_t, int64_t, int64_t>, Plan> plans_;
};

// ---- Linear: y = act(x W^T + b) + residual, the product on cuBLAS ---------------------------------
class CudaLinear final : public DeviceLayer {
 public:
  CudaLinear(CudaBackend& be, const Tensor& weight, const Tensor& bias, Act act);
  Tensor forward(const Tensor& x, const Tensor* residual) const override;

 private:
  CudaBackend& be_;
  Tensor weight_, bias_;
  Act act_;
  int64_t out_, in_;
};

class CudaBackend final : public DeviceBackend {
 public:
  explicit CudaBackend(int index) : index_(index), pool_(index) {
    // Exact float32 everywhere: no TF32 in cuBLAS or cuDNN, whatever the environment says.
    ::setenv("NVIDIA_TF32_OVERRIDE", "0", 1);
    check(cudaSetDevice(index_), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cublasCreate(&cublas_), "cublasCreate");
    check(cublasSetStream(cublas_, stream_), "cublasSetStream");
    check(cublasSetMathMode(cublas_, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode");
    check(cudnnCreate(&cudnn_), "cudnnCreate");
    check(cudnnSetStream(cudnn_, stream_), "cudnnSetStream");
  }

  Device device() const { return Device::cuda(index_); }
  cudaStream_t stream() const { return stream_; }
  cudnnHandle_t cudnn() const { return cudnn_; }
  void activate() const { check(cudaSetDevice(index_), "cudaSetDevice"); }
  Tensor empty(Shape s, DType t = DType::F32) { return Tensor::empty(std::move(s), t, device()); }
  // An input of an op on this device: device tensors as they are, host ones copied (once, for
  // parameters: Tensor::on).
  Tensor here(const Tensor& t) const {
    if (!t.defined() || t.device() == device()) return t;
    if (!t.is_cpu()) throw Error("an op on " + device().str() + " got a tensor on " + t.device().str());
    return t.on(device());
  }

  // ---- memory ----
  std::shared_ptr<void> allocate(size_t bytes) override {
    activate();
    void* p = pool_.get(bytes);
    return std::shared_ptr<void>(p, [this, bytes](void* q) { pool_.put(q, bytes); });
  }
  void copy_to_device(void* dst, const void* src, size_t n) override {
    check(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream_), "copy to the GPU");
  }
  void copy_to_host(void* dst, const void* src, size_t n) override {
    check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, stream_), "copy to the host");
    synchronize();
  }
  void copy_on_device(void* dst, const void* src, size_t n) override {
    check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, stream_), "copy on the GPU");
  }
  void fill(Tensor& x, float value) override {
    if (x.dtype() == DType::F32 && value != 0.0f) {
      cuda::fill(mf(x), value, x.numel(), stream_);
      launched("fill");
    } else {
      check(cudaMemsetAsync(x.raw(), 0, x.nbytes(), stream_), "memset");
    }
  }
  Tensor convert(const Tensor& x, DType to) override {
    if (to == DType::F16 || to == DType::BF16)
      throw Error(std::string("conversion to ") + dtype_name(to) + " is not supported");
    Tensor y = empty(x.shape(), to);
    cuda::convert(y.raw(), int(to), x.raw(), int(x.dtype()), x.numel(), stream_);
    launched("convert");
    return y;
  }
  void synchronize() override { check(cudaStreamSynchronize(stream_), "the GPU's work"); }

  // ---- weighted layers ----
  std::shared_ptr<DeviceLayer> make_conv2d(const Tensor& weight, const Tensor& bias, const Conv2dOptions& opt) override {
    return std::make_shared<CudaConv>(*this, weight, bias, opt);
  }
  std::shared_ptr<DeviceLayer> make_linear(const Tensor& weight, const Tensor& bias, Act act) override {
    return std::make_shared<CudaLinear>(*this, weight, bias, act);
  }

  // Row-major C[M, N] = alpha * A[M, K] * op(B) for `batch` matrices at the given strides; op(B) is
  // B[K, N] (ldb >= N) or, with trans_b, B[N, K] (ldb >= K). cuBLAS is column-major: it computes
  // C^T = op(B)^T A^T.
  void gemm(bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t lda, int64_t sa,
            const float* b, int64_t ldb, int64_t sb, float beta, float* c, int64_t ldc, int64_t sc,
            int64_t batch) const {
    if (M == 0 || N == 0 || batch == 0) return;
    check(cublasSgemmStridedBatched(cublas_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, int(N), int(M), int(K),
                                    &alpha, b, int(ldb), sb, a, int(lda), sa, &beta, c, int(ldc), sc, int(batch)),
          "sgemm");
  }

  // ---- ops ----
  void act_inplace(Tensor& x, Act a) override {
    require_f32(x, "act");
    cuda::act_inplace(mf(x), x.numel(), a, stream_);
    launched("act");
  }

  Tensor matmul(const Tensor& a0, const Tensor& b0, bool trans_b, float alpha) override {
    Tensor a = here(a0), b = here(b0);
    require_f32(a, "matmul");
    require_f32(b, "matmul");
    if (a.dim() < 2 || a.dim() != b.dim())
      throw Error("matmul: shapes " + shape_str(a.shape()) + " and " + shape_str(b.shape()));
    int64_t M = a.size(-2), K = a.size(-1);
    int64_t N = trans_b ? b.size(-2) : b.size(-1);
    int64_t Kb = trans_b ? b.size(-1) : b.size(-2);
    if (K != Kb) throw Error("matmul: inner dims differ: " + shape_str(a.shape()) + " x " + shape_str(b.shape()));
    int64_t batch = 1;
    Shape out_shape;
    for (int64_t i = 0; i + 2 < a.dim(); ++i) {
      if (a.size(i) != b.size(i)) throw Error("matmul: batch dims differ");
      batch *= a.size(i);
      out_shape.push_back(a.size(i));
    }
    out_shape.push_back(M);
    out_shape.push_back(N);
    Tensor y = empty(out_shape);
    if (y.numel() == 0) return y;
    if (K == 0) {
      fill(y, 0.0f);
      return y;
    }
    gemm(trans_b, M, N, K, alpha, cf(a), K, M * K, cf(b), trans_b ? K : N, K * N, 0.0f, mf(y), N, M * N, batch);
    return y;
  }

  Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps) override {
    require_f32(x, "layer_norm");
    int64_t c = x.size(-1), rows = x.numel() / std::max<int64_t>(c, 1);
    if (weight.numel() != c || bias.numel() != c)
      throw Error("layer_norm: weight/bias do not match " + shape_str(x.shape()));
    Tensor w = here(weight), b = here(bias), y = empty(x.shape());
    cuda::layer_norm(mf(y), cf(x), cf(w), cf(b), rows, c, eps, stream_);
    launched("layer_norm");
    return y;
  }

  Tensor group_norm_nhwc(const Tensor& x, int groups, const Tensor& weight, const Tensor& bias, float eps,
                         Act a) override {
    require_f32(x, "group_norm");
    if (x.dim() != 4 || groups <= 0 || x.size(3) % groups != 0)
      throw Error("group_norm: " + std::to_string(groups) + " groups for " + shape_str(x.shape()));
    if (weight.numel() != x.size(3) || bias.numel() != x.size(3))
      throw Error("group_norm: weight/bias do not match " + shape_str(x.shape()));
    Tensor w = here(weight), b = here(bias), y = empty(x.shape());
    cuda::group_norm_nhwc(mf(y), cf(x), x.size(0), x.size(1) * x.size(2), x.size(3), groups, cf(w), cf(b), eps, a,
                          stream_);
    launched("group_norm");
    return y;
  }

  Tensor channel_affine(const Tensor& x, const Tensor& scale, const Tensor& shift, Act a) override {
    require_f32(x, "channel_affine");
    int64_t c = x.size(-1), rows = x.numel() / std::max<int64_t>(c, 1);
    if (scale.numel() != c || (shift.defined() && shift.numel() != c))
      throw Error("channel_affine: scale/shift do not match " + shape_str(x.shape()));
    Tensor s = here(scale), t = here(shift), y = empty(x.shape());
    cuda::channel_affine(mf(y), cf(x), cf(s), t.defined() ? cf(t) : nullptr, rows, c, a, stream_);
    launched("channel_affine");
    return y;
  }

  Tensor grn_nhwc(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps) override {
    require_f32(x, "grn");
    if (x.dim() != 4 || gamma.numel() != x.size(3) || beta.numel() != x.size(3))
      throw Error("grn: gamma/beta do not match " + shape_str(x.shape()));
    Tensor g = here(gamma), b = here(beta), y = empty(x.shape());
    cuda::grn_nhwc(mf(y), cf(x), x.size(0), x.size(1) * x.size(2), x.size(3), cf(g), cf(b), eps, stream_);
    launched("grn");
    return y;
  }

  void softmax_lastdim_inplace(Tensor& x) override {
    require_f32(x, "softmax");
    int64_t c = x.size(-1), rows = x.numel() / std::max<int64_t>(c, 1);
    cuda::softmax_rows(mf(x), rows, c, stream_);
    launched("softmax");
  }

  Tensor max_pool2d_nhwc(const Tensor& x, int k, int s, int pt, int pl, int pb, int pr, bool ceil_mode) override {
    require_f32(x, "max_pool2d");
    int64_t n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
    auto out_size = [&](int64_t in, int lo, int hi) {
      int64_t span = in + lo + hi - k;
      int64_t o = (ceil_mode ? (span + s - 1) / s : span / s) + 1;
      // torch: with ceil_mode the last window must start inside the input or the left padding.
      if (ceil_mode && (o - 1) * s >= in + lo) --o;
      return o;
    };
    int64_t oh = out_size(h, pt, pb), ow = out_size(w, pl, pr);
    if (oh <= 0 || ow <= 0) throw Error("max_pool2d: input " + shape_str(x.shape()) + " is smaller than the window");
    Tensor y = empty({n, oh, ow, c});
    cuda::max_pool2d_nhwc(mf(y), cf(x), n, h, w, c, oh, ow, k, s, pt, pl, stream_);
    launched("max_pool2d");
    return y;
  }

  Tensor avg_pool2d_nhwc(const Tensor& x, int k, int s, int pad, bool count_include_pad) override {
    require_f32(x, "avg_pool2d");
    int64_t n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
    int64_t oh = (h + 2 * pad - k) / s + 1, ow = (w + 2 * pad - k) / s + 1;
    if (oh <= 0 || ow <= 0) throw Error("avg_pool2d: input " + shape_str(x.shape()) + " is smaller than the window");
    Tensor y = empty({n, oh, ow, c});
    cuda::avg_pool2d_nhwc(mf(y), cf(x), n, h, w, c, oh, ow, k, s, pad, count_include_pad, stream_);
    launched("avg_pool2d");
    return y;
  }

  Tensor global_avg_pool_nhwc(const Tensor& x) override {
    require_f32(x, "global_avg_pool");
    int64_t n = x.size(0), hw = x.size(1) * x.size(2), c = x.size(3);
    Tensor y = empty({n, c});
    cuda::global_avg_pool_nhwc(mf(y), cf(x), n, hw, c, stream_);
    launched("global_avg_pool");
    return y;
  }

  Tensor permute(const Tensor& x, const std::vector<int>& perm) override {
    int64_t d = x.dim();
    if (static_cast<int64_t>(perm.size()) != d) throw Error("permute: wrong number of dims");
    if (d > cuda::kMaxDims) throw Error("permute: more than 8 dims");
    Shape out_shape(d);
    std::vector<int64_t> in_strides(d, 1), src_stride(d);
    for (int64_t i = d - 2; i >= 0; --i) in_strides[i] = in_strides[i + 1] * x.size(i + 1);
    for (int64_t i = 0; i < d; ++i) {
      out_shape[i] = x.size(perm[i]);
      src_stride[i] = in_strides[perm[i]];
    }
    Tensor y = empty(out_shape, x.dtype());
    if (y.numel() == 0) return y;
    cuda::permute(y.raw(), x.raw(), out_shape.data(), src_stride.data(), int(d), y.numel(),
                  int(dtype_size(x.dtype())), stream_);
    launched("permute");
    return y;
  }

  Tensor pad_nhwc(const Tensor& x, int top, int left, int bottom, int right, float value) override {
    require_f32(x, "pad");
    int64_t n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
    Tensor y = empty({n, h + top + bottom, w + left + right, c});
    cuda::pad_nhwc(mf(y), cf(x), n, h, w, c, top, left, bottom, right, value, stream_);
    launched("pad");
    return y;
  }

  Tensor window_partition(const Tensor& x, int64_t window, int64_t shift) override {
    require_f32(x, "window_partition");
    if (x.dim() != 4) throw Error("window_partition: x must be [B, H, W, C], got " + shape_str(x.shape()));
    const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
    if (window <= 0 || H % window != 0 || W % window != 0 || shift < 0 || shift >= window)
      throw Error("window_partition: the map is not a grid of windows");
    Tensor y = empty({B * (H / window) * (W / window), window * window, C});
    cuda::window_partition(mf(y), cf(x), B, H, W, C, window, shift, stream_);
    launched("window_partition");
    return y;
  }

  Tensor window_reverse(const Tensor& windows, int64_t window, int64_t H, int64_t W, int64_t shift, int64_t out_h,
                        int64_t out_w) override {
    require_f32(windows, "window_reverse");
    if (window <= 0 || H % window != 0 || W % window != 0 || shift < 0 || shift >= window)
      throw Error("window_reverse: the map is not a grid of windows");
    const int64_t nh = H / window, nw = W / window;
    if (windows.dim() != 3 || windows.size(1) != window * window || windows.size(0) % (nh * nw) != 0)
      throw Error("window_reverse: windows " + shape_str(windows.shape()) + " do not tile the map");
    if (out_h < 0 || out_h > H || out_w < 0 || out_w > W) throw Error("window_reverse: crop larger than the map");
    const int64_t B = windows.size(0) / (nh * nw), C = windows.size(2);
    Tensor y = empty({B, out_h, out_w, C});
    cuda::window_reverse(mf(y), cf(windows), B, H, W, C, window, shift, out_h, out_w, stream_);
    launched("window_reverse");
    return y;
  }

  Tensor cat(const std::vector<Tensor>& xs0, int64_t dim) override {
    std::vector<Tensor> xs;
    for (auto& t : xs0) xs.push_back(here(t));
    int64_t d = xs[0].dim();
    if (dim < 0) dim += d;
    Shape out_shape = xs[0].shape();
    out_shape[dim] = 0;
    for (auto& t : xs) {
      if (t.dim() != d || t.dtype() != xs[0].dtype()) throw Error("cat: mismatched tensors");
      for (int64_t i = 0; i < d; ++i)
        if (i != dim && t.size(i) != xs[0].size(i))
          throw Error("cat: shapes " + shape_str(t.shape()) + " and " + shape_str(xs[0].shape()));
      out_shape[dim] += t.size(dim);
    }
    Tensor y = empty(out_shape, xs[0].dtype());
    size_t es = dtype_size(y.dtype());
    int64_t outer = 1, inner = 1;
    for (int64_t i = 0; i < dim; ++i) outer *= out_shape[i];
    for (int64_t i = dim + 1; i < d; ++i) inner *= out_shape[i];
    const size_t row = out_shape[dim] * inner * es;
    size_t offset = 0;
    for (auto& t : xs) {
      const size_t chunk = t.size(dim) * inner * es;
      if (chunk && outer)
        check(cudaMemcpy2DAsync(static_cast<char*>(y.raw()) + offset, row, t.raw(), chunk, chunk, outer,
                                cudaMemcpyDeviceToDevice, stream_),
              "cat");
      offset += chunk;
    }
    return y;
  }

  Tensor narrow(const Tensor& x, int64_t dim, int64_t begin, int64_t length) override {
    int64_t d = x.dim();
    if (dim < 0) dim += d;
    if (begin < 0 || length < 0 || begin + length > x.size(dim)) throw Error("narrow: out of range");
    Shape out_shape = x.shape();
    out_shape[dim] = length;
    Tensor y = empty(out_shape, x.dtype());
    size_t es = dtype_size(x.dtype());
    int64_t outer = 1, inner = 1;
    for (int64_t i = 0; i < dim; ++i) outer *= x.size(i);
    for (int64_t i = dim + 1; i < d; ++i) inner *= x.size(i);
    const size_t width = length * inner * es;
    if (width && outer)
      check(cudaMemcpy2DAsync(y.raw(), width, static_cast<const char*>(x.raw()) + begin * inner * es,
                              x.size(dim) * inner * es, width, outer, cudaMemcpyDeviceToDevice, stream_),
            "narrow");
    return y;
  }

  Tensor binary(BinaryOp op, const Tensor& a0, const Tensor& b0) override {
    Tensor a = here(a0), b = here(b0);
    const char* name = op == BinaryOp::Add ? "add" : op == BinaryOp::Sub ? "sub" : op == BinaryOp::Mul ? "mul" : "div";
    require_f32(a, name);
    require_f32(b, name);
    int64_t d = std::max(a.dim(), b.dim());
    if (d > cuda::kMaxDims) throw Error(std::string(name) + ": more than 8 dims");
    Shape out(std::max<int64_t>(d, 1), 1);
    std::vector<int64_t> sa(out.size(), 0), sb(out.size(), 0);
    int64_t stra = 1, strb = 1;
    for (int64_t i = d - 1; i >= 0; --i) {
      int64_t ia = i - (d - a.dim()), ib = i - (d - b.dim());
      int64_t da = ia >= 0 ? a.size(ia) : 1, db = ib >= 0 ? b.size(ib) : 1;
      if (da != db && da != 1 && db != 1)
        throw Error(std::string(name) + ": cannot broadcast " + shape_str(a.shape()) + " with " + shape_str(b.shape()));
      out[i] = std::max(da, db);
      sa[i] = da == 1 ? 0 : stra;
      sb[i] = db == 1 ? 0 : strb;
      stra *= da;
      strb *= db;
    }
    Tensor y = empty(d == 0 ? Shape{} : out);
    cuda::binary(int(op), mf(y), cf(a), cf(b), out.data(), sa.data(), sb.data(), int(out.size()), y.numel(), stream_);
    launched(name);
    return y;
  }

  void add_inplace(Tensor& a, const Tensor& b0) override {
    Tensor b = here(b0);
    require_f32(a, "add_inplace");
    require_f32(b, "add_inplace");
    if (a.numel() != b.numel()) throw Error("add_inplace: " + shape_str(a.shape()) + " += " + shape_str(b.shape()));
    cuda::add_inplace(mf(a), cf(b), a.numel(), stream_);
    launched("add_inplace");
  }

  Tensor scale(const Tensor& x, float s) override {
    require_f32(x, "scale");
    Tensor y = empty(x.shape());
    cuda::scale(mf(y), cf(x), s, x.numel(), stream_);
    launched("scale");
    return y;
  }

  Tensor mul_lastdim(const Tensor& x, const Tensor& gamma) override {
    require_f32(x, "mul_lastdim");
    int64_t c = x.size(-1), rows = x.numel() / std::max<int64_t>(c, 1);
    if (gamma.numel() != c) throw Error("mul_lastdim: " + shape_str(gamma.shape()) + " for " + shape_str(x.shape()));
    Tensor g = here(gamma), y = empty(x.shape());
    cuda::channel_affine(mf(y), cf(x), cf(g), nullptr, rows, c, Act::None, stream_);
    launched("mul_lastdim");
    return y;
  }

  Tensor interpolate(const Tensor& x, int64_t oh, int64_t ow, Interp mode) override {
    require_f32(x, "interpolate");
    if (x.dim() != 4) throw Error("interpolate expects NCHW");
    Tensor y = empty({x.size(0), x.size(1), oh, ow});
    cuda::interpolate(mf(y), cf(x), x.size(0) * x.size(1), x.size(2), x.size(3), oh, ow, int(mode), stream_);
    launched("interpolate");
    return y;
  }

  // softmax(scale * Q K^T + biases) V per (batch, head), the products as batched cuBLAS calls over
  // pointer arrays (Q, K and V keep their [B, L, heads * d] layout; a head is a column block).
  Tensor multi_head_attention(const Tensor& q0, const Tensor& k0, const Tensor& v0, int64_t H,
                              const AttentionOptions& opt) override {
    Tensor q = here(q0), k = here(k0), v = here(v0);
    const int64_t B = q.size(0), Lq = q.size(1), Lk = k.size(1);
    const int64_t dk = q.size(2) / H, dv = v.size(2) / H;
    Tensor head_mask, bias, batch_bias;
    if (opt.head_mask.defined()) {
      if (opt.head_mask.dtype() != DType::F32 || opt.head_mask.numel() != H)
        throw Error("attention: head_mask must hold one float per head (" + std::to_string(H) + ")");
      head_mask = here(opt.head_mask);
    }
    if (opt.bias.defined()) {
      if (opt.bias.dtype() != DType::F32 || opt.bias.shape() != Shape{H, Lq, Lk})
        throw Error("attention: bias must be float32 " + shape_str({H, Lq, Lk}) + ", got " + shape_str(opt.bias.shape()));
      bias = here(opt.bias);
    }
    if (opt.batch_bias.defined()) {
      const Tensor& bb = opt.batch_bias;
      if (bb.dtype() != DType::F32 || bb.dim() != 3 || bb.size(0) == 0 || bb.size(1) != Lq || bb.size(2) != Lk)
        throw Error("attention: batch_bias must be float32 [M, " + std::to_string(Lq) + ", " + std::to_string(Lk) + "]");
      batch_bias = here(bb);
    }
    const double score_bytes = double(B) * double(H) * double(Lq) * double(Lk) * sizeof(float);
    if (score_bytes > double(max_forward_bytes()))
      throw InputError("attention over " + std::to_string(Lq) + " x " + std::to_string(Lk) + " tokens needs " +
                       std::to_string(uint64_t(score_bytes)) + " bytes of scores, more than the limit of " +
                       std::to_string(max_forward_bytes()) + " (VF_MAX_FORWARD_BYTES)");
    Tensor out = empty({B, Lq, H * dv});
    if (B == 0 || Lq == 0) {
      if (opt.probs) *opt.probs = Tensor::zeros({B, H, Lq, Lk}, DType::F32, device());
      return out;
    }
    if (Lk == 0) throw Error("attention: no keys to attend to");
    Tensor scores = empty({B, H, Lq, Lk});
    const int64_t n = B * H;
    Tensor ptrs = empty({3 * n}, DType::I64);  // pointer arrays: Q (then P), K (then V), scores (then out)
    auto* pa = static_cast<const float**>(ptrs.raw());
    const float** pb = pa + n;
    const float** pc = pa + 2 * n;
    const float alpha = opt.scale, zero = 0.0f, one = 1.0f;
    auto pointers = [&](const float** dst, const float* base, int64_t batch_stride, int64_t head_stride) {
      head_pointers<<<cuda::grid_for(n), cuda::kThreads, 0, stream_>>>(dst, base, B, H, batch_stride, head_stride);
      launched("attention pointers");
    };
    // scores[b, h] (row-major [Lq, Lk]) = column-major [Lk, Lq] = K_h (T) x Q_h.
    pointers(pa, cf(k), Lk * k.size(2), dk);
    pointers(pb, cf(q), Lq * q.size(2), dk);
    pointers(pc, cf(scores), H * Lq * Lk, Lq * Lk);
    check(cublasSgemmBatched(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, int(Lk), int(Lq), int(dk), &alpha, pa,
                             int(k.size(2)), pb, int(q.size(2)), &zero, const_cast<float**>(pc), int(Lk), int(n)),
          "attention scores");
    cuda::attention_softmax(mf(scores), B, H, Lq, Lk, opt.scale, bias.defined() ? cf(bias) : nullptr,
                            batch_bias.defined() ? cf(batch_bias) : nullptr,
                            batch_bias.defined() ? batch_bias.size(0) : 1,
                            head_mask.defined() ? cf(head_mask) : nullptr, stream_);
    launched("attention softmax");
    // out[b, :, h] (row-major [Lq, dv], ld H*dv) = column-major [dv, Lq] = V_h x P_h.
    pointers(pa, cf(v), Lk * v.size(2), dv);
    pointers(pb, cf(scores), H * Lq * Lk, Lq * Lk);
    pointers(pc, cf(out), Lq * H * dv, dv);
    check(cublasSgemmBatched(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, int(dv), int(Lq), int(Lk), &one, pa, int(v.size(2)),
                             pb, int(Lk), &zero, const_cast<float**>(pc), int(H * dv), int(n)),
          "attention context");
    if (opt.probs) *opt.probs = scores;
    return out;
  }

  Tensor ms_deform_attn(const Tensor& value0, const std::vector<DeformLevel>& levels, const Tensor& loc0,
                        const Tensor& weights0) override {
    Tensor value = here(value0), loc = here(loc0), weights = here(weights0);
    const int64_t B = value.size(0), S = value.size(1), NH = value.size(2), D = value.size(3);
    const int64_t L = static_cast<int64_t>(levels.size()), Q = loc.size(1), P = loc.size(4);
    std::vector<int64_t> hws;
    for (auto& l : levels) hws.insert(hws.end(), {l.height, l.width, l.start});
    Tensor level_table = Tensor::from_vector<int64_t>({3 * L}, hws).to(device());
    Tensor out = empty({B, Q, NH * D});
    cuda::ms_deform_attn(mf(out), cf(value), static_cast<const int64_t*>(level_table.raw()), cf(loc), cf(weights), B,
                         S, NH, D, L, Q, P, stream_);
    launched("ms_deform_attn");
    return out;
  }

 private:
  int index_;
  Pool pool_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cudnnHandle_t cudnn_ = nullptr;
};

// ---- CudaConv ------------------------------------------------------------------------------------

CudaConv::CudaConv(CudaBackend& be, const Tensor& weight, const Tensor& bias, const Conv2dOptions& opt)
    : be_(be), opt_(opt) {
  out_ = weight.size(0);
  in_ = weight.size(1) * opt.groups;
  kh_ = weight.size(2);
  kw_ = weight.size(3);
  // [out, in/g, kh, kw] -> [out, kh, kw, in/g]: cuDNN's NHWC filter layout.
  weight_ = vf::permute(weight.to(DType::F32).cpu(), {0, 2, 3, 1}).to(be.device());
  bias_ = bias.to(be.device());
  check(cudnnCreateFilterDescriptor(&filter_), "filter descriptor");
  check(cudnnSetFilter4dDescriptor(filter_, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NHWC, int(out_), int(in_ / opt.groups),
                                   int(kh_), int(kw_)),
        "filter descriptor");
}

CudaConv::~CudaConv() {
  for (auto& [k, p] : plans_) {
    cudnnDestroyTensorDescriptor(p.x);
    cudnnDestroyTensorDescriptor(p.y);
    cudnnDestroyConvolutionDescriptor(p.conv);
  }
  if (filter_) cudnnDestroyFilterDescriptor(filter_);
}

CudaConv::Plan& CudaConv::plan_for(const Tensor& x) const {
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2);
  std::lock_guard<std::mutex> lock(mu_);
  auto key = std::make_tuple(n, h, w);
  if (auto it = plans_.find(key); it != plans_.end()) return it->second;

  Plan p;
  p.pt = opt_.pad_top, p.pl = opt_.pad_left, p.pb = opt_.pad_bottom, p.pr = opt_.pad_right;
  if (opt_.dynamic_same) {
    auto same = [](int64_t size, int64_t k, int s, int d, int& lo, int& hi) {
      int64_t outn = (size + s - 1) / s;
      int64_t pad = std::max<int64_t>((outn - 1) * s + (k - 1) * d + 1 - size, 0);
      lo = static_cast<int>(pad / 2);
      hi = static_cast<int>(pad - pad / 2);
    };
    same(h, kh_, opt_.stride_h, opt_.dilation_h, p.pt, p.pb);
    same(w, kw_, opt_.stride_w, opt_.dilation_w, p.pl, p.pr);
  }
  int64_t ekh = (kh_ - 1) * opt_.dilation_h + 1, ekw = (kw_ - 1) * opt_.dilation_w + 1;
  p.oh = (h + p.pt + p.pb - ekh) / opt_.stride_h + 1;
  p.ow = (w + p.pl + p.pr - ekw) / opt_.stride_w + 1;
  if (p.oh <= 0 || p.ow <= 0)
    throw Error("conv2d: input " + std::to_string(h) + "x" + std::to_string(w) + " is smaller than the kernel");
  p.explicit_pad = p.pt != p.pb || p.pl != p.pr;
  const int64_t ih = p.explicit_pad ? h + p.pt + p.pb : h, iw = p.explicit_pad ? w + p.pl + p.pr : w;
  const int ph = p.explicit_pad ? 0 : p.pt, pw = p.explicit_pad ? 0 : p.pl;

  check(cudnnCreateTensorDescriptor(&p.x), "tensor descriptor");
  check(cudnnCreateTensorDescriptor(&p.y), "tensor descriptor");
  check(cudnnCreateConvolutionDescriptor(&p.conv), "convolution descriptor");
  check(cudnnSetTensor4dDescriptor(p.x, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, int(n), int(in_), int(ih), int(iw)),
        "input descriptor");
  check(cudnnSetTensor4dDescriptor(p.y, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, int(n), int(out_), int(p.oh), int(p.ow)),
        "output descriptor");
  check(cudnnSetConvolution2dDescriptor(p.conv, ph, pw, opt_.stride_h, opt_.stride_w, opt_.dilation_h,
                                        opt_.dilation_w, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT),
        "convolution descriptor");
  check(cudnnSetConvolutionGroupCount(p.conv, opt_.groups), "group count");
  check(cudnnSetConvolutionMathType(p.conv, CUDNN_FMA_MATH), "math type");

  // The fastest exact algorithm, timed by cuDNN on this shape with scratch buffers.
  Tensor xs = be_.empty({n, ih, iw, in_}), ys = be_.empty({n, p.oh, p.ow, out_});
  cudaMemsetAsync(xs.raw(), 0, xs.nbytes(), be_.stream());
  constexpr size_t kMaxWorkspace = size_t(512) << 20;
  Tensor ws = be_.empty({int64_t(kMaxWorkspace)}, DType::U8);
  cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
  int found = 0;
  check(cudnnFindConvolutionForwardAlgorithmEx(be_.cudnn(), p.x, xs.raw(), filter_, weight_.raw(), p.conv, p.y,
                                               ys.raw(), CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &found, perf, ws.raw(),
                                               kMaxWorkspace),
        "algorithm search");
  bool chosen = false;
  for (int i = 0; i < found && !chosen; ++i) {
    const auto a = perf[i].algo;
    const bool exact = a == CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM ||
                       a == CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM || a == CUDNN_CONVOLUTION_FWD_ALGO_GEMM ||
                       a == CUDNN_CONVOLUTION_FWD_ALGO_DIRECT;
    if (perf[i].status == CUDNN_STATUS_SUCCESS && exact && perf[i].mathType == CUDNN_FMA_MATH &&
        perf[i].memory <= kMaxWorkspace) {
      p.algo = a;
      p.workspace = perf[i].memory;
      chosen = true;
    }
  }
  if (!chosen) {  // implicit GEMM needs no workspace and takes every shape
    p.algo = CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM;
    size_t bytes = 0;
    check(cudnnGetConvolutionForwardWorkspaceSize(be_.cudnn(), p.x, filter_, p.conv, p.y, p.algo, &bytes),
          "workspace size");
    p.workspace = bytes;
  }
  return plans_.emplace(key, p).first->second;
}

Tensor CudaConv::forward(const Tensor& x, const Tensor* residual) const {
  require_f32(x, "conv2d");
  be_.activate();
  Plan& p = plan_for(x);
  const int64_t n = x.size(0);
  Tensor src = p.explicit_pad ? vf::pad_nhwc(x, p.pt, p.pl, p.pb, p.pr, 0.0f) : x;
  Tensor y = be_.empty({n, p.oh, p.ow, out_});
  if (residual && residual->shape() != y.shape())
    throw Error("conv2d residual has shape " + shape_str(residual->shape()));
  Tensor res = residual ? be_.here(*residual) : Tensor();
  Tensor ws = p.workspace ? be_.empty({int64_t(p.workspace)}, DType::U8) : Tensor();
  const float one = 1.0f, zero = 0.0f;
  check(cudnnConvolutionForward(be_.cudnn(), &one, p.x, src.raw(), filter_, weight_.raw(), p.conv, p.algo,
                                ws.defined() ? ws.raw() : nullptr, p.workspace, &zero, p.y, y.raw()),
        "convolution");
  cuda::bias_act(mf(y), cf(bias_), res.defined() ? cf(res) : nullptr, y.numel() / out_, out_, opt_.act, true,
                 be_.stream());
  launched("conv2d epilogue");
  return y;
}

// ---- CudaLinear ----------------------------------------------------------------------------------

CudaLinear::CudaLinear(CudaBackend& be, const Tensor& weight, const Tensor& bias, Act act)
    : be_(be), act_(act), out_(weight.size(0)), in_(weight.size(1)) {
  weight_ = weight.to(DType::F32).to(be.device());
  bias_ = bias.to(be.device());
}

Tensor CudaLinear::forward(const Tensor& x0, const Tensor* residual) const {
  be_.activate();
  Tensor x = be_.here(x0);
  require_f32(x, "linear");
  const int64_t m = x.numel() / in_;
  Shape out_shape = x.shape();
  out_shape.back() = out_;
  if (residual && residual->numel() != m * out_)
    throw Error("linear residual has shape " + shape_str(residual->shape()));
  Tensor y = be_.empty(out_shape);
  if (m == 0) return y;
  Tensor res = residual ? be_.here(*residual) : Tensor();
  // y [m, out] = x [m, in] W^T: W [out, in] row-major is op(B) with trans_b.
  be_.gemm(true, m, out_, in_, 1.0f, cf(x), in_, 0, cf(weight_), in_, 0, 0.0f, mf(y), out_, 0, 1);
  cuda::bias_act(mf(y), cf(bias_), res.defined() ? cf(res) : nullptr, m, out_, act_, false, be_.stream());
  launched("linear epilogue");
  return y;
}

std::mutex& backends_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace

int cuda_device_count() {
  static const int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return n;
  }();
  return count;
}

DeviceBackend& cuda_backend(int index) {
  std::lock_guard<std::mutex> lock(backends_mutex());
  static std::map<int, CudaBackend*> backends;  // never destroyed: device tensors may outlive statics
  auto it = backends.find(index);
  if (it != backends.end()) return *it->second;
  if (index < 0 || index >= cuda_device_count())
    throw Error("cuda:" + std::to_string(index) + ": no such GPU (" + std::to_string(cuda_device_count()) + " visible)");
  return *backends.emplace(index, new CudaBackend(index)).first->second;
}

}  // namespace vf
