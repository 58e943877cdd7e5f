// norms/backward_norms.cpp - gradients of every norm (normkit/norms.hpp).
//
// With xhat = (x - mean) * rstd over the elements a statistic covers (M of
// them) and g = dy * weight, every norm's input gradient is
//     dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
// (RMSNorm: no mean(g) term; inference BatchNorm / InstanceNorm with running
// statistics: dx = g * rstd), and dweight = sum(dy * xhat), dbias = sum(dy).
//
//   LayerNorm / RMSNorm, and channels-first InstanceNorm / GroupNorm / AdaIN:
//     the fused rows kernel, one read of each row from memory.
//   BatchNorm, and channels-last InstanceNorm / GroupNorm / AdaIN: gradient
//     sums per (sample,) channel, then one apply pass
//     dx = dy * dy_scale + (x - exact mean) * scale + shift.
// Saved means may have been rounded to float32: the sums also give the exact
// mean of x (mean + sum(x - mean) / M), and dx uses that.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "norms/checks.hpp"
#include "kernels/kernel_api.hpp"
#include "normkit/moments.hpp"
#include "normkit/norms.hpp"
#include "plan/backward_plan.hpp"
#include "plan/channel_plan.hpp"
#include "plan/rows_plan.hpp"

namespace normkit {

namespace {

using plan::ChannelGeometry;

bool is_16bit(DType d) { return d == DType::float16 || d == DType::bfloat16; }

void write_zeros(const TensorRef& t) {
  if (t.given) plan::write_all(t, std::vector<double>(t.numel(), 0.0));
}

// dy: x's shape and dtype; dx: likewise, not overlapping dy or x unless it is one of them.
void check_dy_dx_rows(const TensorRef& dy, const TensorRef& x, const TensorRef& dx) {
  core::check_given(dy, "dy");
  if (dy.shape != x.shape)
    core::fail_value("dy: expected the shape of x " + x.shape.to_string() + ", got " + dy.shape.to_string());
  if (dy.dtype != x.dtype)
    core::fail_type("dy: expected dtype " + std::string(to_string(x.dtype)) + " like x, got " +
                    to_string(dy.dtype));
  if (!core::same_memory(dy, dx)) core::check_no_partial_overlap(dy, dx, "dx", "dy");
}

}  // namespace

namespace norms {

kernels::RowsForward check_rows_backward(kernels::RowsNorm norm, const TensorRef& dy, const TensorRef& x,
                                         const TensorRef& mean, const TensorRef& rstd,
                                         const Dims& normalized_shape, const TensorRef& weight, const TensorRef& dx,
                                         const TensorRef& dweight, const TensorRef& dbias,
                                         std::int64_t& dy_row_stride) {
  // The forward's planner validates x, dx (as its y), normalized_shape, weight
  // and the statistics' counts and dtype, and gives the row geometry.
  const kernels::RowsForward f = plan::plan_rows_forward(norm, x, dx, normalized_shape, weight, TensorRef{}, 1.0,
                                                         norm == kernels::RowsNorm::layer ? mean : TensorRef{},
                                                         rstd, "dx");
  core::check_given(rstd, "rstd");
  if (norm == kernels::RowsNorm::layer) core::check_given(mean, "mean");
  check_dy_dx_rows(dy, x, dx);
  plan::RowsView dyv;
  if (!plan::as_rows(dy, normalized_shape.size(), dyv))
    core::fail_value("dy: the normalized dims must be contiguous and the leading dims must collapse to one stride; "
                     "pass a contiguous copy");
  dy_row_stride = dyv.row_stride;
  const DType param_dtype = weight.given ? weight.dtype : (is_16bit(x.dtype) ? DType::float32 : x.dtype);
  for (const auto* out : {&dweight, &dbias}) {
    if (!out->given) continue;
    const char* name = out == &dweight ? "dweight" : "dbias";
    const DType want = (!weight.given && is_16bit(x.dtype) && out->dtype == x.dtype) ? x.dtype : param_dtype;
    core::check_param(*out, name, normalized_shape, want);
  }
  core::check_disjoint({{dweight, "dweight"}, {dbias, "dbias"}},
                       {{x, "x"}, {dy, "dy"}, {dx, "dx"}, {weight, "weight"}, {mean, "mean"}, {rstd, "rstd"}});
  return f;
}

// Validates what every channel-norm backward shares and returns x's geometry.
ChannelGeometry check_channel_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx,
                                       std::optional<Layout> layout, const TensorRef& weight,
                                       const TensorRef& dweight, const TensorRef& dbias) {
  const ChannelGeometry g = plan::channel_geometry(x, layout);
  core::check_given(dy, "dy");
  plan::check_output_like(x, dy, "dy");
  plan::check_output_like(x, dx, "dx");
  if (!core::same_memory(dy, dx)) core::check_no_partial_overlap(dy, dx, "dx", "dy");
  plan::check_channel_param(weight, "weight", g.c, x.dtype);
  plan::check_channel_param(dweight, "dweight", g.c, x.dtype);
  plan::check_channel_param(dbias, "dbias", g.c, x.dtype);
  core::check_disjoint({{dx, "dx"}, {dweight, "dweight"}, {dbias, "dbias"}}, {{weight, "weight"}});
  core::check_disjoint({{dweight, "dweight"}, {dbias, "dbias"}}, {{x, "x"}, {dy, "dy"}});
  return g;
}

void check_backward_stats(const TensorRef& mean, const TensorRef& rstd, std::int64_t count, DType x_dtype,
                          const TensorRef& dx, const TensorRef& dweight, const TensorRef& dbias) {
  core::check_stats_output(mean, "mean", count, stats_dtype(x_dtype));
  core::check_stats_output(rstd, "rstd", count, stats_dtype(x_dtype));
  core::check_disjoint({{dx, "dx"}, {dweight, "dweight"}, {dbias, "dbias"}}, {{mean, "mean"}, {rstd, "rstd"}});
}

ChannelGeometry check_adain_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, double eps,
                                     std::optional<Layout> layout) {
  const ChannelGeometry g = check_channel_backward(dy, x, dx, layout, TensorRef{}, TensorRef{}, TensorRef{});
  core::check_eps(eps);
  if (x.numel() > 0 && g.s <= 1)
    core::fail_value("x: expected more than 1 spatial element, got input of shape " + x.shape.to_string());
  return g;
}

