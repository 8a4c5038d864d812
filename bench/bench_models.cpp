// Whole-model speed, float32, the Hub architectures with deterministic random weights (the speed does
// not depend on the values). bench/run.sh runs each benchmark in a fresh process, beside ONNX Runtime
// and PyTorch on the same machine and thread count, and prints one table.
//
//   BM_<Model>             batch-1 latency; counters: threads, peak_rss_mb (this process's peak, so
//                          per model when the process runs one benchmark, as run.sh does)
//   BM_<Model>/batch       throughput: one model, VF_BENCH_BATCH images (default 8; 2 at 800×1066)
//                          in one forward on all VF_THREADS threads; items_per_second = images/s
//   BM_<Model>/inflight    throughput: VF_BENCH_WORKERS models (default: VF_THREADS), each on its own
//                          thread with VF_THREADS / workers threads of its own, batch 1 each, all
//                          running at once; items_per_second = images/s
// VF_DEVICE=cuda (or cuda:N) runs them on a GPU (bench/run_gpu.sh): an iteration of BM_<Model> is
// Model::infer, from a host image (or, with VF_BENCH_INPUT=device, one already on the GPU, as PyTorch's
// benchmarks have it) to the host outputs; the throughput benchmarks upload their inputs once.
// VF_DTYPE=bfloat16 (or float16) builds the models' convolutions and linear layers in that compute dtype
// (README: reduced precision); the benchmarks keep their names and are labelled with it.
#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench_device.h"
#include "core/device.h"
#include "core/ops.h"
#include "models/model.h"
#include "vf_build_commit.h"  // generated at build time (bench/CMakeLists.txt)

namespace {

using vf_bench::bench_device;

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

vf::DType bench_dtype() {
  const char* t = std::getenv("VF_DTYPE");
  return t && *t ? vf::parse_compute_dtype(t) : vf::DType::F32;
}

std::unique_ptr<vf::Model> build(const vf::json& config) {
  auto store = std::make_shared<vf::WeightStore>();
  store->set_missing_filler(fill);
  vf::LoadDeviceScope on(bench_device(), bench_dtype());
  return vf::create_model(config, "", vf::Weights(store));
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && std::atoi(v) > 0 ? std::atoi(v) : fallback;
}

int bench_threads() { return env_int("VF_THREADS", int(std::thread::hardware_concurrency())); }

struct Arch {
  const char* name;  // the benchmark's name
  vf::json config;   // the Hub config.json, less the keys equal to transformers 4.37's defaults
  int64_t h, w;
  bool detection;    // DETR family: pixel_mask, and few, long iterations
};

vf::ModelInputs inputs(const Arch& a, int64_t batch) {
  vf::ModelInputs in;
  in.pixel_values = fill("pixel_values", {batch, 3, a.h, a.w}).to(bench_device());
  if (a.detection)
    in.pixel_mask = vf::Tensor::from_vector<int64_t>({batch, a.h, a.w}, std::vector<int64_t>(batch * a.h * a.w, 1));
  return in;
}

long minor_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_maxrss) / 1024.0;  // Linux reports kilobytes
}

// On a GPU, counter peak_gpu_mb: the most device memory vf's tensors held while timed (weights
// included; cuDNN's one-time algorithm search at the warm-up not), counted from reset_gpu_peak().
void reset_gpu_peak() {
  if (!bench_device().is_cpu()) vf::device_memory_stats(bench_device(), /*reset_peak=*/true);
}
void report_gpu_peak(benchmark::State& state) {
  if (!bench_device().is_cpu())
    state.counters["peak_gpu_mb"] = double(vf::device_memory_stats(bench_device()).peak) / double(1 << 20);
}

