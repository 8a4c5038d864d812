// Fused attention: softmax(scale * Q K^T + biases) V per (batch, head), without the [Lq, Lk] score
// matrix.
//
// A block owns a tile of query rows of one head and streams the keys through shared memory,
// kKeys at a time. Per query row it keeps the running maximum m of the scores seen so far, the
// running sum l of exp(s - m) and the context o = sum exp(s - m) v (the online softmax): when a later
// tile raises the maximum, l and o are first rescaled by exp(m_old - m_new). The result is
// o * head_mask / l, the function the materialised path computes (to rounding: its sums run in
// another order).
//
// A score follows attention_softmax (norm.cu) step by step: scale * q.k, + bias, + batch_bias, then a
// padded key becomes the lowest float; the maximum propagates NaN. A row whose keys are all padded
// gets equal weights, as there. Keys past Lk in the last tile score -inf and so weigh nothing.
//
// Two kernels:
//  - float32, on CUDA cores: a warp owns R query rows; for the scores each lane takes two keys of the
//    tile (K transposed in shared memory, Q broadcast), for P V one or two output columns.
//  - bfloat16 / float16, on tensor cores (mma.sync m16n8k16, float32 accumulation): a warp owns 16
//    query rows, whose scores, running maxima, sums and context stay in registers; the probabilities
//    are rounded to the 16-bit type for the second product, as the materialised 16-bit path rounds
//    them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cfloat>
#include <type_traits>

#include "core/cuda/kernels.h"
#include "core/cuda/warp.cuh"

namespace vf::cuda {

namespace {

constexpr int kKeys = 64;  // keys per tile
constexpr int kWarps = 4;  // warps per block
constexpr int kThreadsPerBlock = 32 * kWarps;

// Kernels that use more than 48 KB of shared memory must say so, once per kernel and device.
template <auto* Kernel>
void allow_shared_bytes(size_t bytes) {
  static std::atomic<uint64_t> devices{0};
  int device = 0;
  cudaGetDevice(&device);
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (devices.load() & bit) return;
  // A failure shows at the launch.
  if (cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)) == cudaSuccess)
    devices.fetch_or(bit);
}

// Key j of query row i (b, h given): the scaled score plus the biases, or the padding values.
__device__ __forceinline__ float adjust_score(const FusedAttention& a, float dot, int64_t b, int64_t h, int64_t i,
                                              int64_t key) {
  if (key >= a.Lk) return -INFINITY;
  float v = dot * a.scale;
  if (i < a.Lq) {
    if (a.bias) v += a.bias[(h * a.Lq + i) * a.Lk + key];
    if (a.batch_bias) v += a.batch_bias[((b % a.M) * a.Lq + i) * a.Lk + key];
  }
  if (a.key_mask && !a.key_mask[b * a.Lk + key]) v = -FLT_MAX;
  return v;
}

// The online-softmax step of one row: from the tile's maximum, the new maximum and the base the
// exponents subtract (0 while every score so far is -inf, so that exp gives 0, not NaN), and the
// factor alpha that rescales the old sum and context.
struct Rescale {
  float m, base, alpha;
};
__device__ __forceinline__ Rescale rescale(float m_old, float tile_max) {
  const float m = nan_max(m_old, tile_max);
  const float base = m == -INFINITY ? 0.f : m;
  return {m, base, expf(m_old - base)};
}

// ---- float32 ----

