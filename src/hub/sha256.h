// SHA-256 (FIPS 180-4), to check downloaded LFS blobs against the sha256 the Hub names them by.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace vf::hub {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  std::array<uint8_t, 32> digest();  // ends the computation
  std::string hex_digest();          // lowercase, 64 characters

 private:
  void compress(const uint8_t* block);
  std::array<uint32_t, 8> h_;
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t length_ = 0;  // bytes so far
};

// The lowercase hex SHA-256 of a whole file (read in chunks); throws vf::InputError if it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace vf::hub
