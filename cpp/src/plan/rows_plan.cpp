#include "plan/rows_plan.hpp"

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "normkit/norms.hpp"
#include "plan/store_plan.hpp"
#include "runtime/dispatch.hpp"
#include "runtime/threads.hpp"

namespace normkit::plan {

bool as_rows(const TensorRef& t, int normalized_ndim, RowsView& out) {
  const int rank = t.shape.size();
  if (normalized_ndim > rank) return false;
  if (t.numel() == 0) {  // nothing is read or written: any strides will do
    out.cols = 1;
    for (int i = rank - normalized_ndim; i < rank; ++i) out.cols *= t.shape[i];
    out.rows = 1;
    for (int i = 0; i < rank - normalized_ndim; ++i) out.rows *= t.shape[i];
    out.row_stride = out.cols;
    return true;
  }
  // Trailing dims: dense, innermost first (size-1 dims may have any stride).
  std::int64_t expected = 1;
  for (int i = rank - 1; i >= rank - normalized_ndim; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expected) return false;
    expected *= t.shape[i];
  }
  out.cols = expected;
  // Leading dims: must step through memory as one evenly spaced sequence.
  out.rows = 1;
  out.row_stride = out.cols;
  bool have_stride = false;
  std::int64_t next = 0;  // stride the next-outer non-unit dim must have
  for (int i = rank - normalized_ndim - 1; i >= 0; --i) {
    if (t.shape[i] == 1) continue;
    if (!have_stride) {
      out.row_stride = t.strides[i];
      have_stride = true;
    } else if (t.strides[i] != next) {
      return false;
    }
    next = t.strides[i] * t.shape[i];
    out.rows *= t.shape[i];
  }
  for (int i = 0; i < rank - normalized_ndim; ++i)
    if (t.shape[i] == 0) out.rows = 0;
  return true;
}

void check_normalized_shape(const TensorRef& x, const Dims& normalized_shape) {
  const int k = normalized_shape.size();
  const int rank = x.shape.size();
  if (k == 0) core::fail_value("normalized_shape: must name at least one dimension");
  for (std::int64_t d : normalized_shape)
    if (d < 0) core::fail_value("normalized_shape: negative extent in " + normalized_shape.to_string());
  bool trailing_match = k <= rank;
  for (int i = 0; trailing_match && i < k; ++i) trailing_match = x.shape[rank - k + i] == normalized_shape[i];
  if (!trailing_match)
    core::fail_value("normalized_shape: " + normalized_shape.to_string() +
                     " does not match the trailing dims of x, whose shape is " + x.shape.to_string());
}

RowsView input_rows(const TensorRef& x, int normalized_ndim) {
  RowsView v;
  if (!as_rows(x, normalized_ndim, v))
    core::fail_value("x: the normalized dims must be contiguous and the leading dims must collapse to one "
                     "stride; pass a contiguous copy");
  return v;
}

void rows_moments(const TensorRef& x, const Dims& normalized_shape, std::vector<double>& mean,
                  std::vector<double>& var) {
  core::check_given(x, "x");
  core::check_float(x, "x");
  check_normalized_shape(x, normalized_shape);
  const RowsView xv = input_rows(x, normalized_shape.size());
  mean.assign(xv.rows, 0.0);
  var.assign(xv.rows, 0.0);
  if (xv.rows == 0 || xv.cols == 0) return;
  kernels::RowsForward p;
  p.norm = kernels::RowsNorm::layer;
  p.dtype = x.dtype;
  p.rows = xv.rows;
  p.cols = xv.cols;
  p.x = x.data;
  p.x_row_stride = xv.row_stride;
  p.y = nullptr;  // statistics only
  p.mean_f64 = mean.data();
  p.var_f64 = var.data();
  p.threads = runtime::threads_for(xv.rows * xv.cols * element_size(x.dtype));
  runtime::active_kernels().rows_forward(p);
}

