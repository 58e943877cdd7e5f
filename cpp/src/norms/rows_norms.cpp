// norms/rows_norms.cpp - LayerNorm and RMSNorm entry points.
#include <limits>

#include "normkit/norms.hpp"
#include "plan/rows_plan.hpp"

namespace normkit {

double machine_epsilon(DType dtype) {
  switch (dtype) {
    case DType::float32: return std::numeric_limits<float>::epsilon();
    case DType::float64: return std::numeric_limits<double>::epsilon();
    case DType::float16: return 0.0009765625;  // 2^-10
    case DType::bfloat16: return 0.0078125;    // 2^-7
    default: return 0;                         // int8 / float8_e4m3: never normalized
  }
  return 0;
}

void layer_norm(const TensorRef& x, const TensorRef& y, const Dims& normalized_shape, const TensorRef& weight,
                const TensorRef& bias, double eps, const TensorRef& mean, const TensorRef& rstd,
                const Epilogue& epilogue) {
  const auto p = plan::plan_rows_forward(kernels::RowsNorm::layer, x, y, normalized_shape, weight, bias, eps,
                                         mean, rstd, "y", epilogue);
  plan::run_rows_forward(p, mean, rstd);
}

void rms_norm(const TensorRef& x, const TensorRef& y, const Dims& normalized_shape, const TensorRef& weight,
              std::optional<double> eps, const TensorRef& rstd, const Epilogue& epilogue) {
  const auto p = plan::plan_rows_forward(kernels::RowsNorm::rms, x, y, normalized_shape, weight, TensorRef{}, eps,
                                         TensorRef{}, rstd, "y", epilogue);
  plan::run_rows_forward(p, TensorRef{}, rstd);
}

}  // namespace normkit
