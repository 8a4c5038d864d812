// Replays every input kept in tests/fuzz/regressions/<fuzzer>/ (inputs that once crashed, hung or
// leaked) and tests/fuzz/corpus/<fuzzer>/ (the seeds) through the same entry function the libFuzzer
// harness calls: each must end in success or a one-line vf::Error, never a crash or another exception.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/tensor.h"
#include "entries.h"

namespace fs = std::filesystem;

namespace {

std::vector<uint8_t> read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

// Runs every file of tests/fuzz/<kind>/<fuzzer>/; returns how many ran.
size_t replay(const std::string& kind, size_t* errors = nullptr) {
  size_t n = 0;
  for (auto& target : vf::fuzz::targets()) {
    fs::path dir = fs::path(VF_SOURCE_DIR) / "tests/fuzz" / kind / target.name;
    if (!fs::is_directory(dir)) continue;
    for (auto& e : fs::directory_iterator(dir)) {
      if (!e.is_regular_file()) continue;
      auto bytes = read_bytes(e.path());
      SCOPED_TRACE(e.path().string());
      try {
        target.run(bytes.data(), bytes.size());
      } catch (const vf::Error& err) {
        std::string msg = err.what();
        EXPECT_FALSE(msg.empty());
        EXPECT_EQ(msg.find('\n'), std::string::npos) << "error message is not one line: " << msg;
        if (errors) ++*errors;
      } catch (const std::exception& err) {
        ADD_FAILURE() << target.name << ": " << e.path() << ": not a vf::Error: " << err.what();
      }
      ++n;
    }
  }
  return n;
}

}  // namespace

TEST(FuzzRegression, CrashingInputsAreRefusedCleanly) {
  size_t errors = 0;
  size_t n = replay("regressions", &errors);
  EXPECT_GT(n, 0u) << "no regression inputs found under tests/fuzz/regressions";
}

TEST(FuzzRegression, SeedCorporaLoadCleanly) {
  size_t errors = 0;
  size_t n = replay("corpus", &errors);
  EXPECT_GE(n, 10u) << "seed corpora missing under tests/fuzz/corpus";
  // Most seeds are valid files: only the deliberately broken ones may be refused.
  EXPECT_LT(errors, n);
}
