// Pages of read-only file mappings that the process may hand back to the kernel.
//
// A checkpoint is memory-mapped and its float32 tensors are used in place; a layer that needs its
// weights in another layout (oneDNN's blocked formats) keeps its reordered copy instead, and then
// the mapped pages it read would stay resident beside the copy until the whole file is unmapped.
// Those pages are clean copies of the file: dropping them costs nothing but a re-read if touched.
#pragma once

#include <cstddef>

#include "core/tensor.h"

namespace vf {

// [data, data + size) is a private mapping of a file that nobody writes to.
void register_file_mapping(const void* data, size_t size);
void unregister_file_mapping(const void* data);

// Whether the bytes of `t` lie in a registered file mapping.
bool is_file_backed(const Tensor& t);

// For a tensor whose bytes were copied and are not needed any more: when they lie in a registered
// file mapping, the pages wholly inside them leave the resident set. Other memory: nothing.
void release_file_pages(const Tensor& t);

}  // namespace vf
