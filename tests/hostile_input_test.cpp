// Hostile and broken input: files from strangers must end in one clear vf::Error (the right kind:
// InputError for unusable files, ModelError for configs/weights that describe no buildable model),
// never a crash, a hang, an allocation of absurd size or code execution.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <functional>
#include <limits>
#include <set>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "core/config.h"
#include "core/errors.h"
#include "core/limits.h"
#include "exit_codes.h"
#include "core/attention.h"
#include "core/ops.h"
#include "io/checkpoint.h"
#include "io/file.h"
#include "io/image.h"
#include "io/json.h"
#include "io/pickle.h"
#include "io/safetensors.h"
#include "io/torch_checkpoint.h"
#include "models/model.h"
#include "processors/image_processor.h"
#include "test_util.h"
#include "visionformers.h"

using namespace vf;
using namespace std::string_literals;
namespace fs = std::filesystem;

namespace {

using test::read_bytes;
using test::write_bytes;

std::string le16(uint16_t v) { return std::string{static_cast<char>(v & 0xff), static_cast<char>(v >> 8)}; }
std::string le32(uint32_t v) { return le16(v & 0xffff) + le16(v >> 16); }
std::string le64(uint64_t v) { return le32(uint32_t(v)) + le32(uint32_t(v >> 32)); }
std::string be32(uint32_t v) {
  return std::string{char(v >> 24), char((v >> 16) & 0xff), char((v >> 8) & 0xff), char(v & 0xff)};
}

using test::error_of;

std::string pstr(const std::string& s) { return "X" + le32(uint32_t(s.size())) + s; }  // BINUNICODE

// A zip archive of stored entries (the layout torch.save writes).
std::string make_zip(const std::vector<std::pair<std::string, std::string>>& entries) {
  std::string out, central;
  for (auto& [name, data] : entries) {
    uint32_t offset = uint32_t(out.size());
    out += le32(0x04034b50) + le16(20) + le16(0) + le16(0) + le32(0) + le32(0) + le32(uint32_t(data.size())) +
           le32(uint32_t(data.size())) + le16(uint16_t(name.size())) + le16(0) + name + data;
    central += le32(0x02014b50) + le16(20) + le16(20) + le16(0) + le16(0) + le32(0) + le32(0) +
               le32(uint32_t(data.size())) + le32(uint32_t(data.size())) + le16(uint16_t(name.size())) + le16(0) +
               le16(0) + le16(0) + le16(0) + le32(0) + le32(offset) + name;
  }
  uint32_t cd = uint32_t(out.size());
  out += central + le32(0x06054b50) + le16(0) + le16(0) + le16(uint16_t(entries.size())) +
         le16(uint16_t(entries.size())) + le32(uint32_t(central.size())) + le32(cd) + le16(0);
  return out;
}

uint32_t crc32(const std::string& s) {
  uint32_t c = 0xffffffffu;
  for (unsigned char b : s) {
    c ^= b;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
  }
  return ~c;
}

std::string png_chunk(const std::string& type, const std::string& data) {
  return be32(uint32_t(data.size())) + type + data + be32(crc32(type + data));
}

// A PNG whose IHDR claims width x height (8-bit RGB), with a few bytes of image data.
std::string png_claiming(uint32_t width, uint32_t height) {
  std::string ihdr = be32(width) + be32(height) + "\x08\x02\x00\x00\x00"s;
  return "\x89PNG\r\n\x1a\n"s + png_chunk("IHDR", ihdr) + png_chunk("IDAT", "\x78\x9c\x63\x00\x00\x00\x01\x00\x01"s) +
         png_chunk("IEND", "");
}

std::string scratch(const std::string& name) { return test::temp_dir("hostile_" + name); }

}  // namespace

// ---- pickles -----------------------------------------------------------------------------------

// Every callable an attacker would reach for is refused by name, whichever opcode names it and
// whichever container (zip archive or legacy pickle stream) carries it; nothing is executed.
TEST(HostilePickle, RefusesEveryGlobalOutsideTheAllowList) {
  const std::string dir = scratch("pickle");
  const char* globals[][2] = {
      {"posix", "system"},   {"nt", "system"},         {"os", "system"},
      {"subprocess", "Popen"}, {"subprocess", "check_output"}, {"builtins", "eval"},
      {"builtins", "exec"},  {"__builtin__", "eval"},  {"builtins", "getattr"},
      {"builtins", "__import__"}, {"torch.storage", "_load_from_bytes"}, {"torch", "load"},
      {"runpy", "_run_code"}, {"pickle", "loads"},     {"numpy.core.multiarray", "_reconstruct"},
      {"torch._utils", "_rebuild_tensor"}, {"collections", "defaultdict"}, {"torch.nn.modules.linear", "Linear"},
  };
  const std::string marker = dir + "/pwned";
  std::filesystem::remove(marker);
  for (auto& g : globals) {
    const std::string module = g[0], name = g[1], full = module + "." + name;
    SCOPED_TRACE(full);
    const std::string arg = pstr("touch " + marker) + "\x85";  // a 1-tuple argument
    std::vector<std::pair<std::string, std::string>> pickles = {
        // GLOBAL (protocol 0-3) + REDUCE
        {"global", "\x80\x02"s + "c" + module + "\n" + name + "\n" + arg + "R."},
        // STACK_GLOBAL (protocol 4) + REDUCE
        {"stack_global", "\x80\x04"s + pstr(module) + pstr(name) + "\x93" + arg + "R."},
        // INST (protocol 0): calls the class with the MARKed arguments
        {"inst", "\x80\x02(" + pstr("x") + "i" + module + "\n" + name + "\n."},
        // OBJ (protocol 1) and NEWOBJ (protocol 2) on a GLOBAL
        {"obj", "\x80\x02(c" + module + "\n" + name + "\n" + pstr("x") + "o."},
        {"newobj", "\x80\x02" "c"s + module + "\n" + name + "\n" + arg + "\x81."},
        // hidden inside an otherwise valid state dict value
        {"nested", "\x80\x02}(" + pstr("w") + "c" + module + "\n" + name + "\n" + arg + "Ru."},
    };
    for (auto& [how, pkl] : pickles) {
      SCOPED_TRACE(how);
      // In a zip archive (torch >= 1.6).
      std::string zpath = dir + "/" + module + "_" + name + "_" + how + ".bin";
      write_bytes(zpath, make_zip({{"archive/data.pkl", pkl}, {"archive/version", "3\n"}}));
      std::string msg = error_of<InputError>([&] { read_torch_checkpoint(zpath); });
      EXPECT_HAS(msg, zpath);
      if (how != "inst") {
        EXPECT_HAS(msg, "'" + full + "' is not allowed");
      }
      // As a legacy stream: magic number pickle first, then the hostile one.
      std::string lpath = dir + "/" + module + "_" + name + "_" + how + "_legacy.bin";
      write_bytes(lpath, pkl);
      msg = error_of<InputError>([&] { read_torch_checkpoint(lpath); });
      EXPECT_HAS(msg, lpath);
      // Through the model-folder entry point as well.
      std::string mdir = dir + "/model_" + how;
      fs::create_directories(mdir);
      fs::copy_file(zpath, mdir + "/pytorch_model.bin", fs::copy_options::overwrite_existing);
      msg = error_of<InputError>([&] { load_checkpoint(mdir); });
      EXPECT_HAS(msg, "pytorch_model.bin");
    }
  }
  EXPECT_FALSE(fs::exists(marker)) << "a hostile pickle ran a command";
}

