// norms/fold_batch_norm.cpp - an inference BatchNorm folded into the
// convolution or linear layer before it (normkit/fused.hpp).
//
// Per output channel c (C_out of them):
//   a[c]     = bn_weight[c] / sqrt(running_var[c] + eps)
//   shift[c] = (bias[c] - running_mean[c]) * a[c] + bn_bias[c]
// then folded_weight = weight * a[channel of the element], folded_bias = shift.
// Everything in double, each result rounded once to the weight's dtype.
//
// Which output channel an element belongs to (K = product of dims 2..):
//   weight [C_out, C_in/groups, ...]            element (o, j, k): channel o
//   transpose: [C_in, C_out/groups, ...]        element (i, j, k): channel
//     (i / (C_in/groups)) * (C_out/groups) + j  (group i / (C_in/groups), its j-th output)
// torch.nn.utils.fusion.fuse_conv_bn_weights scales dim 1 for any transposed
// weight, which is right only for groups = 1 (pytorch issue 180995).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "normkit/fused.hpp"
#include "plan/channel_plan.hpp"

namespace normkit {

namespace {

bool is_16bit(DType dtype) { return dtype == DType::float16 || dtype == DType::bfloat16; }

// double -> float rounded to odd (truncate, then set the last bit if inexact).
// Rounding that float to half or bfloat16 (at most 11 significant bits, float
// has 24 >= 2 * 11 + 2) then gives the correctly rounded double -> 16-bit
// result, which double -> float -> 16-bit with two nearest roundings does not
// always (a double just above a 16-bit tie would round to the tie first).
float to_float_round_odd(double v) {
  float f = static_cast<float>(v);
  if (std::isnan(v) || static_cast<double>(f) == v) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits |= 1u;
  std::memcpy(&f, &bits, sizeof bits);
  return f;
}

template <class T>
double load(T v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) return static_cast<double>(v);
  else return static_cast<double>(static_cast<float>(v));
}

template <class T>
T store(double v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else if constexpr (std::is_same_v<T, float>) return static_cast<float>(v);
  else return T(to_float_round_odd(v));
}

// out[e] = w[e] * scale[channel of e]; w and out may be the same memory
// (each element is read before it is written).
template <class T>
void scale_weight(const TensorRef& weight, const TensorRef& out, const std::vector<double>& scale, bool transpose,
                  std::int64_t groups) {
  const std::int64_t d0 = weight.shape[0];
  const std::int64_t d1 = weight.shape.size() > 1 ? weight.shape[1] : 1;
  const std::int64_t inner = weight.numel() == 0 ? 0 : weight.numel() / (d0 * d1);
  const std::int64_t rows_per_group = transpose ? d0 / groups : 0;
  const T* w = static_cast<const T*>(weight.data);
  T* o = static_cast<T*>(out.data);
  for (std::int64_t i = 0; i < d0; ++i) {
    for (std::int64_t j = 0; j < d1; ++j) {
      const std::int64_t c = transpose ? (i / rows_per_group) * d1 + j : i;
      const double a = scale[static_cast<std::size_t>(c)];
      const std::int64_t base = (i * d1 + j) * inner;
      for (std::int64_t k = 0; k < inner; ++k) o[base + k] = store<T>(load(w[base + k]) * a);
    }
  }
}

void check_float(const TensorRef& t, const char* name) {
  if (!is_float(t.dtype))
    core::fail_type(std::string(name) + ": expected a float dtype (float32, float64, float16 or bfloat16), got " +
                    to_string(t.dtype));
}

// A BN vector: (C_out), the weight's dtype or float32 for 16-bit weight.
void check_bn_vector(const TensorRef& t, const char* name, std::int64_t channels, DType weight_dtype) {
  if (!t.given) return;
  check_float(t, name);
  const DType dtype = is_16bit(weight_dtype) && t.dtype == DType::float32 ? DType::float32 : weight_dtype;
  core::check_param(t, name, Dims{channels}, dtype);
}

double element_or(const TensorRef& t, std::int64_t i, double fallback) {
  return t.given ? plan::read_element(t, i) : fallback;
}

}  // namespace

