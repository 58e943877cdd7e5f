// normkit/axis_norms.hpp - norms along any axes: the Lp normalization of
// torch.nn.functional.normalize and ONNX LpNormalization, and ONNX
// MeanVarianceNormalization.
//
// The rules of normkit/norms.hpp hold (y may be x itself, no partial overlap;
// float32, float64, float16, bfloat16 with float32 statistics for 16-bit x;
// inputs never modified; errors are normkit::Error naming the argument), and:
// x, y (and dy, dx) must be contiguous (row-major) and have one shape and
// dtype. Scratch of O(numel(x) / extent of the innermost reduced axes) is
// allocated for the per-slice tables. An empty x gives an empty y.
#pragma once

#include "normkit/tensor.hpp"

namespace normkit {

// Lp normalization along `dim`, as torch.nn.functional.normalize:
//   y = x / max(||x||_p, eps)       per slice along dim (|| ||_p over that dim)
// p: >= 1, or +infinity (max |x|). dim: in [-rank, rank), rank >= 1.
// eps: finite, >= 0. With eps = 0 a slice whose norm is 0 gives zeros (ONNX
// LpNormalization's reference does the same; PyTorch would give 0/0 = NaN).
// A NaN in a slice gives NaN for that slice; an infinity gives 0 for its
// finite elements and NaN for itself (x / inf), as PyTorch.
// p = 2 takes its norm from the kernels' statistics (sum of squares =
// M2 + count * mean^2, both terms non-negative, in double); other p use a
// plain loop in double (no kernel computes sum |x|^p or max |x|), as do the
// p = 2 slices whose moments are not finite (an infinity) or whose squares
// underflow the statistics' type (values below ~1e-18 in float32).
void normalize(const TensorRef& x, const TensorRef& y, double p = 2.0, int dim = -1, double eps = 1e-12);

// Gradient of normalize: dx from dy (x's shape and dtype) and x, with the
// same p, dim, eps. Where the norm is clamped (norm < eps) dx = dy / eps; a
// slice of zeros with eps = 0 (y = 0 there) gets dx = 0. p = inf shares the
// gradient evenly between a slice's maxima, as PyTorch. dx may be dy or x
// itself (in place), no other overlap.
void normalize_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, double p = 2.0,
                        int dim = -1, double eps = 1e-12);

// ONNX MeanVarianceNormalization over `axes` (each in [-rank, rank), no
// repeats, at least one; default (0, 2, 3), the NCHW per-channel form):
//   y = (x - mean) / (sqrt(var) + eps)    mean, biased var over the axes
// eps is added to the standard deviation, as ONNX does (ONNX fixes 1e-9).
// The statistics are the kernels' shifted, merged moments, not ONNX's
// E[x^2] - E[x]^2 (which cancels to 0 or below for a large mean). With eps = 0
// a constant slice (var 0) gives zeros rather than 0/0.
// Any set of axes maps onto the kernels without a transpose (plan/axis_plan.hpp).
void mean_variance_norm(const TensorRef& x, const TensorRef& y, const Dims& axes = Dims{0, 2, 3},
                        double eps = 1e-9);

}  // namespace normkit
