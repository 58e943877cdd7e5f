// cuda/cuda_norms.cpp - the normkit::cuda entry points (normkit/cuda.hpp).
//
// Each validates its arguments with the same checks as the CPU entry point
// (norms/checks.hpp, plan/*: none reads an element), checks that every view
// is memory of x's device, converts the small parameter tensors to the
// accumulation type on the device when they are not already, and queues the
// kernels of cuda/launch.hpp on the caller's stream. Nothing here waits for
// the device.
//
// Every norm maps onto two problems, as on the CPU:
//   rows     LayerNorm, RMSNorm                        rows_forward / rows_backward
//   channels BatchNorm, InstanceNorm, GroupNorm, AdaIN  channel_stats -> fold_forward -> channel_apply,
//                                                       channel_backward (-> style_grad)
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "core/check.hpp"
#include "cuda/launch.hpp"
#include "normkit/cuda.hpp"
#include "norms/checks.hpp"
#include "plan/channel_plan.hpp"
#include "plan/rows_plan.hpp"

namespace normkit::cuda {

namespace ck = cuda_kernels;
using norms::ChannelGeometry;

bool built() noexcept { return true; }

int device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" / "no device" status
    return 0;
  }
  return count;
}

namespace {

[[noreturn]] void fail_runtime(const std::string& message) { throw Error(ErrorKind::runtime, message); }

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();
    fail_runtime(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(status) + " (" +
                 cudaGetErrorString(status) + ")");
  }
}

DType acc_dtype(DType x) { return x == DType::float64 ? DType::float64 : DType::float32; }

// The device a view's memory belongs to; an Error naming the argument when it
// is not device (or managed) memory.
int device_of(const TensorRef& t, const char* name) {
  cudaPointerAttributes a{};
  const cudaError_t status = cudaPointerGetAttributes(&a, t.data);
  if (status != cudaSuccess) {
    cudaGetLastError();
    core::fail_value(std::string(name) + ": is not CUDA memory (" + cudaGetErrorString(status) +
                     "); normkit::cuda functions take device memory");
  }
  if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged)
    core::fail_value(std::string(name) +
                     ": is host memory; normkit::cuda functions take device memory (use normkit:: for host arrays)");
  return a.device;
}

