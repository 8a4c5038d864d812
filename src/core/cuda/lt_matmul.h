// Row-major matrix products y[M, N] = x[M, K] w[N, K]^T on cuBLASLt, with the bias, a ReLU and an
// added matrix fused into the product's epilogue, and for each shape the algorithm that ran fastest
// when it was first seen (cuBLAS's default heuristic picks large tiles for the few-row products of
// batch 1, which leave most of the GPU idle).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "core/tensor.h"

namespace vf::cuda {

struct LtProduct {
  int64_t M = 0, N = 0, K = 0;
  DType in = DType::F32;   // x and w: float32 (exact float32 FMA sums), bfloat16 or float16
  DType out = DType::F32;  // y (and `add`)
  const float* bias = nullptr;  // [N] float32, or null
  bool relu = false;            // after the bias
  const void* add = nullptr;    // [M, N], added to the product before the bias, or null
  int64_t batch = 1;            // that many products of these shapes, each operand's matrices back to back
};

class LtMatmul {
 public:
  LtMatmul(cudaStream_t stream, void* workspace, size_t workspace_bytes);
  ~LtMatmul();
  LtMatmul(const LtMatmul&) = delete;
  LtMatmul& operator=(const LtMatmul&) = delete;

  // y = relu?(x w^T + add + bias), enqueued on the stream; false (nothing enqueued) where cuBLASLt
  // has no algorithm for these types and epilogue.
  bool run(const LtProduct& p, const void* x, const void* w, void* y);

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool supported = true;
  };
  using Key = std::tuple<int64_t, int64_t, int64_t, int, int, bool, bool, bool, int, int64_t>;
  Plan& plan_for(const LtProduct& p, int align, const void* x, const void* w, void* y);
  void launch(const Plan& plan, const LtProduct& p, const void* x, const void* w, void* y);

  cudaStream_t stream_;
  void* workspace_;
  size_t workspace_bytes_;
  cublasLtHandle_t lt_ = nullptr;
  std::mutex mu_;
  std::map<Key, Plan> plans_;
};

}  // namespace vf::cuda
