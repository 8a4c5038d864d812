// Paths for tests: the golden cases (../shared/goldens when present, else the vendored subset).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

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

// Plain multi-head attention, one element at a time, in double: context and probabilities.
inline void plain_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t H, float scale, const float* head_mask,
                     Tensor* context, Tensor* probs) {
  const int64_t B = q.size(0), Lq = q.size(1), Lk = k.size(1), dk = q.size(2) / H, dv = v.size(2) / H;
  *context = Tensor::zeros({B, Lq, H * dv});
  *probs = Tensor::zeros({B, H, Lq, Lk});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Lq; ++i) {
        std::vector<double> s(Lk);
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < Lk; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < dk; ++c)
            dot += double(q.f32()[(b * Lq + i) * H * dk + h * dk + c]) * k.f32()[(b * Lk + j) * H * dk + h * dk + c];
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        for (auto& x : s) sum += (x = std::exp(x - mx));
        const double f = head_mask ? head_mask[h] : 1.0;
        for (int64_t j = 0; j < Lk; ++j) {
          const double p = s[j] / sum * f;
          probs->f32()[((b * H + h) * Lq + i) * Lk + j] = static_cast<float>(p);
          for (int64_t c = 0; c < dv; ++c)
            context->f32()[(b * Lq + i) * H * dv + h * dv + c] +=
                static_cast<float>(p * v.f32()[(b * Lk + j) * H * dv + h * dv + c]);
        }
      }
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
