// Timing an alternative on the device, for the choices made once per shape at a layer's first input
// (cuBLASLt's algorithm, a convolution's patch matrix or cuDNN, fused or materialised attention).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "core/errors.h"

namespace vf::cuda {

// Whether work enqueued on s is being recorded into a graph (then nothing may wait for it).
inline bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(s, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
}

// Keeps stream s busy for about `microseconds` (a kernel that waits).
void hold_stream(cudaStream_t s, int microseconds);

// Milliseconds per call of `enqueue` (which enqueues work on s), as the GPU runs it when the calls
// come back to back (in a CUDA graph): one untimed call first, so that a library's set-up on a first
// call is not counted; then the stream is held while the host enqueues `runs` calls between two
// events, so that the time of launching them from the host is not counted either.
template <class Enqueue>
float mean_ms(cudaStream_t s, int runs, Enqueue&& enqueue) {
  auto ok = [](cudaError_t e) {
    if (e != cudaSuccess) throw Error(std::string("timing on the GPU: ") + cudaGetErrorString(e));
  };
  enqueue();
  cudaEvent_t start = nullptr, stop = nullptr;
  ok(cudaEventCreate(&start));
  ok(cudaEventCreate(&stop));
  float ms = 0;
  try {
    hold_stream(s, 500);
    ok(cudaEventRecord(start, s));
    for (int i = 0; i < runs; ++i) enqueue();
    ok(cudaEventRecord(stop, s));
    ok(cudaEventSynchronize(stop));
    ok(cudaEventElapsedTime(&ms, start, stop));
  } catch (...) {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    throw;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms / float(runs);
}

}  // namespace vf::cuda
