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
using namespace std::string_literals;
namespace fs = std::filesystem;

namespace {

using test::write_bytes;

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

std::string floats(std::initializer_list<float> v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), v.begin(), s.size());
  return s;
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
  refuse("short", "\x10\x00\x00"s, "too short");
  refuse("header_past_eof", le64(1000) + "{}", "runs past the end of the file");
  refuse("header_too_large", le64(200'000'000) + std::string(16, ' '), "exceeds the limit");
  refuse("bad_json", raw_safetensors(R"({"a": {"dtype": "F32",)", f32x2), "not valid JSON");
  refuse("number_overflow", raw_safetensors(R"({"a": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 8]}})", f32x2),
         "not valid JSON");
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
  refuse("duplicate_name",
         raw_safetensors(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                         R"( "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                         f32x2),
         "'a' appears twice");
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

TEST(IoCheckpoint, SafetensorsHeaderLengthLikeAPickleOpcode) {
  // A header of 0x80 bytes makes the file start with 0x80, the first byte of a legacy torch pickle.
  std::string header = R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})";
  header.append(0x80 - header.size(), ' ');
  std::string dir = test::temp_dir("io_ckpt_0x80");
  write_bytes(dir + "/model.safetensors", raw_safetensors(header, floats({0.5f, 2.0f})));
  auto store = load_checkpoint(dir);
  ASSERT_TRUE(store->has("w"));
  EXPECT_EQ(store->find("w")->at(1), 2.0);
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

// ---- torch.save checkpoints --------------------------------------------------------------------

