#include "plan/axis_plan.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <utility>

#include "core/check.hpp"
#include "plan/channel_plan.hpp"
#include "plan/merge.hpp"
#include "plan/store_plan.hpp"
#include "runtime/dispatch.hpp"
#include "runtime/threads.hpp"

namespace normkit::plan {

namespace {

// The outer index (row or batch) of each group of partials that merge into
// one slice, in order: group g's members are order[start[g] .. start[g + 1]).
struct Members {
  std::vector<std::int64_t> start, order;
};
Members members(const std::vector<std::int64_t>& key, std::int64_t groups) {
  Members m;
  m.start.assign(groups + 1, 0);
  for (std::int64_t k : key) ++m.start[k + 1];
  for (std::int64_t g = 0; g < groups; ++g) m.start[g + 1] += m.start[g];
  m.order.resize(key.size());
  std::vector<std::int64_t> next(m.start.begin(), m.start.end() - 1);
  for (std::size_t i = 0; i < key.size(); ++i) m.order[next[key[i]]++] = static_cast<std::int64_t>(i);
  return m;
}

// The merge key of each outer index: its slice (rows) or its slice / cols (columns).
std::vector<std::int64_t> outer_keys(const AxisView& v, std::int64_t& groups) {
  std::vector<std::int64_t> key = v.slice_base;
  if (v.columns)
    for (auto& k : key) k /= v.cols;
  groups = v.columns ? v.slices / v.cols : v.slices;
  return key;
}

std::int64_t bytes_of(const TensorRef& x) { return x.numel() * element_size(x.dtype); }

// Visits every element of x as (linear index, slice), in memory order.
template <class F>
void for_each_element(const AxisView& v, F&& f) {
  if (!v.columns) {
    for (std::int64_t r = 0; r < v.rows; ++r) {
      const std::int64_t s = v.slice_base[r], base = r * v.cols;
      for (std::int64_t j = 0; j < v.cols; ++j) f(base + j, s);
    }
    return;
  }
  for (std::int64_t b = 0; b < v.batches; ++b)
    for (std::int64_t m = 0; m < v.rows; ++m) {
      const std::int64_t base = (b * v.rows + m) * v.cols;
      for (std::int64_t c = 0; c < v.cols; ++c) f(base + c, v.slice_base[b] + c);
    }
}

double sgn(double v) { return double((v > 0) - (v < 0)); }

}  // namespace

AxisView axis_view(const TensorRef& x, const std::vector<bool>& reduced) {
  // Runs of (extent, reduced), size-1 dims dropped.
  std::vector<std::pair<std::int64_t, bool>> runs;
  for (int i = 0; i < x.shape.size(); ++i) {
    if (x.shape[i] == 1) continue;
    if (!runs.empty() && runs.back().second == reduced[i]) runs.back().first *= x.shape[i];
    else runs.push_back({x.shape[i], reduced[i]});
  }
  bool any_reduced = false;
  for (const auto& r : runs) any_reduced = any_reduced || r.second;
  if (!any_reduced) runs.push_back({1, true});  // every slice one element: rows of 1
  AxisView v;
  v.columns = !runs.back().second;
  std::size_t outer = runs.size() - 1;
  v.cols = runs.back().first;
  if (v.columns) {
    v.rows = runs[runs.size() - 2].first;
    outer = runs.size() - 2;
  }
  // slice_base over the outer runs, row-major: a kept run extends the slice
  // index, a reduced run repeats it.
  std::vector<std::int64_t> base{0};
  std::int64_t kept = 1;
  for (std::size_t k = 0; k < outer; ++k) {
    const auto [extent, red] = runs[k];
    std::vector<std::int64_t> next;
    next.reserve(base.size() * extent);
    for (std::int64_t s : base)
      for (std::int64_t i = 0; i < extent; ++i) next.push_back(red ? s : s * extent + i);
    base.swap(next);
    if (!red) kept *= extent;
  }
  v.count = 1;
  for (const auto& r : runs)
    if (r.second) v.count *= r.first;
  if (v.columns) {
    v.batches = static_cast<std::int64_t>(base.size());
    for (auto& s : base) s *= v.cols;
    v.slices = kept * v.cols;
  } else {
    v.rows = static_cast<std::int64_t>(base.size());
    v.slices = kept;
  }
  v.slice_base = std::move(base);
  return v;
}

SliceMoments slice_moments(const TensorRef& x, const AxisView& v) {
  SliceMoments out;
  out.mean.assign(v.slices, 0);
  out.m2.assign(v.slices, 0);
  const auto& kernels = runtime::active_kernels();
  std::int64_t groups = 0;
  const std::vector<std::int64_t> keys = outer_keys(v, groups);
  const Members mem = members(keys, groups);
  if (!v.columns) {
    // Rows statistics only (y = nullptr): mean and biased variance per row in double.
    std::vector<double> mean(v.rows), var(v.rows);
    kernels::RowsForward p;
    p.norm = kernels::RowsNorm::layer;
    p.dtype = x.dtype;
    p.rows = v.rows;
    p.cols = v.cols;
    p.x = x.data;
    p.x_row_stride = v.cols;
    p.y = nullptr;
    p.mean_f64 = mean.data();
    p.var_f64 = var.data();
    p.threads = runtime::threads_for(bytes_of(x));
    kernels.rows_forward(p);
    const double n = double(v.cols);
    for (std::int64_t s = 0; s < v.slices; ++s) {
      const Summary m = merge_summaries([&](auto&& visit) {
        for (std::int64_t i = mem.start[s]; i < mem.start[s + 1]; ++i) {
          const std::int64_t r = mem.order[i];
          visit(n, mean[r], var[r] * n);
        }
      });
      out.mean[s] = m.mean;
      out.m2[s] = m.m2;
    }
    return out;
  }
  kernels::ColumnsStats p;
  p.dtype = x.dtype;
  p.batches = v.batches;
  p.rows = v.rows;
  p.cols = v.cols;
  p.block_rows = columns_block_rows(v.cols, x.dtype);
  p.x = x.data;
  const std::int64_t blocks = (p.rows + p.block_rows - 1) / p.block_rows;
  std::vector<double> partial_mean(p.batches * blocks * v.cols), partial_m2(partial_mean.size());
  p.partial_mean = partial_mean.data();
  p.partial_m2 = partial_m2.data();
  p.threads = runtime::threads_for(bytes_of(x));
  kernels.columns_stats(p);
  for (std::int64_t g = 0; g < groups; ++g)
    for (std::int64_t c = 0; c < v.cols; ++c) {
      const Summary m = merge_summaries([&](auto&& visit) {
        for (std::int64_t i = mem.start[g]; i < mem.start[g + 1]; ++i) {
          const std::int64_t b = mem.order[i];
          for (std::int64_t k = 0; k < blocks; ++k) {
            const double count = double(std::min(p.block_rows, p.rows - k * p.block_rows));
            const std::int64_t q = (b * blocks + k) * v.cols + c;
            visit(count, partial_mean[q], partial_m2[q]);
          }
        }
      });
      out.mean[g * v.cols + c] = m.mean;
      out.m2[g * v.cols + c] = m.m2;
    }
  return out;
}

std::vector<double> slice_dot(const TensorRef& dy, const TensorRef& x, const AxisView& v) {
  std::vector<double> dot(v.slices, 0.0);
  const auto& kernels = runtime::active_kernels();
  const int threads = runtime::threads_for(2 * bytes_of(x));
  if (!v.columns) {
    // The rows backward's pass 1 alone (dx = nullptr): with rms (no mean) and
    // one segment per row, segment_sum_dy_xc is sum dy * x.
    const AccTable ones = to_acc_table(std::vector<double>(v.rows, 1.0), x.dtype);
    std::vector<double> sum_dy(v.rows), sum_dy_x(v.rows), sum_x(v.rows);
    kernels::RowsBackward p;
    p.norm = kernels::RowsNorm::rms;
    p.dtype = x.dtype;
    p.rows = v.rows;
    p.cols = v.cols;
    p.x = x.data;
    p.x_row_stride = v.cols;
    p.dy = dy.data;
    p.dy_row_stride = v.cols;
    p.dx = nullptr;
    p.segments = 1;
    p.rstd = ones.data();
    p.segment_sum_dy = sum_dy.data();
    p.segment_sum_dy_xc = sum_dy_x.data();
    p.row_sum_xc = sum_x.data();
    p.threads = threads;
    kernels.rows_backward(p);
    for (std::int64_t r = 0; r < v.rows; ++r) dot[v.slice_base[r]] += sum_dy_x[r];  // rows in order
    return dot;
  }
  kernels::ColumnsGradSums p;
  p.dtype = x.dtype;
  p.batches = v.batches;
  p.rows = v.rows;
  p.cols = v.cols;
  p.block_rows = std::max<std::int64_t>(columns_block_rows(v.cols, x.dtype) / 2, 1);  // two inputs per block in L2
  p.x = x.data;
  p.dy = dy.data;
  p.center = nullptr;  // sums of dy * (x - 0)
  p.table_stride = v.cols;
  const std::int64_t blocks = (p.rows + p.block_rows - 1) / p.block_rows;
  std::vector<double> part_dy(p.batches * blocks * v.cols), part_dy_x(part_dy.size()), part_x(part_dy.size());
  p.partial_dy = part_dy.data();
  p.partial_dy_xc = part_dy_x.data();
  p.partial_xc = part_x.data();
  p.threads = threads;
  kernels.columns_grad_sums(p);
  for (std::int64_t b = 0; b < v.batches; ++b)  // batches, then blocks, in order
    for (std::int64_t k = 0; k < blocks; ++k)
      for (std::int64_t c = 0; c < v.cols; ++c) dot[v.slice_base[b] + c] += part_dy_x[(b * blocks + k) * v.cols + c];
  return dot;
}

void slice_apply(const TensorRef& x, const TensorRef& y, const AxisView& v, const SliceAffine& f,
                 const TensorRef& dy) {
  const bool f64 = x.dtype == DType::float64;
  const bool has_center = !f.center.empty(), has_dy = dy.given && !f.b.empty();
  // A table entry the stats dtype holds as a normal number (or 0, or NaN,
  // which the kernels propagate as the plain loop would).
  auto holds = [&](double t) {
    if (std::isnan(t) || t == 0) return true;
    const double a = std::fabs(t);
    return f64 ? (a >= DBL_MIN && a <= DBL_MAX) : (a >= double(FLT_MIN) && a <= double(FLT_MAX));
  };
  std::vector<double> scale(v.slices), dy_scale(has_dy ? v.slices : 0);
  std::vector<char> plain(v.slices, 0);
  bool any_plain = false;
  for (std::int64_t s = 0; s < v.slices; ++s) {
    const double den = f.den[s];
    scale[s] = den == 0 ? 0.0 : f.a[s] / den;
    if (has_dy) dy_scale[s] = den == 0 ? 0.0 : f.b[s] / den;
    if (!holds(scale[s]) || (has_dy && !holds(dy_scale[s]))) {
      plain[s] = 1;
      any_plain = true;
      scale[s] = 0;
      if (has_dy) dy_scale[s] = 0;
    }
  }
  // Plain slices first, into a buffer: y may be x (or dy) itself, which the
  // kernel pass overwrites. Rare (see axis_plan.hpp), so a per-element loop.
  std::vector<std::pair<std::int64_t, double>> fixed;
  if (any_plain)
    for_each_element(v, [&](std::int64_t i, std::int64_t s) {
      if (!plain[s]) return;
      const double den = f.den[s];
      double t = 0;
      if (den != 0) {
        const double xc = read_element(x, i) - (has_center ? f.center[s] : 0.0);
        t = (xc * f.a[s] + (has_dy ? read_element(dy, i) * f.b[s] : 0.0)) / den;
      }
      fixed.push_back({i, t});
    });

  // The kernels' tables: per row (rows) or per batch, extended periodically (columns).
  const std::int64_t entries = v.columns ? v.batches * (v.cols + kernels::kColumnsTablePad) : v.rows;
  auto table = [&](auto&& value_of_slice) {
    std::vector<double> t(entries);
    if (!v.columns) {
      for (std::int64_t r = 0; r < v.rows; ++r) t[r] = value_of_slice(v.slice_base[r]);
    } else {
      const std::int64_t stride = v.cols + kernels::kColumnsTablePad;
      for (std::int64_t b = 0; b < v.batches; ++b)
        for (std::int64_t j = 0; j < stride; ++j) t[b * stride + j] = value_of_slice(v.slice_base[b] + j % v.cols);
    }
    return to_acc_table(t, x.dtype);
  };
  const AccTable scale_t = table([&](std::int64_t s) { return scale[s]; });
  const AccTable shift_t = table([](std::int64_t) { return 0.0; });
  AccTable hi_t, lo_t, dy_scale_t;
  // center = hi + lo, each in the stats dtype: (x - hi) - lo keeps a large mean exact.
  auto hi_of = [&](std::int64_t s) { return f64 ? f.center[s] : double(float(f.center[s])); };
  if (has_center) {
    hi_t = table(hi_of);
    lo_t = table([&](std::int64_t s) { return f.center[s] - hi_of(s); });
  }
  if (has_dy) dy_scale_t = table([&](std::int64_t s) { return dy_scale[s]; });
  kernels::ApplyTerms apply;
  apply.center_hi = has_center ? hi_t.data() : nullptr;
  apply.center_lo = has_center ? lo_t.data() : nullptr;
  apply.dy = has_dy ? dy.data : nullptr;
  apply.dy_scale = has_dy ? dy_scale_t.data() : nullptr;
  const std::int64_t bytes = bytes_of(x);
  const bool stream = !core::same_memory(x, y) && !(has_dy && core::same_memory(dy, y)) &&
                      runtime::use_streaming_stores(bytes);
  const int threads = runtime::threads_for((has_dy ? 3 : 2) * bytes);
  const auto& kernels = runtime::active_kernels();
  if (!v.columns) {
    kernels::RowsForward p;
    p.norm = kernels::RowsNorm::scale_shift;
    p.dtype = x.dtype;
    p.params_float32 = !f64;  // tables in the stats dtype
    p.rows = v.rows;
    p.cols = v.cols;
    p.x = x.data;
    p.x_row_stride = v.cols;
    p.y = y.data;
    p.y_row_stride = v.cols;
    p.segments = 1;
    p.param_period = v.rows;  // one table entry per row
    p.weight = scale_t.data();
    p.bias = shift_t.data();
    p.apply = apply;
    p.apply.dy_row_stride = v.cols;
    p.store = plain_store(x.dtype);
    p.streaming_stores = stream;
    p.threads = threads;
    kernels.rows_forward(p);
  } else {
    kernels::ColumnsApply p;
    p.dtype = x.dtype;
    p.batches = v.batches;
    p.rows = v.rows;
    p.cols = v.cols;
    p.table_stride = v.cols + kernels::kColumnsTablePad;
    p.x = x.data;
    p.y = y.data;
    p.scale = scale_t.data();
    p.shift = shift_t.data();
    p.apply = apply;
    p.store = plain_store(x.dtype);
    p.streaming_stores = stream;
    p.threads = threads;
    kernels.columns_apply(p);
  }
  for (const auto& [i, t] : fixed) write_element(y, i, t);
}

// ---- plain loops ---------------------------------------------------------------

std::vector<double> slice_lp_norm_plain(const TensorRef& x, const AxisView& v, double p,
                                        const std::vector<char>* only) {
  std::vector<double> acc(v.slices, 0.0);
  auto skip = [&](std::int64_t s) { return only != nullptr && !(*only)[s]; };
  if (p == 1) {
    for_each_element(v, [&](std::int64_t i, std::int64_t s) {
      if (!skip(s)) acc[s] += std::fabs(read_element(x, i));
    });
    return acc;
  }
  // max |x| per slice, NaN sticky (std::max would drop a NaN after the first element).
  for_each_element(v, [&](std::int64_t i, std::int64_t s) {
    if (skip(s)) return;
    const double a = std::fabs(read_element(x, i));
    if (std::isnan(a) || std::isnan(acc[s])) acc[s] = std::numeric_limits<double>::quiet_NaN();
    else acc[s] = std::max(acc[s], a);
  });
  if (std::isinf(p)) return acc;
  std::vector<double> sum(v.slices, 0.0);
  for_each_element(v, [&](std::int64_t i, std::int64_t s) {
    const double m = acc[s];
    if (!skip(s) && m > 0 && std::isfinite(m)) sum[s] += std::pow(std::fabs(read_element(x, i)) / m, p);
  });
  for (std::int64_t s = 0; s < v.slices; ++s)
    if (acc[s] > 0 && std::isfinite(acc[s])) acc[s] *= std::pow(sum[s], 1.0 / p);  // else 0, inf or NaN as is
  return acc;
}

void normalize_backward_plain(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, const AxisView& v,
                              double p, double eps, const std::vector<double>& norm,
                              const std::vector<double>& dot) {
  const bool inf = std::isinf(p);
  // p = inf: the gradient of max |x| is shared evenly by the maxima (and NaNs), as in PyTorch.
  std::vector<double> maxima(inf ? v.slices : 0, 0.0);
  if (inf)
    for_each_element(v, [&](std::int64_t i, std::int64_t s) {
      const double a = std::fabs(read_element(x, i));
      if (a == norm[s] || std::isnan(a)) maxima[s] += 1;
    });
  for_each_element(v, [&](std::int64_t i, std::int64_t s) {
    const double n = norm[s];
    const double den = std::isnan(n) ? n : std::max(n, eps);
    const double xi = read_element(x, i), g_dy = read_element(dy, i);
    double out = 0;
    if (den != 0) {
      if (n >= eps && n > 0) {  // the norm itself divides: its gradient flows
        double g;  // d norm / d x_i
        if (p == 1) g = sgn(xi);
        else if (inf) g = (std::fabs(xi) == n || std::isnan(xi)) ? sgn(xi) / maxima[s] : 0.0;
        else g = sgn(xi) * std::pow(std::fabs(xi) / n, p - 1);
        out = (g_dy - g * dot[s] / n) / den;
      } else {
        out = g_dy / den;  // clamped to eps: a constant
      }
    }
    write_element(dx, i, out);
  });
}

}  // namespace normkit::plan