// One call's work on the device: the device guard (the call runs on x's
// device and restores the caller's current device), the stream, scratch
// buffers (stream-ordered, freed after the queued work), and the outputs that
// are computed in the accumulation type and converted into the caller's
// dtype at the end.
class Work {
 public:
  Work(const TensorRef& x, const char* x_name, cudaStream_t stream, DType x_dtype)
      : stream_(stream), acc_(acc_dtype(x_dtype)) {
    if (device_count() == 0)
      fail_runtime("no CUDA device: normkit::cuda functions need an NVIDIA GPU and its driver");
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    device_ = previous_;
    if (x.given && x.numel() > 0) device_ = device_of(x, x_name);
    if (device_ != previous_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~Work() {
    for (void* p : buffers_) cudaFreeAsync(p, stream_);
    if (device_ != previous_) cudaSetDevice(previous_);
  }
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;

  ck::Stream stream() const { return static_cast<ck::Stream>(stream_); }
  DType acc() const { return acc_; }

  // Every other given, non-empty view must be memory of x's device.
  void on_device(std::initializer_list<std::pair<const TensorRef*, const char*>> views) const {
    for (const auto& [t, name] : views) {
      if (!t->given || t->numel() == 0) continue;
      const int d = device_of(*t, name);
      if (d != device_)
        core::fail_value(std::string(name) + ": is on CUDA device " + std::to_string(d) + ", but x is on device " +
                         std::to_string(device_) + " (all arrays of a call must be on one device)");
    }
  }

  // `count` elements of the accumulation type, uninitialized.
  void* scratch(std::int64_t count) {
    if (count <= 0) count = 1;
    void* p = nullptr;
    check_cuda(cudaMallocAsync(&p, static_cast<std::size_t>(count) * element_size(acc_), stream_),
               "cudaMallocAsync");
    buffers_.push_back(p);
    return p;
  }

  // A small contiguous input (parameters, statistics) as acc values: the view
  // itself when it has the acc dtype, else a converted copy. Null when not given.
  const void* acc_in(const TensorRef& t) {
    if (!t.given) return nullptr;
    if (t.dtype == acc_ || t.numel() == 0) return t.data;
    void* p = scratch(t.numel());
    ck::convert(t.data, t.dtype, 1, p, acc_, 1, t.numel(), stream());
    return p;
  }

  // Where a kernel writes a small contiguous output in acc values: the view
  // itself when it has the acc dtype, else scratch converted into it by finish().
  void* acc_out(const TensorRef& t) {
    if (!t.given) return nullptr;
    if (t.dtype == acc_) return t.data;
    void* p = scratch(t.numel());
    pending_.push_back({p, t});
    return p;
  }

  // An input-output (running statistics): acc values read from and written back to `t`.
  void* acc_inout(const TensorRef& t) {
    if (!t.given) return nullptr;
    if (t.dtype == acc_) return t.data;
    void* p = const_cast<void*>(acc_in(t));
    pending_.push_back({p, t});
    return p;
  }

  // Converts the acc_out / acc_inout results into the caller's views.
  void finish() {
    for (const auto& [p, t] : pending_) ck::convert(p, acc_, 1, t.data, t.dtype, 1, t.numel(), stream());
    pending_.clear();
  }

  // Fills a float view with NaN (all bits set is a NaN in every float type) or zeros.
  void fill_nan(const TensorRef& t) const { fill(t, 0xFF); }
  void fill_zero(const TensorRef& t) const { fill(t, 0); }
  // Copies `count` acc values.
  void copy(void* dst, const void* src, std::int64_t count) const {
    if (count > 0)
      check_cuda(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(count) * element_size(acc_),
                                 cudaMemcpyDeviceToDevice, stream_),
                 "cudaMemcpyAsync");
  }

 private:
  void fill(const TensorRef& t, int byte) const {
    if (t.given && t.numel() > 0)
      check_cuda(cudaMemsetAsync(t.data, byte, static_cast<std::size_t>(t.numel()) * element_size(t.dtype), stream_),
                 "cudaMemsetAsync");
  }

  struct Pending {
    void* acc;
    TensorRef target;
  };
  cudaStream_t stream_;
  DType acc_;
  int previous_ = 0, device_ = 0;
  std::vector<void*> buffers_;
  std::vector<Pending> pending_;
};

ck::ChannelShape shape_of(const ChannelGeometry& g) {
  ck::ChannelShape s;
  s.n = g.n;
  s.c = g.c;
  s.s = g.s;
  s.channels_last = g.channels_last;
  return s;
}

// Statistics of x per group (into `mean`/`rstd`, acc arrays), optionally
// updating running statistics.
// `mean_lo` (optional): the part of the mean below the acc precision (see ChannelStats).
void stats(Work& w, const TensorRef& x, const ChannelGeometry& g, bool per_sample, std::int64_t groups, double eps,
           void* mean, void* rstd, void* mean_lo, void* running_mean = nullptr, void* running_var = nullptr,
           double momentum = 0.1) {
  ck::ChannelStats p;
  p.dtype = x.dtype;
  p.shape = shape_of(g);
  p.x = x.data;
  p.per_sample = per_sample;
  p.groups = groups;
  p.eps = eps;
  p.mean = mean;
  p.rstd = rstd;
  p.mean_lo = mean_lo;
  p.running_mean = running_mean;
  p.running_var = running_var;
  p.momentum = momentum;
  ck::channel_stats(p, w.stream());
}

// y = (x - mean) * rstd * w + b with w, b per channel (weight, bias) or per
// (sample, channel) (style_std, style_mean).
// mean_lo: optional (from stats()).
void normalize(Work& w, const TensorRef& x, const TensorRef& y, const ChannelGeometry& g, bool per_sample,
               std::int64_t groups, const void* mean, const void* mean_lo, const void* rstd, const void* weight,
               const void* bias, const void* style_std = nullptr, const void* style_mean = nullptr) {
  const std::int64_t entries = g.n * g.c;
  ck::FoldForward f;
  f.dtype = x.dtype;
  f.shape = shape_of(g);
  f.per_sample = per_sample;
  f.groups = groups;
  f.mean = mean;
  f.rstd = rstd;
  f.weight = weight;
  f.bias = bias;
  f.style_std = style_std;
  f.style_mean = style_mean;
  f.center = w.scratch(entries);
  f.scale = w.scratch(entries);
  f.shift = w.scratch(entries);
  f.mean_lo = mean_lo;
  f.center_lo = mean_lo ? w.scratch(entries) : nullptr;
  ck::fold_forward(f, w.stream());
  ck::ChannelApply a;
  a.dtype = x.dtype;
  a.shape = shape_of(g);
  a.x = x.data;
  a.y = y.data;
  a.center = f.center;
  a.scale = f.scale;
  a.shift = f.shift;
  a.center_lo = f.center_lo;
  a.table_n_stride = g.c;
  ck::channel_apply(a, w.stream());
}

// Where batch statistics go: the caller's output when it has the acc dtype
// (always, for stats_dtype outputs), else scratch.
void* stats_target(Work& w, const TensorRef& out, std::int64_t count) {
  return out.given ? out.data : w.scratch(count);
}

// Inference with running statistics (BatchNorm eval; InstanceNorm without
// input statistics): per-channel statistics, written `repeat` times into the
// mean/rstd outputs (1, or N for InstanceNorm's (N, C) outputs).
void normalize_running(Work& w, const TensorRef& x, const TensorRef& y, const ChannelGeometry& g,
                       const TensorRef& running_mean, const TensorRef& running_var, const TensorRef& weight,
                       const TensorRef& bias, double eps, const TensorRef& mean, const TensorRef& rstd,
                       std::int64_t repeat) {
  void* mean_c = w.scratch(g.c);
  void* rstd_c = w.scratch(g.c);
  if (g.c > 0)
    ck::stats_from_running(x.dtype, w.acc_in(running_mean), w.acc_in(running_var), eps, mean_c, rstd_c, g.c,
                           w.stream());
  if (x.numel() > 0)
    normalize(w, x, y, g, /*per_sample=*/false, 1, mean_c, nullptr, rstd_c, w.acc_in(weight), w.acc_in(bias));
  for (std::int64_t n = 0; n < repeat; ++n) {
    if (mean.given) w.copy(static_cast<char*>(mean.data) + n * g.c * element_size(w.acc()), mean_c, g.c);
    if (rstd.given) w.copy(static_cast<char*>(rstd.data) + n * g.c * element_size(w.acc()), rstd_c, g.c);
  }
}

// The rows problem's gradient (LayerNorm, RMSNorm).
void rows_backward(bool rms, const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                   const Dims& normalized_shape, const TensorRef& weight, const TensorRef& dx,
                   const TensorRef& dweight, const TensorRef& dbias, cudaStream_t stream) {
  const auto norm = rms ? kernels::RowsNorm::rms : kernels::RowsNorm::layer;
  std::int64_t dy_row_stride = 0;
  const kernels::RowsForward f = norms::check_rows_backward(norm, dy, x, mean, rstd, normalized_shape, weight, dx,
                                                            dweight, dbias, dy_row_stride);
  Work w(x, "x", stream, x.dtype);
  w.on_device({{&dy, "dy"}, {&mean, "mean"}, {&rstd, "rstd"}, {&weight, "weight"}, {&dx, "dx"},
               {&dweight, "dweight"}, {&dbias, "dbias"}});
  if (f.rows == 0 || f.cols == 0) {
    w.fill_zero(dweight);
    w.fill_zero(dbias);
    return;
  }
  ck::RowsBackward p;
  p.dtype = x.dtype;
  p.rms = rms;
  p.rows = f.rows;
  p.cols = f.cols;
  p.x = x.data;
  p.x_row_stride = f.x_row_stride;
  p.dy = dy.data;
  p.dy_row_stride = dy_row_stride;
  p.dx = dx.data;
  p.dx_row_stride = f.y_row_stride;
  p.weight = w.acc_in(weight);
  p.mean = rms ? nullptr : mean.data;
  p.rstd = rstd.data;
  p.dweight = w.acc_out(dweight);
  p.dbias = w.acc_out(dbias);
  ck::rows_backward(p, w.stream());
  w.finish();
}

// The channel norms' gradient: dx, and the parameter gradients' sums (acc) into
// sum_dy / sum_dy_xhat (null: not wanted).
void channel_backward(Work& w, const TensorRef& dy, const TensorRef& x, const TensorRef& dx,
                      const ChannelGeometry& g, bool per_sample, std::int64_t groups, bool constant_stats,
                      const void* mean, const void* rstd, const void* weight, std::int64_t weight_n_stride,
                      void* sum_dy, void* sum_dy_xhat, std::int64_t grads_n_stride) {
  ck::ChannelBackward p;
  p.dtype = x.dtype;
  p.shape = shape_of(g);
  p.per_sample = per_sample;
  p.groups = groups;
  p.constant_stats = constant_stats;
  p.x = x.data;
  p.dy = dy.data;
  p.dx = dx.data;
  p.mean = mean;
  p.rstd = rstd;
  p.weight = weight;
  p.weight_n_stride = weight_n_stride;
  p.sum_dy = sum_dy;
  p.sum_dy_xhat = sum_dy_xhat;
  p.grads_n_stride = grads_n_stride;
  ck::channel_backward(p, w.stream());
}

}  // namespace

