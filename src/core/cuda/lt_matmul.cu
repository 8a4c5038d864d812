#include "core/cuda/lt_matmul.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "core/cuda/timing.h"
#include "core/errors.h"

namespace vf::cuda {

namespace {

void check(cublasStatus_t e, const char* what) {
  if (e != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("cuBLASLt: ") + what + ": " + cublasGetStatusString(e));
}

cudaDataType_t lt_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    default: throw Error("cuBLASLt product of " + std::string(dtype_name(t)));
  }
}

// The largest power of two up to 16 that divides every address: algorithms are chosen for it.
int alignment_of(std::initializer_list<const void*> ptrs) {
  int a = 16;
  for (const void* p : ptrs)
    if (p)
      while (reinterpret_cast<uintptr_t>(p) % a) a /= 2;
  return a;
}

}  // namespace

LtMatmul::LtMatmul(cudaStream_t stream, void* workspace, size_t workspace_bytes)
    : stream_(stream), workspace_(workspace), workspace_bytes_(workspace_bytes) {
  check(cublasLtCreate(&lt_), "cublasLtCreate");
}

LtMatmul::~LtMatmul() {
  for (auto& [k, p] : plans_) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatrixLayoutDestroy(p.d);
    cublasLtMatmulDescDestroy(p.desc);
  }
  if (lt_) cublasLtDestroy(lt_);
}

bool LtMatmul::run(const LtProduct& p, const void* x, const void* w, void* y) {
  if (p.M == 0 || p.N == 0) return true;
  const int align = alignment_of({x, w, y, p.add, p.bias});
  Plan& plan = plan_for(p, align, x, w, y);
  if (!plan.supported) return false;
  launch(plan, p, x, w, y);
  return true;
}

void LtMatmul::launch(const Plan& plan, const LtProduct& p, const void* x, const void* w, void* y) {
  const float one = 1.0f, zero = 0.0f;
  if (p.bias)
    check(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias, sizeof(p.bias)),
          "bias pointer");
  // Column-major view: y^T [N, M] = w [K, N]^T x^T [K, M].
  check(cublasLtMatmul(lt_, plan.desc, &one, w, plan.a, x, plan.b, p.add ? &one : &zero, p.add ? p.add : y, plan.c,
                       y, plan.d, &plan.algo, workspace_, workspace_bytes_, stream_),
        "matmul");
}

LtMatmul::Plan& LtMatmul::plan_for(const LtProduct& p, int align, const void* x, const void* w, void* y) {
  std::lock_guard<std::mutex> lock(mu_);
  const Key key{p.M, p.N, p.K, int(p.in), int(p.out), p.bias != nullptr, p.relu, p.add != nullptr, align, p.batch};
  if (auto it = plans_.find(key); it != plans_.end()) return it->second;

  Plan plan;
  const cudaDataType_t in = lt_type(p.in), out = lt_type(p.out);
  // Float32 inputs: CUBLAS_COMPUTE_32F is the exact FMA product (no TF32).
  check(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "descriptor");
  const cublasOperation_t t = CUBLAS_OP_T, n = CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)), "transa");
  check(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &n, sizeof(n)), "transb");
  cublasLtEpilogue_t epilogue = p.bias ? (p.relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS)
                                       : (p.relu ? CUBLASLT_EPILOGUE_RELU : CUBLASLT_EPILOGUE_DEFAULT);
  check(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)),
        "epilogue");
  if (p.bias) {
    const cudaDataType_t bias_type = CUDA_R_32F;
    check(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                         sizeof(bias_type)),
          "bias type");
    check(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias, sizeof(p.bias)),
          "bias pointer");
  }
  check(cublasLtMatrixLayoutCreate(&plan.a, in, uint64_t(p.K), uint64_t(p.N), p.K), "layout");
  check(cublasLtMatrixLayoutCreate(&plan.b, in, uint64_t(p.K), uint64_t(p.M), p.K), "layout");
  check(cublasLtMatrixLayoutCreate(&plan.c, out, uint64_t(p.N), uint64_t(p.M), p.N), "layout");
  check(cublasLtMatrixLayoutCreate(&plan.d, out, uint64_t(p.N), uint64_t(p.M), p.N), "layout");
  if (p.batch > 1) {
    const int32_t count = int32_t(p.batch);
    const int64_t strides[4] = {p.N * p.K, p.M * p.K, p.M * p.N, p.M * p.N};
    cublasLtMatrixLayout_t layouts[4] = {plan.a, plan.b, plan.c, plan.d};
    for (int i = 0; i < 4; ++i) {
      check(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)),
            "batch count");
      check(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[i],
                                             sizeof(strides[i])),
            "batch stride");
    }
  }

  cublasLtMatmulPreference_t pref;
  check(cublasLtMatmulPreferenceCreate(&pref), "preference");
  check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_,
                                             sizeof(workspace_bytes_)),
        "workspace");
  const uint32_t a32 = uint32_t(align);
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    check(cublasLtMatmulPreferenceSetAttribute(pref, attr, &a32, sizeof(a32)), "alignment");
  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t found[kCandidates];
  int count = 0;
  // A combination cuBLASLt does not take (a float32 bias with a 16-bit output, on some versions) is
  // refused here: the caller then does without the fused epilogue.
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(lt_, plan.desc, plan.a, plan.b, plan.c, plan.d, pref,
                                                               kCandidates, found, &count);
  cublasLtMatmulPreferenceDestroy(pref);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE) count = 0;
  else check(status, "algorithm heuristic");
  if (count == 0) {
    plan.supported = false;
    return plans_.emplace(key, plan).first->second;
  }
  plan.algo = found[0].algo;

  // Time the candidates on the real operands (y is rewritten by each; `add` and x are only read),
  // unless the stream is being recorded into a graph, where nothing may wait.
  if (count > 1 && !capturing(stream_) && p.add != y) {
    float best_ms = -1;
    int best = 0;
    for (int i = 0; i < count; ++i) {
      if (found[i].state != CUBLAS_STATUS_SUCCESS) continue;
      plan.algo = found[i].algo;
      const float ms = mean_ms(stream_, 3, [&] { launch(plan, p, x, w, y); });
      if (best_ms < 0 || ms < best_ms) best_ms = ms, best = i;
    }
    plan.algo = found[best].algo;
  }
  return plans_.emplace(key, plan).first->second;
}

}  // namespace vf::cuda
