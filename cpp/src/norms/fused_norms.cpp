// norms/fused_norms.cpp - the residual-add forms of LayerNorm and RMSNorm
// (normkit/fused.hpp): the rows plan of x with a residual load stage.
#include "normkit/fused.hpp"
#include "plan/rows_plan.hpp"

namespace normkit {

namespace {
void add_rows_norm(kernels::RowsNorm norm, const TensorRef& x, const TensorRef& residual, const TensorRef& y,
                   const TensorRef& sum, const Dims& normalized_shape, const TensorRef& weight, const TensorRef& bias,
                   std::optional<double> eps, const TensorRef& residual_bias, const Epilogue& epilogue,
                   const TensorRef& mean, const TensorRef& rstd) {
  auto p = plan::plan_rows_forward(norm, x, y, normalized_shape, weight, bias, eps, mean, rstd, "y", epilogue);
  plan::plan_residual(p, x, residual, residual_bias, sum, y, weight, bias, normalized_shape);
  plan::run_rows_forward(p, mean, rstd);
}
}  // namespace

void add_layer_norm(const TensorRef& x, const TensorRef& residual, const TensorRef& y, const TensorRef& sum,
                    const Dims& normalized_shape, const TensorRef& weight, const TensorRef& bias, double eps,
                    const TensorRef& residual_bias, const Epilogue& epilogue, const TensorRef& mean,
                    const TensorRef& rstd) {
  add_rows_norm(kernels::RowsNorm::layer, x, residual, y, sum, normalized_shape, weight, bias, eps, residual_bias,
                epilogue, mean, rstd);
}

void add_rms_norm(const TensorRef& x, const TensorRef& residual, const TensorRef& y, const TensorRef& sum,
                  const Dims& normalized_shape, const TensorRef& weight, std::optional<double> eps,
                  const TensorRef& residual_bias, const Epilogue& epilogue, const TensorRef& rstd) {
  add_rows_norm(kernels::RowsNorm::rms, x, residual, y, sum, normalized_shape, weight, TensorRef{}, eps,
                residual_bias, epilogue, TensorRef{}, rstd);
}

}  // namespace normkit
