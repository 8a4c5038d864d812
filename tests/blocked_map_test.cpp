// A ResNet-style chain of Conv2d on BlockedMaps (stem, max pool, bottlenecks with projected and
// identity shortcuts, strided blocks, a channel count that is not a multiple of the block) against
// a convolution and a max pool written here from their definitions, on NCHW arrays in double; the
// blocked max pool's NaN, -inf and border values against hand-computed ones, and against the NHWC pool.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "test_util.h"
#include "core/ops.h"

using namespace vf;

namespace {

// An NCHW map in double, the reference's own representation.
struct Map {
  int64_t c = 0, h = 0, w = 0;
  std::vector<double> v;
  double& at(int64_t ch, int64_t y, int64_t x) { return v[(ch * h + y) * w + x]; }
  double at(int64_t ch, int64_t y, int64_t x) const { return v[(ch * h + y) * w + x]; }
};

using test::randn;

// y[o, i, j] = b[o] + sum over o's group of input channels c and the taps (ky, kx) of
// w[o, c, ky, kx] x[c, i s - p + ky d, j s - p + kx d] (zero outside), then + residual, then ReLU when
// asked (d: the dilation).
Map conv_direct(const Map& x, const Tensor& w, const Tensor& b, int stride, int pad, bool relu,
                const Map* residual = nullptr, int groups = 1, int dilation = 1) {
  const int64_t o = w.size(0), k = w.size(2), in_per_group = x.c / groups, out_per_group = o / groups;
  Map y;
  y.c = o;
  y.h = (x.h + 2 * pad - dilation * (k - 1) - 1) / stride + 1;
  y.w = (x.w + 2 * pad - dilation * (k - 1) - 1) / stride + 1;
  y.v.assign(y.c * y.h * y.w, 0.0);
  for (int64_t oc = 0; oc < o; ++oc)
    for (int64_t i = 0; i < y.h; ++i)
      for (int64_t j = 0; j < y.w; ++j) {
        double acc = b.f32()[oc];
        for (int64_t ic = 0; ic < in_per_group; ++ic)
          for (int64_t ky = 0; ky < k; ++ky)
            for (int64_t kx = 0; kx < k; ++kx) {
              const int64_t yy = i * stride - pad + ky * dilation, xx = j * stride - pad + kx * dilation;
              if (yy < 0 || yy >= x.h || xx < 0 || xx >= x.w) continue;
              const int64_t c = (oc / out_per_group) * in_per_group + ic;
              acc += double(w.f32()[((oc * in_per_group + ic) * k + ky) * k + kx]) * x.at(c, yy, xx);
            }
        if (residual) acc += residual->at(oc, i, j);
        y.at(oc, i, j) = relu ? std::max(acc, 0.0) : acc;
      }
  return y;
}

// A [1, H, W, C] tensor as the reference's map.
Map map_of(const Tensor& nhwc) {
  Map m{nhwc.size(3), nhwc.size(1), nhwc.size(2), std::vector<double>(nhwc.numel())};
  for (int64_t c = 0; c < m.c; ++c)
    for (int64_t i = 0; i < m.h; ++i)
      for (int64_t j = 0; j < m.w; ++j) m.at(c, i, j) = nhwc.f32()[(i * m.w + j) * m.c + c];
  return m;
}

// Max over each k x k window, positions outside the map left out.
Map max_pool_direct(const Map& x, int k, int stride, int pad) {
  Map y;
  y.c = x.c;
  y.h = (x.h + 2 * pad - k) / stride + 1;
  y.w = (x.w + 2 * pad - k) / stride + 1;
  y.v.assign(y.c * y.h * y.w, -std::numeric_limits<double>::infinity());
  for (int64_t c = 0; c < y.c; ++c)
    for (int64_t i = 0; i < y.h; ++i)
      for (int64_t j = 0; j < y.w; ++j)
        for (int64_t ky = 0; ky < k; ++ky)
          for (int64_t kx = 0; kx < k; ++kx) {
            const int64_t yy = i * stride - pad + ky, xx = j * stride - pad + kx;
            if (yy >= 0 && yy < x.h && xx >= 0 && xx < x.w) y.at(c, i, j) = std::max(y.at(c, i, j), x.at(c, yy, xx));
          }
  return y;
}

// The NHWC tensor a map converts to against the reference's NCHW map: the largest difference
// relative to the reference's largest magnitude (which must be well above zero: a map of zeros
// would prove nothing).
double relative_error(const Tensor& nhwc, const Map& ref) {
  EXPECT_EQ(nhwc.shape(), (Shape{1, ref.h, ref.w, ref.c}));
  if (nhwc.shape() != Shape{1, ref.h, ref.w, ref.c}) return INFINITY;
  double scale = 0, err = 0;
  for (int64_t c = 0; c < ref.c; ++c)
    for (int64_t i = 0; i < ref.h; ++i)
      for (int64_t j = 0; j < ref.w; ++j) {
        const double r = ref.at(c, i, j), v = nhwc.f32()[(i * ref.w + j) * ref.c + c];
        scale = std::max(scale, std::fabs(r));
        err = std::max(err, std::isnan(v) ? INFINITY : std::fabs(v - r));
      }
  EXPECT_GT(scale, 0.5);
  return err / scale;
}

struct Layer {
  Tensor w, b;
  int stride, pad;
  bool relu;
  Conv2d conv;
};

Layer make_layer(int64_t out, int64_t in, int k, int stride, bool relu, uint32_t seed) {
  Layer l{randn({out, in, k, k}, seed, 1.0f / std::sqrt(float(in * k * k))), randn({out}, seed + 1, 0.1f),
          stride, k / 2, relu, Conv2d()};
  Conv2dOptions o;
  o.stride_h = o.stride_w = stride;
  o.pad_top = o.pad_left = o.pad_bottom = o.pad_right = k / 2;
  o.act = relu ? Act::Relu : Act::None;
  o.blocked_maps = true;
  l.conv = Conv2d(l.w, l.b, o);
  return l;
}

// A bottleneck: 1x1 -> 3x3 (stride) -> 1x1 + shortcut, ReLU after the sum.
struct Bottleneck {
  Layer c1, c2, c3;
  bool projected;
  Layer shortcut;

