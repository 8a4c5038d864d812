// COCO polygon / RLE rasterisation (processors/coco_mask.h) against masks worked out by hand with
// pycocotools' algorithm (cocoapi common/maskApi.c), step by step in the comments; pycocotools itself
// is not available here. The golden case proc-detr-polygon-masks (transformers + pycocotools) checks
// the same code on larger polygons through `vf check`.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "processors/coco_mask.h"

namespace vf {
namespace {

using Counts = std::vector<uint32_t>;

// Row-major mask as strings, one per row, for readable expectations.
std::vector<std::string> rows(const std::vector<uint8_t>& m, int64_t h, int64_t w) {
  std::vector<std::string> r;
  for (int64_t y = 0; y < h; ++y) {
    std::string s;
    for (int64_t x = 0; x < w; ++x) s += m[y * w + x] ? '#' : '.';
    r.push_back(s);
  }
  return r;
}

std::vector<std::string> polygon_rows(const std::vector<double>& xy, int64_t h, int64_t w) {
  std::vector<uint8_t> m(size_t(h * w), 0);
  coco_rle_decode_or(coco_rle_from_polygon(xy, h, w), h, w, m.data());
  return rows(m, h, w);
}

// Notation: vertices are scaled by 5 and rounded, (int)(5 v + .5). Each edge is walked along its
// longer axis (u = upsampled x, v = upsampled y). Where u changes between consecutive points, the
// crossing's column is xd = (min(u) or u - 1 when increasing, + .5) / 5 - .5; kept only if xd is a
// whole pixel in [0, w - 1], i.e. the crossing is between u = 5x + 2 and 5x + 3. Its row is
// ceil(clamp((min(v of the two points) + .5) / 5 - .5, 0, h)). Index x * h + y; sorted with h * w
// appended, differences are the run lengths (zeros merge their neighbours).

TEST(CocoMask, TriangleByHand) {
  // (0,0) (4,0) (0,4) in 5x5 -> (0,0) (20,0) (0,20).
  //  edge 1 (0,0)->(20,0): u 0..20, v 0. Crossings at u-1 = 2, 7, 12, 17 -> x 0..3, row ceil(-0.4 -> 0) = 0:
  //    indices 0, 5, 10, 15.
  //  edge 2 (20,0)->(0,20): dx = dy = 20, walked as u = t, v = 20 - t for t = 20..0 (flipped). Crossings
  //    at u = 17, 12, 7, 2 -> x 3, 2, 1, 0; min v = 2, 7, 12, 17 -> rows 0, 1, 2, 3: indices 15, 11, 7, 3.
  //  edge 3 (0,20)->(0,0): u constant, no crossing.
  //  sorted 0 3 5 7 10 11 15 15 25 -> runs 0 3 2 2 3 1 4 0 10 -> the 0 merges: 0 3 2 2 3 1 14.
  const Counts counts = coco_rle_from_polygon({0, 0, 4, 0, 0, 4}, 5, 5);
  EXPECT_EQ(counts, (Counts{0, 3, 2, 2, 3, 1, 14}));
  // Column 0 rows 0-2, column 1 rows 0-1, column 2 row 0. Column 3's two boundaries cancel.
  EXPECT_EQ(polygon_rows({0, 0, 4, 0, 0, 4}, 5, 5),
            (std::vector<std::string>{"###..", "##...", "#....", ".....", "....."}));
}

TEST(CocoMask, SquareWithFractionalCornersByHand) {
  // (0.6,0.6)-(2.4,2.4) in 4x4: 5 * 0.6 + .5 = 3.5 -> 3, 5 * 2.4 + .5 = 12.5 -> 12: (3,3) (12,3) (12,12) (3,12).
  //  top edge u 3..12, v 3: one crossing, u-1 = 7 -> x 1, row ceil((3.5)/5 - .5 = 0.2) = 1: index 5.
  //  bottom edge u 12..3, v 12: crossing at u = 7 -> x 1, row ceil(12.5/5 - .5 = 2.0) = 2: index 6.
  //  sorted 5 6 16 -> runs 5 1 10: one pixel, (row 1, column 1), the only centre (1.5, 1.5) inside.
  EXPECT_EQ(coco_rle_from_polygon({0.6, 0.6, 2.4, 0.6, 2.4, 2.4, 0.6, 2.4}, 4, 4), (Counts{5, 1, 10}));
  EXPECT_EQ(polygon_rows({0.6, 0.6, 2.4, 0.6, 2.4, 2.4, 0.6, 2.4}, 4, 4),
            (std::vector<std::string>{"....", ".#..", "....", "...."}));
  // (0.5,0.5)-(2.5,2.5): corners on pixel centres. 2.5 + .5 = 3 and 12.5 + .5 = 13: (3,3) .. (13,13).
  //  top edge u 3..13: crossings u-1 = 7, 12 -> x 1, 2, row 1: indices 5, 9.
  //  bottom edge u 13..3, v 13: crossings u = 12, 7 -> x 2, 1, row ceil(13.5/5 - .5 = 2.2) = 3: 11, 7.
  //  sorted 5 7 9 11 16 -> runs 5 2 2 2 5: rows 1-2 of columns 1-2 (centres at 2.5 on the right and
  //  bottom edges are in, those at 0.5 on the left and top edges are out).
  EXPECT_EQ(coco_rle_from_polygon({0.5, 0.5, 2.5, 0.5, 2.5, 2.5, 0.5, 2.5}, 4, 4), (Counts{5, 2, 2, 2, 5}));
  EXPECT_EQ(polygon_rows({0.5, 0.5, 2.5, 0.5, 2.5, 2.5, 0.5, 2.5}, 4, 4),
            (std::vector<std::string>{"....", ".##.", ".##.", "...."}));
}

TEST(CocoMask, PolygonPastTheBorderByHand) {
  // (-1,1) (5,1) (5,9) (-1,9) in 4x4: 5 * -1 + .5 = -4.5 -> -4 (a C cast truncates toward zero),
  // 25.5 -> 25, 5.5 -> 5, 45.5 -> 45: (-4,5) (25,5) (25,45) (-4,45).
  //  top edge u -4..25, v 5: crossings u-1 = -3, 2, 7, 12, 17, 22 -> x -1 (dropped, < 0), 0, 1, 2, 3,
  //    4 (dropped, > w - 1); row ceil(5.5/5 - .5 = 0.6) = 1: indices 1, 5, 9, 13.
  //  bottom edge u 25..-4, v 45: x 3, 2, 1, 0; row 45.5/5 - .5 = 8.6 clamped to h = 4: indices 16, 12, 8, 4.
  //  sorted 1 4 5 8 9 12 13 16 16 16 -> runs 1 3 1 3 1 3 1 3 0 0 -> the zeros merge away:
  //  1 3 1 3 1 3 1 3: rows 1-3 of every column.
  EXPECT_EQ(coco_rle_from_polygon({-1, 1, 5, 1, 5, 9, -1, 9}, 4, 4), (Counts{1, 3, 1, 3, 1, 3, 1, 3}));
  EXPECT_EQ(polygon_rows({-1, 1, 5, 1, 5, 9, -1, 9}, 4, 4),
            (std::vector<std::string>{"....", "####", "####", "####"}));
}

TEST(CocoMask, DegeneratePolygons) {
  // Fewer than two distinct points, or a line walked there and back: no crossing survives.
  EXPECT_EQ(coco_rle_from_polygon({}, 3, 3), (Counts{9}));
  EXPECT_EQ(coco_rle_from_polygon({1, 1}, 3, 3), (Counts{9}));
  EXPECT_EQ(coco_rle_from_polygon({0, 0, 3, 3}, 3, 3), (Counts{9}));
  // A repeated vertex changes nothing (the C code's 0/0 row there is never read).
  EXPECT_EQ(coco_rle_from_polygon({0, 0, 4, 0, 4, 0, 0, 4}, 5, 5), (Counts{0, 3, 2, 2, 3, 1, 14}));
  // An odd trailing value is ignored (frPoly passes len / 2 points).
  EXPECT_EQ(coco_rle_from_polygon({0, 0, 4, 0, 0, 4, 7}, 5, 5), (Counts{0, 3, 2, 2, 3, 1, 14}));
}

TEST(CocoMask, CompressedStringsByHand) {
  // rleToString of 1 3 1 3 1 3 1 3: from the fourth count on, each is stored minus the count two
  // before (3-3, 1-1, ... = 0); 1, 3, 1, 0 ... are single characters 48 + value: "13100000".
  EXPECT_EQ(coco_rle_from_string("13100000"), (Counts{1, 3, 1, 3, 1, 3, 1, 3}));
  // 40 2 3 1: 40 = 0b1'01000 -> low 5 bits 8 with the continue bit 0x20 -> 48 + 40 = 'X', then 1 -> '1';
  // 2 -> '2', 3 -> '3'; 1 - 2 = -1 -> 31 with the sign bit 0x10 and no continuation -> 48 + 31 = 'O'.
  EXPECT_EQ(coco_rle_from_string("X123O"), (Counts{40, 2, 3, 1}));
  EXPECT_EQ(coco_rle_from_string(""), Counts{});
  EXPECT_THROW(coco_rle_from_string("X"), Error);       // ends inside a value
  EXPECT_THROW(coco_rle_from_string("1 2"), Error);     // a character outside '0'..'o'
  EXPECT_THROW(coco_rle_from_string("1O"), Error);      // 1, then -1 (no difference yet): negative
  EXPECT_THROW(coco_rle_from_string("oooooooo0"), Error);  // a value longer than 7 characters
}

TEST(CocoMask, SegmentationValues) {
  const std::vector<std::string> square_rows = {"....", "####", "####", "####"};
  // Polygons, uncompressed and compressed RLE of the same mask give the same result.
  json poly = json::parse("[[-1, 1, 5, 1, 5, 9, -1, 9]]");
  json rle = json::parse(R"({"size": [4, 4], "counts": [1, 3, 1, 3, 1, 3, 1, 3]})");
  json rle_string = json::parse(R"({"size": [4, 4], "counts": "13100000"})");
  EXPECT_EQ(rows(coco_segmentation_to_mask(poly, 4, 4), 4, 4), square_rows);
  EXPECT_EQ(rows(coco_segmentation_to_mask(rle, 4, 4), 4, 4), square_rows);
  EXPECT_EQ(rows(coco_segmentation_to_mask(rle_string, 4, 4), 4, 4), square_rows);
  // Several parts: their union (np.any over the decoded parts).
  json parts = json::parse("[[0, 0, 4, 0, 0, 4], [0.6, 0.6, 2.4, 0.6, 2.4, 2.4, 0.6, 2.4], [3.5, 3.5, 5, 3.5, 5, 5, 3.5, 5]]");
  // The third part, (3.5,3.5)-(5,5) -> (18,18)-(25,25): crossing u-1 = 22 -> x 4, rows ceil(18.5/5 - .5 = 3.2) = 4
  // to ceil(25.5/5 - .5 = 4.6) = 5: pixel (4, 4).
  EXPECT_EQ(rows(coco_segmentation_to_mask(parts, 5, 5), 5, 5),
            (std::vector<std::string>{"###..", "##...", "#....", ".....", "....#"}));
  // A first entry of exactly four numbers makes frPyObjects read boxes [x, y, w, h]: (0.5, 0.5, 2, 2)
  // is the polygon (0.5,0.5) (0.5,2.5) (2.5,2.5) (2.5,0.5), the square above walked the other way.
  EXPECT_EQ(rows(coco_segmentation_to_mask(json::parse("[[0.5, 0.5, 2, 2]]"), 4, 4), 4, 4),
            (std::vector<std::string>{"....", ".##.", ".##.", "...."}));
  EXPECT_THROW(coco_segmentation_to_mask(json::parse("[[0.5, 0.5, 2, 2], [0, 0, 1, 0, 1, 1]]"), 4, 4), Error);
  // What pycocotools refuses or would misread.
  EXPECT_THROW(coco_segmentation_to_mask(json::array(), 4, 4), Error);                          // pyobj[0] of []
  EXPECT_THROW(coco_segmentation_to_mask(json::parse("[[1, 2, 3]]"), 4, 4), Error);             // too short
  EXPECT_THROW(coco_segmentation_to_mask(json::parse("[[0, 0, 1, 0, \"x\", 1]]"), 4, 4), Error);  // not a number
  EXPECT_THROW(coco_segmentation_to_mask(json::parse(R"({"size": [4, 5], "counts": [20]})"), 4, 4), Error);  // size
  EXPECT_THROW(coco_segmentation_to_mask(json::parse(R"({"size": [4, 4], "counts": [15]})"), 4, 4), Error);  // 15 != 16
  EXPECT_THROW(coco_segmentation_to_mask(json::parse(R"({"size": [4, 4], "counts": [17]})"), 4, 4), Error);  // overflow
  EXPECT_THROW(coco_segmentation_to_mask(json::parse(R"({"size": [4, 4], "counts": [-1, 17]})"), 4, 4), Error);
  EXPECT_THROW(coco_segmentation_to_mask(json::parse(R"({"counts": [16]})"), 4, 4), Error);
  // Coordinates whose upsampled outline is unbounded are refused, not walked.
  EXPECT_THROW(coco_segmentation_to_mask(json::parse("[[0, 0, 1e12, 0, 0, 1]]"), 4, 4), Error);
  EXPECT_THROW(coco_segmentation_to_mask(json::parse("[[0, 0, 2e7, 0, 0, 1]]"), 4, 4), Error);
}

}  // namespace
}  // namespace vf
