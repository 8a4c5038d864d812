#include "core/assignment.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

namespace vf {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Shortest augmenting path with dual variables (Jonker-Volgenant style, as described in D. F. Crouse,
// "On implementing 2D rectangular assignment algorithms", IEEE TAES 2016 — the algorithm scipy uses).
// Requires rows <= cols. Each row is added in turn: a Dijkstra search over reduced costs
// c[i][j] - u[i] - v[j] finds the cheapest path from the new row to a free column, then the duals
// are updated and the path is flipped. Ties prefer a free column, then the lowest-numbered
// remaining column, so the result matches scipy's on ties as well.
class Solver {
 public:
  Solver(const double* cost, int64_t rows, int64_t cols)
      : c_(cost), nr_(rows), nc_(cols), u_(rows, 0.0), v_(cols, 0.0), dist_(cols), path_(cols, -1),
        col4row_(rows, -1), row4col_(cols, -1), visited_row_(rows), visited_col_(cols), remaining_(cols) {}

  std::vector<int64_t> solve() {
    for (int64_t row = 0; row < nr_; ++row) augment(row);
    return col4row_;
  }

 private:
  void augment(int64_t cur_row) {
    double min_val = 0;
    int64_t n_remaining = nc_;
    // Filled in reverse so that, among equal distances, the search meets columns in the same order
    // as the reference implementation.
    for (int64_t k = 0; k < nc_; ++k) remaining_[k] = nc_ - k - 1;
    std::fill(visited_row_.begin(), visited_row_.end(), 0);
    std::fill(visited_col_.begin(), visited_col_.end(), 0);
    std::fill(dist_.begin(), dist_.end(), kInf);

    int64_t i = cur_row, sink = -1;
    while (sink == -1) {
      visited_row_[i] = 1;
      int64_t best = -1;
      double lowest = kInf;
      const double* ci = c_ + i * nc_;
      for (int64_t k = 0; k < n_remaining; ++k) {
        const int64_t j = remaining_[k];
        const double r = min_val + ci[j] - u_[i] - v_[j];
        if (r < dist_[j]) {
          path_[j] = i;
          dist_[j] = r;
        }
        if (dist_[j] < lowest || (dist_[j] == lowest && row4col_[j] == -1)) {
          lowest = dist_[j];
          best = k;
        }
      }
      min_val = lowest;
      if (best == -1 || min_val == kInf) throw Error("linear_sum_assignment: the cost matrix is infeasible");
      const int64_t j = remaining_[best];
      if (row4col_[j] == -1)
        sink = j;
      else
        i = row4col_[j];
      visited_col_[j] = 1;
      remaining_[best] = remaining_[--n_remaining];
    }

    u_[cur_row] += min_val;
    for (int64_t r = 0; r < nr_; ++r)
      if (visited_row_[r] && r != cur_row) u_[r] += min_val - dist_[col4row_[r]];
    for (int64_t j = 0; j < nc_; ++j)
      if (visited_col_[j]) v_[j] -= min_val - dist_[j];

    int64_t j = sink;
    while (true) {
      const int64_t r = path_[j];
      row4col_[j] = r;
      std::swap(col4row_[r], j);
      if (r == cur_row) break;
    }
  }

  const double* c_;
  int64_t nr_, nc_;
  std::vector<double> u_, v_, dist_;
  std::vector<int64_t> path_, col4row_, row4col_;
  std::vector<uint8_t> visited_row_, visited_col_;
  std::vector<int64_t> remaining_;
};

}  // namespace

std::vector<std::pair<int64_t, int64_t>> linear_sum_assignment(const double* cost, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) throw Error("linear_sum_assignment: negative matrix size");
  std::vector<std::pair<int64_t, int64_t>> result;
  if (rows == 0 || cols == 0) return result;
  for (int64_t k = 0; k < rows * cols; ++k)
    if (std::isnan(cost[k]) || cost[k] == -kInf)
      throw Error("linear_sum_assignment: the cost matrix contains NaN or -inf");

  // The solver needs rows <= cols: solve the transpose otherwise (as scipy does).
  const bool transpose = cols < rows;
  std::vector<double> t;
  const double* c = cost;
  int64_t nr = rows, nc = cols;
  if (transpose) {
    t.resize(static_cast<size_t>(rows * cols));
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = cost[i * cols + j];
    c = t.data();
    std::swap(nr, nc);
  }
  const std::vector<int64_t> col4row = Solver(c, nr, nc).solve();
  result.reserve(static_cast<size_t>(nr));
  for (int64_t i = 0; i < nr; ++i) {
    if (transpose)
      result.emplace_back(col4row[i], i);
    else
      result.emplace_back(i, col4row[i]);
  }
  std::sort(result.begin(), result.end());
  return result;
}

std::vector<std::pair<int64_t, int64_t>> linear_sum_assignment(const Tensor& cost) {
  if (!cost.defined() || cost.dim() != 2)
    throw Error("linear_sum_assignment: cost must be a 2-D matrix, got shape " +
                (cost.defined() ? shape_str(cost.shape()) : std::string("(undefined)")));
  if (cost.dtype() != DType::F32 && cost.dtype() != DType::F64)
    throw Error(std::string("linear_sum_assignment: cost must be float32 or float64, got ") +
                dtype_name(cost.dtype()));
  const Tensor d = cost.dtype() == DType::F64 ? cost : cost.to(DType::F64);
  return linear_sum_assignment(d.data<double>(), cost.size(0), cost.size(1));
}

}  // namespace vf
