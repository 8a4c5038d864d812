// Runs the built `vf` binary from a test, its stdout and stderr captured.
#pragma once

#include <sys/wait.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "test_util.h"

namespace vf::test {

struct CommandResult {
  int rc = -1;
  std::string out, err;
};

inline std::string shell_quoted(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Runs the built `vf` with these arguments; stdout and stderr go through files in `scratch`.
inline CommandResult run_vf(const std::vector<std::string>& args, const std::string& scratch) {
  std::string cmd = shell_quoted(VF_VF_BINARY);
  for (auto& a : args) cmd.append(" ").append(shell_quoted(a));
  const std::string out = scratch + "/stdout.txt", err = scratch + "/stderr.txt";
  cmd.append(" >").append(shell_quoted(out)).append(" 2>").append(shell_quoted(err));
  CommandResult r;
  int status = std::system(cmd.c_str());
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = read_bytes(out);
  r.err = read_bytes(err);
  return r;
}

}  // namespace vf::test
