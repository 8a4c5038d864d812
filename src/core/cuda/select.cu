// Selection on the device: top-k and DETA's first-stage proposals (per-level top-k, batched NMS,
// balancing) of ops.h / boxes.h, giving the host code's indices without reading anything back, so
// that a two-stage forward can be recorded as a CUDA graph.
//
// Orders. The host orders scores with score_above (a NaN first, then larger first) and keeps equal
// scores in index order. Here every order is a stable LSD radix sort (CUB) on a 64-bit key: the
// segment (image, level, ...) in the high bits, and in the low 32 bits the float mapped to an
// unsigned integer that sorts ascending in score_above's order (NaN 0, -0 as +0); the payload starts
// in index order, so equal keys stay in index order as on the host.
//
// Rounding. Every float expression is the host's (boxes.cpp, compiled without FMA contraction),
// written with __fmul_rn / __fadd_rn / __fsub_rn / __fdiv_rn where nvcc could otherwise fuse a
// product into a sum, and min / max as std::min / std::max evaluate them (a NaN argument in the
// same place gives the same result). The one difference is the sigmoid: device_sigmoid (expf) may
// differ from the host's std::exp by an ulp, so the scores and boxes are those of the model's own
// device sigmoid; level_nms_select on those values gives exactly these indices.
#include <cub/device/device_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <string>

#include "core/cuda/activation.cuh"
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"
#include "core/errors.h"

namespace vf::cuda {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}

constexpr int kMaxLevels = 16;
// NMS rows of one image as 64-bit mask words: at most this many (N <= 16384 boxes per image).
constexpr int kMaxMaskWords = 256;
constexpr int kScanChunk = 16;  // mask rows staged in shared memory at a time by the scan

struct LevelTable {
  int levels;
  int start[kMaxLevels + 1];  // start[l] .. start[l + 1] are level l's positions
};

__device__ __forceinline__ int level_of(const LevelTable& t, int s) {
  int l = 0;
  while (l + 1 < t.levels && s >= t.start[l + 1]) ++l;
  return l;
}

// score_above's order as an ascending unsigned key: NaN first, then the larger first; -0 is +0.
__device__ __forceinline__ uint32_t descending_key(float x) {
  if (isnan(x)) return 0;
  const uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
  const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ascending;
}

// std::min / std::max of the host code, NaN handling included: min(a, b) = b < a ? b : a,
// max(a, b) = a < b ? b : a.
__device__ __forceinline__ float host_min(float a, float b) { return b < a ? b : a; }
__device__ __forceinline__ float host_max(float a, float b) { return a < b ? b : a; }

int bits_for(int64_t n) {  // bits to hold 0 .. n - 1
  int b = 0;
  while ((int64_t{1} << b) < n) ++b;
  return b;
}

// A stable ascending radix sort of (key, value) pairs over the low `bits` bits of the keys.
void sort_pairs(const uint64_t* keys_in, uint64_t* keys_out, const int* vals_in, int* vals_out, int64_t n, int bits,
                const ScratchFn& scratch, cudaStream_t s) {
  size_t bytes = 0;
  check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys_in, keys_out, vals_in, vals_out, static_cast<int>(n), 0,
                                        bits, s),
        "radix sort size");
  void* temp = scratch(std::max<size_t>(bytes, 1));
  check(cub::DeviceRadixSort::SortPairs(temp, bytes, keys_in, keys_out, vals_in, vals_out, static_cast<int>(n), 0,
                                        bits, s),
        "radix sort");
}

// ---- top-k ----

__global__ void row_keys_kernel(uint64_t* keys, int* vals, const float* scores, int64_t S, int64_t n) {
  VF_GRID_STRIDE(i, n) {
    keys[i] = (uint64_t(i / S) << 32) | descending_key(scores[i]);
    vals[i] = int(i % S);
  }
}

__global__ void row_heads_kernel(int64_t* out, const int* sorted, int64_t S, int64_t k, int64_t n) {
  VF_GRID_STRIDE(i, n) out[i] = sorted[(i / k) * S + i % k];
}

// ---- proposals ----

