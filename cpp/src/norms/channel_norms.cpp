// norms/channel_norms.cpp - BatchNorm, InstanceNorm, GroupNorm and AdaIN entry points.
//
// Each validates its arguments, gets statistics through the channel plan
// (plan/channel_plan.hpp), turns them and the affine into per-channel (or per
// (sample, channel)) tables, and applies them. Running statistics are updated
// here, in double, after y is written (so in-place calls see the original x).
#include <cmath>
#include <utility>
#include <string>
#include <vector>

#include "core/check.hpp"
#include "norms/checks.hpp"
#include "normkit/moments.hpp"
#include "normkit/norms.hpp"
#include "plan/channel_plan.hpp"
#include "plan/store_plan.hpp"

namespace normkit {

using plan::ChannelGeometry;

namespace norms {

void check_momentum(double momentum) {
  if (!std::isfinite(momentum))
    core::fail_value("momentum: must be a finite number, got " + std::to_string(momentum));
}

DType param_dtype(const TensorRef& weight, const TensorRef& bias, DType x_dtype) {
  const TensorRef* first = weight.given ? &weight : (bias.given ? &bias : nullptr);
  if (first && (x_dtype == DType::float16 || x_dtype == DType::bfloat16) && first->dtype == DType::float32)
    return DType::float32;
  return x_dtype;
}

void check_affine(const TensorRef& weight, const TensorRef& bias, std::int64_t channels, DType x_dtype) {
  const DType pd = param_dtype(weight, bias, x_dtype);
  if (weight.given) core::check_param(weight, "weight", Dims{channels}, pd);
  if (bias.given) core::check_param(bias, "bias", Dims{channels}, pd);
}

void require_running(const TensorRef& t, const char* name, const char* when) {
  if (!t.given) core::fail_value(std::string(name) + ": required " + when);
}

ChannelGeometry check_running_norm(const TensorRef& x, const TensorRef& y, const TensorRef& running_mean,
                                   const TensorRef& running_var, const TensorRef& weight, const TensorRef& bias,
                                   double momentum, double eps, std::optional<Layout> layout,
                                   const TensorRef& mean, const TensorRef& rstd, bool stats_per_sample,
                                   std::optional<DType> y_dtype) {
  const ChannelGeometry g = plan::channel_geometry(x, layout);
  plan::check_output_like(x, y, "y", y_dtype);
  core::check_eps(eps);
  check_momentum(momentum);
  check_affine(weight, bias, g.c, x.dtype);
  plan::check_running_stat(running_mean, "running_mean", g.c, x.dtype);
  plan::check_running_stat(running_var, "running_var", g.c, x.dtype);
  if (running_mean.given != running_var.given)
    core::fail_value(std::string(running_mean.given ? "running_var" : "running_mean") +
                     ": running_mean and running_var must be given together");
  const std::int64_t stats = stats_per_sample ? g.n * g.c : g.c;
  if (mean.given) core::check_stats_output(mean, "mean", stats, stats_dtype(x.dtype));
  if (rstd.given) core::check_stats_output(rstd, "rstd", stats, stats_dtype(x.dtype));
  // The running statistics are written in training and read in eval: apart
  // from every other argument either way.
  core::check_disjoint({{y, "y"}, {mean, "mean"}, {rstd, "rstd"}, {running_mean, "running_mean"},
                        {running_var, "running_var"}},
                       {{weight, "weight"}, {bias, "bias"}});
  core::check_disjoint({{mean, "mean"}, {rstd, "rstd"}, {running_mean, "running_mean"}, {running_var, "running_var"}},
                       {{x, "x"}});
  return g;
}

void check_batch_statistics(const TensorRef& x, const ChannelGeometry& g) {
  if (g.n * g.s == 1)
    core::fail_value("x: expected more than 1 value per channel when training, got input of shape " +
                     x.shape.to_string());
}

void check_given_batch_stats(const Moments& stats, std::int64_t channels) {
  if (stats.shape != Dims{channels} || stats.size() != channels ||
      static_cast<std::int64_t>(stats.m2.size()) != channels)
    core::fail_value("stats: expected moments of shape (" + std::to_string(channels) + ",) for x's " +
                     std::to_string(channels) + " channels, got shape " + stats.shape.to_string());
  if (stats.count < 2)
    core::fail_value("stats: expected more than 1 value per channel when training, got a count of " +
                     std::to_string(stats.count));
}

void check_instance_statistics(const TensorRef& x, const ChannelGeometry& g) {
  if (g.s == 1 && x.numel() > 0)
    core::fail_value("x: expected more than 1 spatial element when training, got input of shape " +
                     x.shape.to_string());
}

ChannelGeometry check_group_norm(const TensorRef& x, const TensorRef& y, std::int64_t num_groups,
                                 const TensorRef& weight, const TensorRef& bias, double eps,
                                 std::optional<Layout> layout, const TensorRef& mean, const TensorRef& rstd,
                                 std::optional<DType> y_dtype) {
  const ChannelGeometry g = plan::channel_geometry(x, layout);
  plan::check_output_like(x, y, "y", y_dtype);
  core::check_eps(eps);
  plan::check_num_groups(num_groups, g.c);
  check_affine(weight, bias, g.c, x.dtype);
  if (mean.given) core::check_stats_output(mean, "mean", g.n * num_groups, stats_dtype(x.dtype));
  if (rstd.given) core::check_stats_output(rstd, "rstd", g.n * num_groups, stats_dtype(x.dtype));
  core::check_disjoint({{y, "y"}, {mean, "mean"}, {rstd, "rstd"}}, {{weight, "weight"}, {bias, "bias"}});
  core::check_disjoint({{mean, "mean"}, {rstd, "rstd"}}, {{x, "x"}});
  return g;
}

void check_adain_spatial(const TensorRef& x, const ChannelGeometry& g) {
  if (x.numel() > 0 && g.s <= 1)
    core::fail_value("x: expected more than 1 spatial element, got input of shape " + x.shape.to_string());
}

AdainStyleMap check_adain_style_map(const TensorRef& x, const TensorRef& y, const TensorRef& style, double eps,
                                    std::optional<Layout> layout) {
  const ChannelGeometry g = plan::channel_geometry(x, layout);
  plan::check_output_like(x, y);
  core::check_eps(eps);
  const ChannelGeometry gs = plan::style_geometry(x, g, style);
  if (gs.s < 1 && style.numel() == 0 && x.numel() > 0) core::fail_value("style: has no spatial elements");
  core::check_disjoint({{y, "y"}}, {{style, "style"}});
  return {g, gs};
}

ChannelGeometry check_adain_style_stats(const TensorRef& x, const TensorRef& y, const TensorRef& style_mean,
                                        const TensorRef& style_std, double eps, std::optional<Layout> layout) {
  const ChannelGeometry g = plan::channel_geometry(x, layout);
  plan::check_output_like(x, y);
  core::check_eps(eps);
  const DType pd = (style_mean.given && style_mean.dtype == DType::float32) ? DType::float32 : x.dtype;
  core::check_param(style_mean, "style_mean", Dims{g.n, g.c}, pd);
  core::check_param(style_std, "style_std", Dims{g.n, g.c}, pd);
  core::check_disjoint({{y, "y"}}, {{style_mean, "style_mean"}, {style_std, "style_std"}});
  return g;
}

}  // namespace norms

namespace {

using namespace norms;

// Channels first, statistics per (sample, group of channels): InstanceNorm's and
// GroupNorm's fused rows, one pass (each row's statistics, then its output) with
// the affine per channel.
plan::GroupMoments grouped_rows(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g, std::int64_t groups,
                                const TensorRef& weight, const TensorRef& bias, double eps,
                                const kernels::StoreStage& store) {
  plan::GroupMoments m;
  plan::fused_group_rows(x, y, g, groups, weight.given ? weight.data : nullptr, bias.given ? bias.data : nullptr,
                         param_dtype(weight, bias, x.dtype), groups, eps, m, &store);
  return m;
}

// t's entries in double (one switch per table), or n entries of `fallback`
// when t is not given.
std::vector<double> read_all_or(const TensorRef& t, std::int64_t n, double fallback) {
  return t.given ? plan::read_all(t) : std::vector<double>(n, fallback);
}

std::vector<double> rstd_of(const std::vector<double>& var, double eps) {
  std::vector<double> r(var.size());
  for (std::size_t i = 0; i < var.size(); ++i) r[i] = 1.0 / std::sqrt(var[i] + eps);
  return r;
}

// r = (1 - momentum) * r + momentum * value.
void update_running(const TensorRef& running, const std::vector<double>& values, double momentum) {
  if (!running.given) return;
  std::vector<double> r = plan::read_all(running);
  for (std::size_t c = 0; c < values.size(); ++c) r[c] = (1 - momentum) * r[c] + momentum * values[c];
  plan::write_all(running, r);
}

// Folded normalization with known per-channel statistics (inference).
void apply_running(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g, const TensorRef& running_mean,
                   const TensorRef& running_var, const TensorRef& weight, const TensorRef& bias, double eps,
                   std::vector<double>& mean_out, std::vector<double>& rstd_out, const kernels::StoreStage& store) {
  const std::vector<double> w = read_all_or(weight, g.c, 1.0), b = read_all_or(bias, g.c, 0.0);
  mean_out = plan::read_all(running_mean);
  rstd_out = rstd_of(plan::read_all(running_var), eps);
  std::vector<double> scale(g.c), shift(g.c);
  for (std::int64_t c = 0; c < g.c; ++c) {
    scale[c] = w[c] * rstd_out[c];
    shift[c] = b[c] - mean_out[c] * scale[c];
  }
  plan::channel_apply(x, y, g, /*per_sample=*/false, scale, shift, nullptr, 0, {}, nullptr, &store);
}

// An empty x (any of N, C or S is 0) has nothing to normalize: statistics
// outputs get NaN (0/0) and running statistics stay as they are, as in PyTorch.
// Call after validation. Returns true when x was empty.
bool finish_if_empty(const TensorRef& x, const TensorRef& mean, const TensorRef& rstd) {
  if (x.numel() != 0) return false;
  for (const TensorRef* t : {&mean, &rstd})
    if (t->given)
      for (std::int64_t i = 0; i < t->numel(); ++i) plan::write_element(*t, i, std::nan(""));
  return true;
}

}  // namespace

namespace {

// BatchNorm's running statistics after a training step: the batch mean and the
// unbiased batch variance (`count` values per channel), in double.
void update_batch_running(const TensorRef& running_mean, const TensorRef& running_var,
                          const std::vector<double>& batch_mean, const std::vector<double>& batch_var,
                          std::int64_t count, double momentum) {
  std::vector<double> unbiased(batch_var.size());
  for (std::size_t c = 0; c < batch_var.size(); ++c) unbiased[c] = batch_var[c] * double(count) / double(count - 1);
  update_running(running_mean, batch_mean, momentum);
  update_running(running_var, unbiased, momentum);
}

// BatchNorm training with per-channel statistics (mean, biased var over
// `count` values): y, then the running statistics (unbiased variance), in
// double, after y is written (an in-place call must not see them change first).
void normalize_with_batch_stats(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g,
                                const std::vector<double>& batch_mean, const std::vector<double>& batch_var,
                                std::int64_t count, const TensorRef& running_mean, const TensorRef& running_var,
                                const TensorRef& weight, const TensorRef& bias, double momentum, double eps,
                                const kernels::StoreStage& store, std::vector<double>& rstd_c) {
  rstd_c = rstd_of(batch_var, eps);
  if (x.numel() > 0) {
    const std::vector<double> w = read_all_or(weight, g.c, 1.0), shift = read_all_or(bias, g.c, 0.0);
    std::vector<double> scale(g.c);
    for (std::int64_t c = 0; c < g.c; ++c) scale[c] = w[c] * rstd_c[c];
    plan::channel_apply(x, y, g, /*per_sample=*/false, scale, shift, &batch_mean, 0, {}, nullptr, &store);
  }
  update_batch_running(running_mean, running_var, batch_mean, batch_var, count, momentum);
}

}  // namespace

void batch_norm(const TensorRef& x, const TensorRef& y, const TensorRef& running_mean,
                const TensorRef& running_var, const TensorRef& weight, const TensorRef& bias, bool training,
                double momentum, double eps, std::optional<Layout> layout, const TensorRef& mean,
                const TensorRef& rstd, const Epilogue& epilogue) {
  const ChannelGeometry g = check_running_norm(x, y, running_mean, running_var, weight, bias, momentum, eps,
                                               layout, mean, rstd, /*stats_per_sample=*/false,
                                               plan::output_dtype(epilogue, x.dtype));
  const kernels::StoreStage store = plan::plan_store(epilogue, x, y, 0, /*dynamic_allowed=*/false);

  std::vector<double> mean_c, rstd_c;
  if (!training) {
    require_running(running_mean, "running_mean", "when training is false");
    apply_running(x, y, g, running_mean, running_var, weight, bias, eps, mean_c, rstd_c, store);
  } else {
    check_batch_statistics(x, g);
    if (finish_if_empty(x, mean, rstd)) return;
    if (g.n == 1 && !g.channels_last) {
      // One sample: a channel's batch statistics are its plane's, and
      // InstanceNorm's fused rows write y in one pass over x (each plane's
      // statistics, then its output, while it is in cache) and one fork, not two.
      const plan::GroupMoments m = grouped_rows(x, y, g, g.c, weight, bias, eps, store);
      mean_c = m.mean;
      rstd_c = rstd_of(m.var, eps);
      update_batch_running(running_mean, running_var, m.mean, m.var, m.count, momentum);
    } else {
      const plan::GroupMoments m = plan::channel_moments(x, g, g.c, /*per_sample=*/false);
      mean_c = m.mean;
      normalize_with_batch_stats(x, y, g, m.mean, m.var, m.count, running_mean, running_var, weight, bias, momentum,
                                 eps, store, rstd_c);
    }
  }
  plan::write_stats_output(mean, "mean", mean_c, x.dtype);
  plan::write_stats_output(rstd, "rstd", rstd_c, x.dtype);
}

void batch_norm_with_stats(const TensorRef& x, const TensorRef& y, const Moments& stats,
                           const TensorRef& running_mean, const TensorRef& running_var, const TensorRef& weight,
                           const TensorRef& bias, double momentum, double eps, std::optional<Layout> layout,
                           const TensorRef& mean, const TensorRef& rstd, const Epilogue& epilogue) {
  const ChannelGeometry g = check_running_norm(x, y, running_mean, running_var, weight, bias, momentum, eps,
                                               layout, mean, rstd, /*stats_per_sample=*/false,
                                               plan::output_dtype(epilogue, x.dtype));
  check_given_batch_stats(stats, g.c);
  const kernels::StoreStage store = plan::plan_store(epilogue, x, y, 0, /*dynamic_allowed=*/false);
  std::vector<double> rstd_c;
  normalize_with_batch_stats(x, y, g, stats.mean, stats.var(0), stats.count, running_mean, running_var, weight,
                             bias, momentum, eps, store, rstd_c);
  plan::write_stats_output(mean, "mean", stats.mean, x.dtype);
  plan::write_stats_output(rstd, "rstd", rstd_c, x.dtype);
}

void instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& running_mean,
                   const TensorRef& running_var, const TensorRef& weight, const TensorRef& bias,
                   bool use_input_stats, double momentum, double eps, std::optional<Layout> layout,
                   const TensorRef& mean, const TensorRef& rstd, const Epilogue& epilogue) {
  plan::require_no_quantize(epilogue, "instance_norm");
  const ChannelGeometry g = check_running_norm(x, y, running_mean, running_var, weight, bias, momentum, eps,
                                               layout, mean, rstd, /*stats_per_sample=*/true);
  const kernels::StoreStage store = plan::plan_store(epilogue, x, y, 0, /*dynamic_allowed=*/false);

  std::vector<double> mean_nc, rstd_nc;
  if (!use_input_stats) {
    require_running(running_mean, "running_mean", "when use_input_stats is false");
    std::vector<double> mean_c, rstd_c;
    apply_running(x, y, g, running_mean, running_var, weight, bias, eps, mean_c, rstd_c, store);
    for (std::int64_t n = 0; n < g.n; ++n) {
      mean_nc.insert(mean_nc.end(), mean_c.begin(), mean_c.end());
      rstd_nc.insert(rstd_nc.end(), rstd_c.begin(), rstd_c.end());
    }
  } else {
    check_instance_statistics(x, g);
    if (finish_if_empty(x, mean, rstd)) return;
    plan::GroupMoments m;
    if (!g.channels_last) {
      m = grouped_rows(x, y, g, g.c, weight, bias, eps, store);
    } else {
      m = plan::channels_last_groups(x, y, g, g.c, eps, store, {plan::read_all(weight), plan::read_all(bias)});
    }
    mean_nc = m.mean;
    rstd_nc = rstd_of(m.var, eps);
    if (running_mean.given && g.n > 0) {
      std::vector<double> batch_mean(g.c, 0.0), batch_var(g.c, 0.0);
      const double unbias = double(g.s) / double(g.s - 1);
      for (std::int64_t n = 0; n < g.n; ++n)
        for (std::int64_t c = 0; c < g.c; ++c) {
          batch_mean[c] += m.mean[n * g.c + c] / double(g.n);
          batch_var[c] += m.var[n * g.c + c] * unbias / double(g.n);
        }
      update_running(running_mean, batch_mean, momentum);
      update_running(running_var, batch_var, momentum);
    }
  }
  plan::write_stats_output(mean, "mean", mean_nc, x.dtype);
  plan::write_stats_output(rstd, "rstd", rstd_nc, x.dtype);
}

