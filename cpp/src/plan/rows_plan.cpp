#include "plan/rows_plan.hpp"

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "normkit/norms.hpp"
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

namespace {
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
                                       const TensorRef& mean, const TensorRef& rstd, const char* y_name) {
  core::check_given(x, "x");
  core::check_given(y, y_name);
  const std::string yn = y_name;
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
  if (y.shape != x.shape)
    core::fail_value(yn + ": expected the shape of x " + x.shape.to_string() + ", got " + y.shape.to_string());
  if (y.dtype != x.dtype)
    core::fail_type(yn + ": expected dtype " + to_string(x.dtype) + " like x, got " + to_string(y.dtype));
  const double eps = eps_arg.has_value() ? *eps_arg : machine_epsilon(x.dtype);
  core::check_eps(eps);
  RowsView xv, yv;
  if (!as_rows(x, k, xv))
    core::fail_value("x: the normalized dims must be contiguous and the leading dims must collapse to one "
                     "stride; pass a contiguous copy");
  if (!as_rows(y, k, yv))
    core::fail_value(yn + ": the normalized dims must be contiguous and the leading dims must collapse to one "
                     "stride");
  // An output whose rows share memory (a broadcast view: row stride 0, or any
  // stride below the row length) would have one element written as several.
  if (yv.rows > 1 && yv.cols > 0 && (yv.row_stride < 0 ? -yv.row_stride : yv.row_stride) < yv.cols)
    core::fail_value(yn + ": its rows overlap each other (row stride " + std::to_string(yv.row_stride) +
                     " elements, rows of " + std::to_string(yv.cols) +
                     "): an output must not be a broadcast or self-overlapping view");
  if (!rows_disjoint(x, xv, y, yv)) core::check_no_partial_overlap(x, y, y_name);

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
  const std::int64_t bytes = xv.rows * xv.cols * element_size(x.dtype);
  p.streaming_stores = !core::same_memory(x, y) && runtime::use_streaming_stores(bytes);
  p.threads = runtime::threads_for(2 * bytes);
  return p;
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
  std::vector<float> weight, bias;
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
    p.params_float32 = true;
  }
  runtime::active_kernels().rows_forward(p);
}

void run_rows_forward(const kernels::RowsForward& p, const TensorRef& mean, const TensorRef& rstd) {
  if (p.rows == 0) return;
  if (p.cols == 0) {
    fill_nan(mean);
    fill_nan(rstd);
    return;
  }
  dispatch_rows(p, p.cols);
}

}  // namespace normkit::plan