// score = sigmoid(logit); box = clamp(center_to_corners(sigmoid(coord logits)), 0, 1).
__global__ void proposal_boxes_kernel(float* score, float* boxes, const float* logits, const float* coords, int64_t n) {
  VF_GRID_STRIDE(i, n) {
    score[i] = device_sigmoid(logits[i]);
    const float cx = device_sigmoid(coords[4 * i]), cy = device_sigmoid(coords[4 * i + 1]);
    const float w = device_sigmoid(coords[4 * i + 2]), h = device_sigmoid(coords[4 * i + 3]);
    const float hw = __fmul_rn(0.5f, w), hh = __fmul_rn(0.5f, h);
    const float corners[4] = {__fsub_rn(cx, hw), __fsub_rn(cy, hh), __fadd_rn(cx, hw), __fadd_rn(cy, hh)};
    for (int c = 0; c < 4; ++c) boxes[4 * i + c] = host_min(host_max(corners[c], 0.f), 1.f);
  }
}

// Per image and level, every position keyed by sigmoid(logit) * (position in the level).
__global__ void level_keys_kernel(uint64_t* keys, int* vals, const float* score, LevelTable t, int64_t S, int64_t n) {
  VF_GRID_STRIDE(i, n) {
    const int64_t s = i % S, bl = i / S, l = bl % t.levels, b = bl / t.levels;
    const float v = __fmul_rn(score[b * S + s], float(level_of(t, int(s)) == l));
    keys[i] = (uint64_t(bl) << 32) | descending_key(v);
    vals[i] = int(s);
  }
}

// The pre-NMS list of each image (level after level, pre_nms_topk each: pre_pos) keyed for NMS by
// its segment and logit; per_level: segments are (image, level) (torchvision's NMS per group),
// else images (one NMS over offset boxes).
__global__ void pre_nms_kernel(int* pre_pos, uint64_t* keys, int* vals, const int* level_sorted, const float* logits,
                               LevelTable t, int64_t S, int64_t P, bool per_level, int64_t n) {
  const int64_t N = P * t.levels;
  VF_GRID_STRIDE(i, n) {
    const int64_t b = i / N, r = i % N, l = r / P, j = r % P;
    const int p = level_sorted[(b * t.levels + l) * S + j];
    pre_pos[i] = p;
    const uint64_t seg = per_level ? uint64_t(b * t.levels + level_of(t, p)) : uint64_t(b);
    keys[i] = (seg << 32) | descending_key(logits[b * S + p]);
    vals[i] = int(r);
  }
}

// torchvision's offset for one NMS over groups: boxes.max() over the image's pre-NMS boxes, NaN
// when any coordinate is NaN (as on the host).
__global__ void max_coordinate_kernel(float* out, const int* pre_pos, const float* boxes, int64_t S, int64_t N) {
  const int64_t b = blockIdx.x;
  __shared__ float part[kThreads];
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < 4 * N; i += blockDim.x) {
    const float x = boxes[(b * S + pre_pos[b * N + i / 4]) * 4 + i % 4];
    m = isnan(m) || isnan(x) ? NAN : host_max(m, x);
  }
  part[threadIdx.x] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    float r = -INFINITY;
    for (int k = 0; k < blockDim.x; ++k) r = isnan(r) || isnan(part[k]) ? NAN : host_max(r, part[k]);
    out[b] = r;
  }
}

// The boxes in NMS order (sorted by segment, then score), offset by group * (max + 1) when one NMS
// runs over the groups, and their areas as nms() computes them.
__global__ void nms_boxes_kernel(float* sboxes, float* sarea, int* sseg, const uint64_t* sorted_keys,
                                 const int* sorted_vals, const int* pre_pos, const float* boxes, const float* max_coord,
                                 LevelTable t, int64_t S, int64_t N, int64_t n) {
  VF_GRID_STRIDE(u, n) {
    const int64_t b = u / N;
    const int p = pre_pos[b * N + sorted_vals[u]];
    float box[4];
    for (int c = 0; c < 4; ++c) box[c] = boxes[(b * S + p) * 4 + c];
    if (max_coord) {
      const float offset = __fmul_rn(float(level_of(t, p)), __fadd_rn(max_coord[b], 1.0f));
      for (int c = 0; c < 4; ++c) box[c] = __fadd_rn(box[c], offset);
    }
    for (int c = 0; c < 4; ++c) sboxes[u * 4 + c] = box[c];
    sarea[u] = __fmul_rn(__fsub_rn(box[2], box[0]), __fsub_rn(box[3], box[1]));
    sseg[u] = int(sorted_keys[u] >> 32);
  }
}

