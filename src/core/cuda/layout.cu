// Layout kernels: permute, pad and the (shifted) window partition / reverse of ops.cpp. Pure data
// movement, so the results are bit-identical to the CPU ops.
#include "core/cuda/kernels.h"

namespace vf::cuda {

namespace {

constexpr int kThreads = 256;

// Grid-stride loops cover any n; capping the grid keeps the block count a valid gridDim.x.
inline unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < (int64_t{1} << 20) ? b : (int64_t{1} << 20));
}

// Passed by value: the kernel parameter space holds it, so no device copy of the shape is needed.
struct PermuteGeometry {
  int64_t shape[kMaxDims];
  int64_t stride[kMaxDims];
  int dims;
};

template <typename T>
__global__ void permute_kernel(T* __restrict__ out, const T* __restrict__ in, PermuteGeometry g, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    int64_t rem = i, off = 0;
    for (int k = g.dims - 1; k >= 0; --k) {
      off += (rem % g.shape[k]) * g.stride[k];
      rem /= g.shape[k];
    }
    out[i] = in[off];
  }
}

__global__ void pad_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t h, int64_t w, int64_t c,
                           int64_t oh, int64_t ow, int64_t top, int64_t left, float value, int64_t total) {
  for (int64_t o = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; o < total; o += int64_t{gridDim.x} * blockDim.x) {
    const int64_t ch = o % c;
    int64_t t = o / c;
    const int64_t col = t % ow - left;
    t /= ow;
    const int64_t row = t % oh - top;
    const int64_t i = t / oh;
    y[o] = (row >= 0 && row < h && col >= 0 && col < w) ? x[((i * h + row) * w + col) * c + ch] : value;
  }
}

// y [B * nh * nw, window^2, C] from x [B, H, W, C] rolled by -shift.
__global__ void window_partition_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t H, int64_t W,
                                        int64_t C, int64_t window, int64_t shift, int64_t nh, int64_t nw,
                                        int64_t total) {
  for (int64_t o = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; o < total; o += int64_t{gridDim.x} * blockDim.x) {
    const int64_t ch = o % C;
    int64_t t = o / C;
    const int64_t j = t % window;
    t /= window;
    const int64_t i = t % window;
    const int64_t wi = t / window;
    const int64_t b = wi / (nh * nw), a = (wi / nw) % nh, c = wi % nw;
    const int64_t r = (a * window + i + shift) % H;
    const int64_t col = (c * window + j + shift) % W;
    y[o] = x[((b * H + r) * W + col) * C + ch];
  }
}

// y [B, out_h, out_w, C]: the gather form of window_reverse + roll by +shift, cropped.
__global__ void window_reverse_kernel(float* __restrict__ y, const float* __restrict__ win, int64_t H, int64_t W,
                                      int64_t C, int64_t window, int64_t shift, int64_t nh, int64_t nw,
                                      int64_t out_h, int64_t out_w, int64_t total) {
  for (int64_t o = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; o < total; o += int64_t{gridDim.x} * blockDim.x) {
    const int64_t ch = o % C;
    int64_t t = o / C;
    const int64_t xx = t % out_w;
    t /= out_w;
    const int64_t yy = t % out_h;
    const int64_t b = t / out_h;
    const int64_t u = (yy - shift + H) % H, a = u / window, i = u % window;
    const int64_t v = (xx - shift + W) % W, c = v / window, j = v % window;
    y[o] = win[(((b * nh + a) * nw + c) * window * window + i * window + j) * C + ch];
  }
}

}  // namespace

void permute(void* out, const void* in, const int64_t* out_shape, const int64_t* src_strides, int dims, int64_t n,
             int elem_size, cudaStream_t s) {
  if (n <= 0) return;
  PermuteGeometry g{};
  g.dims = dims;
  for (int k = 0; k < dims && k < kMaxDims; ++k) {
    g.shape[k] = out_shape[k];
    g.stride[k] = src_strides[k];
  }
  const unsigned nb = blocks_for(n);
  switch (elem_size) {
    case 1: permute_kernel<<<nb, kThreads, 0, s>>>(static_cast<uint8_t*>(out), static_cast<const uint8_t*>(in), g, n); break;
    case 2: permute_kernel<<<nb, kThreads, 0, s>>>(static_cast<uint16_t*>(out), static_cast<const uint16_t*>(in), g, n); break;
    case 4: permute_kernel<<<nb, kThreads, 0, s>>>(static_cast<uint32_t*>(out), static_cast<const uint32_t*>(in), g, n); break;
    case 8: permute_kernel<<<nb, kThreads, 0, s>>>(static_cast<uint64_t*>(out), static_cast<const uint64_t*>(in), g, n); break;
    default: break;  // no other element sizes exist (DType)
  }
}

void pad_nhwc(float* y, const float* x, int64_t n, int64_t h, int64_t w, int64_t c, int top, int left, int bottom,
              int right, float value, cudaStream_t s) {
  const int64_t oh = h + top + bottom, ow = w + left + right;
  const int64_t total = n * oh * ow * c;
  if (total <= 0) return;
  pad_kernel<<<blocks_for(total), kThreads, 0, s>>>(y, x, h, w, c, oh, ow, top, left, value, total);
}

void window_partition(float* y, const float* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t window,
                      int64_t shift, cudaStream_t s) {
  const int64_t total = B * H * W * C;
  if (total <= 0) return;
  window_partition_kernel<<<blocks_for(total), kThreads, 0, s>>>(y, x, H, W, C, window, shift, H / window,
                                                                  W / window, total);
}

void window_reverse(float* y, const float* windows, int64_t B, int64_t H, int64_t W, int64_t C, int64_t window,
                    int64_t shift, int64_t out_h, int64_t out_w, cudaStream_t s) {
  const int64_t total = B * out_h * out_w * C;
  if (total <= 0) return;
  window_reverse_kernel<<<blocks_for(total), kThreads, 0, s>>>(y, windows, H, W, C, window, shift, H / window,
                                                                W / window, out_h, out_w, total);
}

}  // namespace vf::cuda
