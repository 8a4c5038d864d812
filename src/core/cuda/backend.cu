// The CUDA backend: device memory, copies, convolutions (cuDNN, or a patch matrix and one product),
// matrix products (cuBLASLt with fused epilogues), attention (fused, or cuBLAS's batched products
// around the materialised scores, whichever is faster per shape), and the kernels of kernels.h
// behind the DeviceBackend interface.
//
// Exact float32: products run in float32 FMA arithmetic, never TF32 (cuBLAS's default math,
// CUBLAS_COMPUTE_32F in cuBLASLt, NVIDIA_TF32_OVERRIDE=0 set before the libraries start); cuDNN
// convolutions run with CUDNN_FMA_MATH on the algorithms that compute the direct sum (implicit GEMM,
// GEMM, direct; never FFT or Winograd). A KxK convolution is timed both ways at its first input size
// and runs the faster: cuDNN's exact NHWC kernels are slow on most ResNet shapes.
//
// --dtype bfloat16 / float16 (load_compute_dtype() when a layer is built): Conv2d and Linear keep their
// weights in that type and round a float32 input to it; the products run on tensor cores with
// float32 accumulation and write float32, except cuDNN's 16-bit convolutions (16-bit output, widened
// in the epilogue kernel) and Linear::forward_to_layer, whose 16-bit output the next Linear, or
// attention, reads as it is (attention then runs both products in 16 bits). Depthwise convolutions
// stay float32: memory-bound stencils without a product for tensor cores. Every other op reads
// float32.
//
// Every op of one GPU is enqueued on one stream, so memory handed back to the pool may be handed out
// again at once: whatever reads it next is ordered after whatever used it before. Copies to the
// host wait for the stream. A second stream carries upload_beside's copies (the next input while
// the current forward runs), into buffers of their own ordered by events.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "core/backend.h"
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"
#include "core/cuda/lt_matmul.h"
#include "core/cuda/timing.h"
#include "core/errors.h"
#include "core/limits.h"
#include "core/shapes.h"

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
// VF_CUDA_TRACE=1: every op waits for the GPU, and the time since the previous op is added to the
// op's line of a table printed at exit (where a forward's time goes, host work between ops included).
struct OpTrace {
  bool on = [] {
    const char* e = std::getenv("VF_CUDA_TRACE");
    return e && *e && std::string(e) != "0";
  }();
  std::mutex mu;
  std::map<std::string, std::pair<double, long>> ms;
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
  void mark(const char* what) {
    cudaDeviceSynchronize();
    std::lock_guard<std::mutex> lock(mu);
    auto now = std::chrono::steady_clock::now();
    auto& e = ms[what];
    e.first += std::chrono::duration<double, std::milli>(now - last).count();
    e.second += 1;
    last = now;
  }
  ~OpTrace() {
    if (!on) return;
    std::vector<std::pair<double, std::string>> rows;
    double total = 0;
    for (auto& [k, v] : ms) rows.push_back({v.first, k}), total += v.first;
    std::sort(rows.rbegin(), rows.rend());
    std::fprintf(stderr, "VF_CUDA_TRACE: %.1f ms in all\n", total);
    for (auto& [t, k] : rows) std::fprintf(stderr, "  %-24s %9.2f ms %7ld calls\n", k.c_str(), t, ms[k].second);
  }
};
OpTrace& op_trace() {
  static OpTrace t;
  return t;
}

// After a kernel launch: a bad configuration shows here, a fault at the next synchronisation.
void launched(const char* what) {
  check(cudaGetLastError(), what);
  if (op_trace().on) op_trace().mark(what);
}

// VF_CUDA_PLAN_LOG (or VF_CUDA_TRACE): print each choice timed at a first shape (convolution way,
// fused attention) to stderr.
bool log_plans() {
  static const bool on = std::getenv("VF_CUDA_PLAN_LOG") || std::getenv("VF_CUDA_TRACE");
  return on;
}

const float* cf(const Tensor& t) { return static_cast<const float*>(t.raw()); }
float* mf(Tensor& t) { return static_cast<float*>(t.raw()); }

void require_f32(const Tensor& x, const char* op) {
  if (!x.defined()) throw Error(std::string(op) + ": undefined tensor");
  if (x.dtype() != DType::F32) throw Error(std::string(op) + ": expected float32, got " + dtype_name(x.dtype()));
}

// What a backend's tensors hold, for device_memory_stats(): the bytes handed out of its pool, plus all
// that a recorded graph's pool has taken from the GPU (every replay may write any of it).
struct MemoryCounters {
  std::atomic<size_t> in_use{0}, peak{0};
  void add(size_t n) {
    const size_t now = in_use.fetch_add(n) + n;
    size_t p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
  }
  void sub(size_t n) { in_use.fetch_sub(n); }
};

// ---- memory pool ---------------------------------------------------------------------------------
// Size-bucketed like the host pool (tensor.cpp): a forward pass allocates the same sizes again and
// again, so after the first image cudaMalloc is never called.
class Pool {
 public:
  // footprint: counts what this pool takes from the GPU (a graph's pool), else nullptr.
  explicit Pool(int device, std::shared_ptr<MemoryCounters> footprint = nullptr)
      : device_(device), footprint_(std::move(footprint)) {}
  ~Pool() {
    release();
    for (void* p : pinned_) cudaFreeHost(p);
  }
  // A page-locked copy of `n` host bytes that lives as long as this pool (a recorded graph's uploads
  // read from it at every replay).
  void* pin(const void* src, size_t n) {
    void* p = nullptr;
    check(cudaMallocHost(&p, std::max<size_t>(n, 1)), "page-locked staging");
    std::memcpy(p, src, n);
    std::lock_guard<std::mutex> lock(mu_);
    pinned_.push_back(p);
    return p;
  }
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
    if (footprint_) footprint_->add(bytes);
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
    for (auto& [n, p] : free_) {
      cudaFree(p);
      if (footprint_) footprint_->sub(n);
    }
    free_.clear();
    cached_ = 0;
  }

 private:
  int device_;
  std::shared_ptr<MemoryCounters> footprint_;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
  std::vector<void*> pinned_;
};


cudnnDataType_t cudnn_type(DType t) {
  return t == DType::BF16 ? CUDNN_DATA_BFLOAT16 : t == DType::F16 ? CUDNN_DATA_HALF : CUDNN_DATA_FLOAT;
}

class CudaBackend;