// ---- rows -------------------------------------------------------------------------

namespace {

// The rows forward (LayerNorm, RMSNorm) of a planned, validated call.
void rows_forward(bool rms, const TensorRef& x, const TensorRef& y, const kernels::RowsForward& f,
                  const TensorRef& weight, const TensorRef& bias, const TensorRef& mean, const TensorRef& rstd,
                  cudaStream_t stream) {
  Work w(x, "x", stream, x.dtype);
  w.on_device({{&y, "y"}, {&weight, "weight"}, {&bias, "bias"}, {&mean, "mean"}, {&rstd, "rstd"}});
  if (f.rows == 0) return;
  if (f.cols == 0) {  // statistics of nothing, as on the CPU
    w.fill_nan(mean);
    w.fill_nan(rstd);
    return;
  }
  ck::RowsForward p;
  p.dtype = x.dtype;
  p.rms = rms;
  p.rows = f.rows;
  p.cols = f.cols;
  p.x = x.data;
  p.x_row_stride = f.x_row_stride;
  p.y = y.data;
  p.y_row_stride = f.y_row_stride;
  p.weight = w.acc_in(weight);
  p.bias = w.acc_in(bias);
  p.eps = f.eps;  // the planner's: eps = nullopt for RMSNorm is the machine epsilon
  p.mean = mean.given ? mean.data : nullptr;
  p.rstd = rstd.given ? rstd.data : nullptr;
  ck::rows_forward(p, w.stream());
}

}  // namespace

