// norms/axis_norms.cpp - normalize (Lp, torch.nn.functional.normalize), its
// gradient, and mean_variance_norm (ONNX MeanVarianceNormalization): checks,
// then the per-slice statistics and affine of plan/axis_plan.hpp.
#include "normkit/axis_norms.hpp"

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "plan/axis_plan.hpp"
#include "plan/channel_plan.hpp"

namespace normkit {

namespace {

void check_contiguous_input(const TensorRef& t, const char* name) {
  core::check_given(t, name);
  core::check_float(t, name);
  if (!t.is_contiguous()) core::fail_value(std::string(name) + ": must be contiguous (pass a contiguous copy)");
}

void check_p(double p) {
  if (!(p >= 1)) {  // NaN too
    std::ostringstream s;
    s << "p: must be >= 1 (or inf), got " << p;
    core::fail_value(s.str());
  }
}

int check_dim(const TensorRef& x, int dim) {
  const int rank = x.shape.size();
  if (rank == 0 || dim < -rank || dim >= rank)
    core::fail_value("dim: " + std::to_string(dim) + " is out of range for x of shape " + x.shape.to_string() +
                     (rank == 0 ? " (x needs at least one dimension)" : ""));
  return dim < 0 ? dim + rank : dim;
}

// The norm of each slice: the kernels' moments for p = 2 (sum of squares =
// M2 + count * mean^2, both terms non-negative), else a plain loop. Two kinds
// of slice are redone by the plain loop (p = 2 with scaling, in double):
// moments that are not finite (an infinity makes M2 inf - inf; the plain norm
// is inf, NaN only with a NaN in the slice, as PyTorch's), and slices so small
// that the kernels' squares underflow (root mean square below ~1e-18 with
// float32 statistics, ~1e-150 with float64: values of 1e-41 would lose M2).
std::vector<double> slice_norms(const TensorRef& x, const plan::AxisView& v, double p) {
  if (p != 2) return plan::slice_lp_norm_plain(x, v, p);
  const plan::SliceMoments m = plan::slice_moments(x, v);
  std::vector<double> norm(v.slices);
  const double n = double(v.count);
  const double tiny = (x.dtype == DType::float64 ? 1e-150 : 1e-18) * std::sqrt(n);
  std::vector<char> redo(v.slices, 0);
  bool any = false;
  for (std::int64_t s = 0; s < v.slices; ++s) {
    norm[s] = std::sqrt(m.m2[s] + n * m.mean[s] * m.mean[s]);
    redo[s] = !(norm[s] >= tiny) || std::isinf(norm[s]);  // NaN, inf, or tiny (zero slices too)
    any = any || redo[s];
  }
  if (any) {
    const std::vector<double> plain = plan::slice_lp_norm_plain(x, v, p, &redo);
    for (std::int64_t s = 0; s < v.slices; ++s)
      if (redo[s]) norm[s] = plain[s];
  }
  return norm;
}

// max(norm, eps), NaN kept.
double clamped(double norm, double eps) { return std::isnan(norm) ? norm : std::max(norm, eps); }

// Checks p, dim and eps; for a non-empty x fills `v` with x's slices along dim
// and returns true (false: x is empty, nothing to do).
bool lp_view(const TensorRef& x, double p, int dim, double eps, plan::AxisView& v) {
  check_p(p);
  const int d = check_dim(x, dim);
  core::check_eps(eps);
  if (x.numel() == 0) return false;
  std::vector<bool> reduced(x.shape.size(), false);
  reduced[d] = true;
  v = plan::axis_view(x, reduced);
  return true;
}

}  // namespace

void normalize(const TensorRef& x, const TensorRef& y, double p, int dim, double eps) {
  check_contiguous_input(x, "x");
  plan::check_output_like(x, y, "y");
  plan::AxisView v;
  if (!lp_view(x, p, dim, eps, v)) return;
  const std::vector<double> norm = slice_norms(x, v, p);
  plan::SliceAffine f;
  f.a.assign(v.slices, 1.0);
  f.den.resize(v.slices);
  for (std::int64_t s = 0; s < v.slices; ++s) f.den[s] = clamped(norm[s], eps);
  plan::slice_apply(x, y, v, f);
}

void normalize_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, double p, int dim,
                        double eps) {
  check_contiguous_input(x, "x");
  check_contiguous_input(dy, "dy");
  if (dy.shape != x.shape)
    core::fail_value("dy: expected the shape of x " + x.shape.to_string() + ", got " + dy.shape.to_string());
  if (dy.dtype != x.dtype)
    core::fail_type(std::string("dy: expected dtype ") + to_string(x.dtype) + " like x, got " + to_string(dy.dtype));
  plan::check_output_like(x, dx, "dx");  // shape, dtype, contiguous, dx = x or apart from it
  core::check_no_partial_overlap(dy, dx, "dx", "dy");
  plan::AxisView v;
  if (!lp_view(x, p, dim, eps, v)) return;
  const std::vector<double> norm = slice_norms(x, v, p);
  const std::vector<double> dot = plan::slice_dot(dy, x, v);  // sum dy * x per slice
  if (p != 2) {
    plan::normalize_backward_plain(dy, x, dx, v, p, eps, norm, dot);
    return;
  }
  // p = 2: dx = (dy - x * dot / N^2) / N where the norm N divides (N >= eps,
  // N > 0), dx = dy / eps where it is clamped; one apply pass with the dy term.
  plan::SliceAffine f;
  f.a.assign(v.slices, 0.0);
  f.b.assign(v.slices, 1.0);
  f.den.resize(v.slices);
  for (std::int64_t s = 0; s < v.slices; ++s) {
    const double n = norm[s];
    f.den[s] = clamped(n, eps);
    if (n >= eps && n > 0) f.a[s] = -dot[s] / (n * n);
    else if (std::isnan(n)) f.a[s] = n;
  }
  plan::slice_apply(x, dx, v, f, dy);
}

void mean_variance_norm(const TensorRef& x, const TensorRef& y, const Dims& axes, double eps) {
  check_contiguous_input(x, "x");
  plan::check_output_like(x, y, "y");
  const int rank = x.shape.size();
  if (axes.empty()) core::fail_value("axes: must name at least one axis");
  std::vector<bool> reduced(rank, false);
  for (std::int64_t a : axes) {
    if (a < -rank || a >= rank)
      core::fail_value("axes: " + std::to_string(a) + " is out of range for x of shape " + x.shape.to_string());
    const int i = static_cast<int>(a < 0 ? a + rank : a);
    if (reduced[i]) core::fail_value("axes: axis " + std::to_string(i) + " is named twice in " + axes.to_string());
    reduced[i] = true;
  }
  core::check_eps(eps);
  if (x.numel() == 0) return;
  const plan::AxisView v = plan::axis_view(x, reduced);
  const plan::SliceMoments m = plan::slice_moments(x, v);
  plan::SliceAffine f;
  f.center = m.mean;
  f.a.assign(v.slices, 1.0);
  f.den.resize(v.slices);
  for (std::int64_t s = 0; s < v.slices; ++s) f.den[s] = std::sqrt(m.m2[s] / double(v.count)) + eps;
  plan::slice_apply(x, y, v, f);
}

}  // namespace normkit