// ---- Conv2d: cuDNN on NHWC, weights as [out, kh, kw, in/groups] ----------------------------------
class CudaConv final : public DeviceLayer {
 public:
  CudaConv(CudaBackend& be, const Tensor& weight, const Tensor& bias, const Conv2dOptions& opt, DType compute);
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
    // How this shape runs: cuDNN; or a patch matrix and one product (im2col.cu), made and multiplied
    // `chunk_rows` output pixels at a time (a bounded buffer); or Winograd's F(4x4, 3x3)
    // (winograd.cu), `chunk_tiles` tiles at a time. The fastest at the shape's first use.
    enum class Way { Cudnn, Patches, Winograd } way = Way::Cudnn;
    int64_t chunk_rows = 0, chunk_tiles = 0;
  };
  Plan& plan_for(const Tensor& x) const;
  // y [n*oh*ow, out] (float32) = act(the convolution of the float32 NHWC x + bias + residual), by
  // patches or by Winograd (bias and residual may be null).
  void patch_product(const Plan& p, const float* x, int64_t n, int64_t h, int64_t w, const float* bias,
                     const float* residual, Act act, float* y) const;
  void winograd_product(const Plan& p, const float* x, int64_t n, int64_t h, int64_t w, const float* bias,
                        const float* residual, Act act, float* y) const;
  bool winograd_applies() const;

  CudaBackend& be_;
  Tensor weight_, bias_;  // weight_ in dtype_, but float32 for a depthwise convolution
  Conv2dOptions opt_;
  DType dtype_;  // what the products compute in (float32 accumulation)
  int64_t out_, in_, kh_, kw_;
  const char* groups_name_;  // for VF_CUDA_TRACE
  cudnnFilterDescriptor_t filter_ = nullptr;
  mutable std::mutex mu_;
  mutable std::map<std::tuple<int64_t, int64_t, int64_t>, Plan> plans_;
  // Winograd's transformed weights [36, out, in], held while a plan uses them.
  mutable Tensor winograd_weights_;
};

// ---- Linear: y = act(x W^T + b) + residual, the product on cuBLAS ---------------------------------
class CudaLinear final : public DeviceLayer {
 public:
  CudaLinear(CudaBackend& be, const Tensor& weight, const Tensor& bias, Act act, DType compute);
  Tensor forward(const Tensor& x, const Tensor* residual) const override;
  // 16-bit: the output in dtype_, bias and activation applied, for a next layer that reads it.
  Tensor forward_to_layer(const Tensor& x) const override;
  DType input_dtype() const override { return dtype_; }

 private:
  Tensor input(const Tensor& x0) const;  // x0 on this GPU, in dtype_

  CudaBackend& be_;
  Tensor weight_, bias_;  // weight_ in dtype_
  Act act_;
  DType dtype_;
  int64_t out_, in_;
};

// Buffers of uploads beside the work in flight (CudaBackend::upload_beside): device memory of their
// own (not the pool's, whose blocks are ordered on the compute stream only) and a page-locked host
// copy, reused once the compute stream has passed every reader of their last contents.
struct StagedUpload {
  void* device = nullptr;
  void* host = nullptr;
  size_t bytes = 0;
  cudaEvent_t copied = nullptr;    // on the copy stream, after the upload
  cudaEvent_t released = nullptr;  // on the compute stream, when the tensor was dropped
  bool was_released = false;
  ~StagedUpload() {
    if (copied) cudaEventDestroy(copied);
    if (released) cudaEventDestroy(released);
    if (device) cudaFree(device);
    if (host) cudaFreeHost(host);
  }
};

struct Staging {
  std::mutex mu;
  std::vector<std::shared_ptr<StagedUpload>> free;
  std::map<const void*, std::shared_ptr<StagedUpload>> in_use;  // by device address, for await_upload
  std::vector<std::shared_ptr<StagedUpload>> kept;  // dropped while a graph was recorded: never reused
};

class CudaBackend final : public DeviceBackend {
 public:
  explicit CudaBackend(int index)
      : index_(index), pool_(std::make_shared<Pool>(index)), counters_(std::make_shared<MemoryCounters>()) {
    // Exact float32 everywhere: no TF32 in cuBLAS or cuDNN, whatever the environment says.
    ::setenv("NVIDIA_TF32_OVERRIDE", "0", 1);
    check(cudaSetDevice(index_), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cublasCreate(&cublas_), "cublasCreate");
    check(cublasSetStream(cublas_, stream_), "cublasSetStream");
    check(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    check(cudnnCreate(&cudnn_), "cudnnCreate");
    check(cudnnSetStream(cudnn_, stream_), "cudnnSetStream");
    // cuBLAS's workspace, given once: no allocation inside a product (graph capture needs that).
    check(cudaMalloc(&cublas_workspace_, kCublasWorkspace), "cuBLAS workspace");
    check(cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspace), "cublasSetWorkspace");
    lt_ = std::make_unique<cuda::LtMatmul>(stream_, cublas_workspace_, kCublasWorkspace);
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
    // While a graph is recorded its memory comes from, and goes back to, the graph's own pool.
    std::shared_ptr<Pool> pool = capture_pool_ ? capture_pool_ : pool_;
    void* p = pool->get(bytes);
    // A graph's pool is counted whole as it grows (MemoryCounters), not per tensor.
    if (capture_pool_) return std::shared_ptr<void>(p, [pool, bytes](void* q) { pool->put(q, bytes); });
    counters_->add(bytes);
    return std::shared_ptr<void>(p, [pool, bytes, c = counters_](void* q) {
      c->sub(bytes);
      pool->put(q, bytes);
    });
  }
  DeviceMemoryStats memory_stats(bool reset_peak) override {
    if (reset_peak) counters_->peak = counters_->in_use.load();
    return {counters_->in_use.load(), counters_->peak.load()};
  }

  // ---- uploads beside the work in flight ----
  Tensor upload_beside(const Tensor& host) override {
    if (!host.is_cpu()) return Tensor();
    activate();
    const size_t n = host.nbytes();
    std::shared_ptr<StagedUpload> u = staged_buffer(n);
    check(cudaEventSynchronize(u->copied), "upload event");  // its last upload has read the host copy
    std::memcpy(u->host, host.raw(), n);
    if (u->was_released) check(cudaStreamWaitEvent(copy_stream_, u->released, 0), "upload order");
    check(cudaMemcpyAsync(u->device, u->host, n, cudaMemcpyHostToDevice, copy_stream_), "upload beside");
    check(cudaEventRecord(u->copied, copy_stream_), "upload event");
    {
      std::lock_guard<std::mutex> lock(staging_->mu);
      staging_->in_use[u->device] = u;
    }
    // Dropping the tensor marks where the compute stream is (its readers were all enqueued before).
    std::shared_ptr<void> owner(u->device, [staging = staging_, u, stream = stream_, index = index_](void*) {
      cudaSetDevice(index);
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      cudaStreamIsCapturing(stream, &capture);
      const bool ordered = capture == cudaStreamCaptureStatusNone && cudaEventRecord(u->released, stream) == cudaSuccess;
      cudaGetLastError();
      std::lock_guard<std::mutex> lock(staging->mu);
      staging->in_use.erase(u->device);
      u->was_released = ordered;
      (ordered ? staging->free : staging->kept).push_back(u);
    });
    return Tensor::wrap(u->device, host.shape(), host.dtype(), std::move(owner), device());
  }