namespace {
// An output seen as rows: the same stride rules as x, and rows that do not
// share memory (a broadcast view: row stride 0, or any stride below the row
// length, would have one element written as several).
RowsView output_rows(const TensorRef& t, int k, const std::string& name) {
  RowsView v;
  if (!as_rows(t, k, v))
    core::fail_value(name + ": the normalized dims must be contiguous and the leading dims must collapse to one "
                     "stride");
  if (v.rows > 1 && v.cols > 0 && (v.row_stride < 0 ? -v.row_stride : v.row_stride) < v.cols)
    core::fail_value(name + ": its rows overlap each other (row stride " + std::to_string(v.row_stride) +
                     " elements, rows of " + std::to_string(v.cols) +
                     "): an output must not be a broadcast or self-overlapping view");
  return v;
}

// True when x and y are row views with the same row stride whose rows
// interleave without sharing an element (x = buf[:, :8], y = buf[:, 8:]).
// Whole-range overlap checks would refuse them; they are fine.
bool rows_disjoint(const TensorRef& x, const RowsView& xv, const TensorRef& y, const RowsView& yv) {
  if (x.dtype != y.dtype || xv.rows <= 1 || xv.row_stride != yv.row_stride || xv.row_stride <= 0) return false;
  const std::int64_t size = element_size(x.dtype);
  const auto diff = static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(y.data) -
                                              reinterpret_cast<std::uintptr_t>(x.data));
  if (diff % size != 0) return false;
  const std::int64_t stride = xv.row_stride;
  const std::int64_t d = ((diff / size) % stride + stride) % stride;  // y's row start within x's row period
  return d >= xv.cols && stride - d >= yv.cols;
}
}  // namespace

kernels::RowsForward plan_rows_forward(kernels::RowsNorm norm, const TensorRef& x, const TensorRef& y,
                                       const Dims& normalized_shape, const TensorRef& weight,
                                       const TensorRef& bias, std::optional<double> eps_arg,
                                       const TensorRef& mean, const TensorRef& rstd, const char* y_name,
                                       const Epilogue& epilogue) {
  core::check_given(x, "x");
  core::check_float(x, "x");
  core::check_given(y, y_name);
  const std::string yn = y_name;
  const int k = normalized_shape.size();
  check_normalized_shape(x, normalized_shape);
  if (y.shape != x.shape)
    core::fail_value(yn + ": expected the shape of x " + x.shape.to_string() + ", got " + y.shape.to_string());
  const DType y_dtype = output_dtype(epilogue, x.dtype);
  if (y.dtype != y_dtype)  // (plan_store checks the rest of the epilogue)
    core::fail_type(yn + ": expected dtype " + to_string(y_dtype) +
                    (y_dtype == x.dtype ? " like x" : " for the quantized output") + ", got " + to_string(y.dtype));
  const double eps = eps_arg.has_value() ? *eps_arg : machine_epsilon(x.dtype);
  core::check_eps(eps);
  const RowsView xv = input_rows(x, k), yv = output_rows(y, k, yn);
  if (y.dtype == x.dtype && !rows_disjoint(x, xv, y, yv)) core::check_no_partial_overlap(x, y, y_name);

  const bool half_precision = x.dtype == DType::float16 || x.dtype == DType::bfloat16;
  DType param_dtype = x.dtype;
  const TensorRef* first_param = weight.given ? &weight : (bias.given ? &bias : nullptr);
  if (first_param != nullptr && half_precision && first_param->dtype == DType::float32)
    param_dtype = DType::float32;
  if (first_param != nullptr && first_param->dtype != param_dtype)
    core::fail_type(std::string(first_param == &weight ? "weight" : "bias") + ": expected dtype " +
                    to_string(x.dtype) + (half_precision ? " or float32" : "") + " for x of dtype " +
                    to_string(x.dtype) + ", got " + to_string(first_param->dtype));
  if (weight.given) core::check_param(weight, "weight", normalized_shape, param_dtype);
  if (bias.given) core::check_param(bias, "bias", normalized_shape, param_dtype);

  const DType stats = stats_dtype(x.dtype);
  if (mean.given) core::check_stats_output(mean, "mean", xv.rows, stats);
  if (rstd.given) core::check_stats_output(rstd, "rstd", xv.rows, stats);
  // (In a backward, mean and rstd are the saved statistics: read, not written;
  // they are held apart from x and dx all the same.)
  core::check_disjoint({{y, y_name}, {mean, "mean"}, {rstd, "rstd"}}, {{weight, "weight"}, {bias, "bias"}});
  core::check_disjoint({{mean, "mean"}, {rstd, "rstd"}}, {{x, "x"}});

  const kernels::StoreStage store = plan_store(epilogue, x, y, xv.rows, /*dynamic_allowed=*/true, y_name);
  core::check_disjoint({{epilogue.scales, "scales"}},
                       {{y, y_name}, {weight, "weight"}, {bias, "bias"}, {mean, "mean"}, {rstd, "rstd"}});

  kernels::RowsForward p;
  p.norm = norm;
  p.dtype = x.dtype;
  p.params_float32 = param_dtype == DType::float32 && half_precision;
  p.rows = xv.rows;
  p.cols = xv.cols;
  p.x = x.data;
  p.x_row_stride = xv.row_stride;
  p.y = y.data;
  p.y_row_stride = yv.row_stride;
  p.weight = weight.given ? weight.data : nullptr;
  p.bias = bias.given ? bias.data : nullptr;
  p.mean = mean.given ? mean.data : nullptr;
  p.rstd = rstd.given ? rstd.data : nullptr;
  p.eps = eps;
  p.store = store;
  const std::int64_t bytes = xv.rows * xv.cols * element_size(x.dtype);
  p.streaming_stores = !core::same_memory(x, y) && runtime::use_streaming_stores(bytes);
  p.threads = runtime::threads_for(2 * bytes);
  return p;
}

