// plan/rows_plan.hpp - mapping norm calls onto the "rows" canonical problem.
//
// LayerNorm and RMSNorm over the trailing k dims of x are R rows of
// D = prod(normalized_shape) contiguous elements. (Channels-first instance and
// group norms map here too: a row is one (sample, group) block.)
#pragma once

#include <optional>
#include <vector>

#include "kernels/kernel_api.hpp"
#include "normkit/fused.hpp"
#include "normkit/tensor.hpp"

namespace normkit::plan {

// A tensor seen as `rows` rows of `cols` contiguous elements, row i at
// data + i * row_stride elements.
struct RowsView {
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t row_stride = 0;
};

// Whether `t`'s trailing `normalized_ndim` dims are contiguous and its leading
// dims collapse to a single row stride; if so, fills `out`.
bool as_rows(const TensorRef& t, int normalized_ndim, RowsView& out);

// normalized_shape: non-empty, no negative extent, x's trailing dims.
void check_normalized_shape(const TensorRef& x, const Dims& normalized_shape);
// x as rows (as_rows), or a ValueError naming x.
RowsView input_rows(const TensorRef& x, int normalized_ndim);

// LayerNorm's statistics only: per row of x over normalized_shape, the mean
// and biased variance in double (x validated as layer_norm's; y not written).
void rows_moments(const TensorRef& x, const Dims& normalized_shape, std::vector<double>& mean,
                  std::vector<double>& var);

// Validates a LayerNorm / RMSNorm call and builds its problem (threads and
// store kind included). `bias` and `mean` must not be given for rms; an rms
// call without eps gets machine_epsilon(x.dtype). Errors about y name it
// `y_name` ("y" in C++, "out" from Python). The epilogue is the store stage
// (plain by default; y has the quantized dtype when it quantizes).
kernels::RowsForward plan_rows_forward(kernels::RowsNorm norm, const TensorRef& x, const TensorRef& y,
                                       const Dims& normalized_shape, const TensorRef& weight,
                                       const TensorRef& bias, std::optional<double> eps, const TensorRef& mean,
                                       const TensorRef& rstd, const char* y_name = "y",
                                       const Epilogue& epilogue = {});

// The residual add of add_layer_norm / add_rms_norm (normkit/fused.hpp): a
// planned problem for x gets its load stage. Checks residual, residual_bias
// and sum (named `sum_name`) against x and the problem's parameters, and the
// in-place rules between x, residual, y and sum.
void plan_residual(kernels::RowsForward& problem, const TensorRef& x, const TensorRef& residual,
                   const TensorRef& residual_bias, const TensorRef& sum, const TensorRef& y,
                   const TensorRef& weight, const TensorRef& bias, const Dims& normalized_shape,
                   const char* y_name = "y", const char* sum_name = "sum");

// Runs a planned rows problem on the active kernels (empty problems included).
void run_rows_forward(const kernels::RowsForward& problem, const TensorRef& mean, const TensorRef& rstd);

// Hands a rows problem to the active kernels. 16-bit weight/bias are widened
// to float32 here, once per call (`cols` or a few per-segment entries), so the
// kernels never convert parameters inside their loops. `param_count` is the
// number of weight/bias entries.
void dispatch_rows(kernels::RowsForward problem, std::int64_t param_count);

}  // namespace normkit::plan