void layer_norm(const TensorRef& x, const TensorRef& y, const Dims& normalized_shape, const TensorRef& weight,
                const TensorRef& bias, double eps, const TensorRef& mean, const TensorRef& rstd,
                cudaStream_t stream) {
  const kernels::RowsForward f =
      plan::plan_rows_forward(kernels::RowsNorm::layer, x, y, normalized_shape, weight, bias, eps, mean, rstd);
  rows_forward(false, x, y, f, weight, bias, mean, rstd, stream);
}

void rms_norm(const TensorRef& x, const TensorRef& y, const Dims& normalized_shape, const TensorRef& weight,
              std::optional<double> eps, const TensorRef& rstd, cudaStream_t stream) {
  const kernels::RowsForward f =
      plan::plan_rows_forward(kernels::RowsNorm::rms, x, y, normalized_shape, weight, {}, eps, {}, rstd);
  rows_forward(true, x, y, f, weight, {}, {}, rstd, stream);
}

// ---- channel norms ------------------------------------------------------------------

void batch_norm(const TensorRef& x, const TensorRef& y, const TensorRef& running_mean, const TensorRef& running_var,
                const TensorRef& weight, const TensorRef& bias, bool training, double momentum, double eps,
                std::optional<Layout> layout, const TensorRef& mean, const TensorRef& rstd, cudaStream_t stream) {
  const ChannelGeometry g = norms::check_running_norm(x, y, running_mean, running_var, weight, bias, momentum, eps,
                                                      layout, mean, rstd, /*stats_per_sample=*/false);
  if (!training) norms::require_running(running_mean, "running_mean", "when training is false");
  else norms::check_batch_statistics(x, g);
  Work w(x, "x", stream, x.dtype);
  w.on_device({{&y, "y"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}, {&weight, "weight"},
               {&bias, "bias"}, {&mean, "mean"}, {&rstd, "rstd"}});
  if (!training) {
    normalize_running(w, x, y, g, running_mean, running_var, weight, bias, eps, mean, rstd, 1);
    return;
  }
  if (x.numel() == 0) {  // NaN statistics, running statistics unchanged (as PyTorch)
    w.fill_nan(mean);
    w.fill_nan(rstd);
    return;
  }
  void* mean_c = stats_target(w, mean, g.c);
  void* rstd_c = stats_target(w, rstd, g.c);
  void* mean_lo = w.scratch(g.c);
  stats(w, x, g, /*per_sample=*/false, 1, eps, mean_c, rstd_c, mean_lo, w.acc_inout(running_mean),
        w.acc_inout(running_var), momentum);
  normalize(w, x, y, g, /*per_sample=*/false, 1, mean_c, mean_lo, rstd_c, w.acc_in(weight), w.acc_in(bias));
  w.finish();
}

void instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& running_mean,
                   const TensorRef& running_var, const TensorRef& weight, const TensorRef& bias,
                   bool use_input_stats, double momentum, double eps, std::optional<Layout> layout,
                   const TensorRef& mean, const TensorRef& rstd, cudaStream_t stream) {
  const ChannelGeometry g = norms::check_running_norm(x, y, running_mean, running_var, weight, bias, momentum, eps,
                                                      layout, mean, rstd, /*stats_per_sample=*/true);
  if (!use_input_stats) norms::require_running(running_mean, "running_mean", "when use_input_stats is false");
  else norms::check_instance_statistics(x, g);
  Work w(x, "x", stream, x.dtype);
  w.on_device({{&y, "y"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}, {&weight, "weight"},
               {&bias, "bias"}, {&mean, "mean"}, {&rstd, "rstd"}});
  if (!use_input_stats) {
    normalize_running(w, x, y, g, running_mean, running_var, weight, bias, eps, mean, rstd, g.n);
    return;
  }
  if (x.numel() == 0) {
    w.fill_nan(mean);
    w.fill_nan(rstd);
    return;
  }
  void* mean_nc = stats_target(w, mean, g.n * g.c);
  void* rstd_nc = stats_target(w, rstd, g.n * g.c);
  void* mean_lo = w.scratch(g.n * g.c);
  stats(w, x, g, /*per_sample=*/true, g.c, eps, mean_nc, rstd_nc, mean_lo, w.acc_inout(running_mean),
        w.acc_inout(running_var), momentum);
  normalize(w, x, y, g, /*per_sample=*/true, g.c, mean_nc, mean_lo, rstd_nc, w.acc_in(weight), w.acc_in(bias));
  w.finish();
}

void group_norm(const TensorRef& x, const TensorRef& y, std::int64_t num_groups, const TensorRef& weight,
                const TensorRef& bias, double eps, std::optional<Layout> layout, const TensorRef& mean,
                const TensorRef& rstd, cudaStream_t stream) {
  const ChannelGeometry g = norms::check_group_norm(x, y, num_groups, weight, bias, eps, layout, mean, rstd);
  Work w(x, "x", stream, x.dtype);
  w.on_device({{&y, "y"}, {&weight, "weight"}, {&bias, "bias"}, {&mean, "mean"}, {&rstd, "rstd"}});
  if (x.numel() == 0) {
    w.fill_nan(mean);
    w.fill_nan(rstd);
    return;
  }
  void* mean_ng = stats_target(w, mean, g.n * num_groups);
  void* rstd_ng = stats_target(w, rstd, g.n * num_groups);
  void* mean_lo = w.scratch(g.n * num_groups);
  stats(w, x, g, /*per_sample=*/true, num_groups, eps, mean_ng, rstd_ng, mean_lo);
  normalize(w, x, y, g, /*per_sample=*/true, num_groups, mean_ng, mean_lo, rstd_ng, w.acc_in(weight),
            w.acc_in(bias));
}

void adaptive_instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& style, double eps,
                            std::optional<Layout> layout, cudaStream_t stream) {
  const auto [g, gs] = norms::check_adain_style_map(x, y, style, eps, layout);
  if (x.numel() > 0) norms::check_adain_spatial(x, g);
  Work w(x, "x", stream, x.dtype);
  w.on_device({{&y, "y"}, {&style, "style"}});
  if (x.numel() == 0) return;
  const std::int64_t entries = g.n * g.c;
  void* style_mean = w.scratch(entries);
  void* style_rstd = w.scratch(entries);
  stats(w, style, gs, /*per_sample=*/true, g.c, eps, style_mean, style_rstd, nullptr);
  void* style_std = w.scratch(entries);  // sqrt(var + eps) = 1 / rstd
  ck::reciprocal(x.dtype, style_rstd, style_std, entries, w.stream());
  void* mean = w.scratch(entries);
  void* rstd = w.scratch(entries);
  void* mean_lo = w.scratch(entries);
  stats(w, x, g, /*per_sample=*/true, g.c, eps, mean, rstd, mean_lo);
  normalize(w, x, y, g, /*per_sample=*/true, g.c, mean, mean_lo, rstd, nullptr, nullptr, style_std, style_mean);
}

