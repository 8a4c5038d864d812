// Hostile and broken input: files from strangers must end in one clear vf::Error (the right kind:
// InputError for unusable files, ModelError for configs/weights that describe no buildable model),
// never a crash, a hang, an allocation of absurd size or code execution.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sys/wait.h>

#include "core/config.h"
#include "core/errors.h"
#include "exit_codes.h"
#include "io/checkpoint.h"
#include "io/image.h"
#include "io/json.h"
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

// The message of the exception of type E that `f` throws ("" and a test failure otherwise).
template <class E = Error, class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    std::string m = e.what();
    EXPECT_EQ(m.find('\n'), std::string::npos) << "error is not one line: " << m;
    return m;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw the wrong kind of error: " << e.what();
    return e.what();
  }
  ADD_FAILURE() << "expected an error";
  return "";
}

#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << (msg)

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
      if (how != "inst") EXPECT_HAS(msg, "'" + full + "' is not allowed");
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