ChannelGeometry check_adain_backward_map(const TensorRef& dy, const TensorRef& x, const ChannelGeometry& g,
                                         const TensorRef& style, const TensorRef& dx, const TensorRef& dstyle) {
  const ChannelGeometry gs = plan::style_geometry(x, g, style);
  if (gs.s < 1 && x.numel() > 0) core::fail_value("style: has no spatial elements");  // as the forward
  if (dstyle.given) {
    plan::check_output_like(style, dstyle, "dstyle");
  }
  core::check_disjoint({{dx, "dx"}, {dstyle, "dstyle"}}, {{style, "style"}});
  core::check_disjoint({{dstyle, "dstyle"}}, {{x, "x"}, {dy, "dy"}});
  return gs;
}

void check_adain_backward_stats(const TensorRef& dy, const TensorRef& x, const TensorRef& dx,
                                const ChannelGeometry& g, const TensorRef& style_mean, const TensorRef& style_std,
                                const TensorRef& dstyle_mean, const TensorRef& dstyle_std) {
  const DType x_dtype = x.dtype;
  const DType pd = (style_mean.given && style_mean.dtype == DType::float32) ? DType::float32 : x_dtype;
  core::check_param(style_mean, "style_mean", Dims{g.n, g.c}, pd);
  core::check_param(style_std, "style_std", Dims{g.n, g.c}, pd);
  if (dstyle_mean.given) core::check_param(dstyle_mean, "dstyle_mean", Dims{g.n, g.c}, pd);
  if (dstyle_std.given) core::check_param(dstyle_std, "dstyle_std", Dims{g.n, g.c}, pd);
  core::check_disjoint({{dx, "dx"}, {dstyle_mean, "dstyle_mean"}, {dstyle_std, "dstyle_std"}},
                       {{style_mean, "style_mean"}, {style_std, "style_std"}});
  core::check_disjoint({{dstyle_mean, "dstyle_mean"}, {dstyle_std, "dstyle_std"}}, {{x, "x"}, {dy, "dy"}});
}

}  // namespace norms

