#include "io/draw.h"

#include <algorithm>
#include <cctype>
#include <unordered_map>

namespace vf {

namespace {

// 5x7 glyphs, rows top to bottom separated by spaces ('#' = ink).
struct Glyph {
  char c;
  const char* rows;
};
constexpr Glyph kFont[] = {
    {' ', "..... ..... ..... ..... ..... ..... ....."},
    {'0', ".###. #...# #..## #.#.# ##..# #...# .###."},
    {'1', "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###."},
    {'2', ".###. #...# ....# ...#. ..#.. .#... #####"},
    {'3', "##### ...#. ..#.. ...#. ....# #...# .###."},
    {'4', "...#. ..##. .#.#. #..#. ##### ...#. ...#."},
    {'5', "##### #.... ####. ....# ....# #...# .###."},
    {'6', "..##. .#... #.... ####. #...# #...# .###."},
    {'7', "##### ....# ...#. ..#.. .#... .#... .#..."},
    {'8', ".###. #...# #...# .###. #...# #...# .###."},
    {'9', ".###. #...# #...# .#### ....# ...#. .##.."},
    {'A', ".###. #...# #...# ##### #...# #...# #...#"},
    {'B', "####. #...# #...# ####. #...# #...# ####."},
    {'C', ".###. #...# #.... #.... #.... #...# .###."},
    {'D', "###.. #..#. #...# #...# #...# #..#. ###.."},
    {'E', "##### #.... #.... ####. #.... #.... #####"},
    {'F', "##### #.... #.... ####. #.... #.... #...."},
    {'G', ".###. #...# #.... #.### #...# #...# .####"},
    {'H', "#...# #...# #...# ##### #...# #...# #...#"},
    {'I', ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###."},
    {'J', "..### ...#. ...#. ...#. ...#. #..#. .##.."},
    {'K', "#...# #..#. #.#.. ##... #.#.. #..#. #...#"},
    {'L', "#.... #.... #.... #.... #.... #.... #####"},
    {'M', "#...# ##.## #.#.# #.#.# #...# #...# #...#"},
    {'N', "#...# #...# ##..# #.#.# #..## #...# #...#"},
    {'O', ".###. #...# #...# #...# #...# #...# .###."},
    {'P', "####. #...# #...# ####. #.... #.... #...."},
    {'Q', ".###. #...# #...# #...# #.#.# #..#. .##.#"},
    {'R', "####. #...# #...# ####. #.#.. #..#. #...#"},
    {'S', ".#### #.... #.... .###. ....# ....# ####."},
    {'T', "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#.."},
    {'U', "#...# #...# #...# #...# #...# #...# .###."},
    {'V', "#...# #...# #...# #...# #...# .#.#. ..#.."},
    {'W', "#...# #...# #...# #.#.# #.#.# #.#.# .#.#."},
    {'X', "#...# #...# .#.#. ..#.. .#.#. #...# #...#"},
    {'Y', "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#.."},
    {'Z', "##### ....# ...#. ..#.. .#... #.... #####"},
    {'.', "..... ..... ..... ..... ..... .##.. .##.."},
    {',', "..... ..... ..... ..... .##.. ..#.. .#..."},
    {':', "..... .##.. .##.. ..... .##.. .##.. ....."},
    {';', "..... .##.. .##.. ..... .##.. ..#.. .#..."},
    {'_', "..... ..... ..... ..... ..... ..... #####"},
    {'-', "..... ..... ..... ##### ..... ..... ....."},
    {'+', "..... ..#.. ..#.. ##### ..#.. ..#.. ....."},
    {'=', "..... ..... ##### ..... ##### ..... ....."},
    {'%', "##... ##..# ...#. ..#.. .#... #..## ...##"},
    {'(', "...#. ..#.. .#... .#... .#... ..#.. ...#."},
    {')', ".#... ..#.. ...#. ...#. ...#. ..#.. .#..."},
    {'/', "..... ....# ...#. ..#.. .#... #.... ....."},
    {'#', ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#."},
    {'!', "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#.."},
    {'\'', "..#.. ..#.. .#... ..... ..... ..... ....."},
    {'?', ".###. #...# ....# ...#. ..#.. ..... ..#.."},
};
constexpr int kGlyphW = 5, kGlyphH = 7;

const char* glyph_rows(char c) {
  c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (const Glyph& g : kFont)
    if (g.c == c) return g.rows;
  return glyph_rows('?');
}

void put(Image& img, int64_t x, int64_t y, Rgb color) {
  if (x < 0 || y < 0 || x >= img.width || y >= img.height) return;
  uint8_t* px = img.rgb.data() + (y * img.width + x) * img.channels;
  px[0] = color.r;
  px[1] = color.g;
  px[2] = color.b;
}

void require_rgb(const Image& img, const char* what) {
  if (img.channels != 3 || img.rgb.size() != img.pixels() * 3)
    throw Error(std::string(what) + ": expected an RGB image");
}

void require_map(const Tensor& map, const char* what) {
  if (!map.defined() || map.dtype() != DType::I32 || map.dim() != 2)
    throw Error(std::string(what) + ": expected an int32 [height, width] map");
}

}  // namespace

Rgb palette_color(int64_t index) {
  uint64_t c = static_cast<uint64_t>(index) & 0xffffff;
  Rgb rgb;
  for (int j = 7; j >= 0; --j) {
    rgb.r |= static_cast<uint8_t>((c & 1) << j);
    rgb.g |= static_cast<uint8_t>(((c >> 1) & 1) << j);
    rgb.b |= static_cast<uint8_t>(((c >> 2) & 1) << j);
    c >>= 3;
  }
  return rgb;
}

void fill_rect(Image& img, int64_t x0, int64_t y0, int64_t x1, int64_t y1, Rgb color) {
  require_rgb(img, "fill_rect");
  x0 = std::max<int64_t>(x0, 0);
  y0 = std::max<int64_t>(y0, 0);
  x1 = std::min<int64_t>(x1, img.width - 1);
  y1 = std::min<int64_t>(y1, img.height - 1);
  for (int64_t y = y0; y <= y1; ++y)
    for (int64_t x = x0; x <= x1; ++x) put(img, x, y, color);
}

void draw_box(Image& img, int64_t x0, int64_t y0, int64_t x1, int64_t y1, Rgb color, int thickness) {
  require_rgb(img, "draw_box");
  if (img.width <= 0 || img.height <= 0) return;
  if (x0 > x1) std::swap(x0, x1);
  if (y0 > y1) std::swap(y0, y1);
  x0 = std::clamp<int64_t>(x0, 0, img.width - 1);
  x1 = std::clamp<int64_t>(x1, 0, img.width - 1);
  y0 = std::clamp<int64_t>(y0, 0, img.height - 1);
  y1 = std::clamp<int64_t>(y1, 0, img.height - 1);
  const int64_t t = std::max(thickness, 1) - 1;
  fill_rect(img, x0, y0, x1, std::min(y0 + t, y1), color);  // top
  fill_rect(img, x0, std::max(y1 - t, y0), x1, y1, color);  // bottom
  fill_rect(img, x0, y0, std::min(x0 + t, x1), y1, color);  // left
  fill_rect(img, std::max(x1 - t, x0), y0, x1, y1, color);  // right
}

int64_t text_width(const std::string& text, int scale) {
  return text.empty() ? 0 : static_cast<int64_t>(text.size()) * (kGlyphW + 1) * scale - scale;
}

int64_t text_height(int scale) { return kGlyphH * scale; }

void draw_text(Image& img, int64_t x, int64_t y, const std::string& text, Rgb color, int scale) {
  require_rgb(img, "draw_text");
  scale = std::max(scale, 1);
  for (size_t k = 0; k < text.size(); ++k) {
    const char* rows = glyph_rows(text[k]);
    const int64_t gx = x + static_cast<int64_t>(k) * (kGlyphW + 1) * scale;
    for (int r = 0; r < kGlyphH; ++r)
      for (int c = 0; c < kGlyphW; ++c)
        if (rows[r * (kGlyphW + 1) + c] == '#')
          fill_rect(img, gx + c * scale, y + r * scale, gx + (c + 1) * scale - 1, y + (r + 1) * scale - 1, color);
  }
}

void draw_boxes(Image& img, const std::vector<BoxAnnotation>& boxes) {
  require_rgb(img, "draw_boxes");
  const int64_t side = std::min(img.width, img.height);
  const int thickness = static_cast<int>(std::max<int64_t>(2, side / 250));
  const int scale = static_cast<int>(std::max<int64_t>(1, side / 400));
  const Rgb white{255, 255, 255}, black{0, 0, 0};
  for (const BoxAnnotation& b : boxes) {
    draw_box(img, b.x0, b.y0, b.x1, b.y1, b.color, thickness);
    if (b.text.empty()) continue;
    // The tag: text plus a margin of `scale` on each side, in the box's colour, at its left corner.
    const int64_t tag_w = text_width(b.text, scale) + 2 * scale, tag_h = text_height(scale) + 2 * scale;
    const int64_t left = std::clamp<int64_t>(std::min(b.x0, b.x1), 0, std::max<int64_t>(img.width - 1, 0));
    const int64_t top = std::clamp<int64_t>(std::min(b.y0, b.y1), 0, img.height - 1);
    const int64_t bottom = std::clamp<int64_t>(std::max(b.y0, b.y1), 0, img.height - 1);
    int64_t tag_y;
    if (top - tag_h >= 0) tag_y = top - tag_h;                      // above the box
    else if (bottom + 1 + tag_h <= img.height) tag_y = bottom + 1;  // below it
    else tag_y = top + thickness;                                   // inside
    fill_rect(img, left, tag_y, left + tag_w - 1, tag_y + tag_h - 1, b.color);
    const double luma = 0.299 * b.color.r + 0.587 * b.color.g + 0.114 * b.color.b;
    draw_text(img, left + scale, tag_y + scale, b.text, luma > 140 ? black : white, scale);
  }
}

Image render_segments(const Tensor& map, const std::vector<std::pair<int64_t, Rgb>>& colors) {
  require_map(map, "render_segments");
  Image img;
  img.height = map.size(0);
  img.width = map.size(1);
  img.channels = 3;
  img.rgb.assign(img.pixels() * 3, 0);
  std::unordered_map<int64_t, Rgb> lut(colors.begin(), colors.end());
  const int32_t* ids = map.data<int32_t>();
  const int64_t n = map.numel();
  // Runs of one id are the common case: look the colour up once per run.
  int64_t last_id = 0;
  const Rgb* last = nullptr;
  bool have_last = false;
  for (int64_t i = 0; i < n; ++i) {
    if (!have_last || ids[i] != last_id) {
      auto it = lut.find(ids[i]);
      last = it == lut.end() ? nullptr : &it->second;
      last_id = ids[i];
      have_last = true;
    }
    if (last) {
      img.rgb[3 * i] = last->r;
      img.rgb[3 * i + 1] = last->g;
      img.rgb[3 * i + 2] = last->b;
    }
  }
  return img;
}

Image render_mask(const Tensor& map, int64_t id) {
  require_map(map, "render_mask");
  Image img;
  img.height = map.size(0);
  img.width = map.size(1);
  img.channels = 1;
  img.rgb.resize(img.pixels());
  const int32_t* ids = map.data<int32_t>();
  for (int64_t i = 0, n = map.numel(); i < n; ++i) img.rgb[i] = ids[i] == id ? 255 : 0;
  return img;
}

}  // namespace vf
