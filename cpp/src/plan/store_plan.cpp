#include "plan/store_plan.hpp"

#include <cmath>
#include <string>

#include "core/check.hpp"

namespace normkit {

double quantize_max(Quantize quantize) {
  switch (quantize) {
    case Quantize::int8: return 127.0;
    case Quantize::float8_e4m3: return 448.0;
    case Quantize::none: break;
  }
  return 0;
}

namespace plan {

kernels::StoreStage plain_store(DType x_dtype) {
  kernels::StoreStage s;
  s.out_dtype = x_dtype;
  return s;
}

DType output_dtype(const Epilogue& e, DType x_dtype) {
  switch (e.quantize) {
    case Quantize::int8: return DType::int8;
    case Quantize::float8_e4m3: return DType::float8_e4m3;
    case Quantize::none: break;
  }
  return x_dtype;
}

namespace {
const char* quantize_name(Quantize q) { return q == Quantize::int8 ? "int8" : "float8_e4m3"; }
}  // namespace

kernels::StoreStage plan_store(const Epilogue& e, const TensorRef& x, const TensorRef& y, std::int64_t rows,
                               bool dynamic_allowed, const char* y_name) {
  const std::string yn = y_name;
  if (static_cast<int>(e.activation) > static_cast<int>(Activation::gelu_tanh))
    core::fail_value("activation: unknown value " + std::to_string(static_cast<int>(e.activation)));
  if (static_cast<int>(e.quantize) > static_cast<int>(Quantize::float8_e4m3))
    core::fail_value("quantize: unknown value " + std::to_string(static_cast<int>(e.quantize)));
  kernels::StoreStage s;
  s.activation = e.activation;
  s.out_dtype = output_dtype(e, x.dtype);
  if (e.quantize == Quantize::none) {
    if (e.scale) core::fail_value("scale: given without quantize (a scale is for quantized outputs)");
    if (e.scales.given) core::fail_value("scales: given without quantize");
    if (y.dtype != x.dtype)
      core::fail_type(yn + ": expected dtype " + to_string(x.dtype) + " like x, got " + to_string(y.dtype));
    return s;
  }
  s.quantized = true;
  if (y.dtype != s.out_dtype)
    core::fail_type(yn + ": expected dtype " + to_string(s.out_dtype) + " for quantize=" +
                    quantize_name(e.quantize) + ", got " + to_string(y.dtype));
  if (e.scale) {
    if (!(std::isfinite(*e.scale) && *e.scale > 0))
      core::fail_value("scale: must be a finite number > 0, got " + std::to_string(*e.scale));
    if (e.scales.given) core::fail_value("scales: only for dynamic quantization (scale not given)");
    s.scale = *e.scale;
  } else {
    if (!dynamic_allowed)
      core::fail_value(std::string("scale: required with quantize=") + quantize_name(e.quantize) +
                       " here (a static per-tensor scale; dynamic scales are per row, for the rows norms)");
    if (!e.scales.given)
      core::fail_value("scales: required for dynamic quantization (scale not given): float32, one per row");
    core::check_stats_output(e.scales, "scales", rows, DType::float32);
    s.row_scales = static_cast<float*>(e.scales.data);
  }
  // A quantized y has other elements than x: it may not be x, nor overlap it.
  core::check_disjoint({{y, y_name}, {e.scales, "scales"}}, {{x, "x"}});
  return s;
}

void require_no_quantize(const Epilogue& e, const char* norm_name) {
  if (e.quantize != Quantize::none)
    core::fail_value(std::string("quantize: ") + norm_name + " has no quantized output (only an activation)");
  if (e.scale) core::fail_value("scale: given without quantize (a scale is for quantized outputs)");
  if (e.scales.given) core::fail_value("scales: given without quantize");
}

}  // namespace plan
}  // namespace normkit