void adaptive_instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& style_mean,
                            const TensorRef& style_std, double eps, std::optional<Layout> layout,
                            cudaStream_t stream) {
  const ChannelGeometry g = norms::check_adain_style_stats(x, y, style_mean, style_std, eps, layout);
  if (x.numel() > 0) norms::check_adain_spatial(x, g);
  Work w(x, "x", stream, x.dtype);
  w.on_device({{&y, "y"}, {&style_mean, "style_mean"}, {&style_std, "style_std"}});
  if (x.numel() == 0) return;
  const std::int64_t entries = g.n * g.c;
  void* mean = w.scratch(entries);
  void* rstd = w.scratch(entries);
  void* mean_lo = w.scratch(entries);
  stats(w, x, g, /*per_sample=*/true, g.c, eps, mean, rstd, mean_lo);
  normalize(w, x, y, g, /*per_sample=*/true, g.c, mean, mean_lo, rstd, nullptr, nullptr, w.acc_in(style_std),
            w.acc_in(style_mean));
}

// ---- backward -------------------------------------------------------------------------

void layer_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         const Dims& normalized_shape, const TensorRef& weight, const TensorRef& dx,
                         const TensorRef& dweight, const TensorRef& dbias, cudaStream_t stream) {
  rows_backward(false, dy, x, mean, rstd, normalized_shape, weight, dx, dweight, dbias, stream);
}

void rms_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& rstd, const Dims& normalized_shape,
                       const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight, cudaStream_t stream) {
  rows_backward(true, dy, x, TensorRef{}, rstd, normalized_shape, weight, dx, dweight, TensorRef{}, stream);
}

namespace {

// BatchNorm / InstanceNorm / GroupNorm backward after their own checks: the
// statistics groups per channel (BatchNorm) or per (sample, group), the
// weight and its gradients per channel.
void affine_channel_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                             const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight,
                             const TensorRef& dbias, const ChannelGeometry& g, bool per_sample, std::int64_t groups,
                             bool constant_stats, cudaStream_t stream) {
  Work w(x, "x", stream, x.dtype);
  w.on_device({{&dy, "dy"}, {&mean, "mean"}, {&rstd, "rstd"}, {&weight, "weight"}, {&dx, "dx"},
               {&dweight, "dweight"}, {&dbias, "dbias"}});
  if (x.numel() == 0) {
    w.fill_zero(dweight);
    w.fill_zero(dbias);
    return;
  }
  channel_backward(w, dy, x, dx, g, per_sample, groups, constant_stats, mean.data, rstd.data, w.acc_in(weight), 0,
                   w.acc_out(dbias), w.acc_out(dweight), 0);
  w.finish();
}

}  // namespace

void batch_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight,
                         const TensorRef& dbias, bool training, std::optional<Layout> layout, cudaStream_t stream) {
  const ChannelGeometry g = norms::check_channel_backward(dy, x, dx, layout, weight, dweight, dbias);
  norms::check_backward_stats(mean, rstd, g.c, x.dtype, dx, dweight, dbias);
  affine_channel_backward(dy, x, mean, rstd, weight, dx, dweight, dbias, g, /*per_sample=*/false, 1,
                          /*constant_stats=*/!training, stream);
}

void instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                            const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight,
                            const TensorRef& dbias, bool use_input_stats, std::optional<Layout> layout,
                            cudaStream_t stream) {
  const ChannelGeometry g = norms::check_channel_backward(dy, x, dx, layout, weight, dweight, dbias);
  norms::check_backward_stats(mean, rstd, g.n * g.c, x.dtype, dx, dweight, dbias);
  affine_channel_backward(dy, x, mean, rstd, weight, dx, dweight, dbias, g, /*per_sample=*/true, g.c,
                          /*constant_stats=*/!use_input_stats, stream);
}

