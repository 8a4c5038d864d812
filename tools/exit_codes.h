// Exit codes of the `vf` CLI (docs/exit-codes.md). 64-70 follow BSD sysexits.h where one fits.
#pragma once

#include <exception>

#include "core/errors.h"

namespace vf::exit_code {

constexpr int kOk = 0;
constexpr int kMismatch = 1;        // vf check: outputs differ from the golden case beyond tolerance
constexpr int kNotSupported = 2;    // vf check: the case's model family is not supported (yet)
constexpr int kUsage = 64;          // EX_USAGE: bad command line
constexpr int kBadInput = 65;       // EX_DATAERR: an input file is missing, unreadable, corrupt, hostile or too large
constexpr int kModelProblem = 66;   // the files are readable but describe no model we can build (config / weights)
constexpr int kUnavailable = 69;    // EX_UNAVAILABLE: a model by Hub id cannot be had (Hub unreachable / refuses it, not cached)
constexpr int kInternal = 70;       // EX_SOFTWARE: anything else (a bug, out of memory, an unclassified vf::Error)

// The exit code for an exception that ended a command.
inline int for_exception(const std::exception& e) {
  if (dynamic_cast<const InputError*>(&e)) return kBadInput;
  if (dynamic_cast<const ModelError*>(&e)) return kModelProblem;
  if (dynamic_cast<const UnavailableError*>(&e)) return kUnavailable;
  return kInternal;
}

}  // namespace vf::exit_code
