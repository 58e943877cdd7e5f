// normkit/norms.hpp - the normalization functions.
//
// Every function takes views over caller-owned memory and writes its result
// into `y` (which may be the same memory as `x`: in place is allowed, partial
// overlap is not, nor an output whose elements share memory, such as a
// broadcast view). Apart from that one in-place pair (and dx = dy in a
// backward), no output may share memory with any other argument: statistics
// outputs, running statistics, gradients and y are each their own memory.
// Element types: float32, float64, float16, bfloat16;
// statistics and accumulation are float32 for the 16-bit types.
// Inputs are never modified. No memory is allocated beyond small per-thread
// scratch. Errors are normkit::Error with the argument named in what().
// Every forward takes an optional `epilogue` (normkit/fused.hpp): an
// activation after the affine and, for LayerNorm, RMSNorm, BatchNorm and
// GroupNorm, a quantized output (y then has dtype int8 / float8_e4m3, and may
// not overlap x).
#pragma once

#include <optional>

#include "normkit/fused.hpp"
#include "normkit/layout.hpp"
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
                const TensorRef& mean = {}, const TensorRef& rstd = {}, const Epilogue& epilogue = {});

// RMSNorm, as torch.nn.functional.rms_norm:
//   y = x / sqrt(mean(x^2) + eps) * weight
// eps = nullopt means the machine epsilon of x's dtype (PyTorch's default).
// Arguments as for layer_norm; rstd = 1 / sqrt(mean(x^2) + eps).
void rms_norm(const TensorRef& x, const TensorRef& y, const Dims& normalized_shape,
              const TensorRef& weight = {}, std::optional<double> eps = std::nullopt,
              const TensorRef& rstd = {}, const Epilogue& epilogue = {});

// Machine epsilon of a dtype (what rms_norm uses when eps is not given).
double machine_epsilon(DType dtype);

// ---- channel norms ----------------------------------------------------------
// x has a channel layout (normkit/layout.hpp): N, C and spatial axes S; the
// default (nullopt) is the channels-first layout of x's rank, as in PyTorch.
// x and y must be contiguous in that layout; y has x's shape, dtype and layout.
// weight, bias: optional, shape (C), dtype x's or float32 (16-bit x), one dtype for both.
// Running statistics: shape (C), float32 or x's dtype, contiguous; updated in
// place where the norm says so. Optional outputs mean/rstd: contiguous,
// stats_dtype(x.dtype), of the size each norm states. Small O(N*C) scratch is
// allocated for statistics tables.

// BatchNorm, as torch.nn.functional.batch_norm. training: normalize with the
// batch statistics (biased variance) and, if running statistics are given,
// update them: r = (1 - momentum) * r + momentum * batch (unbiased variance for
// running_var); fewer than 2 values per channel is an error. Otherwise normalize
// with the running statistics (required), folded into one multiply-add.
// mean, rstd: (C) - the statistics used to normalize.
void batch_norm(const TensorRef& x, const TensorRef& y, const TensorRef& running_mean,
                const TensorRef& running_var, const TensorRef& weight = {}, const TensorRef& bias = {},
                bool training = false, double momentum = 0.1, double eps = 1e-5,
                std::optional<Layout> layout = std::nullopt, const TensorRef& mean = {},
                const TensorRef& rstd = {}, const Epilogue& epilogue = {});

// InstanceNorm, as torch.nn.functional.instance_norm: statistics per (sample,
// channel) over the spatial axes when use_input_stats (then running statistics,
// if given, get the batch mean of the per-instance statistics, unbiased variance;
// one spatial element is an error), else the running statistics (required).
// mean, rstd: (N, C).
void instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& running_mean = {},
                   const TensorRef& running_var = {}, const TensorRef& weight = {}, const TensorRef& bias = {},
                   bool use_input_stats = true, double momentum = 0.1, double eps = 1e-5,
                   std::optional<Layout> layout = std::nullopt, const TensorRef& mean = {},
                   const TensorRef& rstd = {}, const Epilogue& epilogue = {});

// GroupNorm, as torch.nn.functional.group_norm: statistics per (sample, group of
// C / num_groups channels); num_groups must divide C. mean, rstd: (N, num_groups).
void group_norm(const TensorRef& x, const TensorRef& y, std::int64_t num_groups, const TensorRef& weight = {},
                const TensorRef& bias = {}, double eps = 1e-5, std::optional<Layout> layout = std::nullopt,
                const TensorRef& mean = {}, const TensorRef& rstd = {}, const Epilogue& epilogue = {});