void plan_residual(kernels::RowsForward& p, const TensorRef& x, const TensorRef& residual,
                   const TensorRef& residual_bias, const TensorRef& sum, const TensorRef& y,
                   const TensorRef& weight, const TensorRef& bias, const Dims& normalized_shape,
                   const char* y_name, const char* sum_name) {
  const std::string sn = sum_name;
  const int k = normalized_shape.size();
  core::check_given(residual, "residual");
  if (residual.dtype != x.dtype)
    core::fail_type("residual: expected dtype " + std::string(to_string(x.dtype)) + " like x, got " +
                    to_string(residual.dtype));
  // residual: x's shape, or x's trailing dims (leading size-1 dims allowed),
  // covering at least the normalized dims; broadcast over x's leading dims.
  Dims trimmed;
  int first = 0;
  while (first < residual.shape.size() && residual.shape[first] == 1 &&
         residual.shape.size() - first > std::min(k, x.shape.size()))
    ++first;
  for (int i = first; i < residual.shape.size(); ++i) trimmed.push_back(residual.shape[i]);
  bool fits = trimmed.size() >= k && trimmed.size() <= x.shape.size() && residual.shape.size() <= x.shape.size();
  for (int i = 0; fits && i < trimmed.size(); ++i)
    fits = trimmed[i] == x.shape[x.shape.size() - trimmed.size() + i];
  if (!fits)
    core::fail_value("residual: shape " + residual.shape.to_string() + " does not broadcast to x's shape " +
                     x.shape.to_string() + " (it must be x's shape or x's trailing dims, normalized dims included)");
  RowsView rv;
  if (!as_rows(residual, k, rv))
    core::fail_value("residual: the normalized dims must be contiguous and the leading dims must collapse to one "
                     "stride; pass a contiguous copy");
  const bool full = residual.numel() == x.numel();

  core::check_given(sum, sum_name);
  if (sum.shape != x.shape)
    core::fail_value(sn + ": expected the shape of x " + x.shape.to_string() + ", got " + sum.shape.to_string());
  if (sum.dtype != x.dtype)
    core::fail_type(sn + ": expected dtype " + to_string(x.dtype) + " like x, got " + to_string(sum.dtype));
  const RowsView sv = output_rows(sum, k, sn);

  // One dtype for weight, bias and residual_bias (x's, or float32 for 16-bit x).
  if (residual_bias.given) {
    const bool half_precision = x.dtype == DType::float16 || x.dtype == DType::bfloat16;
    const bool other_params = weight.given || bias.given;
    if (!other_params && half_precision && residual_bias.dtype == DType::float32) p.params_float32 = true;
    const DType pd = p.params_float32 ? DType::float32 : x.dtype;
    core::check_param(residual_bias, "residual_bias", normalized_shape, pd);
  }

  // In place: sum may be x or (a full-shape) residual, y may be x or residual;
  // y and sum are apart, and nothing else overlaps.
  core::check_no_partial_overlap(x, sum, sum_name);
  if (full) {
    core::check_no_partial_overlap(residual, sum, sum_name, "residual");
    if (y.dtype == x.dtype) core::check_no_partial_overlap(residual, y, y_name, "residual");
    else core::check_disjoint({{y, y_name}}, {{residual, "residual"}});
  } else {
    core::check_disjoint({{sum, sum_name}, {y, y_name}}, {{residual, "residual"}});
  }
  core::check_disjoint({{sum, sum_name}, {y, y_name}},
                       {{weight, "weight"}, {bias, "bias"}, {residual_bias, "residual_bias"}});
  const TensorRef mean_ref(p.mean, stats_dtype(x.dtype), Dims{p.mean ? p.rows : 0}, Dims{1});
  const TensorRef rstd_ref(p.rstd, stats_dtype(x.dtype), Dims{p.rstd ? p.rows : 0}, Dims{1});
  const TensorRef scales_ref(p.store.row_scales, DType::float32, Dims{p.store.row_scales ? p.rows : 0}, Dims{1});
  core::check_disjoint({{sum, sum_name}, {mean_ref, "mean"}, {rstd_ref, "rstd"}, {scales_ref, "scales"}}, {});
  core::check_disjoint({{mean_ref, "mean"}, {rstd_ref, "rstd"}, {scales_ref, "scales"}},
                       {{residual, "residual"}, {residual_bias, "residual_bias"}});

  p.load.residual = residual.data;
  p.load.residual_row_stride = rv.row_stride;
  p.load.residual_rows = rv.rows > 0 ? rv.rows : 1;
  p.load.bias = residual_bias.given ? residual_bias.data : nullptr;
  p.load.sum = sum.data;
  p.load.sum_row_stride = sv.row_stride;
  const std::int64_t bytes = p.rows * p.cols * element_size(x.dtype);
  p.streaming_stores = !core::same_memory(x, y) && !core::same_memory(residual, y) &&
                       runtime::use_streaming_stores(2 * bytes);
  p.threads = runtime::threads_for(4 * bytes);
}

