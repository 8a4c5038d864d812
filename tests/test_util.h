// Paths for tests: the golden cases (../shared/goldens when present, else the vendored subset).
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>

#include "core/tensor.h"  // vf::Error

namespace vf::test {

// A float32 tensor of normal values with standard deviation `stddev`, the same on every run of a seed.
inline Tensor randn(Shape shape, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, stddev);
  Tensor t = Tensor::empty(std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(g);
  return t;
}

// The message of the exception of type E that `f` throws ("" and a test failure otherwise); an
// error message must be one line.
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

// `msg` contains `part`.
#define EXPECT_HAS(msg, part) EXPECT_NE(std::string(msg).find(part), std::string::npos) << (msg)


inline std::string goldens_dir() {
  namespace fs = std::filesystem;
  fs::path shared = fs::path(VF_SOURCE_DIR) / ".." / "shared" / "goldens";
  if (fs::exists(shared / "README.md")) return fs::canonical(shared).string();
  return (fs::path(VF_SOURCE_DIR) / "tests" / "goldens").string();
}

inline std::string images_dir() { return goldens_dir() + "/images"; }

// The folder of a golden case. Tests only name cases that are vendored in tests/goldens, so this
// fails (never skips) when one is absent.
inline std::string golden_case(const std::string& name) {
  std::string p = goldens_dir() + "/" + name;
  EXPECT_TRUE(std::filesystem::exists(p + "/case.json")) << "golden case " << p << " is missing";
  return p;
}

// A scratch folder for files a test writes.
inline std::string temp_dir(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() / ("vf_test_" + name);
  std::filesystem::create_directories(p);
  return p.string();
}

// A file's bytes, whole (empty when it cannot be read), and a file written with exactly these bytes.
inline std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace vf::test
