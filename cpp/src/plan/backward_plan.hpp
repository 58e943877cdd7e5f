// plan/backward_plan.hpp - mapping the norms' gradients onto the fused rows
// backward problem (kernels::RowsBackward).
//
//   LayerNorm / RMSNorm        R rows of D: dx per row, and dweight / dbias as
//                              block partials merged in block order
//   channels-first per-sample  N*G rows of (C/G)*S, one segment per channel:
//   (InstanceNorm, GroupNorm,  dx per row, and per (sample, channel) sums of
//   AdaIN)                     dy and dy * xhat
// Arguments are checked by the callers (norms/checks.hpp).
#pragma once

#include <vector>

#include "kernels/kernel_api.hpp"
#include "normkit/tensor.hpp"
#include "plan/channel_plan.hpp"

namespace normkit::plan {

// dweight = sum(dy * xhat), dbias = sum(dy) over the rows, in double; empty
// when neither output is wanted.
struct RowsParamGrads {
  std::vector<double> dweight, dbias;
};

// LayerNorm / RMSNorm backward over a non-empty problem: `f` is the forward's
// plan for x with dx as its y (check_rows_backward), dy rows at
// `dy_row_stride`. Writes dx. The block partials are fixed by the shape alone
// (at most 64 blocks), so the weight gradients do not depend on the thread count.
RowsParamGrads rows_backward(kernels::RowsNorm norm, const kernels::RowsForward& f, const TensorRef& dy,
                             std::int64_t dy_row_stride, const TensorRef& x, const TensorRef& mean,
                             const TensorRef& rstd, const TensorRef& weight, const TensorRef& dx,
                             bool want_param_grads);

// Channels-first per-sample norm backward with statistics per (sample, group)
// (mean_ng, rstd_ng: N*groups) and an affine weight per (sample, channel)
// (w_nc: N*C), in one fused rows pass over a non-empty x. Writes dx, and per
// (sample, channel) sum_dy and sum_dy_xhat (N*C entries each, xhat about the
// exact mean: the kernel sums about the mean rounded to the stats dtype).
void grouped_rows_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, const ChannelGeometry& g,
                           std::int64_t groups, const std::vector<double>& mean_ng,
                           const std::vector<double>& rstd_ng, const std::vector<double>& w_nc,
                           std::vector<double>& sum_dy, std::vector<double>& sum_dy_xhat);

// BatchNorm's training backward, channels first, in one fused rows pass over a
// non-empty x: a row per channel, its N planes summed as one row and its dx
// written from cache (RowsBackward::planes). Statistics and weight per channel
// (C entries each); writes dx and per-channel sum_dy and sum_dy_xhat (about
// the exact mean).
//
// Taken (use_batch_planes_backward) for one sample, and for planes under
// kMinChannelPlaneBytes, where the other paths pay per plane (a row call each,
// or tables per (channel, position)): 2 threads, [8,2048,7,7] 265 -> 163 us,
// [8,256,14,14] 94 -> 46, [48,512,7,7] 275 -> 200, [128,256,14,14] 2.2-2.8 ->
// 1.8-2.0 ms. Planes under kMaxColumnsStatsPlaneBytes (runs of a few lines, C
// planes apart) only while x is at most kMaxStridedPlanesBackwardBytes: from
// memory the prefetchers miss such runs ([64,2048,7,7] 3.2 -> 4.5 ms; 6 MiB
// of x break even).
constexpr std::int64_t kMaxStridedPlanesBackwardBytes = std::int64_t(4) << 20;
bool use_batch_planes_backward(const ChannelGeometry& g, DType dtype);
void batch_planes_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, const ChannelGeometry& g,
                           const std::vector<double>& mean_c, const std::vector<double>& rstd_c,
                           const std::vector<double>& w_c, std::vector<double>& sum_dy,
                           std::vector<double>& sum_dy_xhat);

}  // namespace normkit::plan