void group_norm(const TensorRef& x, const TensorRef& y, std::int64_t num_groups, const TensorRef& weight,
                const TensorRef& bias, double eps, std::optional<Layout> layout, const TensorRef& mean,
                const TensorRef& rstd, const Epilogue& epilogue) {
  const ChannelGeometry g = check_group_norm(x, y, num_groups, weight, bias, eps, layout, mean, rstd,
                                             plan::output_dtype(epilogue, x.dtype));
  const kernels::StoreStage store = plan::plan_store(epilogue, x, y, 0, /*dynamic_allowed=*/false);
  if (finish_if_empty(x, mean, rstd)) return;

  plan::GroupMoments m;
  if (!g.channels_last) {
    m = grouped_rows(x, y, g, num_groups, weight, bias, eps, store);
  } else {
    m = plan::channels_last_groups(x, y, g, num_groups, eps, store, {plan::read_all(weight), plan::read_all(bias)});
  }
  plan::write_stats_output(mean, "mean", m.mean, x.dtype);
  plan::write_stats_output(rstd, "rstd", rstd_of(m.var, eps), x.dtype);
}

namespace {

void adain_apply(const TensorRef& x, const TensorRef& y, const ChannelGeometry& g,
                 const std::vector<double>& style_mean, const std::vector<double>& style_std, double eps,
                 const kernels::StoreStage& store) {
  if (x.numel() == 0) return;
  check_adain_spatial(x, g);
  if (!g.channels_last) {
    // One fused pass: per (sample, channel) row, weight = style std, bias = style mean.
    const DType table_dtype = x.dtype == DType::float64 ? DType::float64 : DType::float32;
    std::vector<float> wf, bf;
    std::vector<double> wd, bd;
    const void* w;
    const void* b;
    if (table_dtype == DType::float64) {
      wd = style_std;
      bd = style_mean;
      w = wd.data();
      b = bd.data();
    } else {
      wf.assign(style_std.begin(), style_std.end());
      bf.assign(style_mean.begin(), style_mean.end());
      w = wf.data();
      b = bf.data();
    }
    plan::GroupMoments m;
    plan::fused_group_rows(x, y, g, g.c, w, b, table_dtype, g.n * g.c, eps, m, &store);
    return;
  }
  plan::channels_last_groups(x, y, g, g.c, eps, store, {style_std, style_mean});
}

}  // namespace