// mask[b][i][w] bit j - 64 w: box j comes after box i in the same segment and overlaps it with
// IoU > threshold (nms()'s expression). Blocks of 64 rows x 64 columns; words left of a row's own
// word are never read and not written.
__global__ void nms_mask_kernel(uint64_t* mask, const float* sboxes, const float* sarea, const int* sseg, int64_t N,
                                int64_t W, double threshold) {
  const int64_t rb = blockIdx.y, cb = blockIdx.x, b = blockIdx.z;
  if (cb < rb) return;
  __shared__ float cbox[64][4];
  __shared__ float carea[64];
  __shared__ int cseg[64];
  const int64_t j0 = cb * 64;
  const int t = threadIdx.x;
  if (j0 + t < N) {
    const int64_t u = b * N + j0 + t;
    for (int c = 0; c < 4; ++c) cbox[t][c] = sboxes[u * 4 + c];
    carea[t] = sarea[u];
    cseg[t] = sseg[u];
  }
  __syncthreads();
  const int64_t i = rb * 64 + t;
  if (i >= N) return;
  const int64_t u = b * N + i;
  const float ax1 = sboxes[u * 4], ay1 = sboxes[u * 4 + 1], ax2 = sboxes[u * 4 + 2], ay2 = sboxes[u * 4 + 3];
  const float a = sarea[u];
  const int seg = sseg[u];
  uint64_t bits = 0;
  const int64_t cols = min(int64_t(64), N - j0);
  for (int64_t c = 0; c < cols; ++c) {
    if (j0 + c <= i || cseg[c] != seg) continue;
    const float w = host_max(0.0f, __fsub_rn(host_min(ax2, cbox[c][2]), host_max(ax1, cbox[c][0])));
    const float h = host_max(0.0f, __fsub_rn(host_min(ay2, cbox[c][3]), host_max(ay1, cbox[c][1])));
    const float inter = __fmul_rn(w, h);
    const float iou = __fdiv_rn(inter, __fsub_rn(__fadd_rn(a, carea[c]), inter));
    if (double(iou) > threshold) bits |= uint64_t{1} << c;
  }
  mask[(b * N + i) * W + cb] = bits;
}

// Where each segment of the sorted boxes begins and ends (empty segments: begin = end = 0).
__global__ void segment_bounds_kernel(int* begin, int* end, const int* sseg, int64_t n) {
  VF_GRID_STRIDE(u, n) {
    const int s = sseg[u];
    if (u == 0 || sseg[u - 1] != s) begin[s] = int(u);
    if (u == n - 1 || sseg[u + 1] != s) end[s] = int(u + 1);
  }
}

// nms()'s greedy pass over one segment (a block): a box is kept unless a kept box before it
// suppressed it. The removed bits live in shared memory; mask rows are staged kScanChunk at a time
// by the whole block, then one warp walks them in order.
__global__ void nms_scan_kernel(uint8_t* kept, const uint64_t* mask, const int* seg_begin, const int* seg_end,
                                int64_t N, int64_t W) {
  extern __shared__ uint64_t shared_words[];
  const int beg = seg_begin[blockIdx.x], end = seg_end[blockIdx.x];
  if (beg >= end) return;
  const int64_t b = beg / N, lo = beg - b * N, hi = end - b * N;
  const int64_t w0 = lo / 64, ws = (hi - 1) / 64 + 1 - w0;
  uint64_t* removed = shared_words;
  uint64_t* rows = shared_words + ws;
  for (int64_t w = threadIdx.x; w < ws; w += blockDim.x) removed[w] = 0;
  const uint64_t* m = mask + b * N * W;
  for (int64_t c0 = lo; c0 < hi; c0 += kScanChunk) {
    const int64_t n_rows = min(int64_t(kScanChunk), hi - c0);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < n_rows * ws; e += blockDim.x)
      rows[e] = m[(c0 + e / ws) * W + w0 + e % ws];
    __syncthreads();
    if (threadIdx.x < 32) {
      for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t i = c0 + r, wi = i / 64 - w0;
        const bool keep = !((removed[wi] >> (i & 63)) & 1);
        __syncwarp();  // every lane has read the word before any lane changes it
        if (keep) {
          if (threadIdx.x == 0) kept[b * N + i] = 1;
          for (int64_t w = wi + threadIdx.x; w < ws; w += 32) removed[w] |= rows[r * ws + w];
        }
        __syncwarp();
      }
    }
  }
}

