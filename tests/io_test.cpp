// src/io: JSON, safetensors, synthetic weights, checkpoint folders, torch.save files.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "io/checkpoint.h"
#include "io/json.h"
#include "io/safetensors.h"
#include "io/synthetic.h"
#include "io/torch_checkpoint.h"
#include "test_util.h"

using namespace vf;
namespace fs = std::filesystem;

namespace {

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A safetensors file from a header text and a data section.
std::string raw_safetensors(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

// The message of the vf::Error `f` throws ("" and a test failure when it throws nothing).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a vf::Error";
  return "";
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0);
}

const char* kVendoredTiny[] = {"bit-tiny-bottleneck-same", "convnext-tiny-backbone", "convnextv2-tiny-model",
                               "deit-tiny-model", "detr-tiny-model"};

}  // namespace

// ---- JSON --------------------------------------------------------------------------------------

TEST(IoJson, ReadsAndReportsErrors) {
  std::string dir = test::temp_dir("io_json");
  write_bytes(dir + "/ok.json", R"({"a": [1, 2], "b": "x"})");
  json j = read_json_file(dir + "/ok.json");
  EXPECT_EQ(j["a"][1].get<int>(), 2);
  EXPECT_EQ(j["b"].get<std::string>(), "x");

  std::string missing = error_of([&] { read_json_file(dir + "/nope.json"); });
  EXPECT_NE(missing.find("nope.json"), std::string::npos) << missing;

  write_bytes(dir + "/bad.json", "{\n  \"a\": 1,\n  \"b\": ]\n}");
  std::string bad = error_of([&] { read_json_file(dir + "/bad.json"); });
  EXPECT_NE(bad.find("bad.json"), std::string::npos) << bad;
  EXPECT_NE(bad.find("line 3"), std::string::npos) << bad;

  std::string big = error_of([&] { read_json_file(dir + "/ok.json", 5); });
  EXPECT_NE(big.find("limit"), std::string::npos) << big;
}

// ---- synthetic weights -------------------------------------------------------------------------