namespace {

using namespace norms;

// ---- rows norms ---------------------------------------------------------------

void rows_backward(kernels::RowsNorm norm, const TensorRef& dy, const TensorRef& x, const TensorRef& mean,
                   const TensorRef& rstd, const Dims& normalized_shape, const TensorRef& weight, const TensorRef& dx,
                   const TensorRef& dweight, const TensorRef& dbias) {
  plan::RowsView dyv;
  const kernels::RowsForward f = norms::check_rows_backward(norm, dy, x, mean, rstd, normalized_shape, weight, dx,
                                                            dweight, dbias, dyv.row_stride);
  const std::int64_t rows = f.rows, cols = f.cols;
  if (rows == 0 || cols == 0) {
    write_zeros(dweight);
    write_zeros(dbias);
    return;
  }
  const plan::RowsParamGrads grads = plan::rows_backward(norm, f, dy, dyv.row_stride, x, mean, rstd, weight, dx,
                                                         dweight.given || dbias.given);
  plan::write_all(dweight, grads.dweight);
  plan::write_all(dbias, grads.dbias);
}

// ---- channel norms ---------------------------------------------------------------

double weight_at(const TensorRef& weight, std::int64_t c) {
  return weight.given ? plan::read_element(weight, c) : 1.0;
}

// The C weights (ones when not given) `samples` times over: per channel, or
// per (sample, channel) for the per-sample norms.
std::vector<double> weights_per_sample(const TensorRef& weight, std::int64_t c, std::int64_t samples) {
  const std::vector<double> w = weight.given ? plan::read_all(weight) : std::vector<double>(c, 1.0);
  std::vector<double> out(samples * c);
  for (std::int64_t n = 0; n < samples; ++n) std::copy(w.begin(), w.end(), out.begin() + n * c);
  return out;
}

// Gradient of a norm with statistics per (sample, group) and an affine weight
// per (sample, channel) `w_nc` (GroupNorm, InstanceNorm, AdaIN). Writes dx;
// returns per (sample, channel) sums of dy and of dy * xhat.
struct AffineGrads {
  std::vector<double> sum_dy, sum_dy_xhat;
};

AffineGrads per_sample_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx,
                                const ChannelGeometry& g, std::int64_t groups, const std::vector<double>& mean_ng,
                                const std::vector<double>& rstd_ng, const std::vector<double>& w_nc) {
  const std::int64_t per_group = g.c / groups;
  AffineGrads out;
  out.sum_dy.assign(g.n * g.c, 0.0);
  out.sum_dy_xhat.assign(g.n * g.c, 0.0);
  if (x.numel() == 0) return out;

  if (!g.channels_last) {
    plan::grouped_rows_backward(dy, x, dx, g, groups, mean_ng, rstd_ng, w_nc, out.sum_dy, out.sum_dy_xhat);
    return out;
  }

  // Channels-last: sums per (sample, channel), then one apply pass; a large
  // sample is done whole before the next, so the apply pass re-reads it from cache.
  const std::int64_t step = plan::samples_per_step(g, x.dtype);
  const double count = double(per_group * g.s);
  for (std::int64_t n0 = 0; n0 < g.n; n0 += step) {
    const std::int64_t samples = std::min(step, g.n - n0), first = n0 * g.c, entries = samples * g.c;
    ChannelGeometry gs = g;
    gs.n = samples;
    std::vector<double> center(entries);
    for (std::int64_t e = 0; e < entries; ++e)
      center[e] = mean_ng[(first + e) / g.c * groups + (first + e) % g.c / per_group];
    const TensorRef xs = plan::sample_slice(x, n0, samples), dys = plan::sample_slice(dy, n0, samples);
    const plan::GradSums sums = plan::channel_grad_sums(xs, dys, gs, /*per_sample=*/true, center);
    std::vector<double> dy_scale(entries), scale(entries), shift(entries);
    for (std::int64_t e0 = 0; e0 < entries; e0 += per_group) {  // one group of one sample
      const std::int64_t n = (first + e0) / g.c, grp = (first + e0) % g.c / per_group;
      const double rs = rstd_ng[n * groups + grp];
      double xc = 0;
      for (std::int64_t j = 0; j < per_group; ++j) xc += sums.xc[e0 + j];
      const double delta = xc / count;
      double sum_g = 0, sum_g_xhat = 0;
      for (std::int64_t j = 0; j < per_group; ++j) {
        const std::int64_t e = e0 + j, ge = first + e;
        out.sum_dy[ge] = sums.dy[e];
        out.sum_dy_xhat[ge] = rs * (sums.dy_xc[e] - delta * sums.dy[e]);
        sum_g += w_nc[ge] * out.sum_dy[ge];
        sum_g_xhat += w_nc[ge] * out.sum_dy_xhat[ge];
      }
      for (std::int64_t j = 0; j < per_group; ++j) {
        const std::int64_t e = e0 + j;
        center[e] += delta;
        dy_scale[e] = w_nc[first + e] * rs;
        scale[e] = -rs * rs * (sum_g_xhat / count);
        shift[e] = -rs * (sum_g / count);
      }
    }
    plan::channel_apply(xs, plan::sample_slice(dx, n0, samples), gs, /*per_sample=*/true, scale, shift, &center,
                        dx.numel() * element_size(dx.dtype), dys, &dy_scale);
  }
  return out;
}

