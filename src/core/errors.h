// Kinds of vf::Error, for callers that must tell them apart (the `vf` CLI maps them to exit codes,
// tools/exit_codes.h). Every message stays one line: what file, what is wrong, what was expected.
#pragma once

#include "core/tensor.h"

namespace vf {

// An input file cannot be used: missing, unreadable, truncated, corrupt, hostile, or past a size
// limit (weights, images, JSON).
struct InputError : Error {
  using Error::Error;
};

// The files are well-formed but do not describe a model we can build: unknown model_type or
// architecture, a config value of the wrong type or out of range, missing or wrongly shaped tensors.
struct ModelError : Error {
  using Error::Error;
};

// A model named by Hub id cannot be obtained: the Hub (HF_ENDPOINT) is unreachable or offline mode is
// on and the model is not in the cache, or the Hub refuses it (unknown repository, revision or file,
// gated or private without a token, a failed or corrupt download). src/hub throws it.
struct UnavailableError : Error {
  using Error::Error;
};

}  // namespace vf
