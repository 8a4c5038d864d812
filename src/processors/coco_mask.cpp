// pycocotools' rasterisation, reproduced integer for integer (cocoapi common/maskApi.c).
//
// rleFrPoly does not fill a polygon by pixel centres directly: it scales the vertices by 5 and
// rounds them, walks every edge one step at a time along its longer axis (rounding the other
// coordinate), and keeps a "y-boundary" point where the walk crosses from one upsampled column to
// the next and that crossing lies on a pixel centre column ((u + .5) / 5 - .5 an integer). The
// boundary's row is the upsampled row rounded up to whole pixels; sorted by column-major index these
// points toggle the mask on and off down each column. The double/int conversions below are those of
// the C code (casts truncate toward zero), so the results are bit-identical.
#include "processors/coco_mask.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

// The C code's `ys + s * t + .5` is two roundings; -march=native must not fuse it into one FMA.
#pragma GCC optimize("fp-contract=off")

namespace vf {
namespace {

constexpr double kScale = 5;  // rleFrPoly's upsampling
// Bound on the upsampled outline's length: the C code walks (and allocates) every point, so a
// polygon thousands of images wide would take unbounded time and memory; ours walks it without
// storing it, but still refuses such a polygon.
constexpr int64_t kMaxOutlinePoints = int64_t(1) << 26;

// (int)(v) of the C code for a value that must fit an int.
int to_int(double v, const char* what) {
  if (!(v > -2147483648.0 && v < 2147483648.0))
    throw Error(std::string("COCO polygon: ") + what + " out of range (" + std::to_string(v) + ")");
  return static_cast<int>(v);
}

}  // namespace

std::vector<uint32_t> coco_rle_from_polygon(const std::vector<double>& xy, int64_t height, int64_t width) {
  const size_t k = xy.size() / 2;
  const int64_t h = height, w = width;
  std::vector<int> x(k + 1), y(k + 1);
  for (size_t j = 0; j < k; ++j) {
    x[j] = to_int(kScale * xy[2 * j] + .5, "x coordinate");
    y[j] = to_int(kScale * xy[2 * j + 1] + .5, "y coordinate");
  }
  if (k) x[k] = x[0], y[k] = y[0];
  int64_t outline = 0;
  for (size_t j = 0; j < k; ++j)
    outline += std::max(std::llabs(int64_t(x[j]) - x[j + 1]), std::llabs(int64_t(y[j]) - y[j + 1])) + 1;
  if (outline > kMaxOutlinePoints)
    throw Error("COCO polygon too large: its outline has " + std::to_string(outline) +
                " points at 5x resolution (limit " + std::to_string(kMaxOutlinePoints) + ")");

  // Boundary points as column-major indices x * h + y; the walk is streamed, keeping the previous
  // point (u, v) of the concatenated outline (each edge repeats the vertex the previous one ended on).
  std::vector<int64_t> a;
  bool have_prev = false;
  int pu = 0, pv = 0;
  auto visit = [&](int u, int v) {
    if (have_prev && u != pu) {
      double xd = static_cast<double>(u < pu ? u : u - 1);
      xd = (xd + .5) / kScale - .5;
      if (std::floor(xd) == xd && xd >= 0 && xd <= static_cast<double>(w - 1)) {
        double yd = static_cast<double>(v < pv ? v : pv);
        yd = (yd + .5) / kScale - .5;
        if (yd < 0) yd = 0;
        else if (yd > static_cast<double>(h)) yd = static_cast<double>(h);
        yd = std::ceil(yd);
        a.push_back(static_cast<int64_t>(xd) * h + static_cast<int64_t>(yd));
      }
    }
    have_prev = true, pu = u, pv = v;
  };
  for (size_t j = 0; j < k; ++j) {
    int xs = x[j], xe = x[j + 1], ys = y[j], ye = y[j + 1];
    const int dx = std::abs(xe - xs), dy = std::abs(ys - ye);
    const bool flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
    if (flip) std::swap(xs, xe), std::swap(ys, ye);
    if (dx == 0 && dy == 0) {
      // A repeated vertex: the C code computes its row as (int)(ys + 0/0 * 0 + .5), but the point
      // shares its column with both neighbours, so that row is never read.
      visit(xs, ys);
      continue;
    }
    const double s = dx >= dy ? static_cast<double>(ye - ys) / dx : static_cast<double>(xe - xs) / dy;
    if (dx >= dy) {
      for (int d = 0; d <= dx; ++d) {
        const int t = flip ? dx - d : d;
        visit(t + xs, static_cast<int>(ys + s * t + .5));
      }
    } else {
      for (int d = 0; d <= dy; ++d) {
        const int t = flip ? dy - d : d;
        visit(static_cast<int>(xs + s * t + .5), t + ys);
      }
    }
  }

  // Sorted boundary indices -> run lengths; a zero-length run (two boundaries on one pixel cancel)
  // merges its neighbours.
  a.push_back(h * w);
  std::sort(a.begin(), a.end());
  int64_t prev = 0;
  for (int64_t& v : a) {
    const int64_t t = v;
    v -= prev;
    prev = t;
  }
  std::vector<uint32_t> counts;
  counts.push_back(static_cast<uint32_t>(a[0]));
  for (size_t j = 1; j < a.size();) {
    if (a[j] > 0) {
      counts.push_back(static_cast<uint32_t>(a[j++]));
    } else {
      ++j;
      if (j < a.size()) counts.back() += static_cast<uint32_t>(a[j++]);
    }
  }
  return counts;
}

std::vector<uint32_t> coco_rle_from_string(const std::string& s) {
  std::vector<uint32_t> counts;
  size_t p = 0;
  while (p < s.size()) {
    int64_t x = 0;
    int k = 0;
    bool more = true;
    while (more) {
      if (p >= s.size()) throw Error("COCO RLE counts string ends inside a value");
      const int c = static_cast<unsigned char>(s[p]) - 48;
      if (c < 0 || c > 63) throw Error("COCO RLE counts string has a character outside '0'..'o': " + s.substr(p, 1));
      // A count is a uint32 and a difference of two, so 7 characters (35 bits) always suffice.
      if (k == 7) throw Error("COCO RLE counts string has a value longer than 7 characters");
      x |= int64_t(c & 0x1f) << (5 * k);
      more = c & 0x20;
      ++p, ++k;
      if (!more && (c & 0x10)) x |= -(int64_t(1) << (5 * k));  // sign extension
    }
    if (counts.size() > 2) x += counts[counts.size() - 2];
    if (x < 0 || x > int64_t(std::numeric_limits<uint32_t>::max()))
      throw Error("COCO RLE counts string decodes to a count out of range (" + std::to_string(x) + ")");
    counts.push_back(static_cast<uint32_t>(x));
  }
  return counts;
}

void coco_rle_decode_or(const std::vector<uint32_t>& counts, int64_t height, int64_t width, uint8_t* mask) {
  int64_t total = 0;
  for (uint32_t c : counts) total += c;
  if (total != height * width)
    throw Error("COCO RLE counts cover " + std::to_string(total) + " pixels, the mask has " +
                std::to_string(height * width) + " (" + std::to_string(height) + "x" + std::to_string(width) + ")");
  int64_t i = 0;
  for (size_t j = 0; j < counts.size(); ++j) {
    if (j % 2)
      for (int64_t e = i + counts[j]; i < e; ++i) mask[(i % height) * width + i / height] = 1;
    else
      i += counts[j];
  }
}

namespace {

std::vector<double> numbers(const json& v, const std::string& what) {
  if (!v.is_array()) throw Error("COCO segmentation: " + what + " must be a list of numbers, got " + v.dump().substr(0, 80));
  std::vector<double> out;
  out.reserve(v.size());
  for (const json& n : v) {
    if (!n.is_number()) throw Error("COCO segmentation: " + what + " holds a non-number: " + n.dump().substr(0, 80));
    const double d = n.get<double>();
    if (!std::isfinite(d)) throw Error("COCO segmentation: " + what + " holds a non-finite number");
    out.push_back(d);
  }
  return out;
}

}  // namespace

std::vector<uint8_t> coco_segmentation_to_mask(const json& seg, int64_t height, int64_t width) {
  std::vector<uint8_t> mask(static_cast<size_t>(height * width), 0);
  if (seg.is_object()) {
    // frPyObjects(dict) -> frUncompressedRLE, whose mask size is the dict's own `size`; decode then
    // reads the (re-compressed) counts. A compressed string is read as decode reads it.
    if (!seg.contains("counts") || !seg.contains("size"))
      throw Error("COCO RLE segmentation needs 'size' and 'counts', got " + seg.dump().substr(0, 80));
    const std::vector<double> size = numbers(seg["size"], "RLE size");
    if (size.size() != 2 || size[0] != double(height) || size[1] != double(width))
      throw Error("COCO RLE segmentation size " + seg["size"].dump() + " is not the image's [" + std::to_string(height) +
                  ", " + std::to_string(width) + "]");
    std::vector<uint32_t> counts;
    const json& c = seg["counts"];
    if (c.is_string()) {
      counts = coco_rle_from_string(c.get<std::string>());
    } else {
      for (double v : numbers(c, "RLE counts")) {
        if (v < 0 || v > double(std::numeric_limits<uint32_t>::max()) || v != std::floor(v))
          throw Error("COCO RLE counts must be integers in [0, 2^32), got " + std::to_string(v));
        counts.push_back(static_cast<uint32_t>(v));
      }
    }
    coco_rle_decode_or(counts, height, width, mask.data());
    return mask;
  }
  // frPyObjects(list) picks its reading from the first entry's length: 4 numbers -> boxes
  // (frBbox; every entry must then be a box), more -> polygons (frPoly).
  if (!seg.is_array() || seg.empty() || !seg[0].is_array() || seg[0].size() < 4)
    throw Error("COCO segmentation must be a list of polygons [x0, y0, x1, y1, ...] or an RLE dict, got " +
                seg.dump().substr(0, 80));
  const bool boxes = seg[0].size() == 4;
  for (size_t i = 0; i < seg.size(); ++i) {
    std::vector<double> xy = numbers(seg[i], "polygon " + std::to_string(i));
    if (boxes) {
      if (xy.size() != 4) throw Error("COCO segmentation: a list whose first entry is a box must hold only boxes [x, y, w, h]");
      // rleFrBbox: the box as the polygon (xs, ys), (xs, ye), (xe, ye), (xe, ys).
      const double xs = xy[0], ys = xy[1], xe = xs + xy[2], ye = ys + xy[3];
      xy = {xs, ys, xs, ye, xe, ye, xe, ys};
    }
    coco_rle_decode_or(coco_rle_from_polygon(xy, height, width), height, width, mask.data());
  }
  return mask;
}

}  // namespace vf
