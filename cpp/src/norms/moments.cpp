// norms/moments.cpp - the partial statistics of the norms (normkit/moments.hpp):
// each norm's statistics mapped onto the plans that form them for the norm
// itself, and their exact merge (plan/merge.hpp, the merge the kernels' own
// partials go through).
#include "normkit/moments.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "core/check.hpp"
#include "plan/channel_plan.hpp"
#include "plan/merge.hpp"
#include "plan/rows_plan.hpp"

namespace normkit {

namespace {

// Moments of `shape` from per-statistic means and biased variances over `count` values.
Moments from_mean_var(Dims shape, std::int64_t count, std::vector<double> mean, const std::vector<double>& var) {
  Moments m;
  m.shape = std::move(shape);
  m.count = count;
  m.m2.resize(var.size());
  for (std::size_t i = 0; i < var.size(); ++i) m.m2[i] = count > 0 ? var[i] * double(count) : 0.0;
  m.mean = std::move(mean);
  if (count == 0) m.mean.assign(m.mean.size(), 0.0);
  return m;
}

// groups: 0 for BatchNorm (per channel over the batch), else per (sample, group)
// (InstanceNorm: groups = C, checked by the caller).
Moments channel_moments(const TensorRef& x, const plan::ChannelGeometry& g, std::int64_t groups) {
  const bool per_sample = groups > 0;
  const Dims shape = per_sample ? Dims{g.n, groups} : Dims{g.c};
  if (x.numel() == 0) return from_mean_var(shape, 0, std::vector<double>(shape.product(), 0.0),
                                           std::vector<double>(shape.product(), 0.0));
  const plan::GroupMoments m = plan::channel_moments(x, g, per_sample ? groups : g.c, per_sample);
  return from_mean_var(shape, m.count, m.mean, m.var);
}

plan::ChannelGeometry channel_input(const TensorRef& x, std::optional<Layout> layout) {
  core::check_given(x, "x");
  core::check_float(x, "x");
  return plan::channel_geometry(x, layout);
}

}  // namespace

Moments batch_norm_moments(const TensorRef& x, std::optional<Layout> layout) {
  return channel_moments(x, channel_input(x, layout), 0);
}

Moments instance_norm_moments(const TensorRef& x, std::optional<Layout> layout) {
  const plan::ChannelGeometry g = channel_input(x, layout);
  if (g.c == 0) return from_mean_var(Dims{g.n, 0}, 0, {}, {});
  return channel_moments(x, g, g.c);
}

Moments group_norm_moments(const TensorRef& x, std::int64_t num_groups, std::optional<Layout> layout) {
  const plan::ChannelGeometry g = channel_input(x, layout);
  plan::check_num_groups(num_groups, g.c);
  return channel_moments(x, g, num_groups);
}

Moments layer_norm_moments(const TensorRef& x, const Dims& normalized_shape) {
  std::vector<double> mean, var;
  plan::rows_moments(x, normalized_shape, mean, var);
  Dims shape;
  for (int i = 0; i < x.shape.size() - normalized_shape.size(); ++i) shape.push_back(x.shape[i]);
  return from_mean_var(shape, x.numel() == 0 ? 0 : normalized_shape.product(), std::move(mean), var);
}

Moments merge_moments(const std::vector<const Moments*>& parts) {
  if (parts.empty()) core::fail_value("parts: expected at least one Moments to merge, got none");
  const Moments& first = *parts.front();
  for (std::size_t p = 0; p < parts.size(); ++p) {
    const Moments& m = *parts[p];
    if (m.shape != first.shape)
      core::fail_value("parts[" + std::to_string(p) + "]: expected moments of shape " + first.shape.to_string() +
                       " like parts[0], got " + m.shape.to_string());
    if (m.size() != m.shape.product() || static_cast<std::int64_t>(m.m2.size()) != m.shape.product())
      core::fail_value("parts[" + std::to_string(p) + "]: mean and m2 must have " +
                       std::to_string(m.shape.product()) + " values for shape " + m.shape.to_string());
    if (m.count < 0)
      core::fail_value("parts[" + std::to_string(p) + "]: count must be >= 0, got " + std::to_string(m.count));
  }
  Moments out;
  out.shape = first.shape;
  out.mean.assign(first.mean.size(), 0.0);
  out.m2.assign(first.m2.size(), 0.0);
  for (const Moments* m : parts) out.count += m->count;
  for (std::size_t i = 0; i < out.mean.size(); ++i) {
    const plan::Summary s = plan::merge_summaries([&](auto&& visit) {
      for (const Moments* m : parts) visit(double(m->count), m->mean[i], m->m2[i]);
    });
    out.mean[i] = s.mean;
    out.m2[i] = s.m2;
  }
  return out;
}

Moments merge_moments(const Moments& first, const Moments& second) { return merge_moments({&first, &second}); }

Moments& Moments::merge(const Moments& other) { return *this = merge_moments(*this, other); }

std::vector<double> Moments::var(int correction) const {
  if (correction < 0) core::fail_value("correction: must be >= 0, got " + std::to_string(correction));
  std::vector<double> v(m2.size(), std::numeric_limits<double>::quiet_NaN());
  if (count > correction)
    for (std::size_t i = 0; i < m2.size(); ++i) v[i] = m2[i] / double(count - correction);
  return v;
}

std::vector<double> Moments::rstd(double eps) const {
  core::check_eps(eps);
  std::vector<double> r = var(0);
  for (double& v : r) v = 1.0 / std::sqrt(v + eps);
  return r;
}

}  // namespace normkit
