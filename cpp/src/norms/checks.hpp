// norms/checks.hpp - argument validation shared by the CPU entry points
// (norms/*.cpp) and the CUDA ones (cuda/cuda_norms.cpp), so that both give the
// same errors for the same mistakes. Each throws normkit::Error naming the
// argument; none reads the arrays' elements (they may be device memory).
#pragma once

#include <optional>

#include "kernels/kernel_api.hpp"
#include "normkit/layout.hpp"
#include "normkit/moments.hpp"
#include "normkit/tensor.hpp"
#include "plan/channel_plan.hpp"

namespace normkit::norms {

using plan::ChannelGeometry;

// ---- forward (norms/channel_norms.cpp) ----------------------------------------
// `y_dtype`: y's dtype when it is not x's (a quantized output, normkit/fused.hpp).
void check_momentum(double momentum);
// The dtype weight and bias share: x's, or float32 for 16-bit x.
DType param_dtype(const TensorRef& weight, const TensorRef& bias, DType x_dtype);
// weight / bias: (C), param_dtype.
void check_affine(const TensorRef& weight, const TensorRef& bias, std::int64_t channels, DType x_dtype);
// `name`: required `when` (e.g. running_mean when training is false).
void require_running(const TensorRef& t, const char* name, const char* when);
// What BatchNorm and InstanceNorm share; statistics outputs of C or N*C entries.
ChannelGeometry check_running_norm(const TensorRef& x, const TensorRef& y, const TensorRef& running_mean,
                                   const TensorRef& running_var, const TensorRef& weight, const TensorRef& bias,
                                   double momentum, double eps, std::optional<Layout> layout,
                                   const TensorRef& mean, const TensorRef& rstd, bool stats_per_sample,
                                   std::optional<DType> y_dtype = std::nullopt);
// BatchNorm training needs more than 1 value per channel.
void check_batch_statistics(const TensorRef& x, const ChannelGeometry& g);
// BatchNorm training with given moments: shape (C), count > 1.
void check_given_batch_stats(const Moments& stats, std::int64_t channels);
// InstanceNorm with input statistics needs more than 1 spatial element.
void check_instance_statistics(const TensorRef& x, const ChannelGeometry& g);
ChannelGeometry check_group_norm(const TensorRef& x, const TensorRef& y, std::int64_t num_groups,
                                 const TensorRef& weight, const TensorRef& bias, double eps,
                                 std::optional<Layout> layout, const TensorRef& mean, const TensorRef& rstd,
                                 std::optional<DType> y_dtype = std::nullopt);
// AdaIN normalizes x per (sample, channel): more than 1 spatial element (when x is not empty).
void check_adain_spatial(const TensorRef& x, const ChannelGeometry& g);
struct AdainStyleMap {
  ChannelGeometry x, style;
};
AdainStyleMap check_adain_style_map(const TensorRef& x, const TensorRef& y, const TensorRef& style, double eps,
                                    std::optional<Layout> layout);
ChannelGeometry check_adain_style_stats(const TensorRef& x, const TensorRef& y, const TensorRef& style_mean,
                                        const TensorRef& style_std, double eps, std::optional<Layout> layout);

// ---- backward (norms/backward_norms.cpp) ----------------------------------------
// LayerNorm / RMSNorm backward: the forward's checks (dx as its y) plus dy,
// mean/rstd and dweight/dbias. Returns the row geometry; dy's row stride in
// `dy_row_stride`.
kernels::RowsForward check_rows_backward(kernels::RowsNorm norm, const TensorRef& dy, const TensorRef& x,
                                         const TensorRef& mean, const TensorRef& rstd,
                                         const Dims& normalized_shape, const TensorRef& weight, const TensorRef& dx,
                                         const TensorRef& dweight, const TensorRef& dbias,
                                         std::int64_t& dy_row_stride);
// What every channel-norm backward shares; returns x's geometry.
ChannelGeometry check_channel_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx,
                                       std::optional<Layout> layout, const TensorRef& weight,
                                       const TensorRef& dweight, const TensorRef& dbias);
// mean / rstd given to a backward: `count` entries of stats_dtype(x), apart
// from the outputs dx, dweight, dbias.
void check_backward_stats(const TensorRef& mean, const TensorRef& rstd, std::int64_t count, DType x_dtype,
                          const TensorRef& dx, const TensorRef& dweight, const TensorRef& dbias);
ChannelGeometry check_adain_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, double eps,
                                     std::optional<Layout> layout);
// AdaIN backward from a style map: returns the style's geometry.
ChannelGeometry check_adain_backward_map(const TensorRef& dy, const TensorRef& x, const ChannelGeometry& g,
                                         const TensorRef& style, const TensorRef& dx, const TensorRef& dstyle);
void check_adain_backward_stats(const TensorRef& dy, const TensorRef& x, const TensorRef& dx,
                                const ChannelGeometry& g, const TensorRef& style_mean, const TensorRef& style_std,
                                const TensorRef& dstyle_mean, const TensorRef& dstyle_std);

}  // namespace normkit::norms
