// Pillow's `Image.resize` for 8-bit images, reproduced exactly (the reference processors resize
// uint8 PIL images): separable filters with antialiasing support scaled by the reduction factor,
// coefficients in 22-bit fixed point, a horizontal pass then a vertical one, each rounded and
// clipped to uint8; NEAREST through Pillow's affine scale.
#pragma once

#include <cstdint>

#include "io/image.h"

namespace vf {

// PIL.Image.Resampling values (what preprocessor_config.json's "resample" holds).
enum class Resample : int { Nearest = 0, Lanczos = 1, Bilinear = 2, Bicubic = 3, Box = 4, Hamming = 5 };

// Throws vf::Error for values outside 0..5.
Resample resample_from_int(int value);
const char* resample_name(Resample r);

// `PIL.Image.resize((out_width, out_height), filter)` with no box and no reducing_gap, on an image
// of any channel count (each channel is filtered independently, as Pillow does). Rows are spread
// over OpenMP threads.
Image resize_pil(const Image& in, int64_t out_height, int64_t out_width, Resample filter);

}  // namespace vf