// The kept boxes back in pre-NMS order, keyed so that a sort puts each image's kept boxes first,
// by score (NaN first), equal scores in pre-NMS order: batched_nms's result order.
__global__ void kept_keys_kernel(uint64_t* keys, int* vals, int* count, const uint8_t* kept, const int* sorted_vals,
                                 const int* pre_pos, const float* logits, int64_t S, int64_t N, int64_t n) {
  VF_GRID_STRIDE(u, n) {
    const int64_t b = u / N;
    const int r = sorted_vals[u];
    const bool k = kept[u];
    if (k) atomicAdd(count + b, 1);
    keys[b * N + r] = (uint64_t(b) << 33) | (uint64_t(!k) << 32) |
                      descending_key(logits[b * S + pre_pos[b * N + r]]);
    vals[b * N + r] = r;
  }
}

__global__ void keep_positions_kernel(int* keep_pos, const int* sorted_vals, const int* pre_pos, int64_t N,
                                      int64_t n) {
  VF_GRID_STRIDE(u, n) keep_pos[u] = pre_pos[(u / N) * N + sorted_vals[u]];
}

// The balancing, one block per image: over the kept list (or the plain top-k when fewer than k
// were kept), an entry is taken when fewer than k / L of its level come before it, then the first
// of the others until there are k; out gets the taken entries in order.
constexpr int kBalanceThreads = 1024;
__global__ void __launch_bounds__(kBalanceThreads)
    balance_kernel(int64_t* out, uint8_t* first_pass, const int* keep_pos, const int* count, const int* topk_pos,
                   LevelTable t, int64_t S, int64_t N, int64_t k) {
  using Scan = cub::BlockScan<int, kBalanceThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int level_running[kMaxLevels];
  __shared__ int taken_running, other_running;
  const int64_t b = blockIdx.x;
  const bool fallback = count[b] < k;
  const int64_t n = fallback ? k : count[b];
  const int* list = fallback ? topk_pos + b * S : keep_pos + b * N;
  uint8_t* first = first_pass + b * (N > k ? N : k);
  const int64_t q_per_l = k / t.levels;
  if (threadIdx.x < kMaxLevels) level_running[threadIdx.x] = 0;
  if (threadIdx.x == 0) taken_running = other_running = 0;
  __syncthreads();
  // First pass: the first q_per_l of every level.
  for (int64_t c0 = 0; c0 < n; c0 += kBalanceThreads) {
    const int64_t j = c0 + threadIdx.x;
    const int lv = j < n ? level_of(t, list[j]) : -1;
    int before_in_level = 0;
    for (int l = 0; l < t.levels; ++l) {
      int before = 0, total = 0;
      Scan(scan_storage).ExclusiveSum(int(lv == l), before, total);
      if (lv == l) before_in_level = level_running[l] + before;
      __syncthreads();
      if (threadIdx.x == 0) level_running[l] += total;
      __syncthreads();
    }
    if (j < n) first[j] = before_in_level < q_per_l;
  }
  // Taken in the first pass, in all (its flags are this thread's own writes or before a barrier).
  int mine = 0;
  for (int64_t j = threadIdx.x; j < n; j += kBalanceThreads) mine += first[j];
  int taken_first = 0;
  __syncthreads();
  Scan(scan_storage).ExclusiveSum(mine, mine, taken_first);
  __syncthreads();
  // Second pass: top up with the first of the rest, and write the taken entries in order.
  for (int64_t c0 = 0; c0 < n; c0 += kBalanceThreads) {
    const int64_t j = c0 + threadIdx.x;
    const bool in_first = j < n && first[j];
    const bool other = j < n && !first[j];
    int other_before = 0, other_total = 0;
    Scan(scan_storage).ExclusiveSum(int(other), other_before, other_total);
    __syncthreads();
    const bool take = in_first || (other && other_running + other_before < k - taken_first);
    int pos = 0, taken_total = 0;
    Scan(scan_storage).ExclusiveSum(int(take), pos, taken_total);
    if (take && taken_running + pos < k) out[b * k + taken_running + pos] = list[j];
    __syncthreads();
    if (threadIdx.x == 0) {
      other_running += other_total;
      taken_running += taken_total;
    }
    __syncthreads();
  }
}

