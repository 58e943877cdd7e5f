// layers/layers.cpp - the stateful layer classes (normkit/layers.hpp).
//
// Each layer is a thin owner of buffers around the free functions of
// normkit/norms.hpp: forward calls the norm with the layer's parameters (and,
// in training mode, statistics outputs it keeps for backward); backward calls
// the matching *_backward function, with the weight/bias gradients written
// into scratch buffers and then added to grad_weight/grad_bias. NormLayer does
// that once (saved state, scratch, accumulation, activation); each class gives
// its parameters, saved_count (how many statistics a forward saves) and the two
// calls norm_forward / norm_backward.
#include "normkit/layers.hpp"

#include <cmath>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "normkit/fused.hpp"
#include "normkit/norms.hpp"
#include "plan/channel_plan.hpp"

namespace normkit {

namespace {

bool is_known_dtype(DType dtype) { return is_float(dtype); }  // a layer's dtype and x's: never a quantized type

bool is_16bit(DType dtype) { return dtype == DType::float16 || dtype == DType::bfloat16; }

void check_dtype(DType dtype, const char* argument = "dtype") {
  if (!is_known_dtype(dtype))
    core::fail_type(std::string(argument) + ": unsupported dtype (expected float32, float64, float16 or bfloat16)");
}

void check_no_negative(const Dims& shape, const char* argument) {
  for (std::int64_t d : shape)
    if (d < 0) core::fail_value(std::string(argument) + ": negative extent in " + shape.to_string());
}

void check_positive(std::int64_t value, const char* argument) {
  if (value <= 0) core::fail_value(std::string(argument) + ": must be > 0, got " + std::to_string(value));
}

void check_momentum(const std::optional<double>& momentum) {
  if (momentum && !std::isfinite(*momentum))
    core::fail_value("momentum: must be a finite number or nullopt, got " + std::to_string(*momentum));
}

void check_normalized_shape(const Dims& shape) {
  if (shape.empty()) core::fail_value("normalized_shape: must name at least one dimension");
  check_no_negative(shape, "normalized_shape");
}

// x: the layer's dtype, or 16-bit with a float32 layer.
void check_x_dtype(const TensorRef& x, DType layer_dtype, const char* x_name = "x") {
  if (!x.given) return;  // the norm itself reports a missing x
  if (x.dtype == layer_dtype || (layer_dtype == DType::float32 && is_16bit(x.dtype))) return;
  core::fail_type(std::string(x_name) + ": dtype " + to_string(x.dtype) + " does not match the layer's " +
                  to_string(layer_dtype) + " (x must have the layer's dtype, or be float16/bfloat16 with a " +
                  "float32 layer)");
}

void check_channels(std::int64_t got, std::int64_t want, const char* what, const TensorRef& x) {
  if (got != want)
    core::fail_value("x: expected " + std::to_string(want) + " channels (" + what + "), got " +
                     std::to_string(got) + " in shape " + x.shape.to_string());
}

Buffer make_param(bool defined, DType dtype, const Dims& shape, double fill) {
  return defined ? Buffer(dtype, shape, fill) : Buffer();
}

// The weight/bias gradient output of one backward: scratch shaped as `param`,
// or not given when the parameter is absent.
TensorRef scratch_for(Buffer& scratch, const Buffer& param) {
  if (!param.defined()) return {};
  scratch.resize(param.dtype(), param.shape());
  return scratch.ref();
}

void accumulate(Buffer& grad, const Buffer& scratch) {
  if (grad.defined()) grad.add(scratch);
}

// A statistics output of `count` elements for x, in `buffer`.
TensorRef stats_output(Buffer& buffer, DType x_dtype, std::int64_t count) {
  buffer.resize(stats_dtype(x_dtype), Dims{count});
  return buffer.ref();
}

// Product of x's leading dims before the trailing `k`; -1 when x has fewer dims
// (the norm reports that).
std::int64_t leading_rows(const TensorRef& x, int k) {
  if (!x.given || x.shape.size() < k) return -1;
  std::int64_t rows = 1;
  for (int i = 0; i < x.shape.size() - k; ++i) rows *= x.shape[i];
  return rows < 0 ? -1 : rows;
}

[[noreturn]] void no_saved_forward() {
  core::fail_value(
      "backward: needs a forward in training mode first (each forward allows one backward; eval-mode and "
      "in-place forwards save nothing)");
}

std::int64_t storage_words(DType dtype, const Dims& shape) {
  const std::int64_t bytes = shape.product() * element_size(dtype);
  return (bytes + 7) / 8;
}

}  // namespace

// ---- Buffer -------------------------------------------------------------------

Buffer::Buffer(DType dtype, Dims shape, double fill_value) {
  check_dtype(dtype);
  check_no_negative(shape, "shape");
  dtype_ = dtype;
  shape_ = shape;
  storage_.assign(static_cast<std::size_t>(storage_words(dtype, shape)), 0.0);
  defined_ = true;
  fill(fill_value);
}

TensorRef Buffer::ref() const {
  if (!defined_) return {};
  return TensorRef(const_cast<double*>(storage_.data()), dtype_, shape_, contiguous_strides(shape_));
}

void Buffer::fill(double value) {
  if (!defined_) return;
  const TensorRef r = ref();
  const std::int64_t n = numel();
  for (std::int64_t i = 0; i < n; ++i) plan::write_element(r, i, value);
}

void Buffer::assign(const TensorRef& src, const char* name) {
  if (!defined_) core::fail_value(std::string(name) + ": the layer has no such buffer (it is not defined)");
  core::check_given(src, name);
  if (src.shape != shape_)
    core::fail_value(std::string(name) + ": expected shape " + shape_.to_string() + ", got " +
                     src.shape.to_string());
  check_dtype(src.dtype, name);
  // Read everything first (src may be this buffer, or overlap it), then write.
  const std::int64_t n = numel();
  std::vector<double> values(static_cast<std::size_t>(n));
  const int rank = shape_.size();
  std::int64_t index[kMaxRank] = {};
  std::int64_t offset = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    values[static_cast<std::size_t>(i)] = plan::read_element(src, offset);
    for (int d = rank - 1; d >= 0; --d) {  // next multi-index, row-major
      offset += src.strides[d];
      if (++index[d] < shape_[d]) break;
      offset -= src.strides[d] * shape_[d];
      index[d] = 0;
    }
  }
  const TensorRef dst = ref();
  for (std::int64_t i = 0; i < n; ++i) plan::write_element(dst, i, values[static_cast<std::size_t>(i)]);
}