template <int DK, int DV, int R>
__global__ void __launch_bounds__(kThreadsPerBlock) fused_attention_f32(FusedAttention a) {
  constexpr int KT = kKeys + 1;  // K^T's row length: a pad so that the transposing stores spread over banks
  extern __shared__ __align__(16) float sm[];
  float* qs = sm;                      // [kWarps * R][DK] the block's query rows
  float* kt = qs + kWarps * R * DK;    // [DK][KT] the key tile, transposed
  float* vs = kt + DK * KT;            // [kKeys][DV] the value tile
  float* ps = vs + kKeys * DV;         // [kWarps][R][kKeys] each warp's probabilities
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = blockIdx.y / a.H, h = blockIdx.y % a.H;
  const int64_t row0 = int64_t(blockIdx.x) * kWarps * R, my_row0 = row0 + warp * R;
  const float* Q = static_cast<const float*>(a.q);
  const float* K = static_cast<const float*>(a.k);
  const float* V = static_cast<const float*>(a.v);

  for (int e = threadIdx.x; e < kWarps * R * DK; e += kThreadsPerBlock) {
    const int64_t i = row0 + e / DK;
    qs[e] = i < a.Lq ? Q[(b * a.Lq + i) * a.q_stride + h * DK + e % DK] : 0.f;
  }
  const float* qw = qs + warp * R * DK;
  float* pw = ps + warp * R * kKeys;

  constexpr int C = DV / 32;  // output columns per lane: lane + 32 c
  float m[R], l[R], o[R][C];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY, l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < C; ++c) o[r][c] = 0.f;
  }

  for (int64_t j0 = 0; j0 < a.Lk; j0 += kKeys) {
    __syncthreads();  // the previous tile is consumed (and, the first time, qs is written)
    for (int e = threadIdx.x; e < kKeys * DK; e += kThreadsPerBlock) {
      const int j = e / DK, d = e % DK;
      const int64_t key = j0 + j;
      kt[d * KT + j] = key < a.Lk ? K[(b * a.Lk + key) * a.k_stride + h * DK + d] : 0.f;
    }
    for (int e = threadIdx.x; e < kKeys * DV; e += kThreadsPerBlock) {
      const int64_t key = j0 + e / DV;
      vs[e] = key < a.Lk ? V[(b * a.Lk + key) * a.v_stride + h * DV + e % DV] : 0.f;
    }
    __syncthreads();

    // Scores of keys j0 + lane and j0 + lane + 32 for the warp's rows.
    float s[R][2];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = 0.f;
#pragma unroll 4
    for (int d = 0; d < DK; d += 4) {
      float k0[4], k1[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) k0[t] = kt[(d + t) * KT + lane], k1[t] = kt[(d + t) * KT + lane + 32];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 q = *reinterpret_cast<const float4*>(qw + r * DK + d);
        s[r][0] = fmaf(q.x, k0[0], s[r][0]), s[r][1] = fmaf(q.x, k1[0], s[r][1]);
        s[r][0] = fmaf(q.y, k0[1], s[r][0]), s[r][1] = fmaf(q.y, k1[1], s[r][1]);
        s[r][0] = fmaf(q.z, k0[2], s[r][0]), s[r][1] = fmaf(q.z, k1[2], s[r][1]);
        s[r][0] = fmaf(q.w, k0[3], s[r][0]), s[r][1] = fmaf(q.w, k1[3], s[r][1]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = my_row0 + r;
      const float s0 = adjust_score(a, s[r][0], b, h, i, j0 + lane);
      const float s1 = adjust_score(a, s[r][1], b, h, i, j0 + lane + 32);
      const Rescale x = rescale(m[r], warp_nan_max(nan_max(s0, s1)));
      const float p0 = expf(s0 - x.base), p1 = expf(s1 - x.base);
      l[r] = l[r] * x.alpha + p0 + p1;  // this lane's part of the sum
#pragma unroll
      for (int c = 0; c < C; ++c) o[r][c] *= x.alpha;
      m[r] = x.m;
      pw[r * kKeys + lane] = p0, pw[r * kKeys + lane + 32] = p1;
    }
    __syncwarp();

    // o += P V over the tile's keys.
#pragma unroll 2
    for (int j = 0; j < kKeys; j += 4) {
      float v[4][C];
#pragma unroll
      for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int c = 0; c < C; ++c) v[t][c] = vs[(j + t) * DV + lane + 32 * c];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 p = *reinterpret_cast<const float4*>(pw + r * kKeys + j);
#pragma unroll
        for (int c = 0; c < C; ++c) {
          o[r][c] = fmaf(p.x, v[0][c], o[r][c]);
          o[r][c] = fmaf(p.y, v[1][c], o[r][c]);
          o[r][c] = fmaf(p.z, v[2][c], o[r][c]);
          o[r][c] = fmaf(p.w, v[3][c], o[r][c]);
        }
      }
    }
  }

  const float factor = a.head_mask ? a.head_mask[h] : 1.f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float f = factor / warp_sum(l[r]);
    const int64_t i = my_row0 + r;
    if (i < a.Lq) {
#pragma unroll
      for (int c = 0; c < C; ++c) a.out[(b * a.Lq + i) * a.H * DV + h * DV + lane + 32 * c] = o[r][c] * f;
    }
  }
}