  Bottleneck(int64_t in, int64_t width, int64_t out, int stride, uint32_t seed)
      : c1(make_layer(width, in, 1, 1, true, seed)),
        c2(make_layer(width, width, 3, stride, true, seed + 10)),
        c3(make_layer(out, width, 1, 1, true, seed + 20)),
        projected(in != out || stride != 1),
        shortcut(make_layer(out, in, 1, stride, false, seed + 30)) {}

  BlockedMap forward(BlockedMap x) const {
    BlockedMap h = c2.conv.forward_to_layer(c1.conv.forward_to_layer(x));
    if (projected) return c3.conv.forward(h, shortcut.conv.forward(x));
    return c3.conv.forward(h, std::move(x));
  }
  Map reference(const Map& x) const {
    Map h = conv_direct(conv_direct(x, c1.w, c1.b, 1, 0, true), c2.w, c2.b, c2.stride, 1, true);
    Map r = projected ? conv_direct(x, shortcut.w, shortcut.b, shortcut.stride, 0, false) : x;
    return conv_direct(h, c3.w, c3.b, 1, 0, true, &r);
  }
};

}  // namespace

TEST(BlockedMap, ResNetChainMatchesDirectConvolution) {
  // An image of 3 channels, odd sizes (the stem's padding and the pool's edges matter).
  const int64_t H = 37, W = 29;
  Tensor image = randn({1, 3, H, W}, 1);
  Map ref_in{3, H, W, std::vector<double>(image.f32(), image.f32() + image.numel())};

  Layer stem = make_layer(32, 3, 7, 2, true, 100);
  Bottleneck blocks[] = {
      Bottleneck(32, 16, 64, 1, 200),  // projected shortcut; its 3x3 is Winograd-sized (16 in, 16 out)
      Bottleneck(64, 16, 64, 1, 300),  // identity shortcut: the sum accumulates in the input's storage
      Bottleneck(64, 24, 48, 2, 400),  // strided, 24 and 48 channels (not multiples of 16)
      // strided from an odd size (5x4 -> 3x2) on whole channel blocks: the shortcut runs on its input
      // subsampled, the 3x3 on NHWC maps where oneDNN has only its general kernel for channel blocks
      Bottleneck(48, 32, 64, 2, 500),
      Bottleneck(64, 16, 40, 1, 600),
      Bottleneck(40, 16, 32, 2, 700),  // a strided shortcut on 40 channels (a padded last block)
  };

  BlockedMap x = stem.conv.forward(BlockedMap::from_nchw(image));
  Map ref = conv_direct(ref_in, stem.w, stem.b, 2, 3, true);
  EXPECT_LT(relative_error(x.to_nhwc(), ref), 1e-5);

  x = max_pool2d(x, 3, 2, 1);
  ref = max_pool_direct(ref, 3, 2, 1);
  EXPECT_EQ(x.shape(), (Shape{1, ref.h, ref.w, 32}));
  EXPECT_LT(relative_error(x.to_nhwc(), ref), 1e-5);

  for (const Bottleneck& b : blocks) {
    x = b.forward(std::move(x));
    ref = b.reference(ref);
    EXPECT_LT(relative_error(x.to_nhwc(), ref), 1e-4) << "after the block of " << b.c3.w.size(0) << " channels";
  }
  EXPECT_EQ(x.shape(), (Shape{1, 2, 1, 32}));
}