void Buffer::add(const Buffer& src) {
  if (!defined_ || !src.defined_) core::fail_value("add: both buffers must be defined");
  if (src.shape_ != shape_)
    core::fail_value("add: expected shape " + shape_.to_string() + ", got " + src.shape_.to_string());
  if (src.dtype_ != dtype_)
    core::fail_type(std::string("add: expected dtype ") + to_string(dtype_) + ", got " + to_string(src.dtype_));
  const TensorRef dst = ref(), s = src.ref();
  const std::int64_t n = numel();
  switch (dtype_) {
    case DType::float32: {
      auto* d = static_cast<float*>(dst.data);
      const auto* a = static_cast<const float*>(s.data);
      for (std::int64_t i = 0; i < n; ++i) d[i] += a[i];
      return;
    }
    case DType::float64: {
      auto* d = static_cast<double*>(dst.data);
      const auto* a = static_cast<const double*>(s.data);
      for (std::int64_t i = 0; i < n; ++i) d[i] += a[i];
      return;
    }
    default:  // 16-bit: add in float, round once
      for (std::int64_t i = 0; i < n; ++i)
        plan::write_element(dst, i, static_cast<float>(plan::read_element(dst, i) + plan::read_element(s, i)));
  }
}

void Buffer::resize(DType dtype, Dims shape) {
  check_dtype(dtype);
  check_no_negative(shape, "shape");
  const auto words = static_cast<std::size_t>(storage_words(dtype, shape));
  if (words > storage_.size()) storage_.resize(words);
  dtype_ = dtype;
  shape_ = shape;
  defined_ = true;
}

