// The CUDA kernels of the backend, as host functions that enqueue them on a stream.
//
// Pointers are device pointers to contiguous float32 data unless a parameter says otherwise; every
// function returns at once (the work is ordered on `stream`). Each mirrors a CPU op of ops.cpp,
// attention.cpp or deformable_attention.cpp and computes the same function in float32 (the index
// arithmetic and the order of operations follow the CPU code, so results agree to rounding).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "core/ops.h"

namespace vf::cuda {

// Up to this many dims in the generic index kernels (permute, broadcasting).
constexpr int kMaxDims = 8;

// ---- elementwise (elementwise.cu) ----
void act_inplace(float* x, int64_t n, Act a, cudaStream_t s);
// The epilogues of a product y [rows, cols]; bias and residual may be null.
//   residual_before_act (Conv2d): y = act(y + bias[c] + residual)
//   otherwise (Linear):           y = act(y + bias[c]) + residual
void bias_act(float* y, const float* bias, const float* residual, int64_t rows, int64_t cols, Act a,
              bool residual_before_act, cudaStream_t s);
// out = a op b with numpy broadcasting: `shape` is the output's (dims <= kMaxDims), a_strides and
// b_strides the element strides of a and b over it (0 on a broadcast dim). op: 0 add 1 sub 2 mul 3 div.
void binary(int op, float* out, const float* a, const float* b, const int64_t* shape, const int64_t* a_strides,
            const int64_t* b_strides, int dims, int64_t n, cudaStream_t s);
void add_inplace(float* a, const float* b, int64_t n, cudaStream_t s);
void scale(float* y, const float* x, float s_, int64_t n, cudaStream_t s);
// y[r, c] = x[r, c] * scale[c] + shift[c] (shift may be null), then act.
void channel_affine(float* y, const float* x, const float* scale, const float* shift, int64_t rows, int64_t cols,
                    Act a, cudaStream_t s);
void fill(float* x, float value, int64_t n, cudaStream_t s);
// position.h's sine_expand: out [N, 2F] from y_embed, x_embed [N] and dim_t [F].
void sine_expand(float* out, const float* y_embed, const float* x_embed, const float* dim_t, int64_t N, int64_t F,
                 cudaStream_t s);
// boxes.h's inverse_sigmoid (n values) and refine_boxes (delta [rows, 4], reference [rows, nc]).
void inverse_sigmoid(float* y, const float* x, float eps, int64_t n, cudaStream_t s);
void refine_boxes(float* out, const float* delta, const float* reference, int64_t nc, float eps, int64_t rows,
                  cudaStream_t s);
// dtype conversion through double, as Tensor::to: `from`/`to` are DType values.
void convert(void* out, int to, const void* in, int from, int64_t n, cudaStream_t s);

// ---- 16-bit products (half.cu) ----
// y[i] = x[i] rounded to nearest-even bfloat16 (bf16) or float16 (else); y holds n 16-bit values.
void to_16bit(void* y, const float* x, int64_t n, bool bf16, cudaStream_t s);
// The convolution epilogue from a 16-bit result src [rows, cols]: y = act(src + bias[c] + residual)
// in float32 (bias, residual may be null).
void bias_act_from_16bit(float* y, const void* src, bool bf16, const float* bias, const float* residual, int64_t rows,
                         int64_t cols, Act a, cudaStream_t s);
// In place on a 16-bit y [rows, cols] (a layer's 16-bit output): y = act(y + bias[c]) (bias may be null).
void bias_act_16bit_inplace(void* y, bool bf16, const float* bias, int64_t rows, int64_t cols, Act a, cudaStream_t s);

// ---- normalisation and softmax (norm.cu) ----
void layer_norm(float* y, const float* x, const float* w, const float* b, int64_t rows, int64_t cols, float eps,
                cudaStream_t s);
// Softmax over rows of `cols`, in place.
void softmax_rows(float* x, int64_t rows, int64_t cols, cudaStream_t s);
// The attention probabilities from raw scores [B, H, Lq, Lk] (= Q K^T), in place, in the CPU
// kernel's order: s * scale, + bias[h] ([H, Lq, Lk], may be null), + batch_bias[b % M] ([M, Lq, Lk],
// may be null), the lowest float where key_mask[b, j] == 0 ([B, Lk], may be null), softmax over Lk,
// then * head_mask[h] ([H], may be null).
void attention_softmax(float* scores, int64_t B, int64_t H, int64_t Lq, int64_t Lk, float scale, const float* bias,
                       const float* batch_bias, int64_t M, const uint8_t* key_mask, const float* head_mask,
                       cudaStream_t s);

// Fused attention (attention.cu): out [B, Lq, H * dv] (float32) = softmax(scale * Q K^T + bias +
// batch_bias, key mask) * head_mask V per (batch, head), without the [Lq, Lk] score matrix. Q, K, V
// are [B, L, H * d] operands of `dtype` (float32, bfloat16 or float16; a head is a column block) whose
// row r of batch b starts at element (b * L + r) * stride. The options are attention_softmax's.
struct FusedAttention {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride, k_stride, v_stride;
  float* out;
  int64_t B, Lq, Lk, H, dk, dv;
  float scale;
  const float* bias;        // [H, Lq, Lk] or null
  const float* batch_bias;  // [M, Lq, Lk] or null
  int64_t M;
  const uint8_t* key_mask;  // [B, Lk] or null
  const float* head_mask;   // [H] or null
};
// Whether fused_attention takes these operands: head sizes 32 or 64; 16-bit rows 16-byte aligned.
bool fused_attention_supported(const FusedAttention& a, DType dtype);
void fused_attention(const FusedAttention& a, DType dtype, cudaStream_t s);

// The pointer arrays of attention's batched products: array j (of six) gets, for batch b and head h,
// base[j] + b * batch_stride[j] + h * head_stride[j] (strides in bytes), at out + j * B * H.
struct AttentionPointers {
  const char* base[6];
  int64_t batch_stride[6];
  int64_t head_stride[6];
};
void attention_pointers(const void** out, const AttentionPointers& p, int64_t B, int64_t H, cudaStream_t s);

// ---- convolutions (conv.cu) ----
// Depthwise convolution on NHWC (groups == channels), weight [kh, kw, C], with the epilogue
// y = act(conv + bias[c] + residual) (bias, residual may be null).
void depthwise_conv_nhwc(float* y, const float* x, const float* w, const float* bias, const float* residual,
                         int64_t n, int64_t h, int64_t wd, int64_t c, int64_t oh, int64_t ow, int kh, int kw,
                         int stride_h, int stride_w, int pad_top, int pad_left, int dil_h, int dil_w, Act a,
                         cudaStream_t s);

// ---- patch matrices (im2col.cu) ----
// The geometry of a convolution over an NHWC input [n, h, w, c] with output [n, oh, ow, *].
struct Im2col {
  int64_t h, w, c, oh, ow;
  int kh, kw, sh, sw, pt, pl, dh, dw;
};
// Rows row0 .. row0 + rows of the patch matrix [n * oh * ow, kh * kw * c] (columns in the order
// ky, kx, channel; zeros where a tap falls in the padding), written in dtype: float32, bfloat16 or
// float16.
void im2col_nhwc(void* col, DType dtype, const float* x, const Im2col& g, int64_t row0, int64_t rows, cudaStream_t s);

// ---- Winograd F(4x4, 3x3) (winograd.cu) ----
// A 3x3 stride-1 convolution of an NHWC input [n, h, w, c] into [n, oh, ow, k] with padding pt, pl
// at the top and left (zeros; the bottom and right are implied by oh, ow), over th x tw tiles of 4x4
// outputs per image.
struct Winograd {
  int64_t h, w, c, k, oh, ow, th, tw;
  int pt, pl;
};
// u [36, k, c] = G g G^T of the weights w [k, 3, 3, c].
void winograd_weights(float* u, const float* w, int64_t k, int64_t c, cudaStream_t s);
// v [36, tiles, c] = B^T d B of the input tiles t0 .. t0 + tiles.
void winograd_input(float* v, const float* x, const Winograd& g, int64_t t0, int64_t tiles, cudaStream_t s);
// The outputs of tiles t0 .. t0 + tiles from their products m [36, tiles, k] (= v u^T per position):
// y = act(A^T m A + bias + residual); bias and residual ([n, oh, ow, k]) may be null.
void winograd_output(float* y, const float* m, const float* bias, const float* residual, Act a, const Winograd& g,
                     int64_t t0, int64_t tiles, cudaStream_t s);

// ---- layout (layout.cu) ----
// Generic permutation of `elem_size`-byte elements: out[i] = in[sum(idx_k * src_stride_k)] where
// idx is i's multi-index over out_shape.
void permute(void* out, const void* in, const int64_t* out_shape, const int64_t* src_strides, int dims,
             int64_t n, int elem_size, cudaStream_t s);
// y [B, K, C] = x [B, S, C] at rows idx [B, K] of each batch entry; a row out of range is NaN (device
// indices cannot be checked on the host).
void gather_rows(float* y, const float* x, const int64_t* idx, int64_t B, int64_t S, int64_t K, int64_t C,
                 cudaStream_t s);
void pad_nhwc(float* y, const float* x, int64_t n, int64_t h, int64_t w, int64_t c, int top, int left, int bottom,
              int right, float value, cudaStream_t s);
void window_partition(float* y, const float* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t window,
                      int64_t shift, cudaStream_t s);
void window_reverse(float* y, const float* windows, int64_t B, int64_t H, int64_t W, int64_t C, int64_t window,
                    int64_t shift, int64_t out_h, int64_t out_w, cudaStream_t s);

// ---- selection (select.cu) ----
// Device scratch memory for one call (the backend's pool: what it hands out stays valid until the
// call returns, and everything the call enqueues on the stream is ordered before the next user).
using ScratchFn = std::function<void*(size_t bytes)>;
// ops.h's topk_rows: out [B, k] int64 = topk_indices of every row of scores [B, S].
void topk_rows(int64_t* out, const float* scores, int64_t B, int64_t S, int64_t k, const ScratchFn& scratch,
               cudaStream_t s);
// boxes.h's level_nms_proposals: out [B, k] int64 from logits [B, S] and coord_logits [B, S, 4] (at
// most 16 levels and 16384 pre-NMS boxes per image).
void level_nms_proposals(int64_t* out, const float* logits, const float* coord_logits, int64_t B, int64_t S,
                         const std::vector<int64_t>& level_sizes, int64_t k, int64_t pre_nms_topk,
                         double iou_threshold, const ScratchFn& scratch, cudaStream_t s);

// ---- pooling (pool.cu) ----
void max_pool2d_nhwc(float* y, const float* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oh, int64_t ow,
                     int k, int stride, int pad_top, int pad_left, cudaStream_t s);
void avg_pool2d_nhwc(float* y, const float* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oh, int64_t ow,
                     int k, int stride, int pad, bool count_include_pad, cudaStream_t s);
void global_avg_pool_nhwc(float* y, const float* x, int64_t n, int64_t hw, int64_t c, cudaStream_t s);
// GroupNorm over NHWC (groups over C), optional activation.
void group_norm_nhwc(float* y, const float* x, int64_t n, int64_t hw, int64_t c, int groups, const float* w,
                     const float* b, float eps, Act a, cudaStream_t s);
// ConvNeXt V2's GRN on NHWC.
void grn_nhwc(float* y, const float* x, int64_t n, int64_t hw, int64_t c, const float* gamma, const float* beta,
              float eps, cudaStream_t s);

// ---- resampling (interpolate.cu), NCHW ----
// mode: 0 nearest, 1 bilinear, 2 bilinear align_corners, 3 bicubic.
void interpolate(float* y, const float* x, int64_t nc, int64_t h, int64_t w, int64_t oh, int64_t ow, int mode,
                 cudaStream_t s);

// ---- reductions over planes (planes.cu): x holds `count` planes of n floats; scale may be null (1) ----
// y[i] = the index of the first largest x[k][i] * scale[k] (int64 when y64, else int32).
void argmax_planes(void* y, bool y64, const float* x, const float* scale, int64_t count, int64_t n, cudaStream_t s);
// counts[k] = how many x[k][i] * scale[k] >= threshold.
void count_at_least(int64_t* counts, const float* x, const float* scale, int64_t count, int64_t n, float threshold,
                    cudaStream_t s);
// counts[b] = how many of the n indices (int64 when idx64, else int32) equal b, for b < bins.
void bincount(int64_t* counts, const void* idx, bool idx64, int64_t n, int64_t bins, cudaStream_t s);

// ---- multi-scale deformable sampling (deformable.cu) ----
// value [B, S, heads, D]; locations [B, Q, heads, L, P, 2]; weights [B, Q, heads, L, P]; out [B, Q, heads*D].
// level_hw_start: device array of 3*L int64 (height, width, start) per level.
void ms_deform_attn(float* out, const float* value, const int64_t* level_hw_start, const float* locations,
                    const float* weights, int64_t B, int64_t S, int64_t heads, int64_t D, int64_t L, int64_t Q,
                    int64_t P, cudaStream_t s);

}  // namespace vf::cuda