TEST(HostilePickle, LimitsNestingAndCounts) {
  const std::string dir = scratch("pickle_limits");
  auto refuse = [&](const std::string& what, const std::string& pkl, const std::string& expect) {
    SCOPED_TRACE(what);
    std::string path = dir + "/" + what + ".bin";
    write_bytes(path, make_zip({{"archive/data.pkl", pkl}}));
    std::string msg = error_of<InputError>([&] { read_torch_checkpoint(path); });
    EXPECT_HAS(msg, expect);
    EXPECT_HAS(msg, path);
  };
  refuse("deep_lists", "\x80\x02" + std::string(200000, ']') + std::string(199999, 'a') + ".", "nested deeper");
  refuse("deep_marks", "\x80\x02" + std::string(600, '('), "nested MARKs");
  // 2^20 memo entries is the limit: one value memoised 1.1 million times.
  refuse("memo_flood", "\x80\x04N" + std::string(1100000, '\x94') + ".", "memo");
  // A stack of 1.1 million values.
  refuse("stack_flood", "\x80\x02" + std::string(1100000, 'N') + ".", "stack");
  refuse("long_length", "\x80\x02\x8a\xff" + std::string(16, '\x01'), "unexpected end of data");
  refuse("binbytes8_past_end", "\x80\x04\x8e" + le64(uint64_t(1) << 62) + "x", "unexpected end of data");
}

TEST(HostilePickle, TensorViewsStayInsideTheirStorage) {
  const std::string dir = scratch("pickle_views");
  auto k = [](int v) { return "K" + std::string(1, static_cast<char>(v)); };
  auto tensor = [&](const std::string& size, const std::string& stride, int offset) {
    return "\x80\x02}(" + pstr("w") + "ctorch._utils\n_rebuild_tensor_v2\n((" + pstr("storage") +
           "ctorch\nFloatStorage\n" + pstr("0") + pstr("cpu") + k(4) + "tQ" + k(offset) + size + stride +
           "\x89}tRu.";
  };
  std::string storage(16, '\0');
  auto refuse = [&](const std::string& what, const std::string& pkl, const std::string& expect) {
    SCOPED_TRACE(what);
    std::string path = dir + "/" + what + ".bin";
    write_bytes(path, make_zip({{"archive/data.pkl", pkl}, {"archive/data/0", storage}}));
    std::string msg = error_of<InputError>([&] { read_torch_checkpoint(path); });
    EXPECT_HAS(msg, expect);
    EXPECT_HAS(msg, "'w'");
  };
  // size 2^62 x 4, stride 1: overflows before any allocation.
  refuse("huge_size", tensor("(\x8a\x08" + le64(uint64_t(1) << 62) + k(4) + "t", "(" + k(1) + k(1) + "t", 0), "");
  refuse("negative_size", tensor("J" + le32(uint32_t(-3)) + "\x85", k(1) + "\x85", 0), "");
  refuse("negative_stride", tensor(k(2) + "\x85", "J" + le32(uint32_t(-1)) + "\x85", 0), "");
  refuse("stride_past_end", tensor(k(2) + "\x85", k(100) + "\x85", 0), "");
  refuse("offset_past_end", tensor(k(1) + "\x85", k(1) + "\x85", 200), "");
}

// ---- safetensors -------------------------------------------------------------------------------

TEST(HostileSafetensors, TruncatedCorruptAndOutOfRangeFiles) {
  const std::string dir = scratch("safetensors");
  std::string data(24, '\x01');
  std::string header = R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                       R"("b":{"dtype":"I64","shape":[1],"data_offsets":[16,24]}})";
  std::string good = le64(header.size()) + header + data;
  // Every proper prefix is an InputError naming the file.
  for (size_t n = 0; n < good.size(); ++n) {
    auto buf = std::shared_ptr<uint8_t[]>(new uint8_t[n + 1]);
    std::memcpy(buf.get(), good.data(), n);
    std::string msg = error_of<InputError>([&] { parse_safetensors(buf.get(), n, "cut.safetensors", buf); });
    EXPECT_HAS(msg, "cut.safetensors");
  }
  auto refuse = [&](const std::string& what, const std::string& bytes, const std::string& expect) {
    SCOPED_TRACE(what);
    std::string path = dir + "/" + what + ".safetensors";
    write_bytes(path, bytes);
    std::string msg = error_of<InputError>([&] { read_safetensors(path); });
    EXPECT_HAS(msg, path);
    EXPECT_HAS(msg, expect);
  };
  auto with_header = [&](const std::string& h, const std::string& d) { return le64(h.size()) + h + d; };
  refuse("offsets_past_end",
         with_header(R"({"a":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}})", data),
         "past the end of the data section");
  refuse("offset_u64_max",
         with_header(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,18446744073709551615]}})",
                     data),
         "past the end");
  refuse("shape_overflow",
         with_header(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,24]}})", data),
         "overflows");
  refuse("header_len_u64_max", le64(~uint64_t(0)) + "{}", "exceeds the limit");
  refuse("header_len_past_eof", le64(4096) + "{}", "past the end of the file");
  refuse("deep_header", with_header(std::string(10000, '[') + std::string(10000, ']'), ""), "nested deeper");
  refuse("float_offsets", with_header(R"({"a":{"dtype":"U8","shape":[24],"data_offsets":[0.0,24.0]}})", data),
         "not non-negative integers");
  refuse("string_shape", with_header(R"({"a":{"dtype":"U8","shape":["24"],"data_offsets":[0,24]}})", data),
         "not a non-negative integer");
  refuse("nul_in_header", with_header("{\"a\":\0}"s, ""), "not valid JSON");
  // The model-folder entry point names the file too.
  std::string mdir = dir + "/model";
  fs::create_directories(mdir);
  write_bytes(mdir + "/model.safetensors", good.substr(0, good.size() - 1));
  std::string msg = error_of<InputError>([&] { load_checkpoint(mdir); });
  EXPECT_HAS(msg, mdir + "/model.safetensors");
}

