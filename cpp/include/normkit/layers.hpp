// normkit/layers.hpp - stateful layer objects, as torch.nn modules are.
//
// Each layer owns its parameters (weight, bias), their gradients and, where the
// norm has them, its running statistics, in contiguous buffers of the layer's
// dtype (float32 by default). Constructor arguments and defaults are PyTorch's.
//
//   normkit::LayerNorm ln({768});
//   ln.forward(x, y);          // training mode: saves what backward needs
//   ln.backward(dy, dx);       // dx; grad_weight/grad_bias accumulate
//   ln.zero_grad();
//   ln.eval();                 // inference: nothing saved
//
// forward(x, y) takes views as the free functions do (normkit/norms.hpp). In
// training mode it keeps a view of x, not a copy: x must stay alive and
// unchanged until backward(). backward(dy, dx) needs a training-mode forward
// since the last backward (otherwise an Error), writes dx (x's shape and dtype)
// and adds the weight/bias gradients to grad_weight()/grad_bias().
// Inputs may be float32, float64, float16 or bfloat16: x of the layer's dtype,
// or 16-bit x with a float32 layer (float32 parameters, as in mixed precision);
// any other x dtype is an Error (kind type). The statistics saved for backward
// have stats_dtype(x.dtype) (float32, or float64 for float64 x).
// Errors are normkit::Error naming the argument.
//
// Saved state (what PyTorch keeps in the autograd graph):
// - forward in training mode saves a view of x plus the statistics; forward in
//   eval mode saves nothing and drops what an earlier forward saved. A forward
//   that throws also leaves nothing saved.
// - an in-place forward (y is x) computes y but saves nothing: x is gone, so a
//   following backward() is an Error rather than a wrong gradient.
// - backward() consumes the saved state: a second backward() needs a new forward.
//   A backward() that throws (e.g. dy of the wrong shape) changes nothing: the
//   state stays saved and the gradients untouched.
// - the statistics buffers keep their storage from call to call and grow only
//   when a larger input needs it.
//
// Parameters start as in PyTorch: weight 1, bias 0, running_mean 0,
// running_var 1, num_batches_tracked 0; gradients 0 (defined whenever the
// parameter is). Constructor arguments are checked: num_features /
// num_channels / num_groups > 0, num_groups dividing num_channels, eps finite
// and >= 0, momentum finite, normalized_shape non-empty without negative
// extents, dtype one of the four.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "normkit/fused.hpp"
#include "normkit/layout.hpp"
#include "normkit/tensor.hpp"

namespace normkit {

// A small owned, contiguous array (parameters, gradients, running statistics).
// Its storage never moves after construction (only resize() may move it), so
// views of it stay valid. Buffer() is undefined: no storage, ref() not given.
class Buffer {
 public:
  // An undefined buffer (an absent parameter).
  Buffer() = default;
  // A defined `dtype` array of `shape`, every element `fill`.
  Buffer(DType dtype, Dims shape, double fill = 0.0);

  // False for an absent parameter (e.g. bias=false).
  bool defined() const { return defined_; }
  // The element type of the storage.
  DType dtype() const { return dtype_; }
  // The shape (row-major contiguous).
  const Dims& shape() const { return shape_; }
  // Number of elements (0 when undefined).
  std::int64_t numel() const { return defined_ ? shape_.product() : 0; }
  // The raw storage: numel() elements of dtype(); cast to float* etc.
  void* data() { return storage_.data(); }
  const void* data() const { return storage_.data(); }
  // A view of the buffer; not given (TensorRef{}) when the buffer is undefined.
  TensorRef ref() const;

  // Sets every element to `value` (converted to the buffer's dtype).
  void fill(double value);
  // Copies `src` (same shape; any normkit dtype, converted; any strides) into
  // the buffer. A wrong shape, an undefined buffer or a missing src is an Error
  // naming `name` ("weight: expected shape (768,), got (3,)").
  void assign(const TensorRef& src, const char* name);
  // Adds `src` (same shape and dtype as the buffer) elementwise.
  void add(const Buffer& src);
  // Scratch use (the layers' saved statistics): makes the buffer a defined
  // `dtype` array of `shape`, contents unspecified. The storage is kept when it
  // is large enough and grows otherwise (then earlier views of it are invalid).
  void resize(DType dtype, Dims shape);

