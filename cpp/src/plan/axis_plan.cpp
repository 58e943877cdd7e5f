#include "plan/axis_plan.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <utility>

#include "plan/channel_plan.hpp"
#include "plan/merge.hpp"

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

// The view as the channel plan's geometry, whose statistics, gradient sums and
// apply are the rows / columns problems this mapping needs:
//   rows     one sample of `rows` channels of `cols` elements, channels-first:
//            statistics per (sample, channel) = per row; tables per channel = per row
//   columns  `batches` samples of `rows` positions x `cols` channels,
//            channels-last, per sample: statistics and tables per (batch, column)
ChannelGeometry channel_view(const AxisView& v) {
  ChannelGeometry g;
  g.channels_last = v.columns;
  g.n = v.columns ? v.batches : 1;
  g.c = v.columns ? v.cols : v.rows;
  g.s = v.columns ? v.rows : v.cols;
  return g;
}

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
  // Per row (rows) or per (batch, column) (columns) from the channel plan's
  // statistics, then merged over the other reduced runs per slice, in order.
  const ChannelGeometry g = channel_view(v);
  const GroupMoments part = channel_moments(x, g, g.c, /*per_sample=*/true);  // a group per channel
  const double n = double(part.count);
  std::int64_t groups = 0;
  const std::vector<std::int64_t> keys = outer_keys(v, groups);
  const Members mem = members(keys, groups);
  const std::int64_t per_outer = v.columns ? v.cols : 1;  // entries per row / batch
  SliceMoments out;
  out.mean.assign(v.slices, 0);
  out.m2.assign(v.slices, 0);
  for (std::int64_t k = 0; k < groups; ++k)
    for (std::int64_t c = 0; c < per_outer; ++c) {
      const Summary m = merge_summaries([&](auto&& visit) {
        for (std::int64_t i = mem.start[k]; i < mem.start[k + 1]; ++i) {
          const std::int64_t e = mem.order[i] * per_outer + c;
          visit(n, part.mean[e], part.var[e] * n);
        }
      });
      out.mean[k * per_outer + c] = m.mean;
      out.m2[k * per_outer + c] = m.m2;
    }
  return out;
}

std::vector<double> slice_dot(const TensorRef& dy, const TensorRef& x, const AxisView& v) {
  // The channel plan's gradient sums about a centre of 0 (sum dy * (x - 0)) per
  // row or per (batch, column), added per slice in order.
  const ChannelGeometry g = channel_view(v);
  const std::int64_t per_outer = v.columns ? v.cols : 1;
  const std::vector<double> zero(v.columns ? v.batches * v.cols : v.rows, 0.0);
  const GradSums sums = channel_grad_sums(x, dy, g, /*per_sample=*/v.columns, zero);
  std::vector<double> dot(v.slices, 0.0);
  for (std::size_t e = 0; e < sums.dy_xc.size(); ++e) {
    const auto i = static_cast<std::int64_t>(e);
    dot[v.slice_base[i / per_outer] + i % per_outer] += sums.dy_xc[e];
  }
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

  // The channel plan's apply: tables per row (the rows scale_shift problem,
  // one segment per row) or per (batch, column) (the columns apply).
  const std::int64_t per_outer = v.columns ? v.cols : 1;
  const std::int64_t entries = v.columns ? v.batches * v.cols : v.rows;
  auto per_entry = [&](const std::vector<double>& per_slice) {
    std::vector<double> t(entries);
    for (std::int64_t e = 0; e < entries; ++e) t[e] = per_slice[v.slice_base[e / per_outer] + e % per_outer];
    return t;
  };
  const std::vector<double> scale_e = per_entry(scale), shift_e(entries, 0.0);
  const std::vector<double> center_e = has_center ? per_entry(f.center) : std::vector<double>{};
  const std::vector<double> dy_scale_e = has_dy ? per_entry(dy_scale) : std::vector<double>{};
  channel_apply(x, y, channel_view(v), /*per_sample=*/v.columns, scale_e, shift_e, has_center ? &center_e : nullptr,
                0, has_dy ? dy : TensorRef{}, has_dy ? &dy_scale_e : nullptr);
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