template <int DK, int DV, int R>
void launch_f32(const FusedAttention& a, cudaStream_t s) {
  constexpr size_t bytes = sizeof(float) * (kWarps * R * DK + DK * (kKeys + 1) + kKeys * DV + kWarps * R * kKeys);
  allow_shared_bytes<fused_attention_f32<DK, DV, R>>(bytes);
  const dim3 grid(unsigned((a.Lq + kWarps * R - 1) / (kWarps * R)), unsigned(a.B * a.H));
  fused_attention_f32<DK, DV, R><<<grid, kThreadsPerBlock, bytes, s>>>(a);
}

// ---- bfloat16 / float16 ----

// mma.sync m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"): with g = lane / 4 and
// t = lane % 4, the A fragment (16 x 16, row-major) is four registers of two values each: (g, 2t..),
// (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..); B (16 x 8) is two: (k = 2t.., n = g), (k = 2t + 8..,
// n = g); the float32 C/D (16 x 8) is four values: (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
// So the scores of one query-row block, an accumulator per 8 keys, are already the A fragments of
// P V (two accumulators per 16 keys), and the online softmax rescales registers.
template <class T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 16-bit matrices from shared memory, transposed: lane l gives the address of row l % 8 of
// matrix l / 8; register i receives, from matrix i, the values (rows 2t, 2t + 1; column g).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    u = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    u = *reinterpret_cast<const uint32_t*>(&v);
  }
  return u;
}

