// Paths for tests: the golden cases (../shared/goldens when present, else the vendored subset).
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace vf::test {

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
