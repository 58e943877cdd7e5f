// plan/channel_plan.hpp - mapping the channel norms (BatchNorm, InstanceNorm,
// GroupNorm, AdaIN) onto the canonical problems.
//
//   layout          statistics per (sample, group)         statistics per channel (BatchNorm)
//   channels-first  rows: N*G rows of (C/G)*S, fused        rows stats of N*C planes, merged over N,
//                   stats + per-segment affine              then rows scale/shift per channel
//   channels-last   columns: N batches of S x C, merged      columns: 1 batch of N*S x C, then
//                   over the group's columns, then apply     columns apply
#pragma once

#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "kernels/kernel_api.hpp"
#include "normkit/layout.hpp"
#include "normkit/tensor.hpp"

namespace normkit::plan {

// x seen as N x C x S in a channel layout.
struct ChannelGeometry {
  std::int64_t n = 0, c = 0, s = 0;
  bool channels_last = false;
  Layout layout = Layout::NCHW;
};

// Validates x's rank against the layout (default: channels-first of x's rank)
// and that x is contiguous; `x_name` names x in errors.
ChannelGeometry channel_geometry(const TensorRef& x, std::optional<Layout> layout, const char* x_name = "x");

// num_groups must be a positive divisor of C and at most max(C, 1) (with C = 0
// only 1 group: larger counts would only size empty statistics, and overflow).
void check_num_groups(std::int64_t num_groups, std::int64_t channels);

// A style feature map for AdaIN: x's rank, layout, N, C and dtype, contiguous,
// any spatial size. Returns its geometry.
ChannelGeometry style_geometry(const TensorRef& x, const ChannelGeometry& g, const TensorRef& style);

// y must match x: shape, dtype (`y_dtype` when given: a quantized output,
// whose overlap with x plan_store refuses), contiguous, and not overlap it
// unless it is x.
void check_output_like(const TensorRef& x, const TensorRef& y, const char* y_name = "y",
                       std::optional<DType> y_dtype = std::nullopt);

// Per-group moments in double: mean and biased variance.
struct GroupMoments {
  std::vector<double> mean, var;
  std::int64_t count = 0;  // elements per group
};

// Moments per (sample, group) when per_sample (N*groups groups, groups must
// divide C), else per channel over the whole batch (C groups; `groups` ignored).
GroupMoments channel_moments(const TensorRef& x, const ChannelGeometry& g, std::int64_t groups, bool per_sample);

// y = ((x - center) * scale + shift) per (sample, channel) when per_sample
// (tables of N*C), else per channel (tables of C). center may be null (then the
// folded form y = x * scale + shift).
// `whole_output_bytes`: when x/y are one slice of a larger output, that
// output's size (the kind of store depends on it).
// With `dy` (the backward's apply step): y += dy * dy_scale, dy_scale a table like scale.
// `store`: the forward's store stage (null: plain).
// Channels-first planes smaller than this make short rows for the rows
// kernels (per-row costs, partial vectors and lines at each edge).
constexpr std::int64_t kMinChannelPlaneBytes = 1024;

// Channels first with small planes, per channel (not per_sample), channel_apply
// runs the columns kernel over rows of columns with each channel's entry
// repeated over its plane: long runs of whole vectors and whole streamed lines,
// where the rows kernel took a row per plane, its edges written with partial
// vectors and lines (BatchNorm [256,512,7,7]). The channels go a chunk at a
// time, each chunk's tables at most kColumnsTableChunkBytes, so they stay in L2
// whatever C is (one table of C * S entries, [64,2048,7,7]'s 392 KiB, ran the
// apply 2x slower; 64 KiB chunks ran 5-8% faster than 256 KiB ones).
// Taken for planes under kMaxColumnsStatsPlaneBytes whatever C ([64,2048,7,7]:
// inference 1.9 -> 0.86 ms, training 3.6 -> 2.3, backward 4.4 -> 3.1; Zen 5 EPYC,
// 2 threads), and for planes under kMinChannelPlaneBytes while C * S entries fit
// kMaxColumnsTableBytes: planes of 392 and 784 bytes with more channels ran
// 15-35% slower as columns than as rows ([64,1024,14,14] bfloat16, [32,1024,14,14]).
constexpr std::int64_t kColumnsTableChunkBytes = 64 * 1024;
constexpr std::int64_t kMaxColumnsTableBytes = 256 * 1024;
bool small_planes_as_columns(const ChannelGeometry& g, DType dtype);
// BatchNorm's training statistics too, for planes under this: the columns
// statistics per (channel, position) over the samples, merged per channel, in
// bands of kColumnsStatsBandBytes of accumulators, each band's N rows swept in
// memory order (a row per plane of a few lines cost more; planes of 400 to 784
// bytes ran slower as columns). Zen 5 EPYC, 2 threads, training float32: bands
// against part 5's four blocks of all C * S columns [256,512,7,7] 2.2 -> 1.6 ms
// (bfloat16 1.9 -> 1.05), against the rows [64,2048,7,7] 3.8 -> 2.1.
constexpr std::int64_t kMaxColumnsStatsPlaneBytes = 256;
// The bands: whole channels, at most 2 KiB of accumulators (512 float32
// columns), within the kernel's in-order sweep (16 tiles of 4 vectors) on every
// ISA; each band is a unit of work, fixed by the shape, its channels merged by
// the thread that swept it.
constexpr std::int64_t kColumnsStatsBandBytes = 2048;

void channel_apply(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g, bool per_sample,
                   const std::vector<double>& scale, const std::vector<double>& shift,
                   const std::vector<double>* center, std::int64_t whole_output_bytes = 0,
                   const TensorRef& dy = {}, const std::vector<double>* dy_scale = nullptr,
                   const kernels::StoreStage* store = nullptr);

// Gradient sums per (sample, channel) when per_sample (N*C entries), else per
// channel over the batch (C entries), relative to `center` (a table of the same
// size, exact in double): sums of dy, dy * (x - center) and (x - center).
struct GradSums {
  std::vector<double> dy, dy_xc, xc;
  std::int64_t count = 0;  // elements summed per entry
};
GradSums channel_grad_sums(const TensorRef& x, const TensorRef& dy, const ChannelGeometry& g, bool per_sample,
                           const std::vector<double>& center);

// One channel's sums over the batch (as GradSums) and the terms of its apply
// step, dx = (x - center) * scale + shift + dy * dy_scale.
struct ChannelGradSums {
  double dy = 0, dy_xc = 0, xc = 0;
};
struct ChannelApplyTerms {
  double center, scale, shift, dy_scale;
};
using ChannelGradTerms = std::function<ChannelApplyTerms(std::int64_t c, const ChannelGradSums& sums)>;

// BatchNorm's training backward a channel at a time, channels first, for
// planes of kMinChannelPlaneBytes and more: the channel's sums about center[c]
// (the values channel_grad_sums gives), then terms(c, sums) and its dx while its
// planes of x and dy are still in cache, so x and dy come from memory once
// instead of twice. The channels are shared out over the threads (terms is
// called from them; it must not throw); the values do not depend on the thread
// count. (Smaller planes: batch_planes_backward, or the two passes; blocks of
// channels with a row per plane, part 7 of bench/RESULTS.md, gave way to it.)
// use_batch_grad_by_channel(g, dtype): whether this beats the two passes
// (channels first, x past the cache, the threads' shares even).
bool use_batch_grad_by_channel(const ChannelGeometry& g, DType dtype);
void batch_grad_by_channel(const TensorRef& x, const TensorRef& dy, const TensorRef& dx, const ChannelGeometry& g,
                           const std::vector<double>& center, const ChannelGradTerms& terms);

// Channels-first per-sample norm in one fused pass per (sample, group) row:
// statistics, then y = (x - mean) * rstd * weight[p] + bias[p], p per segment
// (period rows). weight/bias: null or `param_dtype` tables. Writes per-row
// mean/var (double) into `moments` (N*groups entries).
void fused_group_rows(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g, std::int64_t groups,
                      const void* weight, const void* bias, DType param_dtype, std::int64_t param_period,
                      double eps, GroupMoments& moments, const kernels::StoreStage* store = nullptr);

// The affine of a channels-last per-sample norm, per (sample n, channel c):
// scale = a * rstd, shift = b, with a and b read from tables of C entries (per
// channel: weight, bias) or N*C entries (per sample and channel: AdaIN's style);
// an empty table stands for a = 1 / b = 0.
struct ChannelAffine {
  std::vector<double> a, b;
};

// Channels-last per-sample norm (InstanceNorm, GroupNorm, AdaIN): statistics
// per (sample, group) (N*groups) from the columns kernels, then
// y = (x - mean) * scale + shift with (scale, shift) from `affine` per
// (sample, channel). Samples up to 1 MiB go in items (channels_last_items),
// each taken start to finish by one thread: statistics, merge and tables, then
// the output pass re-reading the item from cache, no barriers; larger ones a
// step at a time (samples_per_step), a thread team sharing out each step's
// rows through the statistics, the merge and tables, and the output.
// Returns the moments of all N*groups groups.
GroupMoments channels_last_groups(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g, std::int64_t groups,
                                  double eps, const kernels::StoreStage& store, const ChannelAffine& affine);

// The items of channels_last_groups: runs of `samples` samples (up to
// kChannelsLastItemBytes of x each, so that several samples' fixed costs are
// shared), and with fewer than kChannelsLastMinItems samples each cut into
// `bands` bands of `band_groups` whole groups (the last may be narrower), so
// that there are items for every thread whatever N is (N = 1 is the common
// inference case). Fixed by the shape, so the values do not depend on the thread count.
// Items only for samples up to kMaxChannelsLastItemSampleBytes: larger ones
// (by_rows) go a cache-sized step at a time, each step's rows shared out
// by a team (measured: whole samples of [8,320,64,64] per thread 1.3-1.5x
// slower, narrow bands of [1,320,32,32] / [1,320,64,64] 10-40% slower).
constexpr std::int64_t kMaxChannelsLastItemSampleBytes = 1024 * 1024;
constexpr std::int64_t kChannelsLastItemBytes = 256 * 1024;
constexpr std::int64_t kChannelsLastMinItems = 8;
struct ChannelsLastItems {
  bool by_rows = false;  // no items: the samples are too large (see above)
  std::int64_t samples = 1, band_groups = 0, bands = 1;
};
ChannelsLastItems channels_last_items(const ChannelGeometry& g, std::int64_t groups, DType dtype);

// Samples [first, first + count) of a tensor contiguous in a channel layout
// (the batch axis is first in every layout).
TensorRef sample_slice(const TensorRef& t, std::int64_t first, std::int64_t count);

// How many samples a two-pass per-sample norm (channels-last InstanceNorm /
// GroupNorm / AdaIN) takes at a time: as many as fit in ~8 MiB (at least one),
// so that the second pass re-reads them from cache instead of from memory.
std::int64_t samples_per_step(const ChannelGeometry& g, DType dtype);

// Reads element i of a float tensor as double / writes it (any normkit dtype).
double read_element(const TensorRef& t, std::int64_t i);
void write_element(const TensorRef& t, std::int64_t i, double v);
// Every element of a float tensor as double (empty when t is not given).
std::vector<double> read_all(const TensorRef& t);
// v into the first elements of a contiguous float tensor (at most all of
// them), each as write_element would (nothing when t is not given).
void write_all(const TensorRef& t, const std::vector<double>& v);

// Validates an optional (C)-shaped parameter: x's dtype, or float32 for 16-bit x.
void check_channel_param(const TensorRef& t, const char* name, std::int64_t channels, DType x_dtype);
// Validates a running statistic: shape (C), float32 or x's dtype, contiguous.
void check_running_stat(const TensorRef& t, const char* name, std::int64_t channels, DType x_dtype);
// Writes `values` into an optional statistics output of stats_dtype(x_dtype).
void write_stats_output(const TensorRef& t, const char* name, const std::vector<double>& values, DType x_dtype);

}  // namespace normkit::plan