// Gradient with known, constant statistics (running statistics): dx = dy * w * rstd
// per (sample,) channel; returns the sums for dweight / dbias (only if wanted).
plan::GradSums constant_stats_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx,
                                       const ChannelGeometry& g, bool per_sample, const std::vector<double>& mean,
                                       const std::vector<double>& dx_scale, bool want_sums) {
  // Sums first: dx may be x or dy itself (in place), and the apply overwrites it.
  plan::GradSums sums;
  if (want_sums) sums = plan::channel_grad_sums(x, dy, g, per_sample, mean);
  plan::channel_apply(dy, dx, g, per_sample, dx_scale, std::vector<double>(dx_scale.size(), 0.0), nullptr);
  return sums;
}

// One channel of BatchNorm's training backward, from its reductions over the
// whole batch (count values; sum_dy_xmu taken around `center`, the exact mean):
// the weight / bias gradients and the apply step's terms.
struct BatchChannelGrad {
  double dw, db;
  plan::ChannelApplyTerms apply;
};
BatchChannelGrad batch_channel_grad(double w, double rs, double center, double sum_dy, double sum_dy_xmu,
                                    std::int64_t count) {
  const double dw = rs * sum_dy_xmu, db = sum_dy;
  return {dw, db, {center, -w * rs * rs * (dw / double(count)), -w * rs * (db / double(count)), w * rs}};
}

// The saved mean may have been rounded (float32): the exact mean of x is
// mean + sum(x - mean) / count, and dy * (x - mean) is taken around it.
BatchChannelGrad batch_channel_grad_recentred(double w, double rs, double mean, const plan::ChannelGradSums& s,
                                              std::int64_t count) {
  const double delta = s.xc / double(count);
  return batch_channel_grad(w, rs, mean + delta, s.dy, s.dy_xc - delta * s.dy, count);
}

// BatchNorm's training backward apply pass for all channels, from their
// reductions over the whole batch: dx for this x, and the weight / bias gradients.
void batch_training_apply(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, const ChannelGeometry& g,
                          const std::vector<BatchChannelGrad>& grads,
                          std::vector<double>& dw, std::vector<double>& db) {
  std::vector<double> center(g.c), scale(g.c), shift(g.c), dy_scale(g.c);
  for (std::int64_t c = 0; c < g.c; ++c) {
    const BatchChannelGrad& t = grads[c];
    dw[c] = t.dw;
    db[c] = t.db;
    center[c] = t.apply.center;
    scale[c] = t.apply.scale;
    shift[c] = t.apply.shift;
    dy_scale[c] = t.apply.dy_scale;
  }
  if (x.numel() > 0) plan::channel_apply(x, dx, g, /*per_sample=*/false, scale, shift, &center, 0, dy, &dy_scale);
}

// A statistic given to the distributed backward: (C), float64 (exact) or stats_dtype(x).
void check_given_stat(const TensorRef& t, const char* name, std::int64_t channels, DType x_dtype) {
  core::check_given(t, name);
  core::check_stats_output(t, name, channels, t.dtype == DType::float64 ? DType::float64 : stats_dtype(x_dtype));
}

}  // namespace

void layer_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         const Dims& normalized_shape, const TensorRef& weight, const TensorRef& dx,
                         const TensorRef& dweight, const TensorRef& dbias) {
  rows_backward(kernels::RowsNorm::layer, dy, x, mean, rstd, normalized_shape, weight, dx, dweight, dbias);
}