void adaptive_instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& style, double eps,
                            std::optional<Layout> layout, const Epilogue& epilogue) {
  plan::require_no_quantize(epilogue, "adaptive_instance_norm");
  const auto [g, gs] = check_adain_style_map(x, y, style, eps, layout);
  const kernels::StoreStage store = plan::plan_store(epilogue, x, y, 0, /*dynamic_allowed=*/false);
  if (x.numel() == 0) return;
  const plan::GroupMoments ms = plan::channel_moments(style, gs, g.c, /*per_sample=*/true);
  std::vector<double> style_std(ms.var.size());
  for (std::size_t i = 0; i < style_std.size(); ++i) style_std[i] = std::sqrt(ms.var[i] + eps);
  adain_apply(x, y, g, ms.mean, style_std, eps, store);
}

void adaptive_instance_norm(const TensorRef& x, const TensorRef& y, const TensorRef& style_mean,
                            const TensorRef& style_std, double eps, std::optional<Layout> layout,
                            const Epilogue& epilogue) {
  plan::require_no_quantize(epilogue, "adaptive_instance_norm");
  const ChannelGeometry g = check_adain_style_stats(x, y, style_mean, style_std, eps, layout);
  const kernels::StoreStage store = plan::plan_store(epilogue, x, y, 0, /*dynamic_allowed=*/false);
  if (x.numel() == 0) return;
  std::vector<double> mean(g.n * g.c), std_(g.n * g.c);
  for (std::int64_t i = 0; i < g.n * g.c; ++i) {
    mean[i] = plan::read_element(style_mean, i);
    std_[i] = plan::read_element(style_std, i);
  }
  adain_apply(x, y, g, mean, std_, eps, store);
}

}  // namespace normkit
