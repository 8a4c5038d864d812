// Whole-model latency, batch 1, float32, the Hub architectures with deterministic random weights
// (the speed does not depend on the values). bench/run.sh runs this beside bench/torch_bench.py
// on the same machine and thread count and prints the ratios.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdlib>
#include <memory>

#include "core/ops.h"
#include "models/model.h"

namespace {

// Deterministic values in [-scale, scale]; running variances positive (a folded batch norm needs them).
vf::Tensor fill(const std::string& name, const vf::Shape& shape) {
  vf::Tensor t = vf::Tensor::empty(shape);
  uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ uint8_t(c)) * 1099511628211ull;
  bool variance = name.size() >= 11 && name.compare(name.size() - 11, 11, "running_var") == 0;
  float* p = t.f32();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    h ^= h >> 33; h *= 0xff51afd7ed558ccdull; h ^= h >> 33;
    float u = float(h >> 40) / float(1 << 24) * 2.0f - 1.0f;
    p[i] = variance ? 1.0f + 0.5f * std::fabs(u) : 0.05f * u;
  }
  return t;
}

// VF_DEVICE=cuda (or cuda:N) runs the models on a GPU; an iteration is Model::infer, from the host
// image to the host outputs.
vf::Device bench_device() {
  const char* d = std::getenv("VF_DEVICE");
  return d && *d ? vf::Device::parse(d) : vf::Device::cpu();
}

std::unique_ptr<vf::Model> build(const vf::json& config) {
  auto store = std::make_shared<vf::WeightStore>();
  store->set_missing_filler(fill);
  vf::LoadDeviceScope on(bench_device());
  return vf::create_model(config, "", vf::Weights(store));
}

void run(benchmark::State& state, const vf::json& config, int64_t h, int64_t w, bool with_mask) {
  if (const char* t = std::getenv("VF_THREADS")) vf::set_num_threads(std::atoi(t));
  auto model = build(config);
  vf::ModelInputs in;
  in.pixel_values = fill("pixel_values", {1, 3, h, w});
  if (!bench_device().is_cpu()) {
    // What a caller gets: Model::infer uploads the image, replays the recorded forward where the
    // model allows (an all-ones mask is the same as none), and downloads the outputs.
    for (int i = 0; i < 3; ++i) model->infer(in);  // set-up, recording, first replay
    for (auto _ : state) benchmark::DoNotOptimize(model->infer(in));
    return;
  }
  if (with_mask) in.pixel_mask = vf::Tensor::from_vector<int64_t>({1, h, w}, std::vector<int64_t>(h * w, 1));
  model->forward(in);  // warm-up: primitive creation and weight reorders happen once
  for (auto _ : state) benchmark::DoNotOptimize(model->forward(in));
  state.counters["threads"] = vf::num_threads();
}

}  // namespace

static void BM_ConvNextTiny(benchmark::State& s) {
  run(s, {{"model_type", "convnext"}, {"architectures", {"ConvNextForImageClassification"}}, {"num_labels", 1000}}, 224, 224, false);
}
static void BM_DeiTBase(benchmark::State& s) {
  run(s, {{"model_type", "deit"}, {"architectures", {"DeiTModel"}}}, 224, 224, false);
}
static void BM_DetrResnet50(benchmark::State& s) {
  run(s, {{"model_type", "detr"}, {"architectures", {"DetrForObjectDetection"}}, {"num_labels", 91}}, 800, 1066, true);
}
static void BM_DetaResnet50(benchmark::State& s) {
  run(s, {{"model_type", "deta"}, {"architectures", {"DetaForObjectDetection"}}, {"num_labels", 91}}, 800, 1066, true);
}
// jozhang97/deta-swin-large's config (convert_deta_swin_to_pytorch.py): Swin-L backbone, stages 2-4.
static void BM_DetaSwinLarge(benchmark::State& s) {
  vf::json backbone = {{"model_type", "swin"}, {"embed_dim", 192}, {"depths", {2, 2, 18, 2}},
                       {"num_heads", {6, 12, 24, 48}}, {"window_size", 12}, {"out_indices", {2, 3, 4}}};
  run(s, {{"model_type", "deta"}, {"architectures", {"DetaForObjectDetection"}}, {"num_labels", 91},
          {"backbone_config", backbone}, {"num_queries", 900}, {"encoder_ffn_dim", 2048}, {"decoder_ffn_dim", 2048},
          {"num_feature_levels", 5}, {"assign_first_stage", true}, {"with_box_refine", true}, {"two_stage", true}},
      800, 1066, true);
}

BENCHMARK(BM_ConvNextTiny)->Unit(benchmark::kMillisecond)->MinTime(3.0)->UseRealTime();
BENCHMARK(BM_DeiTBase)->Unit(benchmark::kMillisecond)->MinTime(3.0)->UseRealTime();
BENCHMARK(BM_DetrResnet50)->Unit(benchmark::kMillisecond)->Iterations(3)->UseRealTime();
BENCHMARK(BM_DetaResnet50)->Unit(benchmark::kMillisecond)->Iterations(3)->UseRealTime();
BENCHMARK(BM_DetaSwinLarge)->Unit(benchmark::kMillisecond)->Iterations(1)->UseRealTime();

BENCHMARK_MAIN();