namespace {

std::string data_dir() { return std::string(VF_SOURCE_DIR) + "/tests/data"; }

std::string le16(uint16_t v) { return std::string{static_cast<char>(v & 0xff), static_cast<char>(v >> 8)}; }
std::string le32(uint32_t v) { return le16(v & 0xffff) + le16(v >> 16); }

// A zip archive of stored entries, as torch.save writes them; with zip64 = true every size and
// offset goes through the zip64 extra field and end-of-central-directory records.
std::string make_zip(const std::vector<std::pair<std::string, std::string>>& entries, bool zip64 = false) {
  std::string out, central;
  for (auto& [name, data] : entries) {
    uint64_t offset = out.size();
    out += le32(0x04034b50) + le16(zip64 ? 45 : 20) + le16(0) + le16(0) + le32(0) + le32(0);
    out += zip64 ? le32(0xffffffff) + le32(0xffffffff) : le32(data.size()) + le32(data.size());
    std::string local_extra = zip64 ? le16(1) + le16(16) + le64(data.size()) + le64(data.size()) : "";
    out += le16(name.size()) + le16(local_extra.size()) + name + local_extra + data;
    std::string extra = zip64 ? le16(1) + le16(24) + le64(data.size()) + le64(data.size()) + le64(offset) : "";
    // signature, versions, flags, method, time + date, crc (not checked by the reader), sizes
    central += le32(0x02014b50) + le16(45) + le16(zip64 ? 45 : 20) + le16(0) + le16(0) + le32(0) + le32(0);
    central += zip64 ? le32(0xffffffff) + le32(0xffffffff) : le32(data.size()) + le32(data.size());
    central += le16(name.size()) + le16(extra.size()) + le16(0) + le16(0) + le16(0) + le32(0);
    central += (zip64 ? le32(0xffffffff) : le32(offset)) + name + extra;
  }
  uint64_t cd_offset = out.size();
  out += central;
  if (zip64) {
    uint64_t z64 = out.size();
    out += le32(0x06064b50) + le64(44) + le16(45) + le16(45) + le32(0) + le32(0) + le64(entries.size()) +
           le64(entries.size()) + le64(central.size()) + le64(cd_offset);
    out += le32(0x07064b50) + le32(0) + le64(z64) + le32(1);
    out += le32(0x06054b50) + le16(0) + le16(0) + le16(0xffff) + le16(0xffff) + le32(0xffffffff) + le32(0xffffffff) + le16(0);
  } else {
    out += le32(0x06054b50) + le16(0) + le16(0) + le16(entries.size()) + le16(entries.size()) + le32(central.size()) +
           le32(cd_offset) + le16(0);
  }
  return out;
}

std::string pstr(const std::string& s) { return "X" + le32(s.size()) + s; }  // BINUNICODE

// A pickled state dict {name: _rebuild_tensor_v2(FloatStorage '0' of `numel`, offset, (size,), (stride,))}.
std::string tensor_pickle(const std::string& name, int numel, int offset, int size, int stride) {
  auto k = [](int v) { return "K" + std::string(1, static_cast<char>(v)); };  // BININT1
  return "\x80\x02}(" + pstr(name) + "ctorch._utils\n_rebuild_tensor_v2\n((" + pstr("storage") +
         "ctorch\nFloatStorage\n" + pstr("0") + pstr("cpu") + k(numel) + "tQ" + k(offset) + k(size) + "\x85" +
         k(stride) + "\x85\x89}tRu.";
}

std::string write_temp(const std::string& test, const std::string& name, const std::string& bytes) {
  std::string path = test::temp_dir(test) + "/" + name;
  write_bytes(path, bytes);
  return path;
}

void expect_small_fixture(const std::vector<std::pair<std::string, Tensor>>& t) {
  std::vector<std::string> names;
  for (auto& [n, x] : t) names.push_back(n);
  EXPECT_EQ(names, (std::vector<std::string>{"linear.weight", "linear.weight_t", "row", "col", "bn.num_batches_tracked",
                                             "ids", "half", "bf16", "mask", "double", "param", "expanded", "empty"}));
  ASSERT_EQ(t.size(), 13u);
  auto base = [](int64_t i) { return 0.5 * i - 1; };  // arange(12).reshape(3, 4) * 0.5 - 1
  const Tensor& w = t[0].second;
  EXPECT_EQ(w.shape(), (Shape{3, 4}));
  for (int i = 0; i < 12; ++i) EXPECT_EQ(w.at(i), base(i));
  const Tensor& wt = t[1].second;  // the transpose, materialised
  EXPECT_EQ(wt.shape(), (Shape{4, 3}));
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 3; ++c) EXPECT_EQ(wt.at(r * 3 + c), base(c * 4 + r)) << r << "," << c;
  for (int i = 0; i < 4; ++i) EXPECT_EQ(t[2].second.at(i), base(4 + i));  // row 1
  for (int i = 0; i < 3; ++i) EXPECT_EQ(t[3].second.at(i), base(i * 4 + 2));  // column 2
  EXPECT_EQ(t[4].second.dtype(), DType::I64);
  EXPECT_EQ(t[4].second.shape(), Shape{});
  EXPECT_EQ(t[4].second.data<int64_t>()[0], 7);
  EXPECT_EQ(t[5].second.data<int64_t>()[1], int64_t(1) << 40);
  EXPECT_EQ(t[5].second.data<int64_t>()[0], -3);
  EXPECT_EQ(t[6].second.dtype(), DType::F16);
  EXPECT_EQ(t[6].second.at(0), 1.5);
  EXPECT_EQ(t[6].second.at(2), 0.25);
  EXPECT_EQ(t[7].second.dtype(), DType::BF16);
  EXPECT_EQ(t[7].second.at(1), -3.0);
  EXPECT_EQ(t[8].second.dtype(), DType::Bool);
  EXPECT_EQ(t[8].second.at(0), 1);
  EXPECT_EQ(t[8].second.at(1), 0);
  EXPECT_EQ(t[9].second.dtype(), DType::F64);
  EXPECT_EQ(t[9].second.shape(), (Shape{2, 1}));
  EXPECT_EQ(t[9].second.at(1), 2.5);
  EXPECT_EQ(t[10].second.at(0), 0.125);
  EXPECT_EQ(t[10].second.at(1), -0.25);
  EXPECT_EQ(t[11].second.shape(), (Shape{3, 2}));  // expand(): stride 0
  for (int i = 0; i < 6; ++i) EXPECT_EQ(t[11].second.at(i), i % 2 ? 2.0 : 1.0);
  EXPECT_EQ(t[12].second.shape(), (Shape{0, 3}));
}

}  // namespace

TEST(IoTorch, ReadsZipCheckpoint) {
  expect_small_fixture(read_torch_checkpoint(data_dir() + "/torch_small.bin"));
}

TEST(IoTorch, ReadsLegacyCheckpoint) {
  expect_small_fixture(read_torch_checkpoint(data_dir() + "/torch_small_legacy.bin"));
}