TEST(BlockedMap, SharedResidualIsNotOverwritten) {
  // A residual that another map still shares must stay as it was (the sum goes to a copy).
  Layer l = make_layer(16, 16, 1, 1, false, 500);
  Tensor input = randn({1, 6, 5, 16}, 501);
  BlockedMap x = l.conv.forward(BlockedMap::from_nhwc(input));  // a blocked map
  BlockedMap kept = x;
  const Tensor before = x.to_nhwc();
  BlockedMap y = l.conv.forward(kept, std::move(x));
  EXPECT_EQ(max_abs_diff(kept.to_nhwc(), before), 0.0);
  // y = conv(kept) + kept, against the definition.
  const Map m = map_of(before);
  EXPECT_LT(relative_error(y.to_nhwc(), conv_direct(m, l.w, l.b, 1, 0, false, &m)), 1e-5);
}

TEST(BlockedMap, StridedGroupedAndDilatedConvolutionsMatchTheirDefinition) {
  // 3x3 layers on a channel-blocked map of 64 channels that Winograd does not take (a stride of 2,
  // groups, a dilation): those with only oneDNN's general or reference kernel on channel blocks run
  // on NHWC maps.
  const int64_t H = 9, W = 11, C = 64, O = 48;
  Tensor input = randn({1, H, W, C}, 800);
  Layer first = make_layer(C, C, 1, 1, false, 801);  // makes the map a blocked one
  BlockedMap x = first.conv.forward(BlockedMap::from_nhwc(input));
  const Map xs = map_of(x.to_nhwc());
  struct Case { int stride, groups, dilation; };
  // groups of 16, 4 and 32 input channels (ResNeXt's are 4 wide): the last two are not whole blocks.
  for (const Case k : {Case{2, 1, 1}, Case{2, 4, 1}, Case{1, 16, 1}, Case{1, 1, 2}, Case{1, 2, 2}}) {
    const int pad = k.dilation;
    Tensor w = randn({O, C / k.groups, 3, 3}, 810 + k.stride * 7 + k.groups * 3 + k.dilation, 0.05f);
    Tensor b = randn({O}, 820, 0.1f);
    Conv2dOptions o;
    o.stride_h = o.stride_w = k.stride;
    o.pad_top = o.pad_left = o.pad_bottom = o.pad_right = pad;
    o.dilation_h = o.dilation_w = k.dilation;
    o.groups = k.groups;
    o.blocked_maps = true;
    const Tensor y = Conv2d(w, b, o).forward(x).to_nhwc();
    const Map ref = conv_direct(xs, w, b, k.stride, pad, false, nullptr, k.groups, k.dilation);
    EXPECT_LT(relative_error(y, ref), 1e-5) << "stride " << k.stride << ", groups " << k.groups << ", dilation "
                                            << k.dilation;
  }
}

TEST(BlockedMap, NhwcRoundTripAndShapeChecks) {
  Tensor t = randn({2, 3, 4, 5}, 600);
  EXPECT_EQ(max_abs_diff(BlockedMap::from_nhwc(t).to_nhwc(), t), 0.0);
  BlockedMap n = BlockedMap::from_nchw(t);
  EXPECT_EQ(n.shape(), (Shape{2, 4, 5, 3}));
  EXPECT_EQ(n.to_nhwc().at(((1 * 4 + 2) * 5 + 3) * 3 + 1), t.at(((1 * 3 + 1) * 4 + 2) * 5 + 3));
  Layer l = make_layer(8, 4, 1, 1, false, 601);
  EXPECT_THROW(l.conv.forward(BlockedMap::from_nhwc(t)), Error);  // 5 channels for a layer of 4
  EXPECT_THROW(BlockedMap::from_nhwc(Tensor::empty({3, 4})), Error);
}

namespace {

// A blocked map holding `nhwc`'s values exactly: a depthwise 1x1 convolution of weight 1 and bias 0
// (x * 1 + 0 is x for NaN and -inf too, where a dense identity matrix would spread 0 * NaN).
BlockedMap blocked_copy(const Tensor& nhwc) {
  const int64_t c = nhwc.size(3);
  Conv2dOptions o;
  o.groups = int(c);
  o.blocked_maps = true;
  Conv2d identity(Tensor::from_vector<float>({c, 1, 1, 1}, std::vector<float>(c, 1.f)), Tensor(), o);
  return identity.forward(BlockedMap::from_nhwc(nhwc));
}

}  // namespace

