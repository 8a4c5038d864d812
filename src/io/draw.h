// Drawing on 8-bit RGB images for `vf detect --draw` and `vf segment --out`: box outlines with a
// text tag (a built-in 5x7 font), per-segment colour maps and binary masks.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "io/image.h"

namespace vf {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
  bool operator==(const Rgb&) const = default;
};

// The PASCAL VOC colour map: the bits of `index` spread over the high bits of r, g and b, so
// indices 0 .. 2^24 - 1 get distinct colours; 0 is black (kept for background).
Rgb palette_color(int64_t index);

// Fills the inclusive rectangle [x0, x1] x [y0, y1], clipped to the image.
void fill_rect(Image& img, int64_t x0, int64_t y0, int64_t x1, int64_t y1, Rgb color);

// The outline of the inclusive rectangle, after clamping its corners into the image (a box that
// reaches past the image is drawn along the border), `thickness` pixels growing inwards.
void draw_box(Image& img, int64_t x0, int64_t y0, int64_t x1, int64_t y1, Rgb color, int thickness);

// Text in the built-in 5x7 font (digits, letters shown upper-case, " .,:;_-%()/#+=!?'"; anything else
// as '?'), each pixel a `scale` x `scale` square, top-left corner at (x, y), clipped to the image.
int64_t text_width(const std::string& text, int scale);
int64_t text_height(int scale);
void draw_text(Image& img, int64_t x, int64_t y, const std::string& text, Rgb color, int scale);

struct BoxAnnotation {
  int64_t x0 = 0, y0 = 0, x1 = 0, y1 = 0;  // inclusive corners in pixels (may lie outside the image)
  Rgb color;
  std::string text;  // drawn on a tag of `color` just above the box (below it, or inside, when there is no room)
};

// Draws the boxes in order (the last on top): outline, then its tag, which never covers the box's
// own outline when there is room outside it. Thickness and text scale follow the image size.
void draw_boxes(Image& img, const std::vector<BoxAnnotation>& boxes);

// An RGB image of the size of `map` (int32 [H, W] ids): pixels whose id is listed get its colour,
// the others black.
Image render_segments(const Tensor& map, const std::vector<std::pair<int64_t, Rgb>>& colors);

// A gray image (channels 1): 255 where map == id, else 0 (the pipeline's mask).
Image render_mask(const Tensor& map, int64_t id);

}  // namespace vf