// ---- images ------------------------------------------------------------------------------------

TEST(HostileImage, DecompressionBombIsRefusedBeforeDecoding) {
  const std::string bomb = png_claiming(100000, 100000);
  EXPECT_LT(bomb.size(), 100u);
  std::string msg = error_of<InputError>([&] {
    decode_image(reinterpret_cast<const uint8_t*>(bomb.data()), bomb.size(), "bomb.png");
  });
  EXPECT_HAS(msg, "bomb.png");
  EXPECT_HAS(msg, "100000x100000");
  EXPECT_HAS(msg, "decompression bomb");
  // Just over Pillow's 2 * MAX_IMAGE_PIXELS limit is refused, and so is a zero or 2^31 dimension.
  const std::string over = png_claiming(17896, 10000);  // 178,960,000 > 178,956,970
  EXPECT_HAS(error_of<InputError>([&] {
               decode_image(reinterpret_cast<const uint8_t*>(over.data()), over.size(), "over.png");
             }),
             "decompression bomb");
  for (auto [w, h] : {std::pair<uint32_t, uint32_t>{0, 10}, {0x80000000u, 1}, {1, 0x7fffffffu}}) {
    const std::string bad = png_claiming(w, h);
    error_of<InputError>([&] { decode_image(reinterpret_cast<const uint8_t*>(bad.data()), bad.size(), "bad.png"); });
  }
}

TEST(HostileImage, TruncatedAndCorruptFiles) {
  const std::string truncated = test::images_dir() + "/truncated.jpg";
  ASSERT_TRUE(fs::exists(truncated)) << truncated;
  std::string msg = error_of<InputError>([&] { load_image(truncated); });
  EXPECT_HAS(msg, "truncated.jpg");

  // Every prefix of a valid PNG and a valid JPEG is an InputError (no partial image comes back).
  for (const char* name : {"palette_color.png", "rocket.jpg"}) {
    SCOPED_TRACE(name);
    std::string bytes = read_bytes(test::images_dir() + "/" + name);
    ASSERT_GT(bytes.size(), 500u);
    EXPECT_NO_THROW(decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), name));
    // Like Pillow, a PNG whose image data is complete decodes even when the chunks after it are
    // cut off: only prefixes ending inside the image data must fail.
    size_t must_fail_below = bytes.size() - 2;
    if (std::string(name).ends_with(".png")) {
      size_t idat = bytes.rfind("IDAT");
      ASSERT_NE(idat, std::string::npos);
      uint32_t len = (uint32_t(uint8_t(bytes[idat - 4])) << 24) | (uint32_t(uint8_t(bytes[idat - 3])) << 16) |
                     (uint32_t(uint8_t(bytes[idat - 2])) << 8) | uint32_t(uint8_t(bytes[idat - 1]));
      must_fail_below = idat + 4 + len;  // the end of the last IDAT's data (its CRC follows)
    }
    size_t step = std::max<size_t>(1, bytes.size() / 150);
    for (size_t n = 0; n < must_fail_below; n += step) {
      std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + long(n));
      error_of<InputError>([&] { decode_image(cut.data(), cut.size(), name); });
    }
  }
  EXPECT_HAS(error_of<InputError>([&] { load_image(scratch("img") + "/absent.png"); }), "absent.png");
  std::string gif = "GIF89a\x01\x00\x01\x00";
  EXPECT_HAS(error_of<InputError>([&] {
               decode_image(reinterpret_cast<const uint8_t*>(gif.data()), gif.size(), "x.gif");
             }),
             "x.gif");
}

// ---- JSON and configs --------------------------------------------------------------------------

TEST(HostileJson, NestingDepthAndFileSize) {
  const std::string dir = scratch("json");
  write_bytes(dir + "/deep.json", std::string(100000, '[') + std::string(100000, ']'));
  std::string msg = error_of<InputError>([&] { read_json_file(dir + "/deep.json"); });
  EXPECT_HAS(msg, dir + "/deep.json");
  EXPECT_HAS(msg, "nested deeper than 64");
  write_bytes(dir + "/deep_obj.json", [] {
    std::string s;
    for (int i = 0; i < 1000; ++i) s += "{\"a\":";
    return s + "1" + std::string(1000, '}');
  }());
  EXPECT_HAS(error_of<InputError>([&] { read_json_file(dir + "/deep_obj.json"); }), "nested deeper");
  // 64 levels are fine.
  write_bytes(dir + "/ok.json", std::string(64, '[') + std::string(64, ']'));
  EXPECT_NO_THROW(read_json_file(dir + "/ok.json"));
  write_bytes(dir + "/big.json", "{\"a\": \"" + std::string(2000, 'x') + "\"}");
  EXPECT_HAS(error_of<InputError>([&] { read_json_file(dir + "/big.json", 1024); }), "more than the limit of 1024");
  write_bytes(dir + "/bad.json", "{\"a\": 1,\n \"b\": tru}");
  msg = error_of<InputError>([&] { read_json_file(dir + "/bad.json"); });
  EXPECT_HAS(msg, "bad.json");
  EXPECT_HAS(msg, "line 2");
  EXPECT_HAS(error_of<InputError>([&] { read_json_file(dir); }), "directory");
}