void rms_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& rstd, const Dims& normalized_shape,
                       const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight) {
  rows_backward(kernels::RowsNorm::rms, dy, x, TensorRef{}, rstd, normalized_shape, weight, dx, dweight,
                TensorRef{});
}

void batch_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight,
                         const TensorRef& dbias, bool training, std::optional<Layout> layout) {
  const ChannelGeometry g = check_channel_backward(dy, x, dx, layout, weight, dweight, dbias);
  check_backward_stats(mean, rstd, g.c, x.dtype, dx, dweight, dbias);
  if (x.numel() == 0) {
    write_zeros(dweight);
    write_zeros(dbias);
    return;
  }
  const std::vector<double> mean_c = plan::read_all(mean), rstd_c = plan::read_all(rstd);
  std::vector<double> dw(g.c), db(g.c);
  if (!training) {
    std::vector<double> dx_scale(g.c);
    for (std::int64_t c = 0; c < g.c; ++c) dx_scale[c] = weight_at(weight, c) * rstd_c[c];
    const plan::GradSums s =
        constant_stats_backward(dy, x, dx, g, false, mean_c, dx_scale, dweight.given || dbias.given);
    if (dweight.given || dbias.given)
      for (std::int64_t c = 0; c < g.c; ++c) {
        dw[c] = rstd_c[c] * s.dy_xc[c];
        db[c] = s.dy[c];
      }
  } else if (plan::use_batch_planes_backward(g, x.dtype)) {
    // A row per channel: its planes' sums, then its dx while they are in cache.
    plan::batch_planes_backward(dy, x, dx, g, mean_c, rstd_c, weights_per_sample(weight, g.c, 1), db, dw);
  } else if (plan::use_batch_grad_by_channel(g, x.dtype)) {
    // Channels first: each channel's sums and dx while it is in cache.
    plan::batch_grad_by_channel(x, dy, dx, g, mean_c, [&](std::int64_t c, const plan::ChannelGradSums& s) {
      const BatchChannelGrad t = batch_channel_grad_recentred(weight_at(weight, c), rstd_c[c], mean_c[c], s, g.n * g.s);
      dw[c] = t.dw;
      db[c] = t.db;
      return t.apply;
    });
  } else {
    // Sums first (dx may overwrite x or dy), then the apply pass.
    const plan::GradSums s = plan::channel_grad_sums(x, dy, g, /*per_sample=*/false, mean_c);
    std::vector<BatchChannelGrad> grads(g.c);
    for (std::int64_t c = 0; c < g.c; ++c)
      grads[c] = batch_channel_grad_recentred(weight_at(weight, c), rstd_c[c], mean_c[c],
                                              {s.dy[c], s.dy_xc[c], s.xc[c]}, s.count);
    batch_training_apply(dy, x, dx, g, grads, dw, db);
  }
  plan::write_all(dweight, dw);
  plan::write_all(dbias, db);
}

BatchNormGradSums batch_norm_grad_sums(const TensorRef& dy, const TensorRef& x, const TensorRef& mean,
                                       std::optional<Layout> layout) {
  const ChannelGeometry g = check_channel_backward(dy, x, dy, layout, TensorRef{}, TensorRef{}, TensorRef{});
  check_given_stat(mean, "mean", g.c, x.dtype);
  BatchNormGradSums out;
  out.count = g.n * g.s;
  out.sum_dy.assign(g.c, 0.0);
  out.sum_dy_xmu.assign(g.c, 0.0);
  if (x.numel() == 0) return out;
  const plan::GradSums s = plan::channel_grad_sums(x, dy, g, /*per_sample=*/false, plan::read_all(mean));
  out.sum_dy = s.dy;
  out.sum_dy_xmu = s.dy_xc;
  return out;
}