TEST(IoSynthetic, HashesMatchTheirDefinitions) {
  EXPECT_EQ(fnv1a64(""), 0xcbf29ce484222325ull);
  EXPECT_EQ(fnv1a64("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(splitmix64(0), 0xe220a8397b1dcdafull);  // the first output of SplitMix64 seeded with 0
}

TEST(IoSynthetic, ReproducesGoldenCheckpointsBitForBit) {
  for (const char* name : kVendoredTiny) {
    SCOPED_TRACE(name);
    std::string dir = test::golden_case(name);
    auto synth = synthesize_weights(read_json_file(dir + "/weights.json"));
    auto file = read_safetensors(dir + "/model.safetensors");
    size_t compared = 0;
    for (auto& [tname, t] : file) {
      const Tensor* s = synth->find(tname);
      if (!s) {
        // Only integer buffers (num_batches_tracked) are left out of weights.json.
        EXPECT_NE(t.dtype(), DType::F32) << tname << " is a float tensor missing from weights.json";
        continue;
      }
      EXPECT_TRUE(same_bytes(*s, t)) << tname;
      ++compared;
    }
    EXPECT_EQ(compared, synth->size());
    EXPECT_GT(compared, 10u);
  }
}

// ---- safetensors -------------------------------------------------------------------------------

TEST(IoSafetensors, RoundTripKeepsOrderDtypesAndBytes) {
  std::string dir = test::temp_dir("io_st_roundtrip");
  std::vector<std::pair<std::string, Tensor>> tensors = {
      {"z.first", Tensor::from<float>({2, 3}, {1.5f, -2, 3, 4, 5, 6.25f})},
      {"a.int64", Tensor::from<int64_t>({3}, {-1, 1ll << 40, 7})},
      {"m.bytes", Tensor::from<uint8_t>({5}, {1, 2, 3, 4, 255})},  // leaves the next tensor misaligned
      {"b.double", Tensor::from<double>({1}, {3.141592653589793})},
      {"empty", Tensor::empty({0, 4})},
      {"scalar", Tensor::from<int32_t>({}, {42})},
  };
  std::string path = dir + "/t.safetensors";
  write_safetensors(path, tensors);
  for (auto& e : fs::directory_iterator(dir)) EXPECT_EQ(e.path().filename(), "t.safetensors");  // no temp left

  auto back = read_safetensors(path);
  ASSERT_EQ(back.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(back[i].first, tensors[i].first);
    EXPECT_TRUE(same_bytes(back[i].second, tensors[i].second)) << tensors[i].first;
  }
  EXPECT_EQ(back[3].second.at(0), 3.141592653589793);
  // Copy-on-write mapping: tensors may be modified without changing the file.
  back[0].second.f32()[0] = 99;
  EXPECT_FLOAT_EQ(read_safetensors(path)[0].second.f32()[0], 1.5f);

  WeightStore store;
  load_safetensors(path, store);
  EXPECT_EQ(store.size(), tensors.size());
  EXPECT_EQ(store.find("a.int64")->data<int64_t>()[1], 1ll << 40);
}

TEST(IoSafetensors, ReadsGoldenFileInHeaderOrder) {
  std::string path = test::golden_case("deit-tiny-model") + "/model.safetensors";
  auto t = read_safetensors(path);
  ASSERT_GT(t.size(), 10u);
  // Re-writing what was read gives back a file with the same tensors.
  std::string out = test::temp_dir("io_st_golden") + "/copy.safetensors";
  write_safetensors(out, t);
  auto again = read_safetensors(out);
  ASSERT_EQ(again.size(), t.size());
  for (size_t i = 0; i < t.size(); ++i) {
    EXPECT_EQ(again[i].first, t[i].first);
    EXPECT_TRUE(same_bytes(again[i].second, t[i].second));
  }
}

TEST(IoSafetensors, RefusesCorruptFiles) {
  std::string dir = test::temp_dir("io_st_bad");
  auto refuse = [&](const std::string& name, const std::string& bytes, const std::string& expect) {
    SCOPED_TRACE(name);
    std::string path = dir + "/" + name + ".safetensors";
    write_bytes(path, bytes);
    std::string msg = error_of([&] { read_safetensors(path); });
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(expect), std::string::npos) << msg;
  };
  const std::string f32x2 = std::string(8, '\0');
  refuse("short", "\x10\x00\x00", "too short");
  refuse("header_past_eof", le64(1000) + "{}", "runs past the end of the file");
  refuse("header_too_large", le64(200'000'000) + std::string(16, ' '), "exceeds the limit");
  refuse("bad_json", raw_safetensors(R"({"a": {"dtype": "F32",)", f32x2), "not valid JSON");
  refuse("not_object", raw_safetensors("[1, 2]", ""), "not a JSON object");
  refuse("bad_metadata", raw_safetensors(R"({"__metadata__": {"k": 1}})", ""), "__metadata__");
  refuse("offsets_past_end",
         raw_safetensors(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", f32x2),
         "past the end of the data section");
  refuse("overlap",
         raw_safetensors(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                         R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                         f32x2),
         "overlaps");
  refuse("wrong_byte_length",
         raw_safetensors(R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", f32x2), "needs 12 bytes");
  refuse("unknown_dtype",
         raw_safetensors(R"({"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}})", f32x2),
         "unsupported dtype 'F8_E4M3'");
  refuse("gap",
         raw_safetensors(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", f32x2),
         "belong to no tensor");
  refuse("trailing",
         raw_safetensors(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", f32x2),
         "trailing bytes");
  refuse("begin_after_end",
         raw_safetensors(R"({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}})", f32x2), "begin > end");
  refuse("overflow",
         raw_safetensors(R"({"a": {"dtype": "F32", "shape": [4611686018427387904, 8], "data_offsets": [0, 8]}})",
                         f32x2),
         "overflows");
  refuse("missing_shape", raw_safetensors(R"({"a": {"dtype": "F32", "data_offsets": [0, 8]}})", f32x2), "'shape'");
  refuse("negative_dim",
         raw_safetensors(R"({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", f32x2),
         "non-negative");

  // A good file cut short is caught too.
  std::string good = raw_safetensors(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", f32x2);
  write_bytes(dir + "/good.safetensors", good);
  EXPECT_EQ(read_safetensors(dir + "/good.safetensors").size(), 1u);
  refuse("truncated_data", good.substr(0, good.size() - 3), "past the end of the data section");
  refuse("truncated_header", good.substr(0, 20), "runs past the end of the file");
  EXPECT_NE(error_of([&] { read_safetensors(dir + "/absent.safetensors"); }).find("absent.safetensors"),
            std::string::npos);
}

// ---- checkpoint folders ------------------------------------------------------------------------

TEST(IoCheckpoint, LoadsModelFolder) {
  std::string dir = test::golden_case("convnext-tiny-backbone");
  auto store = load_checkpoint(dir);
  auto file = read_safetensors(dir + "/model.safetensors");
  ASSERT_EQ(store->size(), file.size());
  for (auto& [name, t] : file) EXPECT_TRUE(same_bytes(*store->find(name), t)) << name;

  std::string empty = test::temp_dir("io_ckpt_empty");
  std::string msg = error_of([&] { load_checkpoint(empty); });
  EXPECT_NE(msg.find("no weights found"), std::string::npos) << msg;
  EXPECT_NE(error_of([&] { load_checkpoint(empty + "/nonexistent"); }).find("not found"), std::string::npos);
}

TEST(IoCheckpoint, ShardedIndexOfTwoFiles) {
  std::string src = test::golden_case("deit-tiny-model") + "/model.safetensors";
  auto all = read_safetensors(src);
  ASSERT_GT(all.size(), 4u);
  std::vector<std::pair<std::string, Tensor>> first(all.begin(), all.begin() + all.size() / 2);
  std::vector<std::pair<std::string, Tensor>> second(all.begin() + all.size() / 2, all.end());

  std::string dir = test::temp_dir("io_ckpt_sharded");
  fs::remove(dir + "/model.safetensors");
  write_safetensors(dir + "/model-00001-of-00002.safetensors", first);
  write_safetensors(dir + "/model-00002-of-00002.safetensors", second);
  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
  for (auto& [n, t] : first) index["weight_map"][n] = "model-00001-of-00002.safetensors";
  for (auto& [n, t] : second) index["weight_map"][n] = "model-00002-of-00002.safetensors";
  auto write_index = [&](const json& j) {
    std::ofstream(dir + "/model.safetensors.index.json") << j.dump(2);
  };
  write_index(index);

  auto store = load_checkpoint(dir);
  ASSERT_EQ(store->size(), all.size());
  for (auto& [name, t] : all) EXPECT_TRUE(same_bytes(*store->find(name), t)) << name;
  EXPECT_EQ(load_weights_file(dir + "/model.safetensors.index.json")->size(), all.size());

  // A name the index maps to the other shard.
  json wrong = index;
  wrong["weight_map"][first[0].first] = "model-00002-of-00002.safetensors";
  write_index(wrong);
  std::string msg = error_of([&] { load_checkpoint(dir); });
  EXPECT_NE(msg.find(first[0].first), std::string::npos) << msg;

  // A name in the index that no shard holds.
  json extra = index;
  extra["weight_map"]["not.a.tensor"] = "model-00001-of-00002.safetensors";
  write_index(extra);
  msg = error_of([&] { load_checkpoint(dir); });
  EXPECT_NE(msg.find("not.a.tensor"), std::string::npos) << msg;

  // A name a shard holds that the index does not list.
  json fewer = index;
  fewer["weight_map"].erase(second.back().first);
  write_index(fewer);
  msg = error_of([&] { load_checkpoint(dir); });
  EXPECT_NE(msg.find(second.back().first), std::string::npos) << msg;

  // A shard outside the folder.
  json escape = index;
  escape["weight_map"][first[0].first] = "../elsewhere.safetensors";
  write_index(escape);
  msg = error_of([&] { load_checkpoint(dir); });
  EXPECT_NE(msg.find("relative path"), std::string::npos) << msg;
}