 private:
  DType dtype_ = DType::float32;
  Dims shape_;
  std::vector<double> storage_;  // doubles: 8-byte aligned storage for any dtype
  bool defined_ = false;
};

// What every layer shares: the training flag, the activation, the parameters
// and their gradients, and the protocol above, written once: forward drops what
// was saved, runs the norm and (training mode, not in place) saves x, the
// statistics and the pre-activation; backward needs that saved forward, runs the
// norm's backward into scratch gradients, adds them to grad_weight/grad_bias and
// drops the saved state. A norm's class says only its parameters, how many
// statistics a forward of x saves, and which norm functions it calls.
class NormLayer {
 public:
  virtual ~NormLayer() = default;

  // y = the norm of x with the layer's parameters; in training mode saves what backward needs.
  void forward(const TensorRef& x, const TensorRef& y);
  // dx from dy and the saved forward; adds the parameter gradients to grad_weight/grad_bias.
  void backward(const TensorRef& dy, const TensorRef& dx);
  // Sets the parameter gradients to zero.
  void zero_grad();

  // The layer's dtype (its parameters, gradients and running statistics).
  DType dtype() const { return dtype_; }
  // True in training mode (the default).
  bool training() const { return training_; }
  // Training mode (mode = true) or eval mode (false).
  void train(bool mode = true) { training_ = mode; }
  // Eval mode: running statistics, nothing saved for backward.
  void eval() { train(false); }
  // An activation after the affine (normkit/fused.hpp): y = act(norm(x)).
  // In eval mode (or in place) it is the fused store stage; a training-mode
  // forward keeps the pre-activation z (x's dtype) so that backward() applies
  // act'(z) to dy before the norm's own gradient.
  Activation activation() const { return activation_; }
  void set_activation(Activation activation);

 protected:
  // `dtype` is stored unchecked (each class checks its arguments in its own
  // order); `saves_mean`: whether the saved statistics include a mean.
  NormLayer(DType dtype, bool saves_mean) : dtype_(dtype), saves_mean_(saves_mean) {}
  NormLayer(const NormLayer&) = default;
  NormLayer(NormLayer&&) = default;
  NormLayer& operator=(const NormLayer&) = default;
  NormLayer& operator=(NormLayer&&) = default;

  // Makes the weight (ones), the bias (zeros) and their gradients (zeros), of
  // `shape` and the layer's dtype, each only when asked for (else undefined).
  void init_parameters(const Dims& shape, bool weight, bool bias);
  // The parameters and their gradients; public (weight(), bias(), ...) in the
  // classes that have them, undefined when absent.
  Buffer& weight() { return weight_; }
  Buffer& bias() { return bias_; }
  Buffer& grad_weight() { return grad_weight_; }
  Buffer& grad_bias() { return grad_bias_; }
  Buffer weight_, bias_, grad_weight_, grad_bias_;

  // What the protocol hands a norm's forward: mean and rstd given when the
  // forward saves (else not given); `store` the store stage (the activation
  // when nothing is saved, else none: forward then activates y itself).
  struct ForwardArgs {
    const TensorRef &x, &y, &mean, &rstd;
    const Epilogue& store;
  };
  // What it hands a norm's backward: dy with act'(z) applied, the saved x, mean
  // and rstd, dx, and dweight/dbias (scratch, given when the parameter is).
  struct BackwardArgs {
    const TensorRef &dy, &x, &mean, &rstd, &dx, &dweight, &dbias;
  };

 private:
  // What each norm says. Checks x against the layer (its channel count) and
  // returns how many statistics (mean and rstd each) a training-mode forward of
  // x saves; -1 for an x the norm will reject (the forward then saves nothing
  // and the norm names the error).
  virtual std::int64_t saved_count(const TensorRef& x) const = 0;
  // Runs the norm: y from x with the layer's parameters.
  virtual void norm_forward(const ForwardArgs& a) = 0;
  // Runs the norm's backward: dx, and dweight/dbias, from dy and the saved forward.
  virtual void norm_backward(const BackwardArgs& a) = 0;

  // The store stage of a forward that saves nothing.
  Epilogue epilogue() const;
  // y holds z: saves it, then overwrites y with act(z).
  void activate_saved(const TensorRef& y);
  // dy itself, or dy * act'(z) (into a buffer of this layer) for the norm's backward.
  TensorRef activation_grad(const TensorRef& dy);
  // Drops the saved forward.
  void clear_saved();

