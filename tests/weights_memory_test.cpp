// A memory-mapped checkpoint is held once: float32 tensors wrap the mapping, and a layer that
// needs its weights in another layout keeps the reordered copy only, handing the mapped pages back.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdint>
#include <fstream>
#include <string>

#include "core/file_pages.h"
#include "core/ops.h"
#include "core/weights.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace vf {
namespace {

// Resident kB of the mapping that holds address `p`, as the kernel reports it in
// /proc/self/smaps; -1 when no mapping holds it.
long resident_kb_of_mapping(const void* p) {
  std::ifstream f("/proc/self/smaps");
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::string line;
  bool inside = false;
  while (std::getline(f, line)) {
    unsigned long lo = 0, hi = 0;
    char dash = 0;
    // A mapping's header ("lo-hi perms offset dev inode path") starts with lowercase hex.
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) && !std::isupper(line[0]) &&
        std::sscanf(line.c_str(), "%lx%c%lx", &lo, &dash, &hi) == 3 && dash == '-') {
      inside = a >= lo && a < hi;
      continue;
    }
    long kb = 0;
    if (inside && std::sscanf(line.c_str(), "Rss: %ld kB", &kb) == 1) return kb;
  }
  return -1;
}

// A deterministic, not-too-regular value for element i.
float value(int64_t i) { return static_cast<float>((i * 37 % 23) - 11) / 64.0f; }

Tensor make(const Shape& shape, int64_t salt) {
  Tensor t = Tensor::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = value(i + salt);
  return t;
}

TEST(WeightsMemory, SafetensorsFloat32TensorsWrapTheMappedFile) {
  std::string path = test::temp_dir("weights_memory") + "/wrap.safetensors";
  Tensor a = make({3, 5}, 0), b = make({7}, 100);
  write_safetensors(path, {{"a", a}, {"b", b}});
  auto tensors = read_safetensors(path);
  ASSERT_EQ(tensors.size(), 2u);
  for (auto& [name, t] : tensors) {
    EXPECT_TRUE(is_file_backed(t)) << name;
    // The bytes live in a file mapping (a copy would live in the heap), 4 kB pages or more of it
    // resident once read.
    EXPECT_GE(resident_kb_of_mapping(t.raw()), 4) << name;
  }
  EXPECT_EQ(tensors[0].second.at(7), a.at(7));
  EXPECT_EQ(tensors[1].second.at(6), b.at(6));

  // A file read into memory is not a file mapping: its pages must never be handed back.
  std::string bytes = test::read_bytes(path);
  std::shared_ptr<uint8_t> buf(new uint8_t[bytes.size()], std::default_delete<uint8_t[]>());
  std::copy(bytes.begin(), bytes.end(), buf.get());
  for (auto& [name, t] : parse_safetensors(buf.get(), bytes.size(), "memory", buf)) EXPECT_FALSE(is_file_backed(t));
}

// The weights of a 3x3 convolution on channels-last input are reordered into oneDNN's blocked
// layout. With the checkpoint mapped, the layer must then hold that copy only: the 144 kB of the
// weight's pages in the mapping are not resident (a layer that cloned the weight, or kept the
// original besides the reordered copy, leaves them all resident), and the output is still right.
TEST(WeightsMemory, ReorderedConvWeightsReplaceTheMappedOnes) {
  const int64_t O = 64, I = 64, K = 3, H = 4, W = 5;
  std::string path = test::temp_dir("weights_memory") + "/conv.safetensors";
  Tensor weight = make({O, I, K, K}, 0), bias = make({O}, 7);
  write_safetensors(path, {{"conv.bias", bias}, {"conv.weight", weight}});

  auto store = load_weights_file(path);
  Weights w(store);
  Tensor mapped_weight = w.pp("conv").get("weight", {O, I, K, K});
  const void* weight_address = mapped_weight.raw();
  // Keeps the mapping alive whatever the layer holds (the bias is 256 bytes of the same file).
  Tensor mapped_bias = w.pp("conv").get_unchecked("bias");
  Conv2dOptions opt;
  opt.pad_top = opt.pad_left = opt.pad_bottom = opt.pad_right = 1;
  Conv2d conv(mapped_weight, w.pp("conv").get("bias", {O}), opt);
  mapped_weight = Tensor();
  store.reset();

  Tensor x = make({1, H, W, I}, 3);  // NHWC
  Tensor y = conv.forward(x);
  ASSERT_EQ(y.shape(), (Shape{1, H, W, O}));
  // The convolution by hand, from the values written to the file.
  double worst = 0;
  for (int64_t o = 0; o < O; ++o)
    for (int64_t r = 0; r < H; ++r)
      for (int64_t c = 0; c < W; ++c) {
        double s = bias.f32()[o];
        for (int64_t i = 0; i < I; ++i)
          for (int64_t kr = 0; kr < K; ++kr)
            for (int64_t kc = 0; kc < K; ++kc) {
              int64_t rr = r + kr - 1, cc = c + kc - 1;
              if (rr < 0 || rr >= H || cc < 0 || cc >= W) continue;
              s += double(weight.f32()[((o * I + i) * K + kr) * K + kc]) * x.f32()[(rr * W + cc) * I + i];
            }
        worst = std::max(worst, std::abs(s - y.f32()[(r * W + c) * O + o]));
      }
  EXPECT_LT(worst, 1e-4);

  long resident = resident_kb_of_mapping(weight_address);
  ASSERT_GE(resident, 0) << "the mapping is gone";
  // The file is 144 kB of weight plus a few hundred bytes: at most the header's page and the two
  // pages the weight shares with its neighbours may stay.
  EXPECT_LE(resident, 3 * 4) << "the mapped weight pages are still resident after the reorder";
  // The second run reuses the reordered copy.
  Tensor y2 = conv.forward(x);
  EXPECT_EQ(y2.at(123), y.at(123));
}

}  // namespace
}  // namespace vf