void fold_batch_norm(const TensorRef& weight, const TensorRef& bias, const TensorRef& running_mean,
                     const TensorRef& running_var, double eps, const TensorRef& bn_weight,
                     const TensorRef& bn_bias, const TensorRef& folded_weight, const TensorRef& folded_bias,
                     bool transpose, std::int64_t groups) {
  // ---- weight and the channel counts
  core::check_given(weight, "weight");
  check_float(weight, "weight");
  const int rank = weight.shape.size();
  if (rank < 1)
    core::fail_value("weight: expected at least 1 dim ([C_out, C_in/groups, ...]), got shape " +
                     weight.shape.to_string());
  if (transpose && rank < 2)
    core::fail_value("weight: a transposed convolution's weight [C_in, C_out/groups, ...] needs at least 2 dims, "
                     "got shape " + weight.shape.to_string());
  if (!weight.is_contiguous()) core::fail_value("weight: must be contiguous");
  if (groups <= 0) core::fail_value("groups: must be > 0, got " + std::to_string(groups));
  std::int64_t c_out;
  if (transpose) {
    if (weight.shape[0] % groups != 0)
      core::fail_value("groups: " + std::to_string(groups) + " does not divide C_in = weight.shape[0] = " +
                       std::to_string(weight.shape[0]));
    // Any groups divides C_in = 0: C_out = shape[1] * groups must still fit.
    if (weight.shape[1] > std::numeric_limits<std::int64_t>::max() / groups)
      core::fail_value("groups: " + std::to_string(groups) + " times weight.shape[1] = " +
                       std::to_string(weight.shape[1]) + " channels overflows C_out");
    c_out = weight.shape[1] * groups;
  } else {
    if (weight.shape[0] % groups != 0)
      core::fail_value("groups: " + std::to_string(groups) + " does not divide C_out = weight.shape[0] = " +
                       std::to_string(weight.shape[0]));
    c_out = weight.shape[0];
  }
  const DType dtype = weight.dtype;
  const Dims channels{c_out};

  // ---- the other inputs
  if (bias.given) {
    check_float(bias, "bias");
    core::check_param(bias, "bias", channels, dtype);
  }
  core::check_given(running_mean, "running_mean");
  core::check_given(running_var, "running_var");
  check_bn_vector(running_mean, "running_mean", c_out, dtype);
  check_bn_vector(running_var, "running_var", c_out, dtype);
  core::check_eps(eps);
  check_bn_vector(bn_weight, "bn_weight", c_out, dtype);
  check_bn_vector(bn_bias, "bn_bias", c_out, dtype);

  // ---- outputs: weight's shape and dtype, (C_out); in place only exactly
  check_float(folded_weight, "folded_weight");
  core::check_param(folded_weight, "folded_weight", weight.shape, dtype);
  check_float(folded_bias, "folded_bias");
  core::check_param(folded_bias, "folded_bias", channels, dtype);
  core::check_no_partial_overlap(weight, folded_weight, "folded_weight", "weight");
  if (bias.given) core::check_no_partial_overlap(bias, folded_bias, "folded_bias", "bias");
  core::check_disjoint({{folded_weight, "folded_weight"}, {folded_bias, "folded_bias"}},
                       {{running_mean, "running_mean"},
                        {running_var, "running_var"},
                        {bn_weight, "bn_weight"},
                        {bn_bias, "bn_bias"}});
  core::check_disjoint({{folded_weight, "folded_weight"}}, {{bias, "bias"}});
  core::check_disjoint({{folded_bias, "folded_bias"}}, {{weight, "weight"}});

  // ---- per-channel scale and shift, then the weight
  std::vector<double> scale(static_cast<std::size_t>(c_out));
  for (std::int64_t c = 0; c < c_out; ++c) {
    // var = -eps gives a = inf (or NaN for bn_weight 0), var < -eps NaN: IEEE, no trap.
    const double a = element_or(bn_weight, c, 1.0) / std::sqrt(plan::read_element(running_var, c) + eps);
    scale[static_cast<std::size_t>(c)] = a;
    const double shift = (element_or(bias, c, 0.0) - plan::read_element(running_mean, c)) * a +
                         element_or(bn_bias, c, 0.0);
    switch (dtype) {
      case DType::float32: static_cast<float*>(folded_bias.data)[c] = store<float>(shift); break;
      case DType::float64: static_cast<double*>(folded_bias.data)[c] = shift; break;
      case DType::float16: static_cast<half*>(folded_bias.data)[c] = store<half>(shift); break;
      case DType::bfloat16: static_cast<bfloat16*>(folded_bias.data)[c] = store<bfloat16>(shift); break;
      default: break;  // refused above
    }
  }
  if (weight.numel() == 0) return;
  switch (dtype) {
    case DType::float32: scale_weight<float>(weight, folded_weight, scale, transpose, groups); break;
    case DType::float64: scale_weight<double>(weight, folded_weight, scale, transpose, groups); break;
    case DType::float16: scale_weight<half>(weight, folded_weight, scale, transpose, groups); break;
    case DType::bfloat16: scale_weight<bfloat16>(weight, folded_weight, scale, transpose, groups); break;
    default: break;
  }
}

}  // namespace normkit