void batch_norm_backward_with_sums(const TensorRef& dy, const TensorRef& x, const TensorRef& mean,
                                   const TensorRef& rstd, const BatchNormGradSums& global_sums,
                                   const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight,
                                   const TensorRef& dbias, std::optional<Layout> layout) {
  const ChannelGeometry g = check_channel_backward(dy, x, dx, layout, weight, dweight, dbias);
  check_given_stat(mean, "mean", g.c, x.dtype);
  check_given_stat(rstd, "rstd", g.c, x.dtype);
  core::check_disjoint({{dx, "dx"}, {dweight, "dweight"}, {dbias, "dbias"}}, {{mean, "mean"}, {rstd, "rstd"}});
  const auto channels = static_cast<std::size_t>(g.c);
  if (global_sums.sum_dy.size() != channels || global_sums.sum_dy_xmu.size() != channels)
    core::fail_value("sum_dy: expected " + std::to_string(g.c) + " values (one per channel) in sum_dy and " +
                     "sum_dy_xmu, got " + std::to_string(global_sums.sum_dy.size()) + " and " +
                     std::to_string(global_sums.sum_dy_xmu.size()));
  if (global_sums.count < g.n * g.s || global_sums.count < 1)
    core::fail_value("count: the whole batch's count (" + std::to_string(global_sums.count) +
                     ") must be positive and at least this part's " + std::to_string(g.n * g.s));
  const std::vector<double> mean_c = plan::read_all(mean), rstd_c = plan::read_all(rstd);
  std::vector<double> dw(g.c), db(g.c);
  std::vector<BatchChannelGrad> grads(g.c);
  for (std::int64_t c = 0; c < g.c; ++c)
    grads[c] = batch_channel_grad(weight_at(weight, c), rstd_c[c], mean_c[c], global_sums.sum_dy[c],
                                  global_sums.sum_dy_xmu[c], global_sums.count);
  batch_training_apply(dy, x, dx, g, grads, dw, db);
  plan::write_all(dweight, dw);
  plan::write_all(dbias, db);
}

BatchNormGradSums& BatchNormGradSums::add(const BatchNormGradSums& other) {
  if (sum_dy.empty() && sum_dy_xmu.empty() && count == 0) return *this = other;
  if (other.sum_dy.size() != sum_dy.size() || other.sum_dy_xmu.size() != sum_dy_xmu.size())
    core::fail_value("other: expected sums of " + std::to_string(sum_dy.size()) + " channels, got " +
                     std::to_string(other.sum_dy.size()));
  count += other.count;
  for (std::size_t c = 0; c < sum_dy.size(); ++c) {
    sum_dy[c] += other.sum_dy[c];
    sum_dy_xmu[c] += other.sum_dy_xmu[c];
  }
  return *this;
}

void instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                            const TensorRef& weight, const TensorRef& dx, const TensorRef& dweight,
                            const TensorRef& dbias, bool use_input_stats, std::optional<Layout> layout) {
  const ChannelGeometry g = check_channel_backward(dy, x, dx, layout, weight, dweight, dbias);
  check_backward_stats(mean, rstd, g.n * g.c, x.dtype, dx, dweight, dbias);
  if (x.numel() == 0) {
    write_zeros(dweight);
    write_zeros(dbias);
    return;
  }
  const std::vector<double> mean_nc = plan::read_all(mean), rstd_nc = plan::read_all(rstd);
  const std::vector<double> w_nc = weights_per_sample(weight, g.c, g.n);
  std::vector<double> dw(g.c, 0.0), db(g.c, 0.0);
  if (use_input_stats) {
    const AffineGrads a = per_sample_backward(dy, x, dx, g, g.c, mean_nc, rstd_nc, w_nc);
    for (std::int64_t i = 0; i < g.n * g.c; ++i) {  // samples merged in order
      dw[i % g.c] += a.sum_dy_xhat[i];
      db[i % g.c] += a.sum_dy[i];
    }
  } else {
    std::vector<double> dx_scale(g.n * g.c);
    for (std::int64_t i = 0; i < g.n * g.c; ++i) dx_scale[i] = w_nc[i] * rstd_nc[i];
    const bool want = dweight.given || dbias.given;
    const plan::GradSums s = constant_stats_backward(dy, x, dx, g, true, mean_nc, dx_scale, want);
    if (want)
      for (std::int64_t i = 0; i < g.n * g.c; ++i) {
        dw[i % g.c] += rstd_nc[i] * s.dy_xc[i];
        db[i % g.c] += s.dy[i];
      }
  }
  plan::write_all(dweight, dw);
  plan::write_all(dbias, db);
}