TEST(HostileConfig, UnknownModelTypeAndBadValues) {
  auto store = std::make_shared<WeightStore>();
  std::string msg = error_of<ModelError>([&] { create_model(json{{"model_type", "gpt2"}}, "", Weights(store)); });
  EXPECT_HAS(msg, "unknown model_type 'gpt2'");
  EXPECT_HAS(msg, "convnext");  // the supported ones are listed
  EXPECT_HAS(error_of<ModelError>([&] { create_model(json::object(), "", Weights(store)); }), "no model_type");
  EXPECT_HAS(error_of<ModelError>([&] { create_model(json{{"model_type", 7}}, "", Weights(store)); }), "model_type");
  EXPECT_HAS(error_of<ModelError>([&] {
               create_model(json{{"model_type", "convnext"}, {"architectures", {"ConvNextForMagic"}}}, "",
                            Weights(store));
             }),
             "ConvNextForMagic");
  // A config whose sizes imply absurd tensors is refused before anything that large is allocated.
  json huge = read_json_file(test::goldens_dir() + "/convnext-tiny-backbone/config.json");
  huge["hidden_sizes"] = {1 << 20, 1 << 20, 1 << 20, 1 << 20};
  error_of([&] { create_model(huge, "", Weights(store)); });
  // Sizes that are zero, or numbers no integer can hold (found by the config fuzzer: a float like
  // 3e86 converted to an integer, and a depthwise convolution of zero groups).
  json zero = read_json_file(test::goldens_dir() + "/convnext-tiny-backbone/config.json");
  zero["hidden_sizes"][0] = 0;
  EXPECT_HAS(error_of<ModelError>([&] { create_model(zero, "", Weights(store)); }), "every size must be positive");
  json big = zero;
  big["hidden_sizes"] = {3.3e86, 16, 32, 64};
  EXPECT_HAS(error_of<ModelError>([&] { create_model(big, "", Weights(store)); }), "'hidden_sizes' has a value out of range");
  big["hidden_sizes"] = {8, 16, 32, 64};
  big["depths"] = {1, 1, 4294967297.0, 1};
  EXPECT_HAS(error_of<ModelError>([&] { create_model(big, "", Weights(store)); }), "'depths' has a value out of range");
  EXPECT_EQ(cfg_get<int>(json{{"n", 7.0}}, "n", 0), 7);  // integral floats still read, as before
  EXPECT_EQ(cfg_get<int64_t>(json{{"n", -5}}, "n", 0), -5);
  EXPECT_HAS(error_of<ModelError>([&] { cfg_get<int>(json{{"n", 2147483648.0}}, "n", 0); }), "out of range");
  EXPECT_HAS(error_of<ModelError>([&] { cfg_get<int>(json{{"n", -2147483649LL}}, "n", 0); }), "out of range");
  EXPECT_EQ(cfg_get<int>(json{{"n", -2147483648LL}}, "n", 0), INT32_MIN);
  EXPECT_HAS(error_of<ModelError>([&] { cfg_get<uint32_t>(json{{"n", -1}}, "n", 0); }), "out of range");
}

TEST(HostileConfig, WrongShapesAndMissingTensorsAreNamed) {
  const std::string src = test::goldens_dir() + "/convnext-tiny-backbone";
  const std::string dir = scratch("model_shapes");
  for (const char* f : {"config.json", "preprocessor_config.json"})
    fs::copy_file(src + "/" + f, dir + "/" + f, fs::copy_options::overwrite_existing);
  auto tensors = read_safetensors(src + "/model.safetensors");
  ASSERT_GT(tensors.size(), 3u);
  EXPECT_NO_THROW({
    write_safetensors(dir + "/model.safetensors", tensors);
    Pretrained::from_pretrained(dir);
  });

  // One tensor with a wrong shape: named, with both shapes.
  auto wrong = tensors;
  const std::string victim = wrong[1].first;
  wrong[1].second = Tensor::zeros({3, 5, 7});
  write_safetensors(dir + "/model.safetensors", wrong);
  std::string msg = error_of<ModelError>([&] { Pretrained::from_pretrained(dir); });
  EXPECT_HAS(msg, victim);
  EXPECT_HAS(msg, "[3, 5, 7]");

  // Missing tensors: every one is named.
  auto missing = tensors;
  const std::string gone1 = missing[0].first, gone2 = missing[2].first;
  missing.erase(missing.begin() + 2);
  missing.erase(missing.begin());
  write_safetensors(dir + "/model.safetensors", missing);
  msg = error_of<ModelError>([&] { Pretrained::from_pretrained(dir); });
  EXPECT_HAS(msg, gone1);
  EXPECT_HAS(msg, gone2);
  EXPECT_HAS(msg, "missing");
}

TEST(HostileProcessor, AbsurdSizesAreRefused) {
  json base = {{"image_processor_type", "DeiTImageProcessor"}, {"do_resize", true}, {"do_center_crop", false},
               {"size", {{"height", 8}, {"width", 8}}}};
  EXPECT_NO_THROW(create_image_processor(base));
  for (json size : {json{{"height", 1000000000}, {"width", 1000000000}}, json{{"height", -4}, {"width", 4}},
                    json{{"height", 1e300}, {"width", 4}}, json{{"height", 18446744073709551615ull}, {"width", 4}}}) {
    SCOPED_TRACE(size.dump());
    json c = base;
    c["size"] = size;
    EXPECT_HAS(error_of<ModelError>([&] { create_image_processor(c); }), "size.height");
  }
  json crop = base;
  crop["do_center_crop"] = true;
  crop["crop_size"] = {{"height", 4000000000000LL}, {"width", 2}};
  EXPECT_HAS(error_of<ModelError>([&] { create_image_processor(crop); }), "crop_size.height");
  // A resize target within the per-side limit but past the pixel limit fails at preprocess time.
  json big = base;
  big["size"] = {{"height", 1 << 20}, {"width", 1 << 20}};
  auto proc = create_image_processor(big);
  Image img;
  img.height = img.width = 2;
  img.rgb.assign(12, 7);
  EXPECT_HAS(error_of([&] { proc->preprocess({img}); }), "too large");
  json detr = {{"image_processor_type", "DetrImageProcessor"}, {"size", {{"shortest_edge", 1 << 20}, {"longest_edge", 1 << 20}}}};
  auto dp = create_image_processor(detr);
  error_of([&] { dp->preprocess({img}); });
  json kind = {{"image_processor_type", 12}};
  EXPECT_HAS(error_of<ModelError>([&] { create_image_processor(kind); }), "image_processor_type");
}

// ---- outputs -----------------------------------------------------------------------------------

TEST(HostileOutput, FailedWritesLeaveNoHalfWrittenFile) {
  const std::string dir = scratch("writes");
  // A failed safetensors write keeps the old file intact and leaves no temporary behind.
  const std::string path = dir + "/out.safetensors";
  write_safetensors(path, {{"a", Tensor::from<float>({2}, {1, 2})}});
  const std::string before = read_bytes(path);
  error_of([&] { write_safetensors(path, {{"a", Tensor::from<float>({1}, {3})}, {"a", Tensor::from<float>({1}, {4})}}); });
  error_of([&] { write_safetensors(path, {{"b", Tensor::from<float>({1}, {3})}, {"c", Tensor()}}); });
  EXPECT_EQ(read_bytes(path), before);
  // Into a folder that does not exist: an error, nothing created.
  error_of([&] { write_safetensors(dir + "/no/such/dir/x.safetensors", {{"a", Tensor::from<float>({1}, {1})}}); });
  Image img;
  img.height = 2;
  img.width = 3;
  img.rgb.assign(18, 100);
  save_png(dir + "/ok.png", img);
  const std::string png_before = read_bytes(dir + "/ok.png");
  Image bad = img;
  bad.rgb.resize(5);
  error_of([&] { save_png(dir + "/ok.png", bad); });
  EXPECT_EQ(read_bytes(dir + "/ok.png"), png_before);
  error_of([&] { save_png(dir + "/no/such/dir/x.png", img); });
  for (auto& e : fs::directory_iterator(dir))
    EXPECT_EQ(e.path().string().find(".tmp"), std::string::npos) << "temporary file left: " << e.path();
}