namespace {
// Rows of zero length have no statistics: report NaN, as 0/0 would.
void fill_nan(const TensorRef& t) {
  if (!t.given) return;
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    if (t.dtype == DType::float64) static_cast<double*>(t.data)[i] = std::numeric_limits<double>::quiet_NaN();
    else static_cast<float*>(t.data)[i] = std::numeric_limits<float>::quiet_NaN();
  }
}
}  // namespace

void dispatch_rows(kernels::RowsForward p, std::int64_t param_count) {
  const bool half_precision = p.dtype == DType::float16 || p.dtype == DType::bfloat16;
  std::vector<float> weight, bias, residual_bias;
  if (half_precision && !p.params_float32) {
    auto widen = [&](const void* src, std::vector<float>& dst) -> const void* {
      if (src == nullptr) return nullptr;
      dst.resize(static_cast<std::size_t>(param_count));
      for (std::int64_t i = 0; i < param_count; ++i) {
        if (p.dtype == DType::float16) dst[i] = static_cast<float>(static_cast<const half*>(src)[i]);
        else dst[i] = static_cast<float>(static_cast<const bfloat16*>(src)[i]);
      }
      return dst.data();
    };
    p.weight = widen(p.weight, weight);
    p.bias = widen(p.bias, bias);
    p.load.bias = widen(p.load.bias, residual_bias);
    p.params_float32 = true;
  }
  runtime::active_kernels().rows_forward(p);
}

void run_rows_forward(const kernels::RowsForward& p, const TensorRef& mean, const TensorRef& rstd) {
  if (p.rows == 0) return;
  if (p.cols == 0) {
    fill_nan(mean);
    fill_nan(rstd);
    for (std::int64_t r = 0; r < p.rows && p.store.row_scales; ++r) p.store.row_scales[r] = 1.0f;  // no values
    return;
  }
  dispatch_rows(p, p.cols);
}

}  // namespace normkit::plan