  DType dtype_;
  bool saves_mean_;
  bool training_ = true;
  Activation activation_ = Activation::none;
  Buffer scratch_grad_weight_, scratch_grad_bias_;  // one backward's gradients, before they are added
  TensorRef saved_x_;
  Buffer saved_mean_, saved_rstd_, saved_z_, scratch_dy_;
  bool has_saved_ = false;
};

// torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True).
class LayerNorm : public NormLayer {
 public:
  explicit LayerNorm(Dims normalized_shape, double eps = 1e-5, bool elementwise_affine = true, bool bias = true,
                     DType dtype = DType::float32);

  // The constructor's arguments.
  const Dims& normalized_shape() const { return normalized_shape_; }
  double eps() const { return eps_; }
  bool elementwise_affine() const { return elementwise_affine_; }
  // Parameters and their gradients (shape normalized_shape, the layer's dtype);
  // undefined when absent (elementwise_affine=false, bias=false).
  using NormLayer::bias;
  using NormLayer::grad_bias;
  using NormLayer::grad_weight;
  using NormLayer::weight;

 private:
  std::int64_t saved_count(const TensorRef& x) const override;
  void norm_forward(const ForwardArgs& a) override;
  void norm_backward(const BackwardArgs& a) override;

  Dims normalized_shape_;
  double eps_;
  bool elementwise_affine_;
};

// torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True);
// eps = nullopt: the machine epsilon of x's dtype.
class RMSNorm : public NormLayer {
 public:
  explicit RMSNorm(Dims normalized_shape, std::optional<double> eps = std::nullopt, bool elementwise_affine = true,
                   DType dtype = DType::float32);

  // The constructor's arguments.
  const Dims& normalized_shape() const { return normalized_shape_; }
  std::optional<double> eps() const { return eps_; }
  bool elementwise_affine() const { return elementwise_affine_; }
  // The weight and its gradient (undefined when elementwise_affine=false).
  using NormLayer::grad_weight;
  using NormLayer::weight;

 private:
  std::int64_t saved_count(const TensorRef& x) const override;
  void norm_forward(const ForwardArgs& a) override;
  void norm_backward(const BackwardArgs& a) override;

  Dims normalized_shape_;
  std::optional<double> eps_;
  bool elementwise_affine_;
};

// What BatchNorm and InstanceNorm share: PyTorch's constructor arguments
// (num_features, eps, momentum, affine, track_running_stats) plus layout, checked
// alike; per-channel parameters (C); running statistics and num_batches_tracked;
// the channel check of x; and whether a forward uses the input's statistics
// (training, or not tracking) or the running ones.
class RunningNorm : public NormLayer {
 public:
  // The constructor's arguments.
  std::int64_t num_features() const { return num_features_; }
  double eps() const { return eps_; }
  std::optional<double> momentum() const { return momentum_; }
  bool affine() const { return affine_; }
  bool track_running_stats() const { return track_running_stats_; }
  std::optional<Layout> layout() const { return layout_; }
  // Parameters (C) and their gradients; undefined unless affine.
  using NormLayer::bias;
  using NormLayer::grad_bias;
  using NormLayer::grad_weight;
  using NormLayer::weight;
  // Running statistics (C), undefined unless track_running_stats; the training-step
  // count (BatchNorm counts it; InstanceNorm never increments it).
  Buffer& running_mean() { return running_mean_; }
  Buffer& running_var() { return running_var_; }
  std::int64_t& num_batches_tracked() { return num_batches_tracked_; }

 protected:
  // Checks the arguments (num_features, eps, momentum, dtype, layout, in that
  // order) and makes the buffers. per_instance: statistics per (N, C) rather than (C).
  RunningNorm(std::int64_t num_features, double eps, std::optional<double> momentum, bool affine,
              bool track_running_stats, std::optional<Layout> layout, DType dtype, bool per_instance);
  // True when a forward now uses the input's statistics: training, or not tracking.
  bool input_stats() const { return training() || !track_running_stats_; }
  // The running statistics as the norm functions take them: not given unless tracked.
  TensorRef running_mean_ref() const { return track_running_stats_ ? running_mean_.ref() : TensorRef{}; }
  TensorRef running_var_ref() const { return track_running_stats_ ? running_var_.ref() : TensorRef{}; }

  std::int64_t num_features_;
  double eps_;
  std::optional<double> momentum_;
  bool affine_, track_running_stats_;
  std::optional<Layout> layout_;
  Buffer running_mean_, running_var_;
  std::int64_t num_batches_tracked_ = 0;
  bool saved_input_stats_ = true;  // backward through the input's statistics? (set by each forward)

