// Fused multi-head scaled-dot-product attention: softmax(scale * Q K^T) V, per head.
//
// Q, K and V are read in the layout the projections write them, tokens by rows with the heads side
// by side in the last dimension ([B, L, heads * head_dim]), so no permute is needed on either side
// and the context comes back as [B, Lq, heads * head_dim], ready for the output projection.
//
// The work is split over (batch, head, block of query rows) and each block does its two matrix
// products with oneDNN's matmul (each head's keys and values packed once a call) and the softmax in
// between, so the full [Lq, Lk] score matrix of a head only exists when the caller asks for the
// probabilities. Bfloat16 Q, K and V (a bfloat16 layer's forward_to_attention) have both products
// in bfloat16 (float32 accumulation, the float32 probabilities rounded for the second); the context
// is float32, or bfloat16 where the caller asks (AttentionOptions::out_dtype).
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace vf {

struct AttentionOptions {
  float scale = 1.0f;                // applied to Q K^T before the softmax
  // Optional per-head factor on the probabilities after the softmax (transformers' head_mask as
  // the 4.x self-attention applies it: probs * head_mask[h]). Float32, numel == heads; or undefined.
  Tensor head_mask;
  // When set, *probs receives the probabilities [B, heads, Lq, Lk] (after the head mask, as the
  // reference returns them with output_attentions).
  Tensor* probs = nullptr;
  // Optional additive terms on the scaled scores before the softmax, in this order (Swin's window
  // attention: relative position bias, then the shifted-window mask).
  //  bias: float32 [heads, Lq, Lk], the same for every batch element.
  //  batch_bias: float32 [M, Lq, Lk] shared by the heads; batch element b gets batch_bias[b % M]
  //  (batches laid out as image-major runs of M windows).
  Tensor bias;
  Tensor batch_bias;
  // Optional uint8 [B, Lk], 0 = a padded key: its scaled score becomes the lowest float before the
  // softmax (what DETR's additive finfo.min mask amounts to), so it gets no weight unless every key
  // of the row is padded (then all get the same).
  Tensor key_mask;
  // The context's dtype on the CPU: float32, or bfloat16 for a bfloat16 layer that reads it (its
  // input_dtype()), rounded as that layer's own conversion would round it. A GPU returns its
  // compute dtype whatever this says.
  DType out_dtype = DType::F32;
};

// q: [B, Lq, heads*dk], k: [B, Lk, heads*dk], v: [B, Lk, heads*dv] -> [B, Lq, heads*dv].
Tensor multi_head_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t num_heads,
                            const AttentionOptions& opt);

// Packed projections: qkv [B, L, 3*heads*d] holding Q | K | V along the last dimension (one fused
// Linear) -> [B, L, heads*d].
Tensor multi_head_attention_packed(const Tensor& qkv, int64_t num_heads, const AttentionOptions& opt);

}  // namespace vf