void group_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         std::int64_t num_groups, const TensorRef& weight, const TensorRef& dx,
                         const TensorRef& dweight, const TensorRef& dbias, std::optional<Layout> layout,
                         cudaStream_t stream) {
  const ChannelGeometry g = norms::check_channel_backward(dy, x, dx, layout, weight, dweight, dbias);
  plan::check_num_groups(num_groups, g.c);
  norms::check_backward_stats(mean, rstd, g.n * num_groups, x.dtype, dx, dweight, dbias);
  affine_channel_backward(dy, x, mean, rstd, weight, dx, dweight, dbias, g, /*per_sample=*/true, num_groups,
                          /*constant_stats=*/false, stream);
}

void adaptive_instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& style, double eps,
                                     const TensorRef& dx, const TensorRef& dstyle, std::optional<Layout> layout,
                                     cudaStream_t stream) {
  const ChannelGeometry g = norms::check_adain_backward(dy, x, dx, eps, layout);
  const ChannelGeometry gs = norms::check_adain_backward_map(dy, x, g, style, dx, dstyle);
  Work w(x, "x", stream, x.dtype);
  w.on_device({{&dy, "dy"}, {&style, "style"}, {&dx, "dx"}, {&dstyle, "dstyle"}});
  if (x.numel() == 0 || style.numel() == 0) {
    w.fill_zero(dstyle);
    return;
  }
  const std::int64_t entries = g.n * g.c;
  void* style_mean = w.scratch(entries);
  void* style_rstd = w.scratch(entries);
  stats(w, style, gs, /*per_sample=*/true, g.c, eps, style_mean, style_rstd, nullptr);
  void* style_std = w.scratch(entries);
  ck::reciprocal(x.dtype, style_rstd, style_std, entries, w.stream());
  void* mean = w.scratch(entries);  // x's statistics, recomputed (the forward saves none)
  void* rstd = w.scratch(entries);
  stats(w, x, g, /*per_sample=*/true, g.c, eps, mean, rstd, nullptr);
  void* dmean = dstyle.given ? w.scratch(entries) : nullptr;
  void* dstd = dstyle.given ? w.scratch(entries) : nullptr;
  channel_backward(w, dy, x, dx, g, /*per_sample=*/true, g.c, /*constant_stats=*/false, mean, rstd, style_std, g.c,
                   dmean, dstd, g.c);
  if (!dstyle.given) return;
  ck::StyleGrad sg;
  sg.dtype = style.dtype;
  sg.shape = shape_of(gs);
  sg.style = style.data;
  sg.dstyle = dstyle.data;
  sg.mean = style_mean;
  sg.rstd = style_rstd;
  sg.dmean = dmean;
  sg.dstd = dstd;
  ck::style_grad(sg, w.stream());
}

void adaptive_instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& style_mean,
                                     const TensorRef& style_std, double eps, const TensorRef& dx,
                                     const TensorRef& dstyle_mean, const TensorRef& dstyle_std,
                                     std::optional<Layout> layout, cudaStream_t stream) {
  const ChannelGeometry g = norms::check_adain_backward(dy, x, dx, eps, layout);
  norms::check_adain_backward_stats(dy, x, dx, g, style_mean, style_std, dstyle_mean, dstyle_std);
  Work w(x, "x", stream, x.dtype);
  w.on_device({{&dy, "dy"}, {&style_mean, "style_mean"}, {&style_std, "style_std"}, {&dx, "dx"},
               {&dstyle_mean, "dstyle_mean"}, {&dstyle_std, "dstyle_std"}});
  if (x.numel() == 0) {
    w.fill_zero(dstyle_mean);
    w.fill_zero(dstyle_std);
    return;
  }
  const std::int64_t entries = g.n * g.c;
  void* mean = w.scratch(entries);
  void* rstd = w.scratch(entries);
  stats(w, x, g, /*per_sample=*/true, g.c, eps, mean, rstd, nullptr);
  channel_backward(w, dy, x, dx, g, /*per_sample=*/true, g.c, /*constant_stats=*/false, mean, rstd,
                   w.acc_in(style_std), g.c, w.acc_out(dstyle_mean), w.acc_out(dstyle_std), g.c);
  w.finish();
}

}  // namespace normkit::cuda