// ---- the vf CLI's exit codes -------------------------------------------------------------------

namespace {
int run_vf(const std::string& args) {
  std::string cmd = std::string(VF_VF_BINARY) + " " + args + " >/dev/null 2>&1";
  int st = std::system(cmd.c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}
}  // namespace

TEST(HostileCli, ExitCodesTellFailuresApart) {
  const std::string dir = scratch("cli");
  EXPECT_EQ(run_vf("--no-such-flag"), exit_code::kUsage);
  EXPECT_EQ(run_vf("check"), exit_code::kUsage);  // missing required arguments
  // Corrupt weights: bad input data.
  const std::string corrupt = dir + "/corrupt";
  fs::create_directories(corrupt);
  fs::copy_file(test::goldens_dir() + "/convnext-tiny-backbone/config.json", corrupt + "/config.json",
                fs::copy_options::overwrite_existing);
  write_bytes(corrupt + "/model.safetensors", le64(1000) + "{}");
  EXPECT_EQ(run_vf("info " + corrupt), exit_code::kBadInput);
  // A missing model folder: bad input too.
  EXPECT_EQ(run_vf("info " + dir + "/absent"), exit_code::kBadInput);
  // An unknown model_type: a model/config problem.
  const std::string unknown = dir + "/unknown";
  fs::create_directories(unknown);
  write_bytes(unknown + "/config.json", R"({"model_type": "gpt2"})");
  write_safetensors(unknown + "/model.safetensors", {{"a", Tensor::from<float>({1}, {1})}});
  EXPECT_EQ(run_vf("info " + unknown), exit_code::kModelProblem);
}

// ---- non-regular files, scale, memory, paths (issue 11, part 5) --------------------------------

namespace {

// Runs vf with `args` (and `env` assignments before it); returns the exit code and puts stdout and
// stderr together in *out.
int run_vf_output(const std::string& args, std::string* out, const std::string& env = "") {
  // Its own log per test (CTest runs the tests of this file as parallel processes).
  const std::string log =
      scratch(std::string("cli_out_") + ::testing::UnitTest::GetInstance()->current_test_info()->name()) + "/out.txt";
  std::string cmd = env + " " + std::string(VF_VF_BINARY) + " " + args + " >" + log + " 2>&1 </dev/null";
  int st = std::system(cmd.c_str());
  *out = read_bytes(log);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

// A copy of a golden case's model folder (config, preprocessor config, weights).
std::string copy_model(const std::string& golden, const std::string& name) {
  const std::string src = test::golden_case(golden), dst = scratch("model_" + name);
  for (auto& e : fs::directory_iterator(dst)) fs::remove_all(e.path());
  for (const char* f : {"config.json", "preprocessor_config.json", "model.safetensors"})
    fs::copy_file(src + "/" + f, dst + "/" + f, fs::copy_options::overwrite_existing);
  return dst;
}

void edit_json(const std::string& path, const std::function<void(json&)>& edit) {
  json j = read_json_file(path);
  edit(j);
  write_bytes(path, j.dump());
}

}  // namespace

// A FIFO (or a directory) where a model file should be is refused at once: opening a FIFO for
// reading blocks until a writer comes, so a hang here would be this test timing out.
TEST(HostileFiles, FifoOrDirectoryAsAnyInputIsRefusedWithoutBlocking) {
  const std::string dir = scratch("fifo");
  for (auto& e : fs::directory_iterator(dir)) fs::remove_all(e.path());
  const std::string model = copy_model("convnext-tiny-backbone", "fifo");
  auto make_fifo = [](const std::string& p) {
    fs::remove_all(p);
    ASSERT_EQ(::mkfifo(p.c_str(), 0600), 0) << p;
  };
  // Every loader, called directly.
  make_fifo(dir + "/config.json");
  std::string msg = error_of<InputError>([&] { read_json_file(dir + "/config.json"); });
  EXPECT_HAS(msg, "FIFO");
  EXPECT_HAS(msg, dir + "/config.json");
  for (const char* name : {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "w.pt", "w"}) {
    SCOPED_TRACE(name);
    make_fifo(dir + "/" + name);
    EXPECT_HAS(error_of<InputError>([&] { load_weights_file(dir + "/" + name); }), "FIFO");
  }
  EXPECT_HAS(error_of<InputError>([&] { read_safetensors(dir + "/model.safetensors"); }), "FIFO");
  EXPECT_HAS(error_of<InputError>([&] { read_torch_checkpoint(dir + "/pytorch_model.bin"); }), "FIFO");
  // A shard named by an index.
  write_bytes(dir + "/index.json", R"({"weight_map": {"a": "shard.safetensors"}})");
  make_fifo(dir + "/shard.safetensors");
  EXPECT_HAS(error_of<InputError>([&] { load_weights_file(dir + "/index.json"); }), "FIFO");
  // Through the model folder: config.json, preprocessor_config.json, the weights.
  for (const char* name : {"config.json", "preprocessor_config.json", "model.safetensors"}) {
    SCOPED_TRACE(name);
    const std::string m = copy_model("convnext-tiny-backbone", "fifo");
    make_fifo(m + "/" + name);
    EXPECT_HAS(error_of<InputError>([&] { Pretrained::from_pretrained(m); }), m + "/" + name);
    std::string out;
    EXPECT_EQ(run_vf_output("info " + m, &out), exit_code::kBadInput) << out;
    EXPECT_HAS(out, name);
  }
  // A directory given as the weights file.
  const std::string m = copy_model("convnext-tiny-backbone", "dirweights");
  fs::remove(m + "/model.safetensors");
  fs::create_directories(m + "/model.safetensors");
  std::string out;
  EXPECT_EQ(run_vf_output("info " + m, &out), exit_code::kBadInput) << out;
  EXPECT_HAS(out, "model.safetensors");
  EXPECT_HAS(out, "directory");
}

// Parsers stay O(n log n): a shard index with 100k distinct shard names and a safetensors header
// of 200k tensors were quadratic (minutes); they now load within the test's time.
TEST(HostileScale, HugeShardIndexAndSafetensorsHeaderAreNotQuadratic) {
  const std::string dir = scratch("scale");
  std::string index = R"({"weight_map": {)";
  for (int i = 0; i < 100000; ++i)
    index += (i ? "," : "") + ("\"t" + std::to_string(i) + "\": \"shard-" + std::to_string(i) + ".safetensors\"");
  write_bytes(dir + "/model.safetensors.index.json", index + "}}");
  // The first shard (in order of appearance) is absent: the whole map was read first.
  EXPECT_HAS(error_of<InputError>([&] { load_weights_file(dir + "/model.safetensors.index.json"); }),
             "shard 'shard-0.safetensors' is missing");

  std::string header = "{";
  const int n = 200000;
  for (int i = 0; i < n; ++i)
    header += (i ? "," : "") + ("\"z" + std::to_string(n - i) + "\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}");
  header += "}";
  write_bytes(dir + "/many.safetensors", le64(header.size()) + header);
  auto tensors = read_safetensors(dir + "/many.safetensors");
  ASSERT_EQ(tensors.size(), size_t(n));
  EXPECT_EQ(tensors.front().first, "z200000");  // header order, not sorted
  EXPECT_EQ(tensors.back().first, "z1");
  // The writer is linear too.
  std::vector<std::pair<std::string, Tensor>> many;
  for (int i = 0; i < n; ++i) many.emplace_back("w" + std::to_string(i), Tensor::empty({0}));
  write_safetensors(dir + "/written.safetensors", many);
  auto back = read_safetensors(dir + "/written.safetensors");
  ASSERT_EQ(back.size(), size_t(n));
  EXPECT_EQ(back[12345].first, "w12345");
}

namespace {
long max_rss_mb() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024;
}
}  // namespace

// Memory follows what the pickle keeps: 4 million empty tuples made and dropped one by one (an 8 MB
// pickle) used to be kept to the end (about a gigabyte).
TEST(HostileMemory, PickleFreesWhatItDrops) {
  const std::string dir = scratch("pickle_memory");
  std::string pkl = "\x80\x02";
  for (int i = 0; i < 4000000; ++i) pkl += ")0";
  pkl += "}.";
  write_bytes(dir + "/drops.bin", make_zip({{"archive/data.pkl", pkl}}));
  const long before = max_rss_mb();
  EXPECT_TRUE(read_torch_checkpoint(dir + "/drops.bin").empty());
  // Under AddressSanitizer freed memory waits in its quarantine (256 MB by default) and every block
  // carries redzones, so the bound grows by that much; the old unpickler, keeping the 4M tuples to
  // the end, needed gigabytes either way.
#if defined(__SANITIZE_ADDRESS__)
  constexpr long kBoundMb = 200 + 400;
#else
  constexpr long kBoundMb = 200;
#endif
  EXPECT_LT(max_rss_mb() - before, kBoundMb) << "MB of peak memory for a pickle that keeps nothing";
  // Containers in reference cycles cannot be freed early: their number is limited.
  std::string cycles = "\x80\x02";
  for (int i = 0; i < 3000; ++i) cycles += "]2a0";  // a list appended to itself, dropped
  cycles += "}.";
  pickle::Limits limits;
  limits.max_live_containers = 1000;
  size_t pos = 0;
  std::string msg = error_of<InputError>([&] {
    pickle::unpickle(reinterpret_cast<const uint8_t*>(cycles.data()), cycles.size(), pos, "cycles.pkl", {}, limits);
  });
  EXPECT_HAS(msg, "containers alive at once");
}

// A stride-0 view of one element claiming 2^29 elements (2 GB once copied) has its shape checked
// against the model before anything is copied.
TEST(HostileMemory, StrideZeroViewIsShapeCheckedBeforeItIsCopied) {
  const std::string dir = scratch("stride0");
  auto k = [](int v) { return "K" + std::string(1, static_cast<char>(v)); };
  const std::string pkl = "\x80\x02}(" + pstr("w") + "ctorch._utils\n_rebuild_tensor_v2\n((" + pstr("storage") +
                          "ctorch\nFloatStorage\n" + pstr("0") + pstr("cpu") + k(1) + "tQ" + k(0) + "J" +
                          le32(1u << 29) + "\x85" + k(0) + "\x85\x89}tRu.";
  write_bytes(dir + "/pytorch_model.bin", make_zip({{"archive/data.pkl", pkl}, {"archive/data/0", le32(0x3f800000)}}));
  const long before = max_rss_mb();
  auto store = load_weights_file(dir + "/pytorch_model.bin");
  ASSERT_TRUE(store->shape_of("w"));
  EXPECT_EQ(*store->shape_of("w"), (Shape{1 << 29}));
  std::string msg = error_of<ModelError>([&] { Weights(store).get("w", {4}); });
  EXPECT_HAS(msg, "[536870912]");
  EXPECT_HAS(msg, "[4]");
  EXPECT_LT(max_rss_mb() - before, 1000) << "MB: the view was copied before its shape was checked";
  // A view of the size the model expects is copied on use: four ones.
  const std::string small = "\x80\x02}(" + pstr("w") + "ctorch._utils\n_rebuild_tensor_v2\n((" + pstr("storage") +
                            "ctorch\nFloatStorage\n" + pstr("0") + pstr("cpu") + k(1) + "tQ" + k(0) + k(4) +
                            "\x85" + k(0) + "\x85\x89}tRu.";
  write_bytes(dir + "/small.bin", make_zip({{"archive/data.pkl", small}, {"archive/data/0", le32(0x3f800000)}}));
  Tensor w = Weights(load_weights_file(dir + "/small.bin")).get("w", {4});
  for (int i = 0; i < 4; ++i) EXPECT_EQ(w.f32()[i], 1.0f);
}

// A forward whose tensors (or the attention scores the reference would build) exceed
// VF_MAX_FORWARD_BYTES is refused with an input error, not left to exhaust memory.
TEST(HostileMemory, ForwardPastTheMemoryLimitIsRefused) {
  const std::string m = copy_model("conditional-detr-tiny-det", "forward_limit");
  const std::string img = test::images_dir() + "/chelsea.png";
  std::string out;
  ASSERT_EQ(run_vf_output("detect " + m + " " + img, &out), exit_code::kOk) << out;
  EXPECT_EQ(run_vf_output("detect " + m + " " + img, &out, "VF_MAX_FORWARD_BYTES=64K"), exit_code::kBadInput) << out;
  EXPECT_HAS(out, "VF_MAX_FORWARD_BYTES");
  // Attention is estimated from its shapes, as the reference materialises the scores: 80k tokens
  // (a ~80 megapixel image in a DETR encoder) would need 25.6 GB for one head.
  const int64_t L = 80000;
  Tensor q = Tensor::zeros({1, L, 2});
  std::string msg = error_of<InputError>([&] { multi_head_attention(q, q, q, 1, {}); });
  EXPECT_HAS(msg, "80000 x 80000");
  EXPECT_HAS(msg, "VF_MAX_FORWARD_BYTES");
  EXPECT_LE(max_forward_bytes(), uint64_t(16) << 30);
}

// Temporary outputs are created exclusively: a link planted where a temporary used to go
// (OUT.tmp) is never written through, and a failed multi-file output leaves nothing.
TEST(HostileOutput, PlantedLinksAreNotFollowedAndFailedOutputsLeaveNothing) {
  const std::string dir = scratch("planted");
  for (auto& e : fs::directory_iterator(dir)) fs::remove_all(e.path());
  write_bytes(dir + "/victim", "precious");
  fs::create_symlink(dir + "/victim", dir + "/out.png.tmp");
  Image img;
  img.height = 2;
  img.width = 3;
  img.rgb.assign(18, 100);
  save_png(dir + "/out.png", img);
  EXPECT_EQ(read_bytes(dir + "/victim"), "precious");
  EXPECT_TRUE(fs::is_symlink(dir + "/out.png.tmp"));
  EXPECT_EQ(decode_image(reinterpret_cast<const uint8_t*>(read_bytes(dir + "/out.png").data()),
                         read_bytes(dir + "/out.png").size(), "out.png").rgb, img.rgb);
  fs::create_symlink(dir + "/victim", dir + "/w.safetensors.tmp");
  write_safetensors(dir + "/w.safetensors", {{"a", Tensor::from<float>({1}, {1})}});
  EXPECT_EQ(read_bytes(dir + "/victim"), "precious");
  // Several outputs: none appears unless all are committed.
  {
    AtomicOutputs outs;
    save_png(outs, dir + "/a.png", img);
    save_png(outs, dir + "/b.png", img);
    EXPECT_THROW(save_png(outs, dir + "/no/such/c.png", img), InputError);
  }
  std::set<std::string> left;
  for (auto& e : fs::directory_iterator(dir)) left.insert(e.path().filename().string());
  EXPECT_EQ(left, (std::set<std::string>{"victim", "out.png", "out.png.tmp", "w.safetensors", "w.safetensors.tmp"}));
  // Through the CLI: an output folder that does not exist is bad input (65), and no mask is left.
  const std::string m = copy_model("conditional-detr-tiny-det", "draw");
  std::string out;
  EXPECT_EQ(run_vf_output("detect " + m + " " + test::images_dir() + "/chelsea.png --draw " + dir + "/absent/x.png", &out),
            exit_code::kBadInput)
      << out;
  EXPECT_HAS(out, dir + "/absent");
}

// Files named by a model folder stay inside it, links included, except the links of a Hugging Face
// cache snapshot into its repository's blobs/; errors never echo the bytes of a file.
TEST(HostilePaths, ShardsThroughLinksStayInsideTheModelFolder) {
  const std::string root = scratch("paths");
  fs::remove_all(root);
  const std::string outside = root + "/outside", model = root + "/model";
  fs::create_directories(outside);
  fs::create_directories(model);
  write_bytes(outside + "/secret", "s3cr3t-p4ssw0rd\n");
  write_safetensors(outside + "/w.safetensors", {{"a", Tensor::from<float>({1}, {1})}});
  fs::create_directory_symlink(outside, model + "/linked");
  write_bytes(model + "/model.safetensors.index.json", R"({"weight_map": {"a": "linked/w.safetensors"}})");
  std::string msg = error_of<InputError>([&] { load_checkpoint(model); });
  EXPECT_HAS(msg, "outside the model folder");
  EXPECT_HAS(msg, "linked/w.safetensors");
  // A link in the folder itself to a file outside is refused as well.
  fs::remove(model + "/model.safetensors.index.json");
  fs::create_symlink(outside + "/secret", model + "/model.safetensors");
  EXPECT_HAS(error_of<InputError>([&] { load_checkpoint(model); }), "outside the model folder");
  // A file that is not safetensors: the error does not print its first 8 bytes as a number.
  fs::remove(model + "/model.safetensors");
  fs::copy_file(outside + "/secret", model + "/model.safetensors");
  uint64_t first8 = 0;
  std::memcpy(&first8, "s3cr3t-p", 8);
  msg = error_of<InputError>([&] { load_checkpoint(model); });
  EXPECT_EQ(msg.find(std::to_string(first8)), std::string::npos) << msg;
  EXPECT_EQ(msg.find("s3cr3t"), std::string::npos) << msg;

  // A Hub cache snapshot: links into ../../blobs are followed, even for the shards.
  const std::string repo = root + "/hub/models--org--name";
  const std::string snap = repo + "/snapshots/0123abc";
  fs::create_directories(repo + "/blobs");
  fs::create_directories(snap);
  write_safetensors(repo + "/blobs/b1", {{"a", Tensor::from<float>({1}, {7})}});
  write_bytes(repo + "/blobs/b2", R"({"weight_map": {"a": "model-00001.safetensors"}})");
  fs::create_symlink("../../blobs/b1", snap + "/model-00001.safetensors");
  fs::create_symlink("../../blobs/b2", snap + "/model.safetensors.index.json");
  auto store = load_checkpoint(snap);
  EXPECT_EQ(store->find("a")->f32()[0], 7.0f);
  // ... but not beyond the repository.
  fs::remove(snap + "/model-00001.safetensors");
  fs::create_symlink("../../../../outside/w.safetensors", snap + "/model-00001.safetensors");
  EXPECT_HAS(error_of<InputError>([&] { load_checkpoint(snap); }), "outside the model folder");
}

// id2label keys are read as Python's int() reads a str; anything else is refused (stoll read
// "1.9" as 1 and "0x4" as 0).
TEST(HostileConfig, Id2labelKeysAreReadAsPythonInt) {
  int64_t v = -1;
  for (auto [s, want] : std::vector<std::pair<std::string, int64_t>>{
           {"0", 0}, {"17", 17}, {" 3 ", 3}, {"+4", 4}, {"-2", -2}, {"1_000", 1000}, {"007", 7}, {"\t9\n", 9}}) {
    EXPECT_TRUE(parse_python_int(s, &v)) << s;
    EXPECT_EQ(v, want) << s;
  }
  for (std::string s : {"1.9", "0x4", "4abc", "", " ", "_1", "1_", "1__0", "+", "1 2", "1e3", "99999999999999999999"})
    EXPECT_FALSE(parse_python_int(s, &v)) << s;
  auto store = std::make_shared<WeightStore>();
  json c = read_json_file(test::goldens_dir() + "/convnext-tiny-backbone/config.json");
  c["id2label"] = {{"0", "cat"}, {"1.9", "dog"}};
  EXPECT_HAS(error_of<ModelError>([&] { create_model(c, "", Weights(store)); }), "'id2label'");
  c["id2label"] = {{"0", "cat"}, {"0x4", "dog"}};
  EXPECT_HAS(error_of<ModelError>([&] { create_model(c, "", Weights(store)); }), "0x4");
}

TEST(HostileConfig, NegativeDepthsAreRefused) {
  auto store = std::make_shared<WeightStore>();
  json c = read_json_file(test::goldens_dir() + "/convnext-tiny-backbone/config.json");
  c["depths"][1] = -1;
  EXPECT_HAS(error_of<ModelError>([&] { create_model(c, "", Weights(store)); }), "'depths'");
  json b = read_json_file(test::goldens_dir() + "/bit-tiny-bottleneck-same/config.json");
  b["depths"][0] = -2;
  EXPECT_HAS(error_of<ModelError>([&] { create_model(b, "", Weights(store)); }), "'depths'");
  json d = read_json_file(test::goldens_dir() + "/detr-tiny-model/config.json");
  d["backbone_config"]["depths"][2] = 0;
  EXPECT_HAS(error_of<ModelError>([&] { create_model(d, "", Weights(store)); }), "depths");
}

// NaN weights give NaN, as in PyTorch: max pooling keeps a NaN in its window, and the CLI shows a
// NaN box as nan (text) / null (JSON), not -2147483648.
TEST(HostileNaN, MaxPoolPropagatesNaNAndTheCliShowsNaNBoxes) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // 1x3x3x1, a NaN in the middle; 2x2 windows, stride 1: every window holds it.
  Tensor x = Tensor::from<float>({1, 3, 3, 1}, {1, 2, 3, 4, nan, 6, 7, 8, 9});
  Tensor y = max_pool2d_nhwc(x, 2, 1, 0, 0, 0, 0);
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(std::isnan(y.f32()[i])) << i;
  Tensor x2 = Tensor::from<float>({1, 2, 3, 1}, {nan, 1, 5, 2, 3, 4});  // windows {nan,1,2,3}, {1,5,3,4}
  Tensor y2 = max_pool2d_nhwc(x2, 2, 1, 0, 0, 0, 0);
  EXPECT_TRUE(std::isnan(y2.f32()[0]));
  EXPECT_EQ(y2.f32()[1], 5.0f);