TEST(BlockedMap, MaxPoolNanInfAndBorders) {
  // A 5 x 6 map pooled 3 x 3, stride 2, padding 1 (the ResNet stem's pool) -> 3 x 3: the padding is
  // left out of every window (an all-negative or all -inf window must not give 0), a NaN anywhere in
  // a window gives NaN (PyTorch's rule). 32 channels (whole blocks) and 24 (the last block padded).
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t H = 5, W = 6;
  for (int64_t C : {32, 24}) {
    SCOPED_TRACE("channels " + std::to_string(C));
    std::vector<float> v(H * W * C);
    auto at = [&](int64_t i, int64_t j, int64_t c) -> float& { return v[(i * W + j) * C + c]; };
    // Increasing along rows and columns, all negative: a window's maximum is its bottom-right pixel.
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j)
        for (int64_t c = 0; c < C; ++c) at(i, j, c) = float(i * W + j) - 100.f - float(c);
    // Channel 20 decreasing: the maximum is a window's top-left pixel.
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) at(i, j, 20) = -float(i * W + j) - 1.f;
    at(0, 0, 0) = nan;  // top-left corner: only output (0, 0) sees it
    at(4, 5, 3) = nan;  // bottom-right corner: only output (2, 2)
    at(2, 2, 17) = nan;  // the second block, inside: only output (1, 1) (rows 1-3, columns 1-3)
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) at(i, j, 1) = at(i, j, 5) = -inf;  // all -inf: -inf, not 0
    at(0, 0, 5) = nan;  // NaN beside -inf: NaN at (0, 0), -inf elsewhere

    Tensor y = max_pool2d(blocked_copy(Tensor::from_vector<float>({1, H, W, C}, v)), 3, 2, 1).to_nhwc();
    ASSERT_EQ(y.shape(), (Shape{1, 3, 3, C}));
    for (int64_t oy = 0; oy < 3; ++oy)
      for (int64_t ox = 0; ox < 3; ++ox)
        for (int64_t c = 0; c < C; ++c) {
          // Window rows 2 oy - 1 .. 2 oy + 1 and columns 2 ox - 1 .. 2 ox + 1, clipped to the map.
          const int64_t bottom = std::min<int64_t>(2 * oy + 1, H - 1), right = std::min<int64_t>(2 * ox + 1, W - 1);
          const int64_t top = std::max<int64_t>(2 * oy - 1, 0), left = std::max<int64_t>(2 * ox - 1, 0);
          float want = float(bottom * W + right) - 100.f - float(c);
          if (c == 20) want = -float(top * W + left) - 1.f;
          if (c == 1 || c == 5) want = -inf;
          const bool nan_here = (c == 0 && oy == 0 && ox == 0) || (c == 3 && oy == 2 && ox == 2) ||
                                (c == 17 && oy == 1 && ox == 1) || (c == 5 && oy == 0 && ox == 0);
          const float got = y.f32()[(oy * 3 + ox) * C + c];
          if (nan_here)
            EXPECT_TRUE(std::isnan(got)) << "channel " << c << " at " << oy << "," << ox << ": " << got;
          else
            EXPECT_EQ(got, want) << "channel " << c << " at " << oy << "," << ox;
        }
  }
}

TEST(BlockedMap, MaxPoolEqualsNhwcPool) {
  // Random maps (no NaN) of odd sizes, whole and padded channel blocks: the blocked pool gives the
  // NHWC pool's values exactly (a maximum involves no rounding).
  for (int64_t C : {64, 40}) {
    SCOPED_TRACE("channels " + std::to_string(C));
    Tensor x = randn({2, 23, 18, C}, 700 + uint32_t(C));
    BlockedMap b = blocked_copy(x);
    ASSERT_EQ(max_abs_diff(b.to_nhwc(), x), 0.0);
    for (auto [k, s, p] : {std::array<int, 3>{3, 2, 1}, {2, 2, 0}, {3, 1, 1}}) {
      Tensor want = max_pool2d_nhwc(x, k, s, p, p, p, p);
      Tensor got = max_pool2d(b, k, s, p).to_nhwc();
      ASSERT_EQ(got.shape(), want.shape());
      EXPECT_EQ(max_abs_diff(got, want), 0.0) << "kernel " << k << ", stride " << s << ", padding " << p;
    }
  }
}