// ---- the activation of every layer ---------------------------------------------

namespace {

// Calls f(offset) for each element of t in row-major order (offsets in elements).
template <class F>
void for_each_offset(const TensorRef& t, F&& f) {
  const int rank = t.shape.size();
  std::int64_t index[kMaxRank] = {};
  std::int64_t offset = 0;
  for (std::int64_t n = 0, total = t.numel(); n < total; ++n) {
    f(offset);
    for (int d = rank - 1; d >= 0; --d) {
      if (++index[d] < t.shape[d]) {
        offset += t.strides[d];
        break;
      }
      offset -= (t.shape[d] - 1) * t.strides[d];
      index[d] = 0;
    }
  }
}

constexpr double kSqrtHalf = 0.70710678118654752440;  // 1 / sqrt(2)
constexpr double kSqrt2OverPi = 0.79788456080286535588;

double activate(double z, Activation act) {
  switch (act) {
    case Activation::none: return z;
    case Activation::relu: return z < 0 ? 0.0 : z;
    case Activation::silu: return z / (1.0 + std::exp(-z));
    case Activation::gelu: return 0.5 * z * std::erfc(-z * kSqrtHalf);
    case Activation::gelu_tanh: return 0.5 * z * (1.0 + std::tanh(kSqrt2OverPi * (z + 0.044715 * z * z * z)));
  }
  return z;
}

// d act(z) / dz.
double activation_derivative(double z, Activation act) {
  switch (act) {
    case Activation::none: return 1.0;
    case Activation::relu: return z > 0 ? 1.0 : 0.0;
    case Activation::silu: {
      const double s = 1.0 / (1.0 + std::exp(-z));
      return s * (1.0 + z * (1.0 - s));
    }
    case Activation::gelu: return 0.5 * std::erfc(-z * kSqrtHalf) + z * std::exp(-0.5 * z * z) * 0.39894228040143267794;
    case Activation::gelu_tanh: {
      const double t = std::tanh(kSqrt2OverPi * (z + 0.044715 * z * z * z));
      return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * kSqrt2OverPi * (1.0 + 3 * 0.044715 * z * z);
    }
  }
  return 1.0;
}

}  // namespace

void NormLayer::set_activation(Activation activation) {
  if (static_cast<int>(activation) > static_cast<int>(Activation::gelu_tanh))
    core::fail_value("activation: unknown value " + std::to_string(static_cast<int>(activation)));
  activation_ = activation;
}

Epilogue NormLayer::epilogue() const {
  Epilogue e;
  e.activation = activation_;
  return e;
}

void NormLayer::activate_saved(const TensorRef& y) {
  saved_z_.resize(y.dtype, y.shape);
  const TensorRef z = saved_z_.ref();
  std::int64_t i = 0;
  for_each_offset(y, [&](std::int64_t offset) {
    const double v = plan::read_element(y, offset);
    plan::write_element(z, i++, v);
    plan::write_element(y, offset, activate(v, activation_));
  });
}

TensorRef NormLayer::activation_grad(const TensorRef& dy) {
  if (activation_ == Activation::none) return dy;
  const TensorRef z = saved_z_.ref();
  if (!dy.given || dy.shape != z.shape || dy.dtype != z.dtype) return dy;  // the norm's backward names the error
  scratch_dy_.resize(dy.dtype, dy.shape);
  const TensorRef g = scratch_dy_.ref();
  std::int64_t i = 0;
  for_each_offset(dy, [&](std::int64_t offset) {
    plan::write_element(g, i, plan::read_element(dy, offset) * activation_derivative(plan::read_element(z, i), activation_));
    ++i;
  });
  return g;
}

