// norms/rows_norms.cpp - LayerNorm and RMSNorm entry points.
#include <cmath>
#include <limits>

#include "core/check.hpp"
#include "normkit/norms.hpp"
#include "plan/rows_plan.hpp"
#include "runtime/dispatch.hpp"

namespace normkit {

namespace {

// Rows of zero length have no statistics: report NaN, as 0/0 would.
void fill_nan_stats(const TensorRef& t) {
  if (!t.given) return;
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    if (t.dtype == DType::float64) static_cast<double*>(t.data)[i] = std::numeric_limits<double>::quiet_NaN();
    else static_cast<float*>(t.data)[i] = std::numeric_limits<float>::quiet_NaN();
  }
}

void run(const kernels::RowsForward& p, const TensorRef& mean, const TensorRef& rstd) {
  if (p.rows == 0) return;
  if (p.cols == 0) {
    fill_nan_stats(mean);
    fill_nan_stats(rstd);
    return;
  }
  runtime::active_kernels().rows_forward(p);
}

}  // namespace

double machine_epsilon(DType dtype) {
  switch (dtype) {
    case DType::float32: return std::numeric_limits<float>::epsilon();
    case DType::float64: return std::numeric_limits<double>::epsilon();
    case DType::float16: return 0.0009765625;  // 2^-10
    case DType::bfloat16: return 0.0078125;    // 2^-7
  }
  return 0;
}

void layer_norm(const TensorRef& x, const TensorRef& y, const Dims& normalized_shape, const TensorRef& weight,
                const TensorRef& bias, double eps, const TensorRef& mean, const TensorRef& rstd) {
  const auto p = plan::plan_rows_forward(kernels::RowsNorm::layer, x, y, normalized_shape, weight, bias, eps,
                                         mean, rstd);
  run(p, mean, rstd);
}

void rms_norm(const TensorRef& x, const TensorRef& y, const Dims& normalized_shape, const TensorRef& weight,
              std::optional<double> eps, const TensorRef& rstd) {
  core::check_given(x, "x");
  const double e = eps.has_value() ? *eps : machine_epsilon(x.dtype);
  const auto p = plan::plan_rows_forward(kernels::RowsNorm::rms, x, y, normalized_shape, weight, TensorRef{}, e,
                                         TensorRef{}, rstd);
  run(p, TensorRef{}, rstd);
}

}  // namespace normkit