 private:
  // Checks x's channel count (when the layer has per-channel buffers); C or N * C.
  std::int64_t saved_count(const TensorRef& x) const override;

  bool per_instance_;
};

// torch.nn.BatchNorm1d/2d/3d in one class: BatchNorm(num_features, eps=1e-5,
// momentum=0.1, affine=True, track_running_stats=True, layout). The layout
// defaults to the channels-first layout of x's rank (NC, NCL, NCHW, NCDHW).
// momentum = nullopt: cumulative moving average (factor 1 / num_batches_tracked).
// Training: batch statistics, running statistics updated (if tracked; the
// running variance with the unbiased batch variance), num_batches_tracked += 1
// (also for an empty x, whose running statistics stay as they are, as in
// PyTorch; not when forward throws). Eval: running statistics if tracked, else
// batch ones. Saved statistics: (C). x's channel count must be num_features
// when the layer has per-channel buffers (affine or track_running_stats);
// without any, any channel count is accepted, as in PyTorch.
class BatchNorm : public RunningNorm {
 public:
  explicit BatchNorm(std::int64_t num_features, double eps = 1e-5, std::optional<double> momentum = 0.1,
                     bool affine = true, bool track_running_stats = true,
                     std::optional<Layout> layout = std::nullopt, DType dtype = DType::float32);
  // Folds this layer, in inference form, into the convolution or linear layer
  // before it: fold_batch_norm (normkit/fused.hpp) with the running statistics,
  // eps and (if affine) weight/bias as the BN arguments. C_out must be
  // num_features; weight's dtype the layer's, or 16-bit with a float32 layer.
  // Needs track_running_stats (otherwise an Error); does not change the layer.
  void fold(const TensorRef& weight, const TensorRef& bias, const TensorRef& folded_weight,
            const TensorRef& folded_bias, bool transpose = false, std::int64_t groups = 1) const;

 private:
  void norm_forward(const ForwardArgs& a) override;
  void norm_backward(const BackwardArgs& a) override;
};

// torch.nn.InstanceNorm1d/2d/3d in one class: InstanceNorm(num_features,
// eps=1e-5, momentum=0.1, affine=False, track_running_stats=False, layout).
// Uses input statistics in training or when not tracking; the running ones in eval.
// As torch.nn.InstanceNorm*d: training with track_running_stats updates the
// running statistics with factor momentum (the batch mean of the per-instance
// statistics; unbiased variance), and momentum = nullopt leaves them unchanged
// (PyTorch passes momentum 0.0 then); num_batches_tracked is kept for
// state_dict compatibility but never incremented (PyTorch's InstanceNorm never
// does). Saved statistics: (N, C). Channel count: as BatchNorm.
class InstanceNorm : public RunningNorm {
 public:
  explicit InstanceNorm(std::int64_t num_features, double eps = 1e-5, std::optional<double> momentum = 0.1,
                        bool affine = false, bool track_running_stats = false,
                        std::optional<Layout> layout = std::nullopt, DType dtype = DType::float32);

 private:
  void norm_forward(const ForwardArgs& a) override;
  void norm_backward(const BackwardArgs& a) override;
};

// torch.nn.GroupNorm(num_groups, num_channels, eps=1e-5, affine=True), plus layout.
// Saved statistics: (N, num_groups). x's channel count must be num_channels
// when affine; without parameters any count divisible by num_groups is
// accepted, as in PyTorch.
class GroupNorm : public NormLayer {
 public:
  GroupNorm(std::int64_t num_groups, std::int64_t num_channels, double eps = 1e-5, bool affine = true,
            std::optional<Layout> layout = std::nullopt, DType dtype = DType::float32);

  // The constructor's arguments.
  std::int64_t num_groups() const { return num_groups_; }
  std::int64_t num_channels() const { return num_channels_; }
  double eps() const { return eps_; }
  bool affine() const { return affine_; }
  std::optional<Layout> layout() const { return layout_; }
  // Parameters (C) and their gradients; undefined unless affine.
  using NormLayer::bias;
  using NormLayer::grad_bias;
  using NormLayer::grad_weight;
  using NormLayer::weight;

 private:
  std::int64_t saved_count(const TensorRef& x) const override;
  void norm_forward(const ForwardArgs& a) override;
  void norm_backward(const BackwardArgs& a) override;

  std::int64_t num_groups_, num_channels_;
  double eps_;
  bool affine_;
  std::optional<Layout> layout_;
};

}  // namespace normkit
