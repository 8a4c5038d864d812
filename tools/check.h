#pragma once

#include <string>

namespace vf::check {

// Runs one golden case folder; returns the process exit code (0 pass, 1 fail, 2 unsupported).
int run_check(const std::string& case_dir, const std::string& images_dir);

}  // namespace vf::check
