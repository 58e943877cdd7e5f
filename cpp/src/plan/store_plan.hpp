// plan/store_plan.hpp - the store stage of a forward problem, from the
// caller's Epilogue (normkit/fused.hpp): checked once here for every norm.
#pragma once

#include <cstdint>

#include "kernels/kernel_api.hpp"
#include "normkit/fused.hpp"
#include "normkit/tensor.hpp"

namespace normkit::plan {

// The plain store stage: y in x's dtype, no activation.
kernels::StoreStage plain_store(DType x_dtype);

// The dtype y must have: x's, or the quantized type.
DType output_dtype(const Epilogue& epilogue, DType x_dtype);

// Validates the epilogue against x and y (y's shape is checked by the caller's
// planner; its dtype here) and builds the kernels' store stage.
// `rows`: the statistics' count, the size of the dynamic scales output;
// `dynamic_allowed`: whether a quantization without a scale may be dynamic
// per row (the rows norms), else it is an error naming `scale`.
// `norm_name` names the function in errors about what it does not offer.
kernels::StoreStage plan_store(const Epilogue& epilogue, const TensorRef& x, const TensorRef& y,
                               std::int64_t rows, bool dynamic_allowed, const char* y_name = "y");

// For norms that take an activation only (InstanceNorm, AdaIN): a quantize
// is an error naming `quantize` and the function.
void require_no_quantize(const Epilogue& epilogue, const char* norm_name);

}  // namespace normkit::plan