void latency(benchmark::State& state, const Arch& a) {
  vf::set_num_threads(bench_threads());
  auto model = build(a.config);
  std::string label = bench_dtype() != vf::DType::F32 ? vf::dtype_name(bench_dtype()) : "";
  if (!bench_device().is_cpu()) {
    // What a caller gets: Model::infer uploads the image, replays the recorded forward where the
    // model allows (no pixel mask: all ones is the same as none), and downloads the outputs. With
    // VF_BENCH_INPUT=device the image is on the GPU before the clock starts (infer copies it into the
    // recorded forward's input on the GPU), which is what PyTorch's timings of a model measure.
    vf::ModelInputs in;
    in.pixel_values = fill("pixel_values", {1, 3, a.h, a.w});
    const char* source = std::getenv("VF_BENCH_INPUT");
    if (source && std::string(source) == "device") {
      in.pixel_values = in.pixel_values.to(bench_device());
      label += label.empty() ? "input on the GPU" : ", input on the GPU";
    }
    state.SetLabel(label);
    for (int i = 0; i < 3; ++i) model->infer(in);  // set-up, recording, first replay
    reset_gpu_peak();
    for (auto _ : state) benchmark::DoNotOptimize(model->infer(in));
    report_gpu_peak(state);
    return;
  }
  state.SetLabel(label);
  auto in = inputs(a, 1);
  model->forward(in);  // warm-up: primitive creation and weight reorders happen once
  const long faults_before = minor_faults();
  for (auto _ : state) benchmark::DoNotOptimize(model->forward(in));
  // Page faults of a warm forward: memory taken from the system anew each time (the buffer pool
  // should hand every buffer back: 0 or near it).
  state.counters["faults_per_forward"] =
      double(minor_faults() - faults_before) / double(std::max<int64_t>(1, state.iterations()));
  state.counters["threads"] = vf::num_threads();
  state.counters["peak_rss_mb"] = peak_rss_mb();
  // Where the memory is: the most the buffer pool had handed out at once (weights included), and
  // what it keeps cached for the next forward.
  const vf::PoolStats pool = vf::pool_stats();
  state.counters["pool_peak_mb"] = double(pool.peak_live_bytes) / double(1 << 20);
  state.counters["pool_cached_mb"] = double(pool.cached_bytes) / double(1 << 20);
}

