// layers/layers.cpp - the stateful layer classes (normkit/layers.hpp).
//
// Each layer is a thin owner of buffers around the free functions of
// normkit/norms.hpp: forward calls the norm with the layer's parameters (and,
// in training mode, statistics outputs it keeps for backward); backward calls
// the matching *_backward function, with the weight/bias gradients written
// into scratch buffers and then added to grad_weight/grad_bias.
#include "normkit/layers.hpp"

#include <cmath>
#include <string>
#include <vector>

#include "core/check.hpp"
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

// Whether to keep x for backward: training mode, and y did not overwrite x.
bool keeps_x(bool training, const TensorRef& x, const TensorRef& y) {
  return training && !core::same_memory(x, y);
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

// ---- LayerNorm ------------------------------------------------------------------

LayerNorm::LayerNorm(Dims normalized_shape, double eps, bool elementwise_affine, bool bias, DType dtype)
    : normalized_shape_(normalized_shape), eps_(eps), elementwise_affine_(elementwise_affine), dtype_(dtype) {
  check_normalized_shape(normalized_shape);
  core::check_eps(eps);
  check_dtype(dtype);
  weight_ = make_param(elementwise_affine, dtype, normalized_shape, 1.0);
  bias_ = make_param(elementwise_affine && bias, dtype, normalized_shape, 0.0);
  grad_weight_ = make_param(weight_.defined(), dtype, normalized_shape, 0.0);
  grad_bias_ = make_param(bias_.defined(), dtype, normalized_shape, 0.0);
}

void LayerNorm::forward(const TensorRef& x, const TensorRef& y) {
  has_saved_ = false;
  saved_x_ = {};
  check_x_dtype(x, dtype_);
  const bool keep = keeps_x(training_, x, y);
  const std::int64_t rows = keep ? leading_rows(x, normalized_shape_.size()) : -1;
  if (rows < 0) {  // eval, in place, or an x the norm will reject
    layer_norm(x, y, normalized_shape_, weight_.ref(), bias_.ref(), eps_);
    return;
  }
  layer_norm(x, y, normalized_shape_, weight_.ref(), bias_.ref(), eps_, stats_output(saved_mean_, x.dtype, rows),
             stats_output(saved_rstd_, x.dtype, rows));
  saved_x_ = x;
  has_saved_ = true;
}

void LayerNorm::backward(const TensorRef& dy, const TensorRef& dx) {
  if (!has_saved_) no_saved_forward();
  const TensorRef dw = scratch_for(scratch_grad_weight_, weight_);
  const TensorRef db = scratch_for(scratch_grad_bias_, bias_);
  layer_norm_backward(dy, saved_x_, saved_mean_.ref(), saved_rstd_.ref(), normalized_shape_, weight_.ref(), dx, dw,
                      db);
  accumulate(grad_weight_, scratch_grad_weight_);
  accumulate(grad_bias_, scratch_grad_bias_);
  has_saved_ = false;
  saved_x_ = {};
}

void LayerNorm::zero_grad() {
  grad_weight_.fill(0.0);
  grad_bias_.fill(0.0);
}

// ---- RMSNorm --------------------------------------------------------------------

RMSNorm::RMSNorm(Dims normalized_shape, std::optional<double> eps, bool elementwise_affine, DType dtype)
    : normalized_shape_(normalized_shape), eps_(eps), elementwise_affine_(elementwise_affine), dtype_(dtype) {
  check_normalized_shape(normalized_shape);
  if (eps) core::check_eps(*eps);
  check_dtype(dtype);
  weight_ = make_param(elementwise_affine, dtype, normalized_shape, 1.0);
  grad_weight_ = make_param(weight_.defined(), dtype, normalized_shape, 0.0);
}

void RMSNorm::forward(const TensorRef& x, const TensorRef& y) {
  has_saved_ = false;
  saved_x_ = {};
  check_x_dtype(x, dtype_);
  const bool keep = keeps_x(training_, x, y);
  const std::int64_t rows = keep ? leading_rows(x, normalized_shape_.size()) : -1;
  if (rows < 0) {
    rms_norm(x, y, normalized_shape_, weight_.ref(), eps_);
    return;
  }
  rms_norm(x, y, normalized_shape_, weight_.ref(), eps_, stats_output(saved_rstd_, x.dtype, rows));
  saved_x_ = x;
  has_saved_ = true;
}

void RMSNorm::backward(const TensorRef& dy, const TensorRef& dx) {
  if (!has_saved_) no_saved_forward();
  const TensorRef dw = scratch_for(scratch_grad_weight_, weight_);
  rms_norm_backward(dy, saved_x_, saved_rstd_.ref(), normalized_shape_, weight_.ref(), dx, dw);
  accumulate(grad_weight_, scratch_grad_weight_);
  has_saved_ = false;
  saved_x_ = {};
}

void RMSNorm::zero_grad() { grad_weight_.fill(0.0); }

// ---- BatchNorm ------------------------------------------------------------------

namespace {

// What BatchNorm and InstanceNorm check of their constructor arguments.
void check_running_layer(std::int64_t num_features, double eps, const std::optional<double>& momentum,
                         const std::optional<Layout>& layout, DType dtype) {
  check_positive(num_features, "num_features");
  core::check_eps(eps);
  check_momentum(momentum);
  check_dtype(dtype);
  if (layout) layout_rank(*layout);  // an unknown enum value is an Error
}

// Per-channel weight (ones), bias (zeros) and their gradients, when affine.
void make_channel_affine(bool affine, DType dtype, std::int64_t channels, Buffer& weight, Buffer& bias,
                         Buffer& grad_weight, Buffer& grad_bias) {
  const Dims c{channels};
  weight = make_param(affine, dtype, c, 1.0);
  bias = make_param(affine, dtype, c, 0.0);
  grad_weight = make_param(affine, dtype, c, 0.0);
  grad_bias = make_param(affine, dtype, c, 0.0);
}

}  // namespace

BatchNorm::BatchNorm(std::int64_t num_features, double eps, std::optional<double> momentum, bool affine,
                     bool track_running_stats, std::optional<Layout> layout, DType dtype)
    : num_features_(num_features),
      eps_(eps),
      momentum_(momentum),
      affine_(affine),
      track_running_stats_(track_running_stats),
      layout_(layout),
      dtype_(dtype) {
  check_running_layer(num_features, eps, momentum, layout, dtype);
  make_channel_affine(affine, dtype, num_features, weight_, bias_, grad_weight_, grad_bias_);
  running_mean_ = make_param(track_running_stats, dtype, Dims{num_features}, 0.0);
  running_var_ = make_param(track_running_stats, dtype, Dims{num_features}, 1.0);
}

void BatchNorm::forward(const TensorRef& x, const TensorRef& y) {
  has_saved_ = false;
  saved_x_ = {};
  check_x_dtype(x, dtype_);
  const plan::ChannelGeometry g = plan::channel_geometry(x, layout_);
  if (affine_ || track_running_stats_) check_channels(g.c, num_features_, "num_features", x);

  // As torch.nn.BatchNorm: batch statistics in training or without running
  // statistics; running statistics updated only in training when tracked.
  const bool batch_stats = training_ || !track_running_stats_;
  const bool update = training_ && track_running_stats_;
  const TensorRef rm = track_running_stats_ ? running_mean_.ref() : TensorRef{};
  const TensorRef rv = track_running_stats_ ? running_var_.ref() : TensorRef{};
  double factor = 0.0;
  if (update) factor = momentum_ ? *momentum_ : 1.0 / double(num_batches_tracked_ + 1);

  const bool keep = keeps_x(training_, x, y);
  TensorRef mean, rstd;
  if (keep) {
    mean = stats_output(saved_mean_, x.dtype, g.c);
    rstd = stats_output(saved_rstd_, x.dtype, g.c);
  }
  batch_norm(x, y, rm, rv, weight_.ref(), bias_.ref(), batch_stats, factor, eps_, layout_, mean, rstd);
  if (update) ++num_batches_tracked_;
  if (keep) {
    saved_x_ = x;
    saved_training_stats_ = batch_stats;
    has_saved_ = true;
  }
}

void BatchNorm::backward(const TensorRef& dy, const TensorRef& dx) {
  if (!has_saved_) no_saved_forward();
  const TensorRef dw = scratch_for(scratch_grad_weight_, weight_);
  const TensorRef db = scratch_for(scratch_grad_bias_, bias_);
  batch_norm_backward(dy, saved_x_, saved_mean_.ref(), saved_rstd_.ref(), weight_.ref(), dx, dw, db,
                      saved_training_stats_, layout_);
  accumulate(grad_weight_, scratch_grad_weight_);
  accumulate(grad_bias_, scratch_grad_bias_);
  has_saved_ = false;
  saved_x_ = {};
}

void BatchNorm::zero_grad() {
  grad_weight_.fill(0.0);
  grad_bias_.fill(0.0);
}

// ---- InstanceNorm ---------------------------------------------------------------

InstanceNorm::InstanceNorm(std::int64_t num_features, double eps, std::optional<double> momentum, bool affine,
                           bool track_running_stats, std::optional<Layout> layout, DType dtype)
    : num_features_(num_features),
      eps_(eps),
      momentum_(momentum),
      affine_(affine),
      track_running_stats_(track_running_stats),
      layout_(layout),
      dtype_(dtype) {
  check_running_layer(num_features, eps, momentum, layout, dtype);
  make_channel_affine(affine, dtype, num_features, weight_, bias_, grad_weight_, grad_bias_);
  running_mean_ = make_param(track_running_stats, dtype, Dims{num_features}, 0.0);
  running_var_ = make_param(track_running_stats, dtype, Dims{num_features}, 1.0);
}

void InstanceNorm::forward(const TensorRef& x, const TensorRef& y) {
  has_saved_ = false;
  saved_x_ = {};
  check_x_dtype(x, dtype_);
  const plan::ChannelGeometry g = plan::channel_geometry(x, layout_);
  if (affine_ || track_running_stats_) check_channels(g.c, num_features_, "num_features", x);

  // As torch.nn.InstanceNorm*d: F.instance_norm(x, running_mean, running_var,
  // weight, bias, training or not track_running_stats, momentum or 0.0, eps).
  const bool input_stats = training_ || !track_running_stats_;
  const TensorRef rm = track_running_stats_ ? running_mean_.ref() : TensorRef{};
  const TensorRef rv = track_running_stats_ ? running_var_.ref() : TensorRef{};
  const double factor = momentum_.value_or(0.0);

  const bool keep = keeps_x(training_, x, y);
  TensorRef mean, rstd;
  if (keep) {
    mean = stats_output(saved_mean_, x.dtype, g.n * g.c);
    rstd = stats_output(saved_rstd_, x.dtype, g.n * g.c);
  }
  instance_norm(x, y, rm, rv, weight_.ref(), bias_.ref(), input_stats, factor, eps_, layout_, mean, rstd);
  if (keep) {
    saved_x_ = x;
    saved_input_stats_ = input_stats;
    has_saved_ = true;
  }
}

void InstanceNorm::backward(const TensorRef& dy, const TensorRef& dx) {
  if (!has_saved_) no_saved_forward();
  const TensorRef dw = scratch_for(scratch_grad_weight_, weight_);
  const TensorRef db = scratch_for(scratch_grad_bias_, bias_);
  instance_norm_backward(dy, saved_x_, saved_mean_.ref(), saved_rstd_.ref(), weight_.ref(), dx, dw, db,
                         saved_input_stats_, layout_);
  accumulate(grad_weight_, scratch_grad_weight_);
  accumulate(grad_bias_, scratch_grad_bias_);
  has_saved_ = false;
  saved_x_ = {};
}

void InstanceNorm::zero_grad() {
  grad_weight_.fill(0.0);
  grad_bias_.fill(0.0);
}

// ---- GroupNorm ------------------------------------------------------------------

GroupNorm::GroupNorm(std::int64_t num_groups, std::int64_t num_channels, double eps, bool affine,
                     std::optional<Layout> layout, DType dtype)
    : num_groups_(num_groups),
      num_channels_(num_channels),
      eps_(eps),
      affine_(affine),
      layout_(layout),
      dtype_(dtype) {
  check_positive(num_groups, "num_groups");
  check_positive(num_channels, "num_channels");
  if (num_channels % num_groups != 0)
    core::fail_value("num_groups: must divide num_channels, got num_groups=" + std::to_string(num_groups) +
                     ", num_channels=" + std::to_string(num_channels));
  core::check_eps(eps);
  check_dtype(dtype);
  if (layout) layout_rank(*layout);
  make_channel_affine(affine, dtype, num_channels, weight_, bias_, grad_weight_, grad_bias_);
}

void GroupNorm::forward(const TensorRef& x, const TensorRef& y) {
  has_saved_ = false;
  saved_x_ = {};
  check_x_dtype(x, dtype_);
  const plan::ChannelGeometry g = plan::channel_geometry(x, layout_);
  if (affine_) check_channels(g.c, num_channels_, "num_channels", x);

  const bool keep = keeps_x(training_, x, y);
  TensorRef mean, rstd;
  if (keep) {
    mean = stats_output(saved_mean_, x.dtype, g.n * num_groups_);
    rstd = stats_output(saved_rstd_, x.dtype, g.n * num_groups_);
  }
  group_norm(x, y, num_groups_, weight_.ref(), bias_.ref(), eps_, layout_, mean, rstd);
  if (keep) {
    saved_x_ = x;
    has_saved_ = true;
  }
}

void GroupNorm::backward(const TensorRef& dy, const TensorRef& dx) {
  if (!has_saved_) no_saved_forward();
  const TensorRef dw = scratch_for(scratch_grad_weight_, weight_);
  const TensorRef db = scratch_for(scratch_grad_bias_, bias_);
  group_norm_backward(dy, saved_x_, saved_mean_.ref(), saved_rstd_.ref(), num_groups_, weight_.ref(), dx, dw, db,
                      layout_);
  accumulate(grad_weight_, scratch_grad_weight_);
  accumulate(grad_bias_, scratch_grad_bias_);
  has_saved_ = false;
  saved_x_ = {};
}

void GroupNorm::zero_grad() {
  grad_weight_.fill(0.0);
  grad_bias_.fill(0.0);
}

}  // namespace normkit
