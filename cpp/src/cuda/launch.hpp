// cuda/launch.hpp - the CUDA kernels' host interface (plain C++: no CUDA headers).
//
// The entry points (cuda/cuda_norms.cpp) validate a call with the CPU core's
// planners, convert the small parameter tensors to the accumulation type on
// the device, and call these launchers. Every pointer here is device memory.
//
// Conventions shared by all launchers:
// - x, y, dy, dx have `dtype` (float32, float64, float16, bfloat16).
// - "acc" arrays have the accumulation type: double for float64 x, float
//   otherwise (statistics, parameters, tables, gradient sums).
// - y / dx may be the same memory as x or dy (in place): every element is
//   read before the same element is written, and every sum that needs x or dy
//   is complete before the first write.
// - Reductions are split into blocks fixed by the shape and merged in a fixed
//   order (Chan's formula for moments): results do not depend on scheduling,
//   and no float atomics are used.
// - Scratch comes from the stream-ordered allocator (cudaMallocAsync) on the
//   call's stream and is released on it.
// - Launchers throw normkit::Error (kind runtime) on a CUDA error.
#pragma once

#include <cstdint>

#include "normkit/dtype.hpp"

namespace normkit::cuda_kernels {

using Stream = void*;  // a cudaStream_t

// ---- rows: LayerNorm, RMSNorm ------------------------------------------------
// `rows` rows of `cols` contiguous elements; row r of x starts at
// x + r * x_row_stride (elements), likewise y / dy / dx.

struct RowsForward {
  DType dtype = DType::float32;
  bool rms = false;  // RMSNorm: no mean, rstd = 1 / sqrt(mean(x^2) + eps)
  std::int64_t rows = 0, cols = 0;  // rows >= 1, cols >= 1
  const void* x = nullptr;
  std::int64_t x_row_stride = 0;
  void* y = nullptr;
  std::int64_t y_row_stride = 0;
  const void* weight = nullptr;  // acc, cols entries, or null
  const void* bias = nullptr;    // acc, cols entries, or null (always null for rms)
  double eps = 1e-5;
  void* mean = nullptr;  // acc, rows entries, or null (not wanted; always null for rms)
  void* rstd = nullptr;  // acc, rows entries, or null
};
// y = (x - mean) * rstd * weight + bias per row (biased variance).
void rows_forward(const RowsForward& p, Stream stream);

struct RowsBackward {
  DType dtype = DType::float32;
  bool rms = false;
  std::int64_t rows = 0, cols = 0;  // rows >= 1, cols >= 1
  const void* x = nullptr;
  std::int64_t x_row_stride = 0;
  const void* dy = nullptr;
  std::int64_t dy_row_stride = 0;
  void* dx = nullptr;
  std::int64_t dx_row_stride = 0;
  const void* weight = nullptr;  // acc, cols, or null (ones)
  const void* mean = nullptr;    // acc, rows (null for rms): the forward's saved mean
  const void* rstd = nullptr;    // acc, rows: the forward's saved rstd
  void* dweight = nullptr;       // acc, cols, or null: overwritten with sum over rows of dy * xhat
  void* dbias = nullptr;         // acc, cols, or null: overwritten with sum over rows of dy
};
// With g = dy * weight and xhat = (x - mean) * rstd, the mean refined to x's
// exact row mean (saved means may be rounded):
//   LayerNorm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   dx = rstd * (g - xhat * mean(g * xhat))   (xhat = x * rstd)
void rows_backward(const RowsBackward& p, Stream stream);

// ---- channel norms: BatchNorm, InstanceNorm, GroupNorm, AdaIN ---------------
// x contiguous as [n][c][s] (channels-first) or [n][s][c] (channels-last).
struct ChannelShape {
  std::int64_t n = 0, c = 0, s = 0;  // all >= 1 when a launcher is called
  bool channels_last = false;
};

// Statistics groups q:
//   per_sample: q = sample * groups + channel / (c / groups), count (c / groups) * s
//               (InstanceNorm: groups = c; GroupNorm; AdaIN)
//   otherwise:  q = channel, count n * s (BatchNorm)
struct ChannelStats {
  DType dtype = DType::float32;
  ChannelShape shape;
  const void* x = nullptr;
  bool per_sample = false;
  std::int64_t groups = 1;  // per_sample only; divides c
  double eps = 1e-5;
  void* mean = nullptr;  // acc, one per q: required
  void* rstd = nullptr;  // acc, one per q: required; 1 / sqrt(var + eps), biased var
  // Optional, acc, one per q: what `mean` (rounded to acc) lost, so that
  // mean + mean_lo is the group's mean to about double precision (float32 x
  // with a mean of 1e4 and a spread of 1e-2: the rounded mean alone is off by
  // 5% of a standard deviation).
  void* mean_lo = nullptr;
  // Optional running statistics (acc, c entries), updated in place with
  // momentum: r = (1 - momentum) * r + momentum * batch value, the variance
  // unbiased (count / (count - 1)). BatchNorm: per channel. InstanceNorm
  // (per_sample, groups == c): the mean over samples of the per-instance values.
  void* running_mean = nullptr;
  void* running_var = nullptr;
  double momentum = 0.1;
};
void channel_stats(const ChannelStats& p, Stream stream);

// Forward tables per (sample, channel) [n * c] for channel_apply:
//   center = mean[q], scale = rstd[q] * w, shift = b, where
//   w, b = weight[c], bias[c] (or 1, 0 when null), or for AdaIN
//   w, b = style_std[n * c + ch], style_mean[n * c + ch].
struct FoldForward {
  DType dtype = DType::float32;  // of x (acc type follows)
  ChannelShape shape;
  bool per_sample = false;
  std::int64_t groups = 1;
  const void* mean = nullptr;  // acc, per q
  const void* rstd = nullptr;  // acc, per q
  const void* weight = nullptr;  // acc, c, or null
  const void* bias = nullptr;    // acc, c, or null
  const void* style_std = nullptr;   // acc, n * c (AdaIN; then weight/bias are null)
  const void* style_mean = nullptr;  // acc, n * c (AdaIN)
  void* center = nullptr;  // acc, n * c outputs
  void* scale = nullptr;
  void* shift = nullptr;
  const void* mean_lo = nullptr;  // optional, acc, per q (ChannelStats::mean_lo) ...
  void* center_lo = nullptr;      // ... then required: acc, n * c output (mean_lo[q])
};
void fold_forward(const FoldForward& p, Stream stream);

// y = ((x - center[i]) - center_lo[i]) * scale[i] + shift[i]  (+ dy * dy_scale[i]
// when dy is given), i = sample * table_n_stride + channel; center_lo optional.
struct ChannelApply {
  DType dtype = DType::float32;
  ChannelShape shape;
  const void* x = nullptr;
  void* y = nullptr;
  const void* center = nullptr;  // acc tables, required
  const void* scale = nullptr;
  const void* shift = nullptr;
  const void* center_lo = nullptr;  // optional acc table
  const void* dy = nullptr;        // optional, x's dtype and shape
  const void* dy_scale = nullptr;  // acc table, with dy
  std::int64_t table_n_stride = 0;  // c (per sample and channel) or 0 (per channel)
};
void channel_apply(const ChannelApply& p, Stream stream);

// Gradient of a channel norm. Statistics groups as in ChannelStats.
//   training statistics: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) per group,
//     g = dy * w, with the saved mean refined to the group's exact mean;
//   constant_stats (BatchNorm eval, InstanceNorm with running statistics):
//     dx = dy * w * rstd.
// w = weight[c] (weight_n_stride 0) or weight[n * c + ch] (AdaIN: style_std,
// weight_n_stride = c), or 1 when null.
// Parameter gradients, optional, overwritten:
//   sum_dy[i], sum_dy_xhat[i] with i = sample * grads_n_stride + channel: grads_n_stride 0
//   sums over the samples too (dbias, dweight of (c)); = c keeps them per (sample,
//   channel) (AdaIN's dstyle_mean, dstyle_std, n * c entries).
struct ChannelBackward {
  DType dtype = DType::float32;
  ChannelShape shape;
  bool per_sample = false;
  std::int64_t groups = 1;
  bool constant_stats = false;
  const void* x = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  const void* mean = nullptr;  // acc, per q
  const void* rstd = nullptr;  // acc, per q
  const void* weight = nullptr;
  std::int64_t weight_n_stride = 0;
  void* sum_dy = nullptr;       // acc or null
  void* sum_dy_xhat = nullptr;  // acc or null
  std::int64_t grads_n_stride = 0;
};
void channel_backward(const ChannelBackward& p, Stream stream);

// AdaIN with a style map: the style's gradient from d(style_mean), d(style_std)
// per (sample, channel): style_std = sqrt(var + eps) over the style's S elements,
//   dstyle = dmean / S + dstd * (style - mean) * rstd / S
// (mean, rstd: the style's statistics per (sample, channel), acc, n * c).
struct StyleGrad {
  DType dtype = DType::float32;
  ChannelShape shape;  // the style's
  const void* style = nullptr;
  void* dstyle = nullptr;
  const void* mean = nullptr;
  const void* rstd = nullptr;
  const void* dmean = nullptr;  // acc, n * c
  const void* dstd = nullptr;   // acc, n * c
};
void style_grad(const StyleGrad& p, Stream stream);

// ---- small helpers (cuda/small_kernels.cu) ------------------------------------
// Inference statistics from running ones: mean_out = running_mean,
// rstd_out = 1 / sqrt(running_var + eps); acc arrays of `count`.
void stats_from_running(DType dtype, const void* running_mean, const void* running_var, double eps, void* mean_out,
                        void* rstd_out, std::int64_t count, Stream stream);
// out = 1 / in over `count` acc values (style std from the style's rstd).
void reciprocal(DType dtype, const void* in, void* out, std::int64_t count, Stream stream);

// (channel_kernels.cu)
// Converts `count` elements between dtypes (either may be float32, float64,
// float16, bfloat16), element strides in elements.
void convert(const void* src, DType src_dtype, std::int64_t src_stride, void* dst, DType dst_dtype,
             std::int64_t dst_stride, std::int64_t count, Stream stream);

}  // namespace normkit::cuda_kernels
