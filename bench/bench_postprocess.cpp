// Segmentation post-processing at DETR-R50-panoptic's sizes: 100 queries, 250 classes + no-object,
// masks at 1/4 of an 800×1066 input (200×267), the original image 800×1066; the argument is how many
// queries pass the threshold. With VF_DEVICE (cuda, emu) the logits and masks start on the device, as
// vf::segment hands them over (Model::infer_on_device); on the CPU they start on the host.
//
//   vf_bench --benchmark_filter=BM_DetrPanopticPost
#include <benchmark/benchmark.h>

#include <cstdint>

#include "bench_device.h"
#include "core/tensor.h"
#include "processors/detr_postprocess.h"

namespace {

void BM_DetrPanopticPost(benchmark::State& state) {
  const int64_t queries = 100, classes = 251, kept = state.range(0), mh = 200, mw = 267;
  vf::Tensor logits = vf::Tensor::zeros({1, queries, classes});
  for (int64_t q = 0; q < queries; ++q) logits.f32()[q * classes + (q < kept ? q % (classes - 1) : classes - 1)] = 10;
  // Mask logits in [-8, 8), deterministic.
  vf::Tensor masks = vf::Tensor::empty({1, queries, mh, mw});
  uint64_t h = 88172645463325252ull;
  for (int64_t i = 0; i < masks.numel(); ++i) {
    h ^= h << 13, h ^= h >> 7, h ^= h << 17;
    masks.f32()[i] = float(h >> 40) / float(1 << 24) * 16.0f - 8.0f;
  }
  const vf::Device device = vf_bench::bench_device();
  const vf::Tensor l = logits.to(device), m = masks.to(device);
  vf::SegmentationOptions opt;
  opt.threshold = 0.85;
  opt.target_sizes = {{800, 1066}};
  for (auto _ : state)
    benchmark::DoNotOptimize(vf::post_process_panoptic_segmentation(vf::DetrPostKind::Detr, l, m, opt));
  state.SetLabel(device.str());
}

}  // namespace

BENCHMARK(BM_DetrPanopticPost)->Arg(10)->Arg(100)->Unit(benchmark::kMillisecond)->UseRealTime();
