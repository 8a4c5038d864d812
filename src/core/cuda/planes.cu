// Reductions over planes (ops.h: argmax_planes, count_at_least, bincount): the large-mask half of
// segmentation post-processing. Each product x * scale is one correctly rounded float multiply,
// as on the CPU, so the comparisons see the CPU's values.
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"

namespace vf::cuda {

namespace {

__device__ inline float weighed(const float* x, const float* scale, int64_t k, int64_t n, int64_t i) {
  return __fmul_rn(x[k * n + i], scale ? scale[k] : 1.0f);
}

// One thread per position walks the planes in order: the first maximum wins, as on the CPU.
template <class Out>
__global__ void argmax_planes_kernel(Out* __restrict__ y, const float* __restrict__ x,
                                     const float* __restrict__ scale, int64_t count, int64_t n) {
  VF_GRID_STRIDE(i, n) {
    float best = weighed(x, scale, 0, n, i);
    int64_t arg = 0;
    for (int64_t k = 1; k < count; ++k)
      if (const float v = weighed(x, scale, k, n, i); v > best) {
        best = v;
        arg = k;
      }
    y[i] = static_cast<Out>(arg);
  }
}

__device__ inline unsigned warp_count(unsigned v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// blockIdx.y is the plane; each warp adds its count once.
__global__ void count_at_least_kernel(unsigned long long* __restrict__ counts, const float* __restrict__ x,
                                      const float* __restrict__ scale, int64_t n, float threshold) {
  const int64_t k = blockIdx.y;
  unsigned c = 0;
  VF_GRID_STRIDE(i, n) c += weighed(x, scale, k, n, i) >= threshold;
  c = warp_count(c);
  if ((threadIdx.x & 31) == 0 && c) atomicAdd(counts + k, static_cast<unsigned long long>(c));
}

// A block's histogram in shared memory (bins <= kSharedBins), added to the total once per bin.
constexpr int64_t kSharedBins = 8192;

template <class In>
__global__ void bincount_kernel(unsigned long long* __restrict__ counts, const In* __restrict__ idx, int64_t n,
                                int64_t bins) {
  extern __shared__ unsigned local[];
  const bool shared = bins <= kSharedBins;
  if (shared)
    for (int64_t b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  VF_GRID_STRIDE(i, n) {
    const int64_t v = idx[i];
    if (v < 0 || v >= bins) continue;
    if (shared)
      atomicAdd(local + v, 1u);
    else
      atomicAdd(counts + v, 1ull);
  }
  if (!shared) return;
  __syncthreads();
  for (int64_t b = threadIdx.x; b < bins; b += blockDim.x)
    if (local[b]) atomicAdd(counts + b, static_cast<unsigned long long>(local[b]));
}

}  // namespace

void argmax_planes(void* y, bool y64, const float* x, const float* scale, int64_t count, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  if (y64)
    argmax_planes_kernel<<<grid_for(n), kThreads, 0, s>>>(static_cast<int64_t*>(y), x, scale, count, n);
  else
    argmax_planes_kernel<<<grid_for(n), kThreads, 0, s>>>(static_cast<int32_t*>(y), x, scale, count, n);
}

void count_at_least(int64_t* counts, const float* x, const float* scale, int64_t count, int64_t n, float threshold,
                    cudaStream_t s) {
  cudaMemsetAsync(counts, 0, count * sizeof(int64_t), s);
  if (n == 0 || count == 0) return;
  // Enough blocks over all planes to fill the GPU; gridDim.y is at most 65535 planes per launch.
  const unsigned per_plane = std::max<unsigned>(1, grid_for(n) / static_cast<unsigned>(std::min<int64_t>(count, 32)));
  for (int64_t k0 = 0; k0 < count; k0 += 65535) {
    const dim3 grid(per_plane, static_cast<unsigned>(std::min<int64_t>(count - k0, 65535)));
    count_at_least_kernel<<<grid, kThreads, 0, s>>>(reinterpret_cast<unsigned long long*>(counts + k0), x + k0 * n,
                                                    scale ? scale + k0 : nullptr, n, threshold);
  }
}

void bincount(int64_t* counts, const void* idx, bool idx64, int64_t n, int64_t bins, cudaStream_t s) {
  cudaMemsetAsync(counts, 0, bins * sizeof(int64_t), s);
  if (n == 0 || bins == 0) return;
  const size_t shared = bins <= kSharedBins ? bins * sizeof(unsigned) : 0;
  auto* c = reinterpret_cast<unsigned long long*>(counts);
  if (idx64)
    bincount_kernel<<<grid_for(n), kThreads, shared, s>>>(c, static_cast<const int64_t*>(idx), n, bins);
  else
    bincount_kernel<<<grid_for(n), kThreads, shared, s>>>(c, static_cast<const int32_t*>(idx), n, bins);
}

}  // namespace vf::cuda
