#include "entries.h"

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <unistd.h>

#include "core/tensor.h"
#include "core/weights.h"
#include "io/checkpoint.h"
#include "io/image.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "io/torch_checkpoint.h"
#include "models/model.h"
#include "processors/image_processor.h"

namespace vf::fuzz {

namespace {

// A writable, owned copy of the input (tensors may wrap it; ASan sees reads past its end).
std::shared_ptr<uint8_t[]> copy_bytes(const uint8_t* data, size_t size) {
  std::shared_ptr<uint8_t[]> buf(new uint8_t[size ? size : 1]);
  if (size) std::memcpy(buf.get(), data, size);
  return buf;
}

// Reads every byte of every tensor, so that a view past its buffer shows up under ASan.
uint64_t touch(const std::vector<std::pair<std::string, Tensor>>& tensors) {
  uint64_t sum = 0;
  for (auto& [name, t] : tensors) {
    sum += name.size();
    const uint8_t* p = static_cast<const uint8_t*>(t.raw());
    for (size_t i = 0, n = t.nbytes(); i < n; ++i) sum += p[i];
  }
  return sum;
}

volatile uint64_t g_sink = 0;

std::string scratch_dir() {
  static std::string dir = [] {
    std::string tmpl = (std::filesystem::temp_directory_path() / "vf-fuzz-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    return tmpl;
  }();
  return dir;
}

}  // namespace

void safetensors(const uint8_t* data, size_t size) {
  auto buf = copy_bytes(data, size);
  auto tensors = parse_safetensors(buf.get(), size, "fuzz.safetensors", buf);
  g_sink = g_sink + touch(tensors);
  WeightStore store;
  for (auto& [name, t] : tensors) {
    if (store.has(name)) throw Error("fuzz.safetensors: duplicate tensor '" + name + "'");
    store.add(name, t);
  }
}

void torch_checkpoint(const uint8_t* data, size_t size) {
  auto buf = copy_bytes(data, size);
  auto tensors = read_torch_checkpoint(buf.get(), size, "fuzz.bin", buf);
  g_sink = g_sink + touch(tensors);
}

void config(const uint8_t* data, size_t size) {
  json cfg = parse_json_text(std::string(reinterpret_cast<const char*>(data), size), "fuzz/config.json");
  std::string first_error;
  try {
    auto store = std::make_shared<WeightStore>();
    auto model = create_model(cfg, "", Weights(store));
    store->check_complete();  // an empty store: throws naming the missing tensors
  } catch (const Error& e) {
    first_error = e.what();
  }
  auto proc = create_image_processor(cfg);
  g_sink = g_sink + proc->type().size();
  if (!first_error.empty()) throw Error(first_error);
}

void image(const uint8_t* data, size_t size) {
  Image img = decode_image(data, size, "fuzz.img", /*apply_exif_orientation=*/true);
  if (img.channels != 3 || img.rgb.size() != img.pixels() * 3)
    throw std::logic_error("decode_image returned an inconsistent image");
  static const auto deit = create_image_processor(json::parse(R"({
      "image_processor_type": "DeiTImageProcessor", "do_resize": true, "size": {"height": 20, "width": 20},
      "resample": 3, "do_center_crop": true, "crop_size": {"height": 16, "width": 16}, "do_rescale": true,
      "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})"));
  static const auto detr = create_image_processor(json::parse(R"({
      "image_processor_type": "DetrImageProcessor", "do_resize": true,
      "size": {"shortest_edge": 12, "longest_edge": 20}, "do_pad": true, "do_normalize": true,
      "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]})"));
  for (const auto* proc : {deit.get(), detr.get()}) {
    BatchFeature f = proc->preprocess({img});
    const float* p = f.pixel_values.data<float>();
    double s = 0;
    for (int64_t i = 0; i < f.pixel_values.numel(); ++i) s += p[i];
    g_sink = g_sink + static_cast<uint64_t>(s != s);
  }
}

void shard_index(const uint8_t* data, size_t size) {
  const std::string dir = scratch_dir();
  static bool shards_written = [&] {
    auto t = [](std::initializer_list<float> v) {
      Tensor x = Tensor::empty({static_cast<int64_t>(v.size())}, DType::F32);
      std::copy(v.begin(), v.end(), x.data<float>());
      return x;
    };
    write_safetensors(dir + "/model-00001-of-00002.safetensors", {{"a", t({1, 2})}, {"b", t({3})}});
    write_safetensors(dir + "/model-00002-of-00002.safetensors", {{"c", t({4, 5, 6})}});
    std::filesystem::create_directories(dir + "/sub");
    write_safetensors(dir + "/sub/model.safetensors", {{"d", t({7})}});
    return true;
  }();
  (void)shards_written;
  const std::string index = dir + "/model.safetensors.index.json";
  {
    std::ofstream f(index, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  auto store = load_weights_file(index);
  g_sink = g_sink + store->size();
}

const std::vector<Target>& targets() {
  static const std::vector<Target> t = {
      {"safetensors", safetensors}, {"torch", torch_checkpoint}, {"config", config},
      {"image", image},             {"shard_index", shard_index},
  };
  return t;
}

}  // namespace vf::fuzz
