// normkit/norms.hpp - the normalization functions.
//
// Every function takes views over caller-owned memory and writes its result
// into `y` (which may be the same memory as `x`: in place is allowed, partial
// overlap is not). Element types: float32, float64, float16, bfloat16;
// statistics and accumulation are float32 for the 16-bit types.
// Inputs are never modified. No memory is allocated beyond small per-thread
// scratch. Errors are normkit::Error with the argument named in what().
#pragma once

#include <optional>

#include "normkit/tensor.hpp"

namespace normkit {

// LayerNorm over the trailing dims given by `normalized_shape` (they must
// equal x's trailing extents), as torch.nn.functional.layer_norm:
//   y = (x - mean) / sqrt(var + eps) * weight + bias      (biased variance)
// x, y: same shape and dtype; the normalized (trailing) dims must be
//   contiguous, the leading dims may have any strides that collapse to one.
// weight, bias: optional, shape == normalized_shape, contiguous, one dtype for
//   both: x's, or float32 (for 16-bit x only).
// mean, rstd: optional outputs of R = numel(x) / numel(normalized_shape)
//   contiguous elements of stats_dtype(x.dtype); rstd = 1 / sqrt(var + eps).
void layer_norm(const TensorRef& x, const TensorRef& y, const Dims& normalized_shape,
                const TensorRef& weight = {}, const TensorRef& bias = {}, double eps = 1e-5,
                const TensorRef& mean = {}, const TensorRef& rstd = {});

// RMSNorm, as torch.nn.functional.rms_norm:
//   y = x / sqrt(mean(x^2) + eps) * weight
// eps = nullopt means the machine epsilon of x's dtype (PyTorch's default).
// Arguments as for layer_norm; rstd = 1 / sqrt(mean(x^2) + eps).
void rms_norm(const TensorRef& x, const TensorRef& y, const Dims& normalized_shape,
              const TensorRef& weight = {}, std::optional<double> eps = std::nullopt,
              const TensorRef& rstd = {});

// Machine epsilon of a dtype (what rms_norm uses when eps is not given).
double machine_epsilon(DType dtype);

}  // namespace normkit