TEST(IoTorch, LoadsFromModelFolderAndShardIndex) {
  std::string dir = test::temp_dir("io_torch_folder");
  fs::copy_file(data_dir() + "/torch_small.bin", dir + "/pytorch_model.bin", fs::copy_options::overwrite_existing);
  auto store = load_checkpoint(dir);
  EXPECT_EQ(store->size(), 13u);
  EXPECT_EQ(store->find("ids")->data<int64_t>()[2], 5);

  // An index over a torch shard and a safetensors shard.
  std::string sdir = test::temp_dir("io_torch_sharded");
  fs::copy_file(data_dir() + "/torch_small_legacy.bin", sdir + "/pytorch_model-00001-of-00002.bin",
                fs::copy_options::overwrite_existing);
  write_safetensors(sdir + "/extra.safetensors", {{"extra.bias", Tensor::from<float>({2}, {4, 5})}});
  json index = {{"weight_map", {{"extra.bias", "extra.safetensors"}}}};
  for (auto& [n, t] : read_torch_checkpoint(sdir + "/pytorch_model-00001-of-00002.bin"))
    index["weight_map"][n] = "pytorch_model-00001-of-00002.bin";
  std::ofstream(sdir + "/pytorch_model.bin.index.json") << index.dump();
  auto sharded = load_checkpoint(sdir);
  EXPECT_EQ(sharded->size(), 14u);
  EXPECT_EQ(sharded->find("extra.bias")->at(1), 5.0);
  EXPECT_EQ(sharded->find("row")->at(0), 1.0);
}

TEST(IoTorch, Zip64ArchiveAndStorageBounds) {
  std::string storage = floats({1.5f, -2.5f});
  auto zip = [&](const std::string& pkl, bool z64) {
    return make_zip({{"archive/data.pkl", pkl}, {"archive/data/0", storage}, {"archive/version", "3\n"}}, z64);
  };
  for (bool z64 : {false, true}) {
    SCOPED_TRACE(z64 ? "zip64" : "zip");
    auto t = read_torch_checkpoint(write_temp("io_torch_zip64", "ok.bin", zip(tensor_pickle("w", 2, 0, 2, 1), z64)));
    ASSERT_EQ(t.size(), 1u);
    EXPECT_EQ(t[0].first, "w");
    EXPECT_EQ(t[0].second.at(0), 1.5);
    EXPECT_EQ(t[0].second.at(1), -2.5);
  }
  auto refuse = [&](const std::string& what, const std::string& bytes, const std::string& expect) {
    SCOPED_TRACE(what);
    std::string msg = error_of([&] { read_torch_checkpoint(write_temp("io_torch_bounds", what + ".bin", bytes)); });
    EXPECT_NE(msg.find(expect), std::string::npos) << msg;
  };
  refuse("past_storage", zip(tensor_pickle("w", 2, 0, 3, 1), false), "reaches element 2 of a storage of 2");
  refuse("offset_past_storage", zip(tensor_pickle("w", 2, 1, 2, 1), false), "reaches element 2");
  refuse("numel_past_file", zip(tensor_pickle("w", 9, 0, 2, 1), false), "storage declares 9 elements");
  refuse("missing_storage", make_zip({{"archive/data.pkl", tensor_pickle("w", 2, 0, 2, 1)}}), "archive/data/0");
  refuse("no_data_pkl", make_zip({{"archive/other", "x"}}), "data.pkl");
}

TEST(IoTorch, RefusesHostilePickles) {
  auto refuse = [&](const std::string& what, const std::string& pkl, const std::string& expect) {
    SCOPED_TRACE(what);
    std::string path = write_temp("io_torch_hostile", what + ".bin", make_zip({{"archive/data.pkl", pkl}}));
    std::string msg = error_of([&] { read_torch_checkpoint(path); });
    EXPECT_NE(msg.find(expect), std::string::npos) << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
  };
  // os.system("ls") through GLOBAL + REDUCE.
  refuse("posix_system", "\x80\x02" "cposix\nsystem\nq\x00"s + pstr("ls") + "\x85R.",
         "pickle global 'posix.system' is not allowed");
  // eval(...) through STACK_GLOBAL (protocol 4).
  refuse("builtins_eval",
         "\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08" "builtins\x8c\x04" "eval\x93"s + pstr("1") + "\x85R.",
         "pickle global 'builtins.eval' is not allowed");
  refuse("load_from_bytes", "\x80\x02" "ctorch.storage\n_load_from_bytes\n" + pstr("x") + "\x85R.",
         "pickle global 'torch.storage._load_from_bytes' is not allowed");
  refuse("call_storage_class", "\x80\x02" "ctorch\nFloatStorage\n)R.", "calling 'torch.FloatStorage' is not allowed");
  refuse("build_on_global", "\x80\x02" "ccollections\nOrderedDict\n}b.", "BUILD on a global");
  refuse("unknown_opcode", "\x80\x02" "i__builtin__\nobject\n.", "unsupported pickle opcode 0x69 'i'");
  refuse("deep_marks", "\x80\x02" + std::string(100000, '('), "nested MARKs");
  refuse("deep_tuples", "\x80\x02)" + std::string(100000, '\x85'), "nested deeper");
  refuse("self_list", "\x80\x02]q\x00h\x00" "a."s, "expected a state dict");
  refuse("bad_memo", "\x80\x02h\x05.", "memo entry 5");
  refuse("truncated_pickle", "\x80\x02}(" + pstr("w"), "unexpected end of data");
  refuse("huge_string", "\x80\x02X\xff\xff\xff\x7f", "unexpected end of data");
  refuse("not_tensor", "\x80\x02}(" + pstr("w") + "K\x01u.", "entry 'w' is a int, not a tensor");
}

