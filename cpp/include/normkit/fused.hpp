// normkit/fused.hpp - the fused forms inference engines run: a residual add
// before the norm, an activation and a quantizer after it, and BatchNorm
// folded into the preceding convolution or linear layer.
//
// Every forward norm (normkit/norms.hpp) takes an optional `Epilogue`, the
// store stage applied to each normalized value before its single store:
//   y = quantize(activation(affine(norm(x))))
// computed in the accumulation type (float32, or float64 for float64 x).
//
//   // A transformer block's add + RMSNorm into int8 with per-token scales:
//   normkit::Epilogue e;
//   e.quantize = normkit::Quantize::int8;     // scale not set: dynamic per row
//   e.scales = scales_view;                    // float32, one per row
//   normkit::add_rms_norm(x, residual, q, sum, {4096}, weight, 1e-6, {}, e);
#pragma once

#include <cstdint>
#include <optional>

#include "normkit/tensor.hpp"

namespace normkit {

// Activations, as torch.nn.functional names them:
//   relu      max(v, 0) (NaN stays NaN)
//   silu      v * sigmoid(v)
//   gelu      v * Phi(v) = 0.5 v (1 + erf(v / sqrt(2)))          (the exact, erf form)
//   gelu_tanh 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))   (approximate="tanh")
enum class Activation : std::uint8_t { none, relu, silu, gelu, gelu_tanh };

// Quantized outputs. y's view then has dtype int8 or float8_e4m3 (OCP E4M3,
// "fn": no infinities, one NaN per sign, largest finite 448).
//   int8         q = saturate(round_half_to_even(v / scale)) in [-127, 127]; NaN gives 0
//   float8_e4m3  q = round_half_to_even(v / scale) to E4M3, saturating to +-448; NaN stays NaN
enum class Quantize : std::uint8_t { none, int8, float8_e4m3 };

// The store stage of a forward norm.
struct Epilogue {
  Activation activation = Activation::none;  // after the affine
  Quantize quantize = Quantize::none;        // after the activation
  // Quantization scale. Given: static per tensor (finite, > 0). Not given, on
  // the rows norms (LayerNorm, RMSNorm and their add_ forms): dynamic per row,
  // scale_row = max |v| over the row / qmax (qmax 127 for int8, 448 for
  // float8_e4m3; NaN ignored; a row of zeros gets scale 1), written to `scales`.
  // The channel norms need a static scale.
  std::optional<double> scale;
  // Dynamic scales output: float32, one contiguous element per row (the
  // statistics' count). Required for dynamic quantization, refused otherwise.
  TensorRef scales;
};

// Largest magnitude a quantized dtype holds (127, 448).
double quantize_max(Quantize quantize);

// Residual add + LayerNorm, as ONNX Runtime's SkipLayerNormalization:
//   s = x + residual (+ residual_bias)     computed in the accumulation type,
//                                          stored once in x's dtype into `sum`
//   y = layer_norm(s as stored)            (then the epilogue)
// so the fused call equals layer_norm on the returned sum, bit for bit on one
// kernel path.
// residual: x's dtype; x's shape, or x's trailing dims (broadcast over the
//   leading ones: x (B, S, H) with residual (S, H) or (1, S, H)).
// residual_bias: optional, shape normalized_shape, dtype like weight's.
// sum: x's shape and dtype, same stride rules as y. In place: y may be x and
//   sum may be residual (when residual has x's shape) or x, also together; y
//   and sum must not share memory, and no other overlap is allowed.
// Everything else as layer_norm (normkit/norms.hpp); mean/rstd are the
// statistics of s.
void add_layer_norm(const TensorRef& x, const TensorRef& residual, const TensorRef& y, const TensorRef& sum,
                    const Dims& normalized_shape, const TensorRef& weight = {}, const TensorRef& bias = {},
                    double eps = 1e-5, const TensorRef& residual_bias = {}, const Epilogue& epilogue = {},
                    const TensorRef& mean = {}, const TensorRef& rstd = {});

// Residual add + RMSNorm (ONNX Runtime's SkipSimplifiedLayerNormalization,
// vLLM's fused_add_rms_norm): as add_layer_norm, with y = rms_norm(s).
void add_rms_norm(const TensorRef& x, const TensorRef& residual, const TensorRef& y, const TensorRef& sum,
                  const Dims& normalized_shape, const TensorRef& weight = {},
                  std::optional<double> eps = std::nullopt, const TensorRef& residual_bias = {},
                  const Epilogue& epilogue = {}, const TensorRef& rstd = {});

// Folds an inference BatchNorm into the convolution or linear layer before it,
// as torch.nn.utils.fusion.fuse_conv_bn_weights:
//   a[c] = bn_weight[c] / sqrt(running_var[c] + eps)
//   folded_weight = weight * a (per output channel), folded_bias = (bias - running_mean) * a + bn_bias
// weight: [C_out, C_in/groups, ...] (a convolution or linear layer), or with
//   transpose [C_in, C_out/groups, ...] (a transposed convolution: output
//   channel g * (C_out/groups) + j is dim 1 index j of group g's rows).
// bias, bn_weight, bn_bias: optional (zeros, ones, zeros); running_mean,
//   running_var: (C_out). All contiguous, of one float dtype (float32, float64,
//   float16, bfloat16), except that for a 16-bit weight each of the BN vectors
//   (running_mean, running_var, bn_weight, bn_bias) may also be float32.
// folded_weight: weight's shape and dtype; folded_bias: (C_out), weight's
//   dtype. They may be weight / bias themselves (in place); any other overlap
//   of an output with an argument is an Error. Computed in double, each result
//   rounded once to weight's dtype; running_var = -eps gives inf / NaN, as IEEE.
// groups > 0 divides weight.shape[0] (C_out, or C_in with transpose); weight
//   has at least 1 dim (2 with transpose).
void fold_batch_norm(const TensorRef& weight, const TensorRef& bias, const TensorRef& running_mean,
                     const TensorRef& running_var, double eps, const TensorRef& bn_weight,
                     const TensorRef& bn_bias, const TensorRef& folded_weight, const TensorRef& folded_bias,
                     bool transpose = false, std::int64_t groups = 1);

}  // namespace normkit