// ---- the saved-state / scratch / gradient protocol of every layer -------------

void NormLayer::init_parameters(const Dims& shape, bool weight, bool bias) {
  weight_ = make_param(weight, dtype_, shape, 1.0);
  bias_ = make_param(bias, dtype_, shape, 0.0);
  grad_weight_ = make_param(weight, dtype_, shape, 0.0);
  grad_bias_ = make_param(bias, dtype_, shape, 0.0);
}

void NormLayer::clear_saved() {
  has_saved_ = false;
  saved_x_ = {};
}

void NormLayer::forward(const TensorRef& x, const TensorRef& y) {
  clear_saved();
  check_x_dtype(x, dtype_);
  const std::int64_t count = saved_count(x);
  // Keep x for backward: training mode, y did not overwrite x, and an x the norm accepts.
  const bool keep = training_ && !core::same_memory(x, y) && count >= 0;
  TensorRef mean, rstd;
  if (keep) {
    if (saves_mean_) mean = stats_output(saved_mean_, x.dtype, count);
    rstd = stats_output(saved_rstd_, x.dtype, count);
  }
  // A saving forward runs the norm plain into y (then activates y itself, keeping z).
  norm_forward({x, y, mean, rstd, keep ? Epilogue{} : epilogue()});
  if (!keep) return;
  if (activation_ != Activation::none) activate_saved(y);
  saved_x_ = x;
  has_saved_ = true;
}

void NormLayer::backward(const TensorRef& dy, const TensorRef& dx) {
  if (!has_saved_) no_saved_forward();
  const TensorRef dw = scratch_for(scratch_grad_weight_, weight_);
  const TensorRef db = scratch_for(scratch_grad_bias_, bias_);
  norm_backward({activation_grad(dy), saved_x_, saved_mean_.ref(), saved_rstd_.ref(), dx, dw, db});
  accumulate(grad_weight_, scratch_grad_weight_);
  accumulate(grad_bias_, scratch_grad_bias_);
  clear_saved();
}

void NormLayer::zero_grad() {
  grad_weight_.fill(0.0);
  grad_bias_.fill(0.0);
}

// ---- LayerNorm ------------------------------------------------------------------

LayerNorm::LayerNorm(Dims normalized_shape, double eps, bool elementwise_affine, bool bias, DType dtype)
    : NormLayer(dtype, /*saves_mean=*/true),
      normalized_shape_(normalized_shape),
      eps_(eps),
      elementwise_affine_(elementwise_affine) {
  check_normalized_shape(normalized_shape);
  core::check_eps(eps);
  check_dtype(dtype);
  init_parameters(normalized_shape, elementwise_affine, elementwise_affine && bias);
}

std::int64_t LayerNorm::saved_count(const TensorRef& x) const { return leading_rows(x, normalized_shape_.size()); }

void LayerNorm::norm_forward(const ForwardArgs& a) {
  layer_norm(a.x, a.y, normalized_shape_, weight_.ref(), bias_.ref(), eps_, a.mean, a.rstd, a.store);
}

void LayerNorm::norm_backward(const BackwardArgs& a) {
  layer_norm_backward(a.dy, a.x, a.mean, a.rstd, normalized_shape_, weight_.ref(), a.dx, a.dweight, a.dbias);
}

// ---- RMSNorm --------------------------------------------------------------------

RMSNorm::RMSNorm(Dims normalized_shape, std::optional<double> eps, bool elementwise_affine, DType dtype)
    : NormLayer(dtype, /*saves_mean=*/false),
      normalized_shape_(normalized_shape),
      eps_(eps),
      elementwise_affine_(elementwise_affine) {
  check_normalized_shape(normalized_shape);
  if (eps) core::check_eps(*eps);
  check_dtype(dtype);
  init_parameters(normalized_shape, elementwise_affine, /*bias=*/false);
}