  const std::string m = copy_model("conditional-detr-tiny-det", "nan_boxes");
  auto tensors = read_safetensors(m + "/model.safetensors");
  bool found = false;
  for (auto& [name, t] : tensors)
    if (name.find("bbox_predictor.layers.2.bias") != std::string::npos) {
      Tensor c = Tensor::empty(t.shape(), t.dtype());
      for (int64_t i = 0; i < c.numel(); ++i) c.f32()[i] = nan;
      t = c;
      found = true;
    }
  ASSERT_TRUE(found);
  write_safetensors(m + "/model.safetensors", tensors);
  const std::string img = test::images_dir() + "/chelsea.png";
  std::string out;
  ASSERT_EQ(run_vf_output("detect " + m + " " + img + " --threshold 0", &out), exit_code::kOk) << out;
  EXPECT_HAS(out, "[nan, nan, nan, nan]");
  EXPECT_EQ(out.find("2147483648"), std::string::npos) << out;
  ASSERT_EQ(run_vf_output("detect " + m + " " + img + " --threshold 0 --json", &out), exit_code::kOk) << out;
  EXPECT_HAS(out, "\"xmin\": null");
  EXPECT_EQ(out.find("2147483648"), std::string::npos) << out;
}

// Invalid config and processor values, and missing files, are bad input (65) or a model problem
// (66) naming the file and the key, never "internal" (70).
TEST(HostileCli, InvalidConfigsAndProcessorsAreNotInternalErrors) {
  const std::string img = test::images_dir() + "/chelsea.png";
  struct Case {
    std::string name, golden, file, command;
    std::function<void(json&)> edit;
    int code;
    std::string key;
  };
  const std::vector<Case> cases = {
      {"feature_levels", "deformable-detr-tiny-det", "config.json", "info",
       [](json& j) { j["num_feature_levels"] = 0; }, exit_code::kModelProblem, "num_feature_levels"},
      {"heads", "detr-tiny-model", "config.json", "info", [](json& j) { j["encoder_attention_heads"] = 7; },
       exit_code::kModelProblem, "d_model"},
      {"image_size", "deit-tiny-model", "config.json", "info", [](json& j) { j["image_size"] = 0; },
       exit_code::kModelProblem, "image_size"},
      {"activation", "convnext-tiny-backbone", "config.json", "info", [](json& j) { j["hidden_act"] = "nope"; },
       exit_code::kModelProblem, "hidden_act"},
      {"resample", "conditional-detr-tiny-det", "preprocessor_config.json", "detect",
       [](json& j) { j["resample"] = 99; }, exit_code::kModelProblem, "resample"},
      {"crop_pct_0", "convnext-tiny-backbone", "preprocessor_config.json", "info",
       [](json& j) { j["crop_pct"] = 0; }, exit_code::kModelProblem, "crop_pct"},
      {"crop_pct_tiny", "convnext-tiny-backbone", "preprocessor_config.json", "info",
       [](json& j) { j["crop_pct"] = 1e-300; }, exit_code::kModelProblem, "crop_pct"},
      {"pad_size", "conditional-detr-tiny-det", "preprocessor_config.json", "detect",
       [](json& j) { j["pad_size"] = {{"height", 8}, {"width", 8}}; }, exit_code::kModelProblem, "pad_size"},
      {"size_limit", "conditional-detr-tiny-det", "preprocessor_config.json", "detect",
       [](json& j) { j["size"] = {{"height", 1e9}, {"width", 4}}; }, exit_code::kModelProblem, "size.height"},
  };
  for (auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string m = copy_model(c.golden, "exit_" + c.name);
    edit_json(m + "/" + c.file, c.edit);
    std::string out;
    EXPECT_EQ(run_vf_output(c.command + " " + m + (c.command == "detect" ? " " + img : ""), &out), c.code) << out;
    EXPECT_HAS(out, c.key);
    EXPECT_HAS(out, m + "/" + c.file);
  }
  // A missing preprocessor_config.json, when a command needs it.
  const std::string m = copy_model("conditional-detr-tiny-det", "exit_nopre");
  fs::remove(m + "/preprocessor_config.json");
  std::string out;
  EXPECT_EQ(run_vf_output("detect " + m + " " + img, &out), exit_code::kBadInput) << out;
  EXPECT_HAS(out, "preprocessor_config.json");
}
