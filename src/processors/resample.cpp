#include "processors/resample.h"

#include "core/errors.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/tensor.h"

// Pillow's coefficients come from plain double arithmetic; a fused multiply-add would round
// differently and move a fixed-point coefficient by one now and then.
#pragma GCC optimize("fp-contract=off")

namespace vf {

Resample resample_from_int(int value) {
  if (value < 0 || value > 5)
    throw ModelError("unknown resampling filter " + std::to_string(value) +
                " (expected 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box or 5 hamming)");
  return static_cast<Resample>(value);
}

const char* resample_name(Resample r) {
  switch (r) {
    case Resample::Nearest: return "nearest";
    case Resample::Lanczos: return "lanczos";
    case Resample::Bilinear: return "bilinear";
    case Resample::Bicubic: return "bicubic";
    case Resample::Box: return "box";
    case Resample::Hamming: return "hamming";
  }
  return "?";
}

namespace {

// Filters of libImaging/Resample.c, with the same expressions (operation order matters).
double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

double hamming_filter(double x) {
  if (x < 0.0) x = -x;
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x = x * M_PI;
  // Pillow writes the window's constants as floats: 0.54f, 0.46f.
  return std::sin(x) / x * (static_cast<double>(0.54f) + static_cast<double>(0.46f) * std::cos(x));
}

double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double sinc_filter(double x) {
  if (x == 0.0) return 1.0;
  x = x * M_PI;
  return std::sin(x) / x;
}

double lanczos_filter(double x) {
  if (-3.0 <= x && x < 3.0) return sinc_filter(x) * sinc_filter(x / 3);
  return 0.0;
}

struct Filter {
  double (*fn)(double);
  double support;
};

Filter filter_for(Resample r) {
  switch (r) {
    case Resample::Box: return {box_filter, 0.5};
    case Resample::Bilinear: return {bilinear_filter, 1.0};
    case Resample::Hamming: return {hamming_filter, 1.0};
    case Resample::Bicubic: return {bicubic_filter, 2.0};
    case Resample::Lanczos: return {lanczos_filter, 3.0};
    default: throw Error("resize: no convolution filter for nearest");
  }
}

constexpr int kPrecisionBits = 32 - 8 - 2;

// One output position's source window [xmin, xmin + count) and its fixed-point weights.
struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // xmin, count per output position
  std::vector<int32_t> k;   // ksize per output position
};

// precompute_coeffs + normalize_coeffs_8bpc for the box [0, in_size) of the source axis.
Coeffs precompute_coeffs(int in_size, int out_size, const Filter& filter) {
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  double scale = static_cast<double>(in1 - in0) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = filter.support * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(size_t(out_size) * 2);
  c.k.assign(size_t(out_size) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  const double inv_filterscale = 1.0 / filterscale;
  for (int xx = 0; xx < out_size; ++xx) {
    double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      double v = filter.fn((x + xmin - center + 0.5) * inv_filterscale);
      w[x] = v;
      ww += v;
    }
    for (int x = 0; x < xmax; ++x) {
      double v = ww != 0.0 ? w[x] / ww : w[x];
      int32_t* k = &c.k[size_t(xx) * c.ksize];
      k[x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                   : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t ss) {
  int32_t v = ss >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

// Rows [row0, row0 + out.height) of `in`, resampled along x to out.width.
void resample_horizontal(const Image& in, Image& out, int row0, const Coeffs& c) {
  const int64_t C = in.channels, in_stride = in.width * C, out_stride = out.width * C;
  const int out_w = static_cast<int>(out.width);
#pragma omp parallel for schedule(static) if (out.height * out.width > 4096)
  for (int64_t yy = 0; yy < out.height; ++yy) {
    const uint8_t* line_in = in.rgb.data() + (yy + row0) * in_stride;
    uint8_t* line_out = out.rgb.data() + yy * out_stride;
    for (int xx = 0; xx < out_w; ++xx) {
      const int xmin = c.bounds[2 * xx], xmax = c.bounds[2 * xx + 1];
      const int32_t* k = &c.k[size_t(xx) * c.ksize];
      for (int64_t ch = 0; ch < C; ++ch) {
        int32_t ss = 1 << (kPrecisionBits - 1);
        const uint8_t* p = line_in + xmin * C + ch;
        for (int x = 0; x < xmax; ++x) ss += int32_t(p[x * C]) * k[x];
        line_out[xx * C + ch] = clip8(ss);
      }
    }
  }
}

// Resampled along y: output row yy reads rows bounds[2yy] - row_offset ... of `in`.
void resample_vertical(const Image& in, Image& out, int row_offset, const Coeffs& c) {
  const int64_t C = in.channels, stride = in.width * C;
  std::vector<int32_t> acc_init(size_t(stride), 1 << (kPrecisionBits - 1));
#pragma omp parallel
  {
    std::vector<int32_t> acc(static_cast<size_t>(stride));
#pragma omp for schedule(static)
    for (int64_t yy = 0; yy < out.height; ++yy) {
      const int ymin = c.bounds[2 * yy] - row_offset, ymax = c.bounds[2 * yy + 1];
      const int32_t* k = &c.k[size_t(yy) * c.ksize];
      std::copy(acc_init.begin(), acc_init.end(), acc.begin());
      // Row by row: the same integer sum as Pillow's per-pixel loop, in a cache-friendly order.
      for (int y = 0; y < ymax; ++y) {
        const uint8_t* line_in = in.rgb.data() + (y + ymin) * stride;
        const int32_t ky = k[y];
        for (int64_t i = 0; i < stride; ++i) acc[i] += int32_t(line_in[i]) * ky;
      }
      uint8_t* line_out = out.rgb.data() + yy * stride;
      for (int64_t i = 0; i < stride; ++i) line_out[i] = clip8(acc[i]);
    }
  }
}

Image make_image(int64_t h, int64_t w, int64_t channels) {
  Image img;
  img.height = h;
  img.width = w;
  img.channels = channels;
  img.rgb.resize(size_t(h) * size_t(w) * size_t(channels));
  return img;
}

// ImagingResampleInner: horizontal pass (only the source rows the vertical pass reads), then
// vertical; a pass whose size does not change is skipped.
Image resample(const Image& in, int64_t out_h, int64_t out_w, const Filter& filter) {
  const bool need_horizontal = out_w != in.width;
  const bool need_vertical = out_h != in.height;
  Coeffs vert = precompute_coeffs(int(in.height), int(out_h), filter);
  const int ybox_first = vert.bounds[0];
  const int ybox_last = vert.bounds[size_t(out_h) * 2 - 2] + vert.bounds[size_t(out_h) * 2 - 1];
  Image tmp;
  const Image* src = &in;
  int row_offset = 0;
  if (need_horizontal) {
    Coeffs horiz = precompute_coeffs(int(in.width), int(out_w), filter);
    tmp = make_image(need_vertical ? ybox_last - ybox_first : in.height, out_w, in.channels);
    int row0 = need_vertical ? ybox_first : 0;
    resample_horizontal(in, tmp, row0, horiz);
    row_offset = row0;
    if (!need_vertical) return tmp;
    src = &tmp;
  }
  if (!need_vertical) return in;
  Image out = make_image(out_h, src->width, in.channels);
  resample_vertical(*src, out, row_offset, vert);
  return out;
}

// ImagingScaleAffine with a = ((box w) / out_w, 0, 0, 0, (box h) / out_h, 0): source positions
// accumulate in double from half a step, truncated (Pillow's COORD).
Image resize_nearest(const Image& in, int64_t out_h, int64_t out_w) {
  const double a0 = static_cast<double>(static_cast<float>(in.width) - 0.0f) / out_w;
  const double a4 = static_cast<double>(static_cast<float>(in.height) - 0.0f) / out_h;
  auto coord = [](double v) { return v < 0.0 ? -1 : static_cast<int>(v); };
  std::vector<int> xin(size_t(out_w), -1), yin(size_t(out_h), -1);
  double xo = 0.0 + a0 * 0.5;
  for (int64_t x = 0; x < out_w; ++x, xo += a0) xin[x] = coord(xo);
  double yo = 0.0 + a4 * 0.5;
  for (int64_t y = 0; y < out_h; ++y, yo += a4) yin[y] = coord(yo);
  const int64_t C = in.channels;
  Image out = make_image(out_h, out_w, C);
#pragma omp parallel for schedule(static) if (out_h * out_w > 4096)
  for (int64_t y = 0; y < out_h; ++y) {
    uint8_t* o = out.rgb.data() + y * out_w * C;
    if (yin[y] < 0 || yin[y] >= in.height) continue;  // stays zero (never happens for a plain resize)
    const uint8_t* line = in.rgb.data() + yin[y] * in.width * C;
    for (int64_t x = 0; x < out_w; ++x)
      if (xin[x] >= 0 && xin[x] < in.width)
        for (int64_t ch = 0; ch < C; ++ch) o[x * C + ch] = line[xin[x] * C + ch];
  }
  return out;
}

}  // namespace

Image resize_pil(const Image& in, int64_t out_height, int64_t out_width, Resample filter) {
  if (out_height < 1 || out_width < 1)
    throw ModelError("resize: output size " + std::to_string(out_height) + "x" + std::to_string(out_width) +
                " must be at least 1x1");
  if (in.height < 1 || in.width < 1 || in.channels < 1 ||
      in.rgb.size() != in.pixels() * size_t(in.channels))
    throw Error("resize: invalid input image " + std::to_string(in.height) + "x" + std::to_string(in.width) + "x" +
                std::to_string(in.channels));
  if (out_height > (int64_t(1) << 30) || out_width > (int64_t(1) << 30) ||
      out_height * out_width > kMaxImagePixels)
    throw ModelError("resize: output size " + std::to_string(out_height) + "x" + std::to_string(out_width) +
                " is too large");
  if (out_height == in.height && out_width == in.width) return in;  // Image.resize returns a copy
  if (filter == Resample::Nearest) return resize_nearest(in, out_height, out_width);
  const Filter f = filter_for(filter);
  // Image.resize: a very tall image shrinking vertically is resized along y first, then along x.
  if (in.height > in.width * 100 && out_height < in.height) {
    Image tall = resample(in, out_height, in.width, f);
    return resample(tall, out_height, out_width, f);
  }
  return resample(in, out_height, out_width, f);
}

}  // namespace vf