std::int64_t RMSNorm::saved_count(const TensorRef& x) const { return leading_rows(x, normalized_shape_.size()); }

void RMSNorm::norm_forward(const ForwardArgs& a) {
  rms_norm(a.x, a.y, normalized_shape_, weight_.ref(), eps_, a.rstd, a.store);
}

void RMSNorm::norm_backward(const BackwardArgs& a) {
  rms_norm_backward(a.dy, a.x, a.rstd, normalized_shape_, weight_.ref(), a.dx, a.dweight);
}

// ---- RunningNorm (BatchNorm, InstanceNorm) --------------------------------------

RunningNorm::RunningNorm(std::int64_t num_features, double eps, std::optional<double> momentum, bool affine,
                         bool track_running_stats, std::optional<Layout> layout, DType dtype, bool per_instance)
    : NormLayer(dtype, /*saves_mean=*/true),
      num_features_(num_features),
      eps_(eps),
      momentum_(momentum),
      affine_(affine),
      track_running_stats_(track_running_stats),
      layout_(layout),
      per_instance_(per_instance) {
  check_positive(num_features, "num_features");
  core::check_eps(eps);
  check_momentum(momentum);
  check_dtype(dtype);
  if (layout) layout_rank(*layout);  // an unknown enum value is an Error
  init_parameters(Dims{num_features}, affine, affine);
  running_mean_ = make_param(track_running_stats, dtype, Dims{num_features}, 0.0);
  running_var_ = make_param(track_running_stats, dtype, Dims{num_features}, 1.0);
}

std::int64_t RunningNorm::saved_count(const TensorRef& x) const {
  const plan::ChannelGeometry g = plan::channel_geometry(x, layout_);
  if (affine_ || track_running_stats_) check_channels(g.c, num_features_, "num_features", x);
  return per_instance_ ? g.n * g.c : g.c;
}

// ---- BatchNorm ------------------------------------------------------------------

BatchNorm::BatchNorm(std::int64_t num_features, double eps, std::optional<double> momentum, bool affine,
                     bool track_running_stats, std::optional<Layout> layout, DType dtype)
    : RunningNorm(num_features, eps, momentum, affine, track_running_stats, layout, dtype, /*per_instance=*/false) {}

void BatchNorm::norm_forward(const ForwardArgs& a) {
  // As torch.nn.BatchNorm: batch statistics in training or without running
  // statistics; running statistics updated only in training when tracked.
  const bool update = training() && track_running_stats_;
  double factor = 0.0;
  if (update) factor = momentum_ ? *momentum_ : 1.0 / double(num_batches_tracked_ + 1);
  saved_input_stats_ = input_stats();
  batch_norm(a.x, a.y, running_mean_ref(), running_var_ref(), weight_.ref(), bias_.ref(), saved_input_stats_, factor,
             eps_, layout_, a.mean, a.rstd, a.store);
  if (update) ++num_batches_tracked_;
}

void BatchNorm::norm_backward(const BackwardArgs& a) {
  batch_norm_backward(a.dy, a.x, a.mean, a.rstd, weight_.ref(), a.dx, a.dweight, a.dbias, saved_input_stats_,
                      layout_);
}

