// normkit/moments.hpp - statistics that merge: partial moments of a norm,
// merged exactly across shards, and BatchNorm normalized with given statistics.
//
// When a batch is split over threads, processes or time (data-parallel
// training, recalibration over many batches), each part's statistics are a
// `Moments`: per statistic, the count of values behind it, their mean and M2
// (the sum of squared deviations from that mean), in double. Moments merge
// exactly by Chan's formula; the merged moments normalize every part as if it
// were the whole batch:
//
//   // Engine with the batch sharded over workers (any transport between them):
//   normkit::Moments local = normkit::batch_norm_moments(x_shard, normkit::Layout::NHWC);
//   ... exchange local.count / local.mean / local.m2 with the other shards ...
//   normkit::Moments global = normkit::merge_moments(parts);   // pointers, the same order on every shard
//   normkit::batch_norm_with_stats(x_shard, y_shard, global, running_mean, running_var, weight, bias,
//                                  0.1, 1e-5, normkit::Layout::NHWC);
//
//   // Backward: local sums, one all-reduce (a sum over shards), then the apply pass.
//   normkit::BatchNormGradSums s = normkit::batch_norm_grad_sums(dy, x, mean, layout);
//   ... add the shards' count / sum_dy / sum_dy_xmu (BatchNormGradSums::add) ...
//   normkit::batch_norm_backward_with_sums(dy, x, mean, rstd, s, weight, dx, dweight, dbias, layout);
// (mean, rstd: the global statistics as float64 (C) views, global.mean and global.rstd(eps).)
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "normkit/fused.hpp"
#include "normkit/layout.hpp"
#include "normkit/tensor.hpp"

namespace normkit {

// Partial statistics of a norm. Every statistic of one Moments has the same
// count (a norm's statistics each cover the same number of values). Counts,
// means and M2 are double: a float32 mean of 1e4 keeps its low bits, and M2 of
// a spread of 1e-2 around it stays exact where sum / sum-of-squares merges are not.
struct Moments {
  Dims shape;                 // of the statistics (see the *_moments functions)
  std::int64_t count = 0;     // values behind each statistic (0: an empty part)
  std::vector<double> mean;   // shape's element count; 0 where count is 0
  std::vector<double> m2;     // sum of squared deviations from mean

  std::int64_t size() const { return static_cast<std::int64_t>(mean.size()); }
  // m2 / (count - correction); NaN where count <= correction (as torch.var).
  std::vector<double> var(int correction = 0) const;
  // 1 / sqrt(var(0) + eps): what the norms normalize with. eps >= 0, finite.
  std::vector<double> rstd(double eps) const;
  // This merged with `other` (this first), as merge_moments({this, other}).
  Moments& merge(const Moments& other);
};

// The statistics of each norm over x, as the norm's forward forms them:
//   batch_norm_moments     (C): per channel over N and the spatial axes
//   instance_norm_moments  (N, C): per sample and channel over the spatial axes
//   group_norm_moments     (N, num_groups): per sample and group of C / num_groups channels
//   layer_norm_moments     x.shape[:-k]: per row over the trailing k = len(normalized_shape) dims
// Channel norms: x contiguous in `layout` (default channels-first of x's rank),
// any float dtype (16-bit x is accumulated in float32 per block, merged in double).
// An empty x gives count 0. Errors name the argument, as the norms' do.
Moments batch_norm_moments(const TensorRef& x, std::optional<Layout> layout = std::nullopt);
Moments instance_norm_moments(const TensorRef& x, std::optional<Layout> layout = std::nullopt);
Moments group_norm_moments(const TensorRef& x, std::int64_t num_groups,
                           std::optional<Layout> layout = std::nullopt);
Moments layer_norm_moments(const TensorRef& x, const Dims& normalized_shape);

// Merges parts of one shape in the order given (the total mean relative to
// the first non-empty part's, then M2 = sum M2_i + n_i (mean_i - mean)^2). The
// same parts in the same order give the same bits; any grouping agrees within
// float64 rounding; empty parts are skipped, so merging with one is exact.
// Shapes that differ are a ValueError naming the part.
Moments merge_moments(const std::vector<const Moments*>& parts);
Moments merge_moments(const Moments& first, const Moments& second);

// BatchNorm in training with given statistics `stats` (shape (C), count >= 2:
// typically the moments of the global batch, merged over shards): normalizes x
// with stats' mean and biased variance, and updates the running statistics (if
// given) with them: r = (1 - momentum) * r + momentum * value, the unbiased
// variance from stats' count. x may be empty (an empty shard still updates the
// running statistics). Otherwise as batch_norm in normkit/norms.hpp.
void batch_norm_with_stats(const TensorRef& x, const TensorRef& y, const Moments& stats,
                           const TensorRef& running_mean, const TensorRef& running_var, const TensorRef& weight = {},
                           const TensorRef& bias = {}, double momentum = 0.1, double eps = 1e-5,
                           std::optional<Layout> layout = std::nullopt, const TensorRef& mean = {},
                           const TensorRef& rstd = {}, const Epilogue& epilogue = {});

// The reductions of BatchNorm's training backward, per channel, in double:
//   count = values per channel,  sum_dy = sum of dy,  sum_dy_xmu = sum of dy * (x - mean)
// over one part of the batch, with `mean` the statistics it was normalized with
// (shape (C): float64 for the exact mean of merged Moments, or stats_dtype(x)).
// Parts' sums add (add(): counts and sums); the total over all shards is what
// the distributed backward needs: 2C + 1 values to all-reduce.
struct BatchNormGradSums {
  std::int64_t count = 0;
  std::vector<double> sum_dy, sum_dy_xmu;
  BatchNormGradSums& add(const BatchNormGradSums& other);
};
BatchNormGradSums batch_norm_grad_sums(const TensorRef& dy, const TensorRef& x, const TensorRef& mean,
                                       std::optional<Layout> layout = std::nullopt);

// BatchNorm's training backward for one part of a batch, from the whole
// batch's sums (count > 0) and the statistics the forward normalized with
// (mean, rstd: shape (C), float64 or stats_dtype(x); `mean` the one the sums
// were taken around):
//   dx = w * rstd * (dy - sum_dy / count - (x - mean) * rstd^2 * sum_dy_xmu / count)
//   dweight = rstd * sum_dy_xmu,  dbias = sum_dy   (the whole batch's: the same on every part)
// dx, dweight, dbias as in batch_norm_backward (normkit/norms.hpp).
void batch_norm_backward_with_sums(const TensorRef& dy, const TensorRef& x, const TensorRef& mean,
                                   const TensorRef& rstd, const BatchNormGradSums& global_sums,
                                   const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight = {},
                                   const TensorRef& dbias = {}, std::optional<Layout> layout = std::nullopt);

}  // namespace normkit