template <class T>
__device__ __forceinline__ uint32_t load2(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Rows [first, first + 64) of a [B, L, H * D] 16-bit operand into dst (row length ld), zeros past L:
// 16-byte asynchronous copies (fused_attention_supported checked the alignment), so that the next
// key tile loads while this one is used. cp_async_wait<n> waits until at most n groups are pending.
template <class T, int D>
__device__ __forceinline__ void load_tile_async(T* dst, int ld, const T* src, int64_t stride, int64_t L,
                                                int64_t first, int64_t b, int64_t h) {
  constexpr int kVectors = D / 8;  // 8 values per 16 bytes
  for (int e = threadIdx.x; e < 64 * kVectors; e += kThreadsPerBlock) {
    const int r = e / kVectors, c = (e % kVectors) * 8;
    const int64_t i = first + r;
    const T* from = i < L ? src + (b * L + i) * stride + h * D + c : src;
    const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(dst + r * ld + c));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(from), "r"(i < L ? 16 : 0));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <class T, int DK, int DV>
__global__ void __launch_bounds__(kThreadsPerBlock) fused_attention_16bit(FusedAttention a) {
  // Row lengths padded by 8 values (16 bytes): the 32-bit fragment loads of 8 rows and the 16-byte
  // rows ldmatrix reads fall in different banks.
  constexpr int LQ = DK + 8, LK = DK + 8, LV = DV + 8;
  __shared__ __align__(16) T qs[64 * LQ];
  __shared__ __align__(16) T ks[2][kKeys * LK];  // two key and value tiles: one in use, one loading
  __shared__ __align__(16) T vs[2][kKeys * LV];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.y / a.H, h = blockIdx.y % a.H;
  const int64_t row0 = int64_t(blockIdx.x) * 64;
  const int64_t i0 = row0 + warp * 16 + g, i1 = i0 + 8;  // the lane's two query rows
  const T* K = static_cast<const T*>(a.k);
  const T* V = static_cast<const T*>(a.v);

  load_tile_async<T, DK>(qs, LQ, static_cast<const T*>(a.q), a.q_stride, a.Lq, row0, b, h);
  load_tile_async<T, DK>(ks[0], LK, K, a.k_stride, a.Lk, 0, b, h);
  load_tile_async<T, DV>(vs[0], LV, V, a.v_stride, a.Lk, 0, b, h);
  cp_async_commit();

  uint32_t qf[DK / 16][4];
  float o[DV / 8][4];
#pragma unroll
  for (int n = 0; n < DV / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows i0 and i1; l: this lane's part

  for (int64_t j0 = 0, tile = 0; j0 < a.Lk; j0 += kKeys, ++tile) {
    const int cur = int(tile & 1);
    if (j0 + kKeys < a.Lk) {  // the next tile into the other buffer, which everyone is done with
      load_tile_async<T, DK>(ks[cur ^ 1], LK, K, a.k_stride, a.Lk, j0 + kKeys, b, h);
      load_tile_async<T, DV>(vs[cur ^ 1], LV, V, a.v_stride, a.Lk, j0 + kKeys, b, h);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this tile (and, the first time, Q) is in shared memory
    if (tile == 0) {
#pragma unroll
      for (int kc = 0; kc < DK / 16; ++kc) {
        const T* q = qs + (warp * 16 + g) * LQ + kc * 16 + 2 * t;
        qf[kc][0] = load2(q), qf[kc][1] = load2(q + 8 * LQ), qf[kc][2] = load2(q + 8),
        qf[kc][3] = load2(q + 8 * LQ + 8);
      }
    }
    const T* kt = ks[cur];
    const T* vt = vs[cur];

    // S = Q K^T, 8 keys per accumulator: B's column n = key n, its rows = K's row, so two adjacent
    // values of a K row are one register.
    float s[kKeys / 8][4];
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < DK / 16; ++kc) {
        const T* k = kt + (n * 8 + g) * LK + kc * 16 + 2 * t;
        mma16816<T>(s[n], qf[kc], load2(k), load2(k + 8));
      }
    }

    float max0 = -INFINITY, max1 = -INFINITY;
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t key = j0 + n * 8 + 2 * t + e;
        s[n][e] = adjust_score(a, s[n][e], b, h, i0, key);
        s[n][2 + e] = adjust_score(a, s[n][2 + e], b, h, i1, key);
        max0 = nan_max(max0, s[n][e]), max1 = nan_max(max1, s[n][2 + e]);
      }
    // A row's values are spread over the four lanes of its group.
#pragma unroll
    for (int w = 1; w <= 2; w <<= 1) {
      max0 = nan_max(max0, __shfl_xor_sync(0xffffffffu, max0, w));
      max1 = nan_max(max1, __shfl_xor_sync(0xffffffffu, max1, w));
    }
    const Rescale x0 = rescale(m0, max0), x1 = rescale(m1, max1);
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int n = 0; n < kKeys / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[n][e] = expf(s[n][e] - x0.base), sum0 += s[n][e];
        s[n][2 + e] = expf(s[n][2 + e] - x1.base), sum1 += s[n][2 + e];
      }
    l0 = l0 * x0.alpha + sum0, l1 = l1 * x1.alpha + sum1;
    m0 = x0.m, m1 = x1.m;
#pragma unroll
    for (int n = 0; n < DV / 8; ++n) o[n][0] *= x0.alpha, o[n][1] *= x0.alpha, o[n][2] *= x1.alpha, o[n][3] *= x1.alpha;

    // O += P V, 16 keys a step: P's A fragment from two score accumulators; V's B fragments for two
    // blocks of 8 output columns from one transposed ldmatrix.
#pragma unroll
    for (int kc = 0; kc < kKeys / 16; ++kc) {
      const uint32_t p[4] = {pack2<T>(s[2 * kc][0], s[2 * kc][1]), pack2<T>(s[2 * kc][2], s[2 * kc][3]),
                             pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                             pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
      for (int n = 0; n < DV / 16; ++n) {
        const int mi = lane >> 3;  // matrix: keys + 8 (odd), columns + 8 (upper two)
        uint32_t v[4];
        ldmatrix_x4_trans(v, vt + (kc * 16 + (lane & 7) + 8 * (mi & 1)) * LV + n * 16 + 8 * (mi >> 1));
        mma16816<T>(o[2 * n], p, v[0], v[1]);
        mma16816<T>(o[2 * n + 1], p, v[2], v[3]);
      }
    }
    __syncthreads();  // before the next iteration loads into this buffer
  }

#pragma unroll
  for (int w = 1; w <= 2; w <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, w);
    l1 += __shfl_xor_sync(0xffffffffu, l1, w);
  }
  const float factor = a.head_mask ? a.head_mask[h] : 1.f;
  const float f0 = factor / l0, f1 = factor / l1;
  const int64_t width = a.H * DV;