void BatchNorm::fold(const TensorRef& weight, const TensorRef& bias, const TensorRef& folded_weight,
                     const TensorRef& folded_bias, bool transpose, std::int64_t groups) const {
  if (!track_running_stats_)
    core::fail_value("fold: needs running statistics (this BatchNorm has track_running_stats=false)");
  // The layer's vectors are its dtype: the weight must be that, or 16-bit with a float32 layer.
  if (weight.given && is_float(weight.dtype) && weight.dtype != dtype() &&
      !(dtype() == DType::float32 && is_16bit(weight.dtype)))
    core::fail_type("weight: dtype " + std::string(to_string(weight.dtype)) + " does not match the layer's " +
                    to_string(dtype()) + " (weight must have the layer's dtype, or be float16/bfloat16 with a " +
                    "float32 layer)");
  // C_out must be num_features (malformed weights and groups: fold_batch_norm reports them).
  if (weight.given && groups > 0 && weight.shape.size() >= (transpose ? 2 : 1)) {
    const std::int64_t c_out = transpose ? weight.shape[1] * groups : weight.shape[0];
    if (c_out != num_features_)
      core::fail_value("weight: has " + std::to_string(c_out) + " output channels (shape " +
                       weight.shape.to_string() + (transpose ? ", transposed, groups " + std::to_string(groups) : "") +
                       "), the layer " + std::to_string(num_features_) + " (num_features)");
  }
  fold_batch_norm(weight, bias, running_mean_.ref(), running_var_.ref(), eps_, weight_.ref(), bias_.ref(),
                  folded_weight, folded_bias, transpose, groups);
}

// ---- InstanceNorm ---------------------------------------------------------------

InstanceNorm::InstanceNorm(std::int64_t num_features, double eps, std::optional<double> momentum, bool affine,
                           bool track_running_stats, std::optional<Layout> layout, DType dtype)
    : RunningNorm(num_features, eps, momentum, affine, track_running_stats, layout, dtype, /*per_instance=*/true) {}

void InstanceNorm::norm_forward(const ForwardArgs& a) {
  // As torch.nn.InstanceNorm*d: F.instance_norm(x, running_mean, running_var,
  // weight, bias, training or not track_running_stats, momentum or 0.0, eps).
  saved_input_stats_ = input_stats();
  instance_norm(a.x, a.y, running_mean_ref(), running_var_ref(), weight_.ref(), bias_.ref(), saved_input_stats_,
                momentum_.value_or(0.0), eps_, layout_, a.mean, a.rstd, a.store);
}

void InstanceNorm::norm_backward(const BackwardArgs& a) {
  instance_norm_backward(a.dy, a.x, a.mean, a.rstd, weight_.ref(), a.dx, a.dweight, a.dbias, saved_input_stats_,
                         layout_);
}

// ---- GroupNorm ------------------------------------------------------------------

GroupNorm::GroupNorm(std::int64_t num_groups, std::int64_t num_channels, double eps, bool affine,
                     std::optional<Layout> layout, DType dtype)
    : NormLayer(dtype, /*saves_mean=*/true),
      num_groups_(num_groups),
      num_channels_(num_channels),
      eps_(eps),
      affine_(affine),
      layout_(layout) {
  check_positive(num_groups, "num_groups");
  check_positive(num_channels, "num_channels");
  if (num_channels % num_groups != 0)
    core::fail_value("num_groups: must divide num_channels, got num_groups=" + std::to_string(num_groups) +
                     ", num_channels=" + std::to_string(num_channels));
  core::check_eps(eps);
  check_dtype(dtype);
  if (layout) layout_rank(*layout);
  init_parameters(Dims{num_channels}, affine, affine);
}

std::int64_t GroupNorm::saved_count(const TensorRef& x) const {
  const plan::ChannelGeometry g = plan::channel_geometry(x, layout_);
  if (affine_) check_channels(g.c, num_channels_, "num_channels", x);
  return g.n * num_groups_;
}

void GroupNorm::norm_forward(const ForwardArgs& a) {
  group_norm(a.x, a.y, num_groups_, weight_.ref(), bias_.ref(), eps_, layout_, a.mean, a.rstd, a.store);
}

void GroupNorm::norm_backward(const BackwardArgs& a) {
  group_norm_backward(a.dy, a.x, a.mean, a.rstd, num_groups_, weight_.ref(), a.dx, a.dweight, a.dbias, layout_);
}

}  // namespace normkit