  void await_upload(const Tensor& t) override {
    std::shared_ptr<StagedUpload> u;
    {
      std::lock_guard<std::mutex> lock(staging_->mu);
      auto it = staging_->in_use.find(t.raw());
      if (it == staging_->in_use.end()) return;
      u = it->second;
    }
    check(cudaStreamWaitEvent(stream_, u->copied, 0), "wait for an upload");
  }
  void copy_to_device(void* dst, const void* src, size_t n) override {
    if (capture_pool_) {
      // While a graph is recorded, an upload reads a page-locked copy the graph keeps: each replay
      // uploads what the recorded forward uploaded. That is right because a recordable forward
      // reads nothing back from the device (a download stops the recording), so what it computes on
      // the host follows from the input's shape alone.
      src = capture_pool_->pin(src, n);
    }
    check(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream_), "copy to the GPU");
    launched("copy to the GPU");
  }
  void copy_to_host(void* dst, const void* src, size_t n) override {
    check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, stream_), "copy to the host");
    synchronize();
    launched("copy to the host");
  }
  void copy_on_device(void* dst, const void* src, size_t n) override {
    check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, stream_), "copy on the GPU");
    launched("copy on the GPU");
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
    if (to == DType::F16 || to == DType::BF16)  // rounded to nearest even, from float32
      return to_16bit(x.dtype() == DType::F32 ? x : convert(x, DType::F32), to);
    Tensor y = empty(x.shape(), to);
    cuda::convert(y.raw(), int(to), x.raw(), int(x.dtype()), x.numel(), stream_);
    launched("convert");
    return y;
  }
  void synchronize() override { check(cudaStreamSynchronize(stream_), "the GPU's work"); }

  std::shared_ptr<DeviceGraph> capture(const std::function<void()>& enqueue) override;

  // ---- weighted layers ----
  std::shared_ptr<DeviceLayer> make_conv2d(const Tensor& weight, const Tensor& bias, const Conv2dOptions& opt) override {
    return std::make_shared<CudaConv>(*this, weight, bias, opt, load_compute_dtype());
  }
  std::shared_ptr<DeviceLayer> make_linear(const Tensor& weight, const Tensor& bias, Act act) override {
    return std::make_shared<CudaLinear>(*this, weight, bias, act, load_compute_dtype());
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

  // A weighted layer's product with its fused epilogue (lt_matmul.h); shares cuBLAS's workspace,
  // on the same stream.
  bool product(const cuda::LtProduct& p, const void* x, const void* w, void* y) {
    if (!lt_->run(p, x, w, y)) return false;
    launched("product (cuBLASLt)");
    return true;
  }

  // Float32 x rounded to the 16-bit type t (BF16 or F16), in a pooled buffer.
  Tensor to_16bit(const Tensor& x, DType t) {
    Tensor y = empty(x.shape(), t);
    cuda::to_16bit(y.raw(), cf(x), x.numel(), t == DType::BF16, stream_);
    launched("to 16-bit");
    return y;
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
    const MatmulShape ms = matmul_shape(a, b, trans_b);
    const int64_t batch = ms.batch, M = ms.M, N = ms.N, K = ms.K;
    const Shape& out_shape = ms.out;
    Tensor y = empty(out_shape);
    if (y.numel() == 0) return y;
    if (K == 0) {
      fill(y, 0.0f);
      return y;
    }
    gemm(trans_b, M, N, K, alpha, cf(a), K, M * K, cf(b), trans_b ? K : N, K * N, 0.0f, mf(y), N, M * N, batch);
    launched("matmul");
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
    int64_t oh = max_pool_out_size(h, k, s, pt, pb, ceil_mode), ow = max_pool_out_size(w, k, s, pl, pr, ceil_mode);
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
    const int64_t d = x.dim();
    if (d > cuda::kMaxDims) throw Error("permute: more than 8 dims");
    std::vector<int64_t> src_stride;
    const Shape out_shape = permute_shape(x, perm, &src_stride);
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

  // The window ops' arguments are checked by ops.cpp before they reach a backend.
  Tensor window_partition(const Tensor& x, int64_t window, int64_t shift) override {
    const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
    Tensor y = empty({B * (H / window) * (W / window), window * window, C});
    cuda::window_partition(mf(y), cf(x), B, H, W, C, window, shift, stream_);
    launched("window_partition");
    return y;
  }

  Tensor window_reverse(const Tensor& windows, int64_t window, int64_t H, int64_t W, int64_t shift, int64_t out_h,
                        int64_t out_w) override {
    const int64_t B = windows.size(0) / ((H / window) * (W / window)), C = windows.size(2);
    Tensor y = empty({B, out_h, out_w, C});
    cuda::window_reverse(mf(y), cf(windows), B, H, W, C, window, shift, out_h, out_w, stream_);
    launched("window_reverse");
    return y;
  }

  Tensor cat(const std::vector<Tensor>& xs0, int64_t dim) override {
    std::vector<Tensor> xs;
    for (auto& t : xs0) xs.push_back(here(t));
    const Shape out_shape = cat_shape(xs, dim);
    const int64_t d = xs[0].dim();
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
    launched("cat");
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
    launched("narrow");
    return y;
  }

  Tensor gather_rows(const Tensor& x0, const Tensor& idx) override {
    Tensor x = here(x0);
    const int64_t B = x.size(0), S = x.size(1), C = x.size(2), K = idx.size(1);
    Tensor rows = idx.to(device()), y = empty({B, K, C});  // device indices as they are
    cuda::gather_rows(mf(y), cf(x), static_cast<const int64_t*>(rows.raw()), B, S, K, C, stream_);
    launched("gather_rows");
    return y;
  }

  Tensor binary(BinaryOp op, const Tensor& a0, const Tensor& b0) override {
    Tensor a = here(a0), b = here(b0);
    const char* name = op == BinaryOp::Add ? "add" : op == BinaryOp::Sub ? "sub" : op == BinaryOp::Mul ? "mul" : "div";
    require_f32(a, name);
    require_f32(b, name);
    BroadcastShape bs = broadcast_shape(a, b, name);
    if (bs.out.size() > size_t(cuda::kMaxDims)) throw Error(std::string(name) + ": more than 8 dims");
    Tensor y = empty(bs.out);
    if (bs.out.empty()) bs.out = {1}, bs.a_strides = {0}, bs.b_strides = {0};  // two scalars: one element
    cuda::binary(int(op), mf(y), cf(a), cf(b), bs.out.data(), bs.a_strides.data(), bs.b_strides.data(),
                 int(bs.out.size()), y.numel(), stream_);
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

  // The scales are a per-call vector (the kept queries' scores), copied as such, not mirrored as a
  // parameter (Tensor::on) would be.
  Tensor argmax_planes(const Tensor& x0, const Tensor& plane_scale, DType out) override {
    Tensor x = here(x0), s = plane_scale.to(device());
    const int64_t count = x.size(0), n = x.numel() / count;
    Tensor y = empty(Shape(x.shape().begin() + 1, x.shape().end()), out);
    cuda::argmax_planes(y.raw(), out == DType::I64, cf(x), s.defined() ? cf(s) : nullptr, count, n, stream_);
    launched("argmax_planes");
    return y;
  }

  Tensor count_at_least(const Tensor& x0, const Tensor& plane_scale, float threshold) override {
    Tensor x = here(x0), s = plane_scale.to(device());
    const int64_t count = x.size(0), n = x.numel() / count;
    Tensor y = empty({count}, DType::I64);
    cuda::count_at_least(static_cast<int64_t*>(y.raw()), cf(x), s.defined() ? cf(s) : nullptr, count, n, threshold,
                         stream_);
    launched("count_at_least");
    return y;
  }

  Tensor bincount(const Tensor& idx, int64_t bins) override {
    Tensor y = empty({bins}, DType::I64);
    cuda::bincount(static_cast<int64_t*>(y.raw()), here(idx).raw(), idx.dtype() == DType::I64, idx.numel(), bins,
                   stream_);
    launched("bincount");
    return y;
  }

  // softmax(scale * Q K^T + biases) V per (batch, head); Q, K and V keep their [B, L, heads * d]
  // layout (a head is a column block). Three 16-bit operands of one type (16-bit layers'
  // forward_to_attention) are read as they are; a mix is widened.
  Tensor multi_head_attention(const Tensor& q0, const Tensor& k0, const Tensor& v0, int64_t H,
                              const AttentionOptions& opt) override {
    Tensor q = here(q0), k = here(k0), v = here(v0);
    const DType t = q.dtype();
    const bool half = (t == DType::BF16 || t == DType::F16) && k.dtype() == t && v.dtype() == t;
    if (!half) {
      for (Tensor* x : {&q, &k, &v})
        if (x->dtype() == DType::BF16 || x->dtype() == DType::F16) *x = x->to(DType::F32);
      for (const Tensor* x : {&q, &k, &v}) require_f32(*x, "attention");
    }
    return attention({q.raw(), q.size(2)}, {k.raw(), k.size(2)}, {v.raw(), v.size(2)}, q.dtype(), q.size(0),
                     q.size(1), k.size(1), H, q.size(2) / H, v.size(2) / H, opt);
  }

  // Q | K | V side by side in the rows of one tensor: read in place, rows 3 * C apart. A 16-bit qkv
  // (a 16-bit layer's forward_to_layer) has both products on tensor cores, float32 accumulation.
  Tensor multi_head_attention_packed(const Tensor& qkv0, int64_t H, const AttentionOptions& opt) override {
    Tensor qkv = here(qkv0);
    const DType t = qkv.dtype();
    if (t != DType::BF16 && t != DType::F16) require_f32(qkv, "attention");
    const int64_t W = qkv.size(2), C = W / 3, es = int64_t(dtype_size(t));
    const char* p = static_cast<const char*>(qkv.raw());
    return attention({p, W}, {p + C * es, W}, {p + 2 * C * es, W}, t, qkv.size(0), qkv.size(1), qkv.size(1), H,
                     C / H, C / H, opt);
  }

  // A [B, L, heads * d] operand: row r of batch b starts at element (b * L + r) * row_stride of p.
  struct Operand {
    const void* p;
    int64_t row_stride;
  };

  Tensor attention(Operand q, Operand k, Operand v, DType t, int64_t B, int64_t Lq, int64_t Lk, int64_t H, int64_t dk,
                   int64_t dv, const AttentionOptions& opt) {
    Tensor head_mask, bias, batch_bias, key_mask;
    if (opt.key_mask.defined()) {
      if (opt.key_mask.dtype() != DType::U8 || opt.key_mask.shape() != Shape{B, Lk})
        throw Error("attention: key_mask must be uint8 " + shape_str({B, Lk}) + ", got " +
                    shape_str(opt.key_mask.shape()));
      key_mask = here(opt.key_mask);
    }
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
    Tensor out = empty({B, Lq, H * dv});
    if (B == 0 || Lq == 0) {
      if (opt.probs) *opt.probs = Tensor::zeros({B, H, Lq, Lk}, DType::F32, device());
      return out;
    }
    if (Lk == 0) throw Error("attention: no keys to attend to");
    const cuda::FusedAttention a{q.p, k.p, v.p, q.row_stride, k.row_stride, v.row_stride, mf(out), B, Lq, Lk, H, dk, dv,
                                 opt.scale, bias.defined() ? cf(bias) : nullptr,
                                 batch_bias.defined() ? cf(batch_bias) : nullptr,
                                 batch_bias.defined() ? batch_bias.size(0) : 1,
                                 key_mask.defined() ? static_cast<const uint8_t*>(key_mask.raw()) : nullptr,
                                 head_mask.defined() ? cf(head_mask) : nullptr};
    const double score_bytes = double(B) * double(H) * double(Lq) * double(Lk) * sizeof(float);
    const bool scores_fit = score_bytes <= double(max_forward_bytes());
    // The probabilities, when asked for, need the materialised scores.
    if (!opt.probs && cuda::fused_attention_supported(a, t) && (!scores_fit || fused_is_faster(a, t))) {
      cuda::fused_attention(a, t, stream_);
      launched("attention (fused)");
      return out;
    }
    if (!scores_fit)
      throw InputError("attention over " + std::to_string(Lq) + " x " + std::to_string(Lk) + " tokens needs " +
                       std::to_string(uint64_t(score_bytes)) + " bytes of scores, more than the limit of " +
                       std::to_string(max_forward_bytes()) + " (VF_MAX_FORWARD_BYTES)");
    Tensor scores = materialised_attention(a, t);
    if (opt.probs) *opt.probs = scores;
    return out;
  }

  // Fused attention or the materialised scores, timed once per shape and options (not while a graph
  // is recorded: then fused). VF_CUDA_FUSED_ATTENTION=0 or 1 forces one (to compare).
  bool fused_is_faster(const cuda::FusedAttention& a, DType t) {
    static const int forced = [] {
      const char* e = std::getenv("VF_CUDA_FUSED_ATTENTION");
      return e && (e == std::string("0") || e == std::string("1")) ? e[0] - '0' : -1;
    }();
    if (forced >= 0) return forced == 1;
    const auto key = std::make_tuple(int(t), a.B, a.Lq, a.Lk, a.H, a.dk, a.dv,
                                     (a.bias ? 1 : 0) | (a.batch_bias ? 2 : 0) | (a.key_mask ? 4 : 0) |
                                         (a.head_mask ? 8 : 0));
    std::lock_guard<std::mutex> lock(attention_mu_);
    if (auto it = attention_fused_.find(key); it != attention_fused_.end()) return it->second;
    if (cuda::capturing(stream_)) return true;
    const float fused_ms = cuda::mean_ms(stream_, 3, [&] { cuda::fused_attention(a, t, stream_); });
    const float materialised_ms = cuda::mean_ms(stream_, 3, [&] { materialised_attention(a, t); });
    if (log_plans())
      std::fprintf(stderr, "attention %s B=%lld H=%lld %lldx%lld d=%lld/%lld: fused %.3f ms, materialised %.3f ms\n",
                   dtype_name(t), (long long)a.B, (long long)a.H, (long long)a.Lq, (long long)a.Lk, (long long)a.dk,
                   (long long)a.dv, fused_ms, materialised_ms);
    return attention_fused_.emplace(key, fused_ms <= materialised_ms).first->second;
  }

  // The scores [B, H, Lq, Lk] as a tensor: two batched cuBLAS products over pointer arrays around
  // attention_softmax. Returns the probabilities (float32); writes a.out.
  Tensor materialised_attention(const cuda::FusedAttention& a, DType t) {
    const int64_t B = a.B, H = a.H, Lq = a.Lq, Lk = a.Lk, dk = a.dk, dv = a.dv;
    Tensor scores = empty({B, H, Lq, Lk});
    const bool half = t != DType::F32;
    const int64_t n = B * H, es = int64_t(dtype_size(t)), fs = int64_t(sizeof(float));
    Tensor probs16 = half ? empty(scores.shape(), t) : Tensor();  // the probabilities the second product reads
    const char* probs = static_cast<const char*>(half ? probs16.raw() : scores.raw());
    auto bytes = [](const void* p) { return static_cast<const char*>(p); };
    // Six pointer arrays of n: K, Q, scores for the first product; V, P, out for the second.
    Tensor ptrs = empty({6 * n}, DType::I64);
    auto* pp = static_cast<const void**>(ptrs.raw());
    cuda::AttentionPointers ap{
        {bytes(a.k), bytes(a.q), bytes(scores.raw()), bytes(a.v), probs, bytes(a.out)},
        {Lk * a.k_stride * es, Lq * a.q_stride * es, H * Lq * Lk * fs, Lk * a.v_stride * es, H * Lq * Lk * es,
         Lq * H * dv * fs},
        {dk * es, dk * es, Lq * Lk * fs, dv * es, Lq * Lk * es, dv * fs}};
    cuda::attention_pointers(pp, ap, B, H, stream_);
    launched("attention pointers");
    const float alpha = a.scale, zero = 0.0f, one = 1.0f;
    const cudaDataType_t dt = t == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
    // scores[b, h] (row-major [Lq, Lk]) = column-major [Lk, Lq] = K_h (T) x Q_h.
    if (half)
      check(cublasGemmBatchedEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, int(Lk), int(Lq), int(dk), &alpha, pp, dt,
                                int(a.k_stride), pp + n, dt, int(a.q_stride), &zero,
                                const_cast<void**>(pp + 2 * n), CUDA_R_32F, int(Lk), int(n), CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT),
            "attention scores (16-bit)");
    else
      check(cublasSgemmBatched(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, int(Lk), int(Lq), int(dk), &alpha,
                               reinterpret_cast<const float**>(pp), int(a.k_stride),
                               reinterpret_cast<const float**>(pp + n), int(a.q_stride), &zero,
                               const_cast<float**>(reinterpret_cast<const float**>(pp + 2 * n)), int(Lk), int(n)),
            "attention scores");
    launched("attention scores");
    cuda::attention_softmax(mf(scores), B, H, Lq, Lk, a.scale, a.bias, a.batch_bias, a.M, a.key_mask, a.head_mask,
                            stream_);
    launched("attention softmax");
    // out[b, :, h] (row-major [Lq, dv], ld H*dv) = column-major [dv, Lq] = V_h x P_h.
    if (half) {
      cuda::to_16bit(probs16.raw(), cf(scores), scores.numel(), t == DType::BF16, stream_);
      launched("to 16-bit");
      check(cublasGemmBatchedEx(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, int(dv), int(Lq), int(Lk), &one, pp + 3 * n, dt,
                                int(a.v_stride), pp + 4 * n, dt, int(Lk), &zero, const_cast<void**>(pp + 5 * n),
                                CUDA_R_32F, int(H * dv), int(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "attention context (16-bit)");
    } else {
      check(cublasSgemmBatched(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, int(dv), int(Lq), int(Lk), &one,
                               reinterpret_cast<const float**>(pp + 3 * n), int(a.v_stride),
                               reinterpret_cast<const float**>(pp + 4 * n), int(Lk), &zero,
                               const_cast<float**>(reinterpret_cast<const float**>(pp + 5 * n)), int(H * dv), int(n)),
            "attention context");
    }
    launched("attention context");
    return scores;
  }

  Tensor sine_expand(const Tensor& y0, const Tensor& x0, const Tensor& dim_t0) override {
    Tensor y = here(y0), x = here(x0), dim_t = here(dim_t0);
    Tensor out = empty({y.size(0), 2 * dim_t.size(0)});
    cuda::sine_expand(mf(out), cf(y), cf(x), cf(dim_t), y.size(0), dim_t.size(0), stream_);
    launched("sine_expand");
    return out;
  }

  Tensor inverse_sigmoid(const Tensor& x0, float eps) override {
    Tensor x = here(x0);
    Tensor y = empty(x.shape());
    cuda::inverse_sigmoid(mf(y), cf(x), eps, x.numel(), stream_);
    launched("inverse_sigmoid");
    return y;
  }

  Tensor refine_boxes(const Tensor& delta0, const Tensor& reference0, float eps) override {
    Tensor delta = here(delta0), reference = here(reference0);
    Tensor out = empty(delta.shape());
    cuda::refine_boxes(mf(out), cf(delta), cf(reference), reference.size(-1), eps, delta.numel() / 4, stream_);
    launched("refine_boxes");
    return out;
  }

  Tensor topk_rows(const Tensor& scores0, int64_t k) override {
    Tensor scores = here(scores0);
    Tensor out = empty({scores.size(0), k}, DType::I64);
    std::vector<std::shared_ptr<void>> held;
    cuda::topk_rows(static_cast<int64_t*>(out.raw()), cf(scores), scores.size(0), scores.size(1), k, scratch(held),
                    stream_);
    launched("topk_rows");
    return out;
  }

  Tensor level_nms_proposals(const Tensor& logits0, const Tensor& coord_logits0, const std::vector<int64_t>& level_sizes,
                             int64_t k, int64_t pre_nms_topk, double iou_threshold) override {
    Tensor logits = here(logits0), coord_logits = here(coord_logits0);
    Tensor out = empty({logits.size(0), k}, DType::I64);
    std::vector<std::shared_ptr<void>> held;
    cuda::level_nms_proposals(static_cast<int64_t*>(out.raw()), cf(logits), cf(coord_logits), logits.size(0),
                              logits.size(1), level_sizes, k, pre_nms_topk, iou_threshold, scratch(held), stream_);
    launched("level_nms_proposals");
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
  // Pool memory for a kernel's scratch, held in `held` until the caller returns (all its kernels are
  // enqueued on the stream by then, and whatever is handed the blocks next is ordered after them).
  cuda::ScratchFn scratch(std::vector<std::shared_ptr<void>>& held) {
    return [this, &held](size_t bytes) {
      held.push_back(allocate(bytes));
      return held.back().get();
    };
  }

  // A free staging buffer of at least n bytes (not more than twice), else a new one.
  std::shared_ptr<StagedUpload> staged_buffer(size_t n) {
    {
      std::lock_guard<std::mutex> lock(staging_->mu);
      auto& free = staging_->free;
      for (size_t i = 0; i < free.size(); ++i)
        if (free[i]->bytes >= n && free[i]->bytes / 2 <= n) {
          std::shared_ptr<StagedUpload> u = free[i];
          free.erase(free.begin() + static_cast<std::ptrdiff_t>(i));
          return u;
        }
      if (free.size() > 4) free.erase(free.begin());  // inputs changed size: let the oldest go
    }
    auto u = std::make_shared<StagedUpload>();
    u->bytes = std::max<size_t>(n, 1);
    check(cudaMalloc(&u->device, u->bytes), "upload buffer");
    check(cudaMallocHost(&u->host, u->bytes), "page-locked upload buffer");
    check(cudaEventCreateWithFlags(&u->copied, cudaEventDisableTiming), "upload event");
    check(cudaEventCreateWithFlags(&u->released, cudaEventDisableTiming), "upload event");
    return u;
  }

  static constexpr size_t kCublasWorkspace = size_t(32) << 20;
  int index_;
  std::shared_ptr<Pool> pool_;
  std::shared_ptr<Pool> capture_pool_;  // set while a graph is recorded
  std::shared_ptr<MemoryCounters> counters_;
  void* cublas_workspace_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaStream_t copy_stream_ = nullptr;  // upload_beside's
  std::shared_ptr<Staging> staging_ = std::make_shared<Staging>();
  cublasHandle_t cublas_ = nullptr;
  std::unique_ptr<cuda::LtMatmul> lt_;
  cudnnHandle_t cudnn_ = nullptr;
  // Per attention shape and options (dtype, B, Lq, Lk, H, dk, dv, which options): fused or not.
  std::mutex attention_mu_;
  std::map<std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int>, bool> attention_fused_;
};

// ---- CUDA graphs ---------------------------------------------------------------------------------

class CudaGraph final : public DeviceGraph {
 public:
  CudaGraph(cudaGraphExec_t exec, std::shared_ptr<Pool> memory, cudaStream_t stream)
      : exec_(exec), memory_(std::move(memory)), stream_(stream) {}
  ~CudaGraph() override {
    cudaStreamSynchronize(stream_);
    cudaGraphExecDestroy(exec_);
    memory_->release();
  }
  void replay() override { check(cudaGraphLaunch(exec_, stream_), "graph launch"); }

 private:
  cudaGraphExec_t exec_;
  std::shared_ptr<Pool> memory_;  // the buffers the recorded kernels read and write
  cudaStream_t stream_;
};

std::shared_ptr<DeviceGraph> CudaBackend::capture(const std::function<void()>& enqueue) {
  activate();
  synchronize();
  auto memory = std::make_shared<Pool>(index_, counters_);
  capture_pool_ = memory;
  // Relaxed: the graph's pool may call cudaMalloc while recording.
  check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "begin graph capture");
  bool enqueued = true;
  std::string why;
  try {
    enqueue();
  } catch (const std::exception& e) {
    enqueued = false;  // something waited for the device or copied from the host
    why = e.what();
  }
  cudaGraph_t graph = nullptr;
  cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
  capture_pool_ = nullptr;
  cudaGetLastError();
  cudaGraphExec_t exec = nullptr;
  bool ok = enqueued && ended == cudaSuccess && graph && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
  cudaGetLastError();
  if (graph) cudaGraphDestroy(graph);
  if (!ok && std::getenv("VF_CUDA_GRAPH_LOG"))
    std::fprintf(stderr, "vf: not recorded as a CUDA graph: %s\n",
                 !why.empty() ? why.c_str() : ended != cudaSuccess ? cudaGetErrorString(ended) : "instantiation failed");
  if (!ok) return nullptr;
  return std::make_shared<CudaGraph>(exec, memory, stream_);
}

// ---- CudaConv ------------------------------------------------------------------------------------

// A weighted layer's product and epilogue, y [m, n] float32 from x [m, k] and w [n, k] in the type
// `in`: act(x w^T + bias + residual) for a convolution (residual_before_act), act(x w^T + bias) +
// residual for a linear layer. cuBLASLt's epilogue takes the bias, a ReLU and a residual that comes
// before the activation; another activation, or a residual after one, is one more pass.
void layer_product(CudaBackend& be, DType in, int64_t m, int64_t n, int64_t k, const void* x, const void* w,
                   const float* bias, const float* residual, Act act, bool residual_before_act, float* y) {
  const bool fuse_residual = residual && (residual_before_act || act == Act::None);
  cuda::LtProduct p;
  p.M = m, p.N = n, p.K = k, p.in = in, p.bias = bias, p.relu = act == Act::Relu;
  p.add = fuse_residual ? residual : nullptr;
  if (!be.product(p, x, w, y))
    throw Error("cuBLASLt has no float32-output product for " + std::string(dtype_name(in)) + " inputs");
  if (act != Act::None && act != Act::Relu) {
    cuda::act_inplace(y, m * n, act, be.stream());
    launched("act");
  }
  if (residual && !fuse_residual) {
    cuda::add_inplace(y, residual, m * n, be.stream());
    launched("add residual");
  }
}

CudaConv::CudaConv(CudaBackend& be, const Tensor& weight, const Tensor& bias, const Conv2dOptions& opt,
                   DType compute)
    : be_(be), opt_(opt), dtype_(compute) {
  out_ = weight.size(0);
  in_ = weight.size(1) * opt.groups;
  kh_ = weight.size(2);
  kw_ = weight.size(3);
  groups_name_ = opt.groups == 1 ? (kh_ == 1 && kw_ == 1 ? "conv 1x1" : "conv kxk") : "conv grouped";
  const bool depthwise = opt.groups > 1 && opt.groups == in_ && opt.groups == out_;
  // [out, in/g, kh, kw] -> [out, kh, kw, in/g]: cuDNN's NHWC filter layout; a depthwise one (conv.cu,
  // not cuDNN) [C, 1, kh, kw] -> [kh, kw, 1, C], a tap's weights for consecutive channels side by side.
  const std::vector<int> layout = depthwise ? std::vector<int>{2, 3, 1, 0} : std::vector<int>{0, 2, 3, 1};
  weight_ = vf::permute(weight.to(DType::F32).cpu(), layout).to(be.device());
  if (depthwise) dtype_ = DType::F32;  // conv.cu's stencil, float32 whatever the dtype
  if (dtype_ != DType::F32) weight_ = be.to_16bit(weight_, dtype_);
  bias_ = bias.to(be.device());
  check(cudnnCreateFilterDescriptor(&filter_), "filter descriptor");
  check(cudnnSetFilter4dDescriptor(filter_, cudnn_type(dtype_), CUDNN_TENSOR_NHWC, int(out_), int(in_ / opt.groups),
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
  const ConvGeometry g = conv_geometry(opt_, kh_, kw_, h, w);
  p.pt = g.pad_top, p.pl = g.pad_left, p.pb = g.pad_bottom, p.pr = g.pad_right;
  p.oh = g.out_h, p.ow = g.out_w;
  p.explicit_pad = p.pt != p.pb || p.pl != p.pr;
  const int64_t ih = p.explicit_pad ? h + p.pt + p.pb : h, iw = p.explicit_pad ? w + p.pl + p.pr : w;
  const int ph = p.explicit_pad ? 0 : p.pt, pw = p.explicit_pad ? 0 : p.pl;

  check(cudnnCreateTensorDescriptor(&p.x), "tensor descriptor");
  check(cudnnCreateTensorDescriptor(&p.y), "tensor descriptor");
  check(cudnnCreateConvolutionDescriptor(&p.conv), "convolution descriptor");
  const cudnnDataType_t data = cudnn_type(dtype_);
  const bool half = dtype_ != DType::F32;
  check(cudnnSetTensor4dDescriptor(p.x, CUDNN_TENSOR_NHWC, data, int(n), int(in_), int(ih), int(iw)),
        "input descriptor");
  check(cudnnSetTensor4dDescriptor(p.y, CUDNN_TENSOR_NHWC, data, int(n), int(out_), int(p.oh), int(p.ow)),
        "output descriptor");
  check(cudnnSetConvolution2dDescriptor(p.conv, ph, pw, opt_.stride_h, opt_.stride_w, opt_.dilation_h,
                                        opt_.dilation_w, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT),
        "convolution descriptor");
  check(cudnnSetConvolutionGroupCount(p.conv, opt_.groups), "group count");
  // 16-bit: tensor cores, still float32 accumulation (the descriptor's compute type above).
  check(cudnnSetConvolutionMathType(p.conv, half ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH), "math type");

  // The fastest exact algorithm, timed by cuDNN on this shape with scratch buffers.
  Tensor xs = be_.empty({n, ih, iw, in_}, dtype_), ys = be_.empty({n, p.oh, p.ow, out_}, dtype_);
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
    // In 16 bits the same direct sums, on tensor cores or not (cuDNN's choice per shape).
    if (perf[i].status == CUDNN_STATUS_SUCCESS && exact && (half || perf[i].mathType == CUDNN_FMA_MATH) &&
        perf[i].memory <= kMaxWorkspace) {
      p.algo = a;
      p.workspace = perf[i].memory;
      chosen = true;
    }
  }
  // 16-bit layouts cuDNN takes in fewer algorithms (channels not a multiple of 8: a 3-channel stem):
  // then its fastest working one, the precision being the 16-bit type's anyway.
  for (int i = 0; half && i < found && !chosen; ++i) {
    if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].memory <= kMaxWorkspace) {
      p.algo = perf[i].algo;
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
  float cudnn_ms = 0;
  for (int i = 0; i < found; ++i)
    if (perf[i].algo == p.algo && perf[i].status == CUDNN_STATUS_SUCCESS) cudnn_ms = perf[i].time;
  ws = Tensor();
  // The patch matrix and one product (cuDNN's exact float32 NHWC kernels are slow on most KxK
  // shapes, its 16-bit ones mostly are not), and for 3x3 stride-1 float32 layers Winograd, timed the
  // same way on scratch buffers; the fastest is kept. VF_CUDA_CONV (a comma-separated list of cudnn,
  // patches, winograd) limits the choice to those ways, wherever they apply (to compare).
  const char* ways_env = std::getenv("VF_CUDA_CONV");
  const std::string ways = "," + std::string(ways_env ? ways_env : "cudnn,patches,winograd") + ",";
  const auto allowed = [&](const char* way) { return ways.find("," + std::string(way) + ",") != std::string::npos; };
  const bool patches = opt_.groups == 1 && allowed("patches"), winograd = winograd_applies() && allowed("winograd");
  constexpr int64_t kChunkBytes = int64_t(64) << 20;
  p.chunk_rows = std::max<int64_t>(1, kChunkBytes / (kh_ * kw_ * in_ * int64_t(dtype_size(dtype_))));
  p.chunk_tiles = std::max<int64_t>(1, kChunkBytes / (36 * std::max(in_, out_) * int64_t(sizeof(float))));
  if (winograd && !winograd_weights_.defined()) {
    winograd_weights_ = be_.empty({36, out_, in_});
    cuda::winograd_weights(mf(winograd_weights_), cf(weight_), out_, in_, be_.stream());
  }
  float best_ms = allowed("cudnn") && cudnn_ms > 0 ? cudnn_ms : std::numeric_limits<float>::infinity();
  if (patches || winograd) {
    Tensor xf = be_.empty({n, h, w, in_}), yf = be_.empty({n, p.oh, p.ow, out_});
    cudaMemsetAsync(xf.raw(), 0, xf.nbytes(), be_.stream());
    float patches_ms = -1, winograd_ms = -1;
    if (patches) {
      patches_ms = cuda::mean_ms(be_.stream(), 3, [&] {
        patch_product(p, cf(xf), n, h, w, nullptr, nullptr, Act::None, mf(yf));
      });
      if (patches_ms < best_ms) best_ms = patches_ms, p.way = Plan::Way::Patches;
    }
    if (winograd) {
      winograd_ms = cuda::mean_ms(be_.stream(), 3, [&] {
        winograd_product(p, cf(xf), n, h, w, nullptr, nullptr, Act::None, mf(yf));
      });
      if (winograd_ms < best_ms) best_ms = winograd_ms, p.way = Plan::Way::Winograd;
    }
    if (log_plans())
      std::fprintf(stderr, "conv %lldx%lld %lld->%lld on %lldx%lldx%lld: cuDNN %.3f ms, patches %.3f ms, Winograd %.3f ms\n",
                   (long long)kh_, (long long)kw_, (long long)in_, (long long)out_, (long long)n, (long long)h,
                   (long long)w, cudnn_ms, patches_ms, winograd_ms);
  }
  auto& kept = plans_.emplace(key, p).first->second;
  // The transformed weights stay only while some shape of this layer runs by Winograd.
  if (winograd_weights_.defined() &&
      std::none_of(plans_.begin(), plans_.end(), [](const auto& e) { return e.second.way == Plan::Way::Winograd; }))
    winograd_weights_ = Tensor();
  return kept;
}

bool CudaConv::winograd_applies() const {
  return dtype_ == DType::F32 && opt_.groups == 1 && kh_ == 3 && kw_ == 3 && opt_.stride_h == 1 &&
         opt_.stride_w == 1 && opt_.dilation_h == 1 && opt_.dilation_w == 1;
}

void CudaConv::winograd_product(const Plan& p, const float* x, int64_t n, int64_t h, int64_t w, const float* bias,
                                const float* residual, Act act, float* y) const {
  const int64_t th = (p.oh + 3) / 4, tw = (p.ow + 3) / 4, tiles = n * th * tw;
  const cuda::Winograd g{h, w, in_, out_, p.oh, p.ow, th, tw, p.pt, p.pl};
  const int64_t chunk = std::min(tiles, p.chunk_tiles);
  Tensor v = be_.empty({36 * chunk * in_}), m = be_.empty({36 * chunk * out_});
  for (int64_t t0 = 0; t0 < tiles; t0 += chunk) {
    const int64_t count = std::min(chunk, tiles - t0);
    cuda::winograd_input(mf(v), x, g, t0, count, be_.stream());
    launched("conv Winograd input");
    cuda::LtProduct prod;
    prod.M = count, prod.N = out_, prod.K = in_, prod.batch = 36;
    if (!be_.product(prod, v.raw(), winograd_weights_.raw(), m.raw()))
      throw Error("cuBLASLt has no batched float32 product for Winograd's convolution");
    cuda::winograd_output(y, mf(m), bias, residual, act, g, t0, count, be_.stream());
    launched("conv Winograd output");
  }
}

void CudaConv::patch_product(const Plan& p, const float* x, int64_t n, int64_t h, int64_t w, const float* bias,
                             const float* residual, Act act, float* y) const {
  const int64_t M = n * p.oh * p.ow, K = kh_ * kw_ * in_;
  const cuda::Im2col g{h, w, in_, p.oh, p.ow, int(kh_), int(kw_), opt_.stride_h, opt_.stride_w,
                       p.pt, p.pl, opt_.dilation_h, opt_.dilation_w};
  Tensor col = be_.empty({std::min(M, p.chunk_rows) * K}, dtype_);
  for (int64_t row0 = 0; row0 < M; row0 += p.chunk_rows) {
    const int64_t rows = std::min(p.chunk_rows, M - row0);
    cuda::im2col_nhwc(col.raw(), dtype_, x, g, row0, rows, be_.stream());
    launched("conv patches");
    layer_product(be_, dtype_, rows, out_, K, col.raw(), weight_.raw(), bias,
                  residual ? residual + row0 * out_ : nullptr, act, true, y + row0 * out_);
  }
}

Tensor CudaConv::forward(const Tensor& x, const Tensor* residual) const {
  require_f32(x, "conv2d");
  be_.activate();
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2);
  const bool pointwise = kh_ == 1 && kw_ == 1 && opt_.groups == 1 && opt_.stride_h == 1 && opt_.stride_w == 1 &&
                         opt_.pad_top == 0 && opt_.pad_left == 0 && opt_.pad_bottom == 0 && opt_.pad_right == 0;
  const bool depthwise = opt_.groups > 1 && opt_.groups == in_ && opt_.groups == out_;
  if (pointwise || depthwise) {
    // A 1x1 convolution is a matrix product (cuBLAS beats cuDNN's exact float32 kernels on it); a
    // depthwise one is a small stencil per channel (conv.cu).
    const ConvGeometry g = conv_geometry(opt_, kh_, kw_, h, w);
    const int64_t oh = g.out_h, ow = g.out_w;
    Tensor y = be_.empty({n, oh, ow, out_});
    if (residual && residual->shape() != y.shape())
      throw Error("conv2d residual has shape " + shape_str(residual->shape()));
    Tensor res = residual ? be_.here(*residual) : Tensor();
    if (pointwise) {
      Tensor x16 = dtype_ != DType::F32 ? be_.to_16bit(x, dtype_) : x;
      layer_product(be_, dtype_, n * h * w, out_, in_, x16.raw(), weight_.raw(), cf(bias_),
                    res.defined() ? cf(res) : nullptr, opt_.act, true, mf(y));
    } else {
      cuda::depthwise_conv_nhwc(mf(y), cf(x), cf(weight_), cf(bias_), res.defined() ? cf(res) : nullptr, n, h, w, in_,
                                oh, ow, int(kh_), int(kw_), opt_.stride_h, opt_.stride_w, g.pad_top, g.pad_left,
                                opt_.dilation_h,
                                opt_.dilation_w, opt_.act, be_.stream());
      launched("conv depthwise");
    }
    return y;
  }
  Plan& p = plan_for(x);
  Tensor y = be_.empty({n, p.oh, p.ow, out_});
  if (residual && residual->shape() != y.shape())
    throw Error("conv2d residual has shape " + shape_str(residual->shape()));
  Tensor res = residual ? be_.here(*residual) : Tensor();
  if (p.way == Plan::Way::Patches) {
    patch_product(p, cf(x), n, h, w, cf(bias_), res.defined() ? cf(res) : nullptr, opt_.act, mf(y));
    return y;
  }
  if (p.way == Plan::Way::Winograd) {
    winograd_product(p, cf(x), n, h, w, cf(bias_), res.defined() ? cf(res) : nullptr, opt_.act, mf(y));
    return y;
  }
  Tensor src = p.explicit_pad ? vf::pad_nhwc(x, p.pt, p.pl, p.pb, p.pr, 0.0f) : x;
  Tensor ws = p.workspace ? be_.empty({int64_t(p.workspace)}, DType::U8) : Tensor();
  const float one = 1.0f, zero = 0.0f;
  if (dtype_ != DType::F32) {
    Tensor x16 = be_.to_16bit(src, dtype_), y16 = be_.empty(y.shape(), dtype_);
    check(cudnnConvolutionForward(be_.cudnn(), &one, p.x, x16.raw(), filter_, weight_.raw(), p.conv, p.algo,
                                  ws.defined() ? ws.raw() : nullptr, p.workspace, &zero, p.y, y16.raw()),
          "convolution (16-bit)");
    launched(groups_name_);
    cuda::bias_act_from_16bit(mf(y), y16.raw(), dtype_ == DType::BF16, cf(bias_), res.defined() ? cf(res) : nullptr,
                              y.numel() / out_, out_, opt_.act, be_.stream());
    launched("conv2d epilogue (16-bit)");
    return y;
  }
  check(cudnnConvolutionForward(be_.cudnn(), &one, p.x, src.raw(), filter_, weight_.raw(), p.conv, p.algo,
                                ws.defined() ? ws.raw() : nullptr, p.workspace, &zero, p.y, y.raw()),
        "convolution");
  launched(groups_name_);
  cuda::bias_act(mf(y), cf(bias_), res.defined() ? cf(res) : nullptr, y.numel() / out_, out_, opt_.act, true,
                 be_.stream());
  launched("conv2d epilogue");
  return y;
}

// ---- CudaLinear ----------------------------------------------------------------------------------

CudaLinear::CudaLinear(CudaBackend& be, const Tensor& weight, const Tensor& bias, Act act, DType compute)
    : be_(be), act_(act), dtype_(compute), out_(weight.size(0)), in_(weight.size(1)) {
  weight_ = weight.to(DType::F32).to(be.device());
  if (dtype_ != DType::F32) weight_ = be.to_16bit(weight_, dtype_);
  bias_ = bias.to(be.device());
}

Tensor CudaLinear::input(const Tensor& x0) const {
  Tensor x = be_.here(x0);
  if (x.dtype() == dtype_) return x;
  require_f32(x, "linear");
  return be_.to_16bit(x, dtype_);
}

Tensor CudaLinear::forward(const Tensor& x0, const Tensor* residual) const {
  be_.activate();
  const Tensor x = input(x0);
  const int64_t m = x.numel() / in_;
  Shape out_shape = x.shape();
  out_shape.back() = out_;
  if (residual && residual->numel() != m * out_)
    throw Error("linear residual has shape " + shape_str(residual->shape()));
  Tensor y = be_.empty(out_shape);
  if (m == 0) return y;
  Tensor res = residual ? be_.here(*residual) : Tensor();
  layer_product(be_, dtype_, m, out_, in_, x.raw(), weight_.raw(), cf(bias_), res.defined() ? cf(res) : nullptr, act_,
                false, mf(y));
  return y;
}

Tensor CudaLinear::forward_to_layer(const Tensor& x0) const {
  if (dtype_ == DType::F32) return forward(x0, nullptr);
  be_.activate();
  const Tensor x = input(x0);
  const int64_t m = x.numel() / in_;
  Shape out_shape = x.shape();
  out_shape.back() = out_;
  Tensor y = be_.empty(out_shape, dtype_);
  if (m == 0) return y;
  // The bias and a ReLU in cuBLASLt's epilogue where it takes a float32 bias with a 16-bit output;
  // otherwise, and for other activations, one pass over the 16-bit output.
  cuda::LtProduct p;
  p.M = m, p.N = out_, p.K = in_, p.in = dtype_, p.out = dtype_, p.bias = cf(bias_), p.relu = act_ == Act::Relu;
  const bool fused = be_.product(p, x.raw(), weight_.raw(), y.raw());
  if (!fused) {
    p.bias = nullptr, p.relu = false;
    if (!be_.product(p, x.raw(), weight_.raw(), y.raw()))
      throw Error("cuBLASLt has no product for " + std::string(dtype_name(dtype_)) + " inputs and output");
  }
  if (!fused || (act_ != Act::None && act_ != Act::Relu)) {
    cuda::bias_act_16bit_inplace(y.raw(), dtype_ == DType::BF16, fused ? nullptr : cf(bias_), m, out_,
                                 act_, be_.stream());
    launched("linear epilogue (16-bit)");
  }
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

void check_cuda_compute_dtype(int index, DType t) {
  if (t == DType::F32) return;
  if (index < 0 || index >= cuda_device_count())
    throw Error("cuda:" + std::to_string(index) + ": no such GPU (" + std::to_string(cuda_device_count()) + " visible)");
  int major = 0, minor = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index), "compute capability");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index), "compute capability");
  // Tensor-core products with float32 accumulation: float16 from Volta (7.0), bfloat16 from Ampere (8.0).
  const int need = t == DType::BF16 ? 80 : 70;
  if (major * 10 + minor < need)
    throw Error(std::string(dtype_name(t)) + " on cuda:" + std::to_string(index) + " needs compute capability " +
                std::to_string(need / 10) + ".0; this GPU has " + std::to_string(major) + "." + std::to_string(minor) +
                " (float32 works)");
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
