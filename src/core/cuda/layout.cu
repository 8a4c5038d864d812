// Layout kernels: permute, pad and the (shifted) window partition / reverse of ops.cpp. Pure data
// movement, so the results are bit-identical to the CPU ops.
#include "core/cuda/kernels.h"
#include "core/cuda/launch.cuh"

namespace vf::cuda {

namespace {

// Passed by value: the kernel parameter space holds it, so no device copy of the shape is needed.
struct PermuteGeometry {
  int64_t shape[kMaxDims];
  int64_t stride[kMaxDims];
  int dims;
};

template <typename T>
__global__ void permute_kernel(T* __restrict__ out, const T* __restrict__ in, PermuteGeometry g, int64_t n) {
  VF_GRID_STRIDE(i, n) {
    int64_t rem = i, off = 0;
    for (int k = g.dims - 1; k >= 0; --k) {
      off += (rem % g.shape[k]) * g.stride[k];
      rem /= g.shape[k];
    }
    out[i] = in[off];
  }
}

template <typename T>
void launch_permute(void* out, const void* in, const PermuteGeometry& g, int64_t n, cudaStream_t s) {
  permute_kernel<T><<<grid_for(n), kThreads, 0, s>>>(static_cast<T*>(out), static_cast<const T*>(in), g, n);
}

__global__ void pad_kernel(float* __restrict__ y, const float* __restrict__ x, int64_t h, int64_t w, int64_t c,
                           int64_t oh, int64_t ow, int64_t top, int64_t left, float value, int64_t total) {
  VF_GRID_STRIDE(o, total) {
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
  VF_GRID_STRIDE(o, total) {
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
  VF_GRID_STRIDE(o, total) {
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

__global__ void gather_rows_kernel(float* __restrict__ y, const float* __restrict__ x, const int64_t* __restrict__ idx,
                                   int64_t S, int64_t K, int64_t C, int64_t total) {
  VF_GRID_STRIDE(i, total) {
    const int64_t c = i % C, row = i / C, b = row / K, r = idx[row];
    y[i] = r >= 0 && r < S ? x[(b * S + r) * C + c] : __int_as_float(0x7fc00000);  // NaN where out of range
  }
}

}  // namespace

void permute(void* out, const void* in, const int64_t* out_shape, const int64_t* src_strides, int dims, int64_t n,
             int elem_size, cudaStream_t s) {
  if (n <= 0) return;
  PermuteGeometry g{};
  g.dims = dims < kMaxDims ? dims : kMaxDims;  // the backend refuses more dims before it gets here
  for (int k = 0; k < g.dims; ++k) {
    g.shape[k] = out_shape[k];
    g.stride[k] = src_strides[k];
  }
  switch (elem_size) {
    case 1: launch_permute<uint8_t>(out, in, g, n, s); break;
    case 2: launch_permute<uint16_t>(out, in, g, n, s); break;
    case 4: launch_permute<uint32_t>(out, in, g, n, s); break;
    case 8: launch_permute<uint64_t>(out, in, g, n, s); break;
    default: break;  // no other element sizes exist (DType)
  }
}

void pad_nhwc(float* y, const float* x, int64_t n, int64_t h, int64_t w, int64_t c, int top, int left, int bottom,
              int right, float value, cudaStream_t s) {
  const int64_t oh = h + top + bottom, ow = w + left + right;
  const int64_t total = n * oh * ow * c;
  if (total <= 0) return;
  pad_kernel<<<grid_for(total), kThreads, 0, s>>>(y, x, h, w, c, oh, ow, top, left, value, total);
}

void window_partition(float* y, const float* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t window,
                      int64_t shift, cudaStream_t s) {
  const int64_t total = B * H * W * C;
  if (total <= 0) return;
  window_partition_kernel<<<grid_for(total), kThreads, 0, s>>>(y, x, H, W, C, window, shift, H / window,
                                                                  W / window, total);
}

void window_reverse(float* y, const float* windows, int64_t B, int64_t H, int64_t W, int64_t C, int64_t window,
                    int64_t shift, int64_t out_h, int64_t out_w, cudaStream_t s) {
  const int64_t total = B * out_h * out_w * C;
  if (total <= 0) return;
  window_reverse_kernel<<<grid_for(total), kThreads, 0, s>>>(y, windows, H, W, C, window, shift, H / window,
                                                                W / window, out_h, out_w, total);
}

void gather_rows(float* y, const float* x, const int64_t* idx, int64_t B, int64_t S, int64_t K, int64_t C,
                 cudaStream_t s) {
  const int64_t total = B * K * C;
  if (total <= 0) return;
  gather_rows_kernel<<<grid_for(total), kThreads, 0, s>>>(y, x, idx, S, K, C, total);
}

}  // namespace vf::cuda