#pragma unroll
  for (int n = 0; n < DV / 8; ++n) {
    const int64_t col = h * DV + n * 8 + 2 * t;
    if (i0 < a.Lq) *reinterpret_cast<float2*>(a.out + (b * a.Lq + i0) * width + col) = make_float2(o[n][0] * f0, o[n][1] * f0);
    if (i1 < a.Lq) *reinterpret_cast<float2*>(a.out + (b * a.Lq + i1) * width + col) = make_float2(o[n][2] * f1, o[n][3] * f1);
  }
}

template <class T, int DK, int DV>
void launch_16bit(const FusedAttention& a, cudaStream_t s) {
  const dim3 grid(unsigned((a.Lq + 63) / 64), unsigned(a.B * a.H));
  fused_attention_16bit<T, DK, DV><<<grid, kThreadsPerBlock, 0, s>>>(a);
}

// The head sizes the kernels are built for: 32 and 64 (every model here: DETR's 256 / 8, DeiT's and
// CvT's 64, Conditional DETR's 64-wide queries and keys against 32-wide values, Swin's 32).
template <class Launch>
void dispatch(const FusedAttention& a, Launch&& launch) {
  if (a.dk == 32 && a.dv == 32) return launch(std::integral_constant<int, 32>(), std::integral_constant<int, 32>());
  if (a.dk == 64 && a.dv == 32) return launch(std::integral_constant<int, 64>(), std::integral_constant<int, 32>());
  if (a.dk == 32 && a.dv == 64) return launch(std::integral_constant<int, 32>(), std::integral_constant<int, 64>());
  return launch(std::integral_constant<int, 64>(), std::integral_constant<int, 64>());
}

bool aligned_rows(const void* p, int64_t stride_elems) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && stride_elems % 8 == 0;
}

}  // namespace

bool fused_attention_supported(const FusedAttention& a, DType dtype) {
  const bool sizes = (a.dk == 32 || a.dk == 64) && (a.dv == 32 || a.dv == 64);
  if (!sizes || a.B * a.H > 65535 || a.Lk <= 0) return false;
  if (dtype == DType::F32) return true;
  if (dtype != DType::BF16 && dtype != DType::F16) return false;
  return aligned_rows(a.q, a.q_stride) && aligned_rows(a.k, a.k_stride) && aligned_rows(a.v, a.v_stride);
}

void fused_attention(const FusedAttention& a, DType dtype, cudaStream_t s) {
  if (a.B == 0 || a.Lq == 0) return;
  dispatch(a, [&](auto dk, auto dv) {
    constexpr int DK = decltype(dk)::value, DV = decltype(dv)::value;
    if (dtype == DType::BF16) return launch_16bit<__nv_bfloat16, DK, DV>(a, s);
    if (dtype == DType::F16) return launch_16bit<__half, DK, DV>(a, s);
    // Eight rows a warp share each key tile load best; four where that would leave SMs idle.
    if (a.B * a.H * ((a.Lq + 31) / 32) >= 264) return launch_f32<DK, DV, 8>(a, s);
    launch_f32<DK, DV, 4>(a, s);
  });
}

}  // namespace vf::cuda