template <typename T>
T* take(const ScratchFn& scratch, int64_t n) {
  return static_cast<T*>(scratch(std::max<size_t>(size_t(n) * sizeof(T), 1)));
}

}  // namespace

void topk_rows(int64_t* out, const float* scores, int64_t B, int64_t S, int64_t k, const ScratchFn& scratch,
               cudaStream_t s) {
  const int64_t n = B * S;
  if (n <= 0 || k <= 0) return;
  if (n > INT32_MAX) throw Error("topk_rows: more than 2^31 scores");
  uint64_t* keys = take<uint64_t>(scratch, 2 * n);
  int* vals = take<int>(scratch, 2 * n);
  row_keys_kernel<<<grid_for(n), kThreads, 0, s>>>(keys, vals, scores, S, n);
  sort_pairs(keys, keys + n, vals, vals + n, n, 32 + bits_for(B), scratch, s);
  row_heads_kernel<<<grid_for(B * k), kThreads, 0, s>>>(out, vals + n, S, k, B * k);
}

void level_nms_proposals(int64_t* out, const float* logits, const float* coord_logits, int64_t B, int64_t S,
                         const std::vector<int64_t>& level_sizes, int64_t k, int64_t pre_nms_topk, double iou_threshold,
                         const ScratchFn& scratch, cudaStream_t s) {
  const int64_t L = static_cast<int64_t>(level_sizes.size()), P = pre_nms_topk, N = L * P;
  if (B <= 0 || k <= 0) return;
  if (L > kMaxLevels) throw Error("level_nms_proposals: at most " + std::to_string(kMaxLevels) + " levels on a GPU");
  const int64_t W = (N + 63) / 64;
  if (W > kMaxMaskWords)
    throw Error("level_nms_proposals: at most " + std::to_string(64 * kMaxMaskWords) + " boxes per image on a GPU");
  if (B * L * S > INT32_MAX) throw Error("level_nms_proposals: too many positions");
  LevelTable t{};
  t.levels = int(L);
  for (int64_t l = 0; l < L; ++l) t.start[l + 1] = t.start[l] + int(level_sizes[l]);

  float* score = take<float>(scratch, B * S);
  float* boxes = take<float>(scratch, B * S * 4);
  proposal_boxes_kernel<<<grid_for(B * S), kThreads, 0, s>>>(score, boxes, logits, coord_logits, B * S);

  // Per image and level: the pre_nms_topk best (a stable sort of every position per level).
  const int64_t n_level = B * L * S;
  uint64_t* level_keys = take<uint64_t>(scratch, 2 * n_level);
  int* level_vals = take<int>(scratch, 2 * n_level);
  level_keys_kernel<<<grid_for(n_level), kThreads, 0, s>>>(level_keys, level_vals, score, t, S, n_level);
  sort_pairs(level_keys, level_keys + n_level, level_vals, level_vals + n_level, n_level, 32 + bits_for(B * L),
             scratch, s);

  // batched_nms: per level above 4000 box coordinates, else one NMS over offset boxes (its CPU paths).
  const bool per_level = 4 * N > 4000;
  const int64_t segments = per_level ? B * L : B;
  const int64_t n_pre = B * N;
  int* pre_pos = take<int>(scratch, n_pre);
  uint64_t* nms_keys = take<uint64_t>(scratch, 2 * n_pre);
  int* nms_vals = take<int>(scratch, 2 * n_pre);
  pre_nms_kernel<<<grid_for(n_pre), kThreads, 0, s>>>(pre_pos, nms_keys, nms_vals, level_vals + n_level, logits, t, S,
                                                      P, per_level, n_pre);
  sort_pairs(nms_keys, nms_keys + n_pre, nms_vals, nms_vals + n_pre, n_pre, 32 + bits_for(segments), scratch, s);
  float* max_coord = nullptr;
  if (!per_level) {
    max_coord = take<float>(scratch, B);
    max_coordinate_kernel<<<unsigned(B), kThreads, 0, s>>>(max_coord, pre_pos, boxes, S, N);
  }
  float* sboxes = take<float>(scratch, n_pre * 4);
  float* sarea = take<float>(scratch, n_pre);
  int* sseg = take<int>(scratch, n_pre);
  nms_boxes_kernel<<<grid_for(n_pre), kThreads, 0, s>>>(sboxes, sarea, sseg, nms_keys + n_pre, nms_vals + n_pre,
                                                        pre_pos, boxes, max_coord, t, S, N, n_pre);
  uint64_t* mask = take<uint64_t>(scratch, n_pre * W);
  nms_mask_kernel<<<dim3(unsigned(W), unsigned(W), unsigned(B)), 64, 0, s>>>(mask, sboxes, sarea, sseg, N, W,
                                                                              iou_threshold);
  int* bounds = take<int>(scratch, 2 * segments);
  check(cudaMemsetAsync(bounds, 0, sizeof(int) * 2 * segments, s), "memset");
  segment_bounds_kernel<<<grid_for(n_pre), kThreads, 0, s>>>(bounds, bounds + segments, sseg, n_pre);
  uint8_t* kept = take<uint8_t>(scratch, n_pre);
  check(cudaMemsetAsync(kept, 0, n_pre, s), "memset");
  const size_t scan_shared = size_t(1 + kScanChunk) * W * sizeof(uint64_t);
  nms_scan_kernel<<<unsigned(segments), kThreads, scan_shared, s>>>(kept, mask, bounds, bounds + segments, N, W);

  // The kept boxes in batched_nms's order: keep_pos [B, N], count[b] of them per image. The NMS
  // keys' and values' first halves are free again (the sort read them).
  int* count = take<int>(scratch, B);
  check(cudaMemsetAsync(count, 0, sizeof(int) * B, s), "memset");
  kept_keys_kernel<<<grid_for(n_pre), kThreads, 0, s>>>(nms_keys, nms_vals, count, kept, nms_vals + n_pre, pre_pos,
                                                        logits, S, N, n_pre);
  sort_pairs(nms_keys, nms_keys + n_pre, nms_vals, nms_vals + n_pre, n_pre, 33 + bits_for(B), scratch, s);
  int* keep_pos = take<int>(scratch, n_pre);
  keep_positions_kernel<<<grid_for(n_pre), kThreads, 0, s>>>(keep_pos, nms_vals + n_pre, pre_pos, N, n_pre);

  // The fallback: the plain top-k of the logits (every image's, used where fewer than k were kept),
  // in the level sort's buffers (B * S <= B * L * S).
  const int64_t n_rows = B * S;
  row_keys_kernel<<<grid_for(n_rows), kThreads, 0, s>>>(level_keys, level_vals, logits, S, n_rows);
  sort_pairs(level_keys, level_keys + n_level, level_vals, level_vals + n_level, n_rows, 32 + bits_for(B), scratch, s);
  const int* topk_pos = level_vals + n_level;

  uint8_t* first_pass = take<uint8_t>(scratch, B * std::max(N, k));
  balance_kernel<<<unsigned(B), kBalanceThreads, 0, s>>>(out, first_pass, keep_pos, count, topk_pos, t, S, N, k);
}

}  // namespace vf::cuda
