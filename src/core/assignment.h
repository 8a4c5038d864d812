// Linear sum assignment (the Hungarian matching of DETR's losses): the same result as
// scipy.optimize.linear_sum_assignment for a rectangular cost matrix.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace vf {

// Minimal-cost assignment of min(rows, cols) rows to distinct columns of a row-major rows x cols
// cost matrix. Returns (row, col) pairs sorted by row, like scipy's (row_ind, col_ind).
// Throws vf::Error for NaN or -inf costs, or when no finite assignment exists.
std::vector<std::pair<int64_t, int64_t>> linear_sum_assignment(const double* cost, int64_t rows, int64_t cols);
// cost: a float32 or float64 [rows, cols] tensor.
std::vector<std::pair<int64_t, int64_t>> linear_sum_assignment(const Tensor& cost);

}  // namespace vf