void group_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& mean, const TensorRef& rstd,
                         std::int64_t num_groups, const TensorRef& weight, const TensorRef& dx,
                         const TensorRef& dweight, const TensorRef& dbias, std::optional<Layout> layout) {
  const ChannelGeometry g = check_channel_backward(dy, x, dx, layout, weight, dweight, dbias);
  plan::check_num_groups(num_groups, g.c);
  check_backward_stats(mean, rstd, g.n * num_groups, x.dtype, dx, dweight, dbias);
  if (x.numel() == 0) {
    write_zeros(dweight);
    write_zeros(dbias);
    return;
  }
  const std::vector<double> w_nc = weights_per_sample(weight, g.c, g.n);
  std::vector<double> dw(g.c, 0.0), db(g.c, 0.0);
  const AffineGrads a = per_sample_backward(dy, x, dx, g, num_groups, plan::read_all(mean), plan::read_all(rstd), w_nc);
  for (std::int64_t i = 0; i < g.n * g.c; ++i) {
    dw[i % g.c] += a.sum_dy_xhat[i];
    db[i % g.c] += a.sum_dy[i];
  }
  plan::write_all(dweight, dw);
  plan::write_all(dbias, db);
}

namespace {

// AdaIN's content side: x's statistics recomputed, weight = style std per
// (sample, channel). Returns dstyle_mean (sum dy) and dstyle_std (sum dy * xhat).
AffineGrads adain_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& dx, const ChannelGeometry& g,
                           const std::vector<double>& style_std, double eps) {
  const plan::GroupMoments m = plan::channel_moments(x, g, g.c, /*per_sample=*/true);
  std::vector<double> rstd(m.var.size());
  for (std::size_t i = 0; i < rstd.size(); ++i) rstd[i] = 1.0 / std::sqrt(m.var[i] + eps);
  return per_sample_backward(dy, x, dx, g, g.c, m.mean, rstd, style_std);
}

}  // namespace

void adaptive_instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& style, double eps,
                                     const TensorRef& dx, const TensorRef& dstyle, std::optional<Layout> layout) {
  const ChannelGeometry g = check_adain_backward(dy, x, dx, eps, layout);
  const ChannelGeometry gs = check_adain_backward_map(dy, x, g, style, dx, dstyle);
  if (x.numel() == 0 || style.numel() == 0) {
    write_zeros(dstyle);
    return;
  }
  const plan::GroupMoments ms = plan::channel_moments(style, gs, g.c, /*per_sample=*/true);
  std::vector<double> style_std(ms.var.size());
  for (std::size_t i = 0; i < style_std.size(); ++i) style_std[i] = std::sqrt(ms.var[i] + eps);
  const AffineGrads a = adain_backward(dy, x, dx, g, style_std, eps);
  if (!dstyle.given) return;
  // style_mean = mean(style), style_std = sqrt(var(style) + eps):
  // dstyle = dmean / S + dstd * (style - mean) / (S * std).
  const double count = double(gs.s);
  std::vector<double> scale(g.n * g.c), shift(g.n * g.c);
  for (std::int64_t i = 0; i < g.n * g.c; ++i) {
    scale[i] = a.sum_dy_xhat[i] / (count * style_std[i]);
    shift[i] = a.sum_dy[i] / count;
  }
  plan::channel_apply(style, dstyle, gs, /*per_sample=*/true, scale, shift, &ms.mean);
}

void adaptive_instance_norm_backward(const TensorRef& dy, const TensorRef& x, const TensorRef& style_mean,
                                     const TensorRef& style_std, double eps, const TensorRef& dx,
                                     const TensorRef& dstyle_mean, const TensorRef& dstyle_std,
                                     std::optional<Layout> layout) {
  const ChannelGeometry g = check_adain_backward(dy, x, dx, eps, layout);
  check_adain_backward_stats(dy, x, dx, g, style_mean, style_std, dstyle_mean, dstyle_std);
  if (x.numel() == 0) {
    write_zeros(dstyle_mean);
    write_zeros(dstyle_std);
    return;
  }
  const AffineGrads a = adain_backward(dy, x, dx, g, plan::read_all(style_std), eps);
  plan::write_all(dstyle_mean, a.sum_dy);
  plan::write_all(dstyle_std, a.sum_dy_xhat);
}

}  // namespace normkit