// Adaptive instance norm: y = (x - mean(x)) / sqrt(var(x) + eps) * style_std + style_mean
// per (sample, channel), biased variances. From a style feature map (same layout
// and N, C as x, any spatial size; style_std = sqrt(var(style) + eps)) ...
void adaptive_instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& style, double eps = 1e-5,
                            std::optional<Layout> layout = std::nullopt, const Epilogue& epilogue = {});
// ... or from given statistics of shape (N, C) (x's dtype or float32).
void adaptive_instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& style_mean,
                            const TensorRef& style_std, double eps = 1e-5,
                            std::optional<Layout> layout = std::nullopt, const Epilogue& epilogue = {});

// ---- backward ---------------------------------------------------------------
// Gradients of the norms above, from the statistics their forward wrote
// (`mean`, `rstd`: same counts and dtype as the forward's outputs). Common rules:
// - dy, x: the forward's x shape and dtype (x as given to the forward).
// - dx: required, x's shape and dtype; may be dy or x itself (in place), no
//   other overlap. Rows norms: the same stride rules as x; channel norms: contiguous.
// - weight: what the forward got (optional). dweight / dbias: optional outputs
//   of shape weight's (LayerNorm/RMSNorm: normalized_shape; channel norms: (C)),
//   dtype x's, or float32 for 16-bit x; they are overwritten, not accumulated.
//   They may be asked for without a weight (then the gradient of a weight of ones).
// - Reductions use fixed blocks merged in a fixed order: gradients are bit for
//   bit the same from run to run and for any thread count.
// - Statistics saved as float32 (float32/16-bit x) may round a large mean; the
//   training-statistics gradients recentre on the exact mean of x, so a mean of
//   1e4 with a spread of 1e-2 still gives exact gradients.

// Gradient of layer_norm: dx (and dweight, dbias) from dy, x and the forward's mean/rstd (one per row).
void layer_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         const Dims& normalized_shape, const TensorRef& weight, const TensorRef& dx,
                         const TensorRef& dweight = {}, const TensorRef& dbias = {});

// Gradient of rms_norm: dx (and dweight) from dy, x and the forward's rstd (one per row).
void rms_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& rstd, const Dims& normalized_shape,
                       const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight = {});

// Gradient of batch_norm: dx (and dweight, dbias).
// training: mean/rstd are the batch statistics (gradient through them);
// otherwise they are the running statistics the forward used (dx = dy * weight * rstd).
// mean, rstd: (C).
void batch_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight = {},
                         const TensorRef& dbias = {}, bool training = true,
                         std::optional<Layout> layout = std::nullopt);

// Gradient of instance_norm: dx (and dweight, dbias).
// mean, rstd: (N, C) as instance_norm wrote them (the running statistics
// repeated per sample when use_input_stats was false).
void instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                            const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight = {},
                            const TensorRef& dbias = {}, bool use_input_stats = true,
                            std::optional<Layout> layout = std::nullopt);

// Gradient of group_norm: dx (and dweight, dbias). mean, rstd: (N, num_groups).
void group_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         std::int64_t num_groups, const TensorRef& weight, const TensorRef& dx,
                         const TensorRef& dweight = {}, const TensorRef& dbias = {},
                         std::optional<Layout> layout = std::nullopt);

// Gradient of adaptive_instance_norm: dx (and the style's gradient); x's
// statistics are recomputed (the forward saves none).
// From a style feature map: dstyle (optional) has style's shape and dtype.
void adaptive_instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& style, double eps,
                                     const TensorRef& dx, const TensorRef& dstyle = {},
                                     std::optional<Layout> layout = std::nullopt);
// From given statistics (N, C): dstyle_mean / dstyle_std (optional) have their
// shape and dtype.
void adaptive_instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& style_mean,
                                     const TensorRef& style_std, double eps, const TensorRef& dx,
                                     const TensorRef& dstyle_mean = {}, const TensorRef& dstyle_std = {},
                                     std::optional<Layout> layout = std::nullopt);

}  // namespace normkit