// `workers` models at once, each on a thread of its own with `threads_each` compute threads, each
// running `rounds` forwards of `batch` images after a warm-up one; timed from when all are warm to
// when the last finishes.
void throughput(benchmark::State& state, const Arch& a, int workers, int threads_each, int64_t batch, int rounds) {
  for (auto _ : state) {
    std::barrier warm(workers + 1);
    std::vector<std::thread> pool;
    for (int i = 0; i < workers; ++i)
      pool.emplace_back([&] {
        vf::set_num_threads(threads_each);  // OpenMP's thread count is per calling thread
        auto model = build(a.config);
        auto in = inputs(a, batch);
        model->forward(in);
        vf::synchronize(bench_device());
        warm.arrive_and_wait();
        for (int r = 0; r < rounds; ++r) benchmark::DoNotOptimize(model->forward(in));
        vf::synchronize(bench_device());
      });
    warm.arrive_and_wait();
    reset_gpu_peak();
    auto t0 = std::chrono::steady_clock::now();
    for (auto& t : pool) t.join();
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  state.SetItemsProcessed(state.iterations() * workers * batch * rounds);
  state.counters["workers"] = workers;
  state.counters["threads_each"] = threads_each;
  state.counters["batch"] = double(batch);
  state.counters["peak_rss_mb"] = peak_rss_mb();
  report_gpu_peak(state);
}

vf::json detr_family(const char* model_type, const char* architecture) {
  // The timm ResNet-50 backbone is the 4.37 default of all three (use_timm_backbone, backbone "resnet50").
  return {{"model_type", model_type}, {"architectures", {architecture}}, {"num_labels", 91}};
}

std::vector<Arch> architectures() {
  vf::json swin = {{"model_type", "swin"}, {"embed_dim", 192}, {"depths", {2, 2, 18, 2}},
                   {"num_heads", {6, 12, 24, 48}}, {"window_size", 12}, {"out_indices", {2, 3, 4}}};
  return {
      // facebook/convnext-tiny-224
      {"BM_ConvNextTiny",
       {{"model_type", "convnext"}, {"architectures", {"ConvNextForImageClassification"}}, {"num_labels", 1000}},
       224, 224, false},
      // DeiT-B/16 (DeiTModel: DeiTConfig's defaults are facebook/deit-base-patch16-224's size)
      {"BM_DeiTBase", {{"model_type", "deit"}, {"architectures", {"DeiTModel"}}}, 224, 224, false},
      // google/bit-50: its config.json equals BitConfig's defaults (preactivation, no global padding, 32 groups)
      {"BM_Bit50", {{"model_type", "bit"}, {"architectures", {"BitForImageClassification"}}, {"num_labels", 1000}},
       224, 224, false},
      // facebook/convnextv2-tiny-1k-224
      {"BM_ConvNextV2Tiny",
       {{"model_type", "convnextv2"}, {"architectures", {"ConvNextV2ForImageClassification"}},
        {"depths", {3, 3, 9, 3}}, {"hidden_sizes", {96, 192, 384, 768}}, {"num_labels", 1000}},
       224, 224, false},
      // microsoft/cvt-13: CvtConfig's defaults are CvT-13
      {"BM_Cvt13", {{"model_type", "cvt"}, {"architectures", {"CvtForImageClassification"}}, {"num_labels", 1000}},
       224, 224, false},
      // facebook/detr-resnet-50 at the processor's size of a 4:3 image (shortest edge 800)
      {"BM_DetrResnet50", detr_family("detr", "DetrForObjectDetection"), 800, 1066, true},
      // microsoft/conditional-detr-resnet-50: 300 queries, FFN 2048 (the defaults)
      {"BM_ConditionalDetrResnet50", detr_family("conditional_detr", "ConditionalDetrForObjectDetection"), 800, 1066,
       true},
      // SenseTime/deformable-detr: 300 queries, 4 levels, FFN 1024, no box refinement, one stage (the defaults)
      {"BM_DeformableDetr", detr_family("deformable_detr", "DeformableDetrForObjectDetection"), 800, 1066, true},
      // DetaConfig's defaults: two-stage, box refinement, 900 queries, 5 levels
      {"BM_DetaResnet50", {{"model_type", "deta"}, {"architectures", {"DetaForObjectDetection"}}, {"num_labels", 91}},
       800, 1066, true},
      // jozhang97/deta-swin-large's config (convert_deta_swin_to_pytorch.py): Swin-L backbone, stages 2-4
      {"BM_DetaSwinLarge",
       {{"model_type", "deta"}, {"architectures", {"DetaForObjectDetection"}}, {"num_labels", 91},
        {"backbone_config", swin}, {"num_queries", 900}, {"encoder_ffn_dim", 2048}, {"decoder_ffn_dim", 2048},
        {"num_feature_levels", 5}, {"assign_first_stage", true}, {"with_box_refine", true}, {"two_stage", true}},
       800, 1066, true},
  };
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = bench_threads();
  const int workers = std::clamp(env_int("VF_BENCH_WORKERS", threads), 1, threads);
  const char* min_env = std::getenv("VF_BENCH_MIN_SECONDS");
  const double min_seconds = min_env && std::atof(min_env) > 0 ? std::atof(min_env) : 3.0;
  for (const Arch& a : architectures()) {
    bool swin = std::string(a.name) == "BM_DetaSwinLarge";
    auto* l = benchmark::RegisterBenchmark(a.name, [a](benchmark::State& s) { latency(s, a); });
    l->Unit(benchmark::kMillisecond)->UseRealTime();
    // Detection models take seconds per image on the CPU; a GPU gets 20 for a steadier mean.
    // VF_BENCH_MIN_SECONDS: the classifiers' minimum time each (default 3 s), shorter for A/B rounds.
    if (a.detection) l->Iterations(swin ? 1 : (bench_device().is_cpu() ? 3 : 20)); else l->MinTime(min_seconds);

    int64_t batch = env_int("VF_BENCH_BATCH", a.detection ? 2 : 8);
    // VF_BENCH_ROUNDS: forwards per worker (a GPU wants more than the CPU's default for a steady number).
    int rounds = env_int("VF_BENCH_ROUNDS", a.detection ? 2 : 8);
    if (swin) continue;  // minutes per image here: latency only
    benchmark::RegisterBenchmark((std::string(a.name) + "/batch").c_str(),
                                 [a, threads, batch, rounds](benchmark::State& s) {
                                   throughput(s, a, 1, threads, batch, rounds);
                                 })
        ->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(1);
    benchmark::RegisterBenchmark((std::string(a.name) + "/inflight").c_str(),
                                 [a, threads, workers, rounds](benchmark::State& s) {
                                   throughput(s, a, workers, threads / workers, 1, rounds * 2);
                                 })
        ->Unit(benchmark::kMillisecond)->UseManualTime()->Iterations(1);
  }
  benchmark::AddCustomContext("vf_commit", VF_BUILD_COMMIT);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