TEST(IoTorch, TruncatedAndCorruptFilesAreErrors) {
  for (const char* name : {"torch_small.bin", "torch_small_legacy.bin"}) {
    SCOPED_TRACE(name);
    std::ifstream f(data_dir() + "/" + name, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    ASSERT_GT(bytes.size(), 1000u);
    // Parsed from memory (a copy per variant, so that nothing can read past its end unnoticed).
    auto parse = [&](const std::string& b) {
      auto buf = std::shared_ptr<uint8_t[]>(new uint8_t[b.size() + 1]);
      std::memcpy(buf.get(), b.data(), b.size());
      read_torch_checkpoint(buf.get(), b.size(), "corrupt", buf);
    };
    // Every proper prefix is refused with a vf::Error.
    for (size_t n = 0; n < bytes.size(); ++n) EXPECT_THROW(parse(bytes.substr(0, n)), Error) << "prefix of " << n << " bytes";
    // A flipped byte anywhere either still loads or is a vf::Error (never a crash).
    size_t errors = 0;
    for (size_t i = 0; i < bytes.size(); ++i) {
      std::string c = bytes;
      c[i] = static_cast<char>(c[i] ^ 0x5a);
      try {
        parse(c);
      } catch (const Error&) {
        ++errors;
      }
    }
    EXPECT_GT(errors, 10u);
  }
}

TEST(IoTorch, GoldenBinMatchesSafetensors) {
  // bit-tiny-preact-bin is not vendored: this comparison runs only next to ../shared.
  std::string shared = std::string(VF_SOURCE_DIR) + "/../shared/goldens";
  if (!fs::exists(shared + "/bit-tiny-preact-bin/pytorch_model.bin")) GTEST_SKIP() << "needs " << shared;
  auto bin = load_checkpoint(shared + "/bit-tiny-preact-bin");
  auto st = read_safetensors(shared + "/bit-tiny-preact/model.safetensors");
  ASSERT_GT(st.size(), 10u);
  std::set<std::string> names;
  for (auto& [name, t] : st) {
    names.insert(name);
    const Tensor* b = bin->find(name);
    ASSERT_NE(b, nullptr) << name;
    EXPECT_TRUE(same_bytes(*b, t)) << name;
  }
  for (auto& name : bin->names()) EXPECT_TRUE(names.count(name)) << "only in the .bin: " << name;
}

// A safetensors file whose 8-byte header length begins with byte 0x80 (a pickle PROTO opcode) is
// still read as safetensors: the file name decides, not a sniff of the first byte.
TEST(IoCheckpoint, SafetensorsWhoseHeaderLengthStartsWith0x80) {
  std::string header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  header.resize(0x180, ' ');
  std::string bytes(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) bytes[i] = char((n >> (8 * i)) & 0xff);
  ASSERT_EQ(uint8_t(bytes[0]), 0x80);
  float values[2] = {1.5f, -2.0f};
  bytes += header + std::string(reinterpret_cast<const char*>(values), sizeof values);
  std::string path = vf::test::temp_dir("io_0x80") + "/model-00001-of-00001.safetensors";
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
  }
  auto store = vf::load_weights_file(path);
  const vf::Tensor* w = store->find("w");
  ASSERT_NE(w, nullptr);
  EXPECT_FLOAT_EQ(w->f32()[0], 1.5f);
  EXPECT_FLOAT_EQ(w->f32()[1], -2.0f);
}
