// plan/merge.hpp - merging partial statistics (count, mean, M2) in double.
//
// The one merge behind every statistic normkit forms from parts: the kernels'
// per-block partials, BatchNorm's per-plane rows, and the public Moments
// (normkit/moments.hpp) merged across shards.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace normkit::plan {

struct Summary {
  double count = 0, mean = 0, m2 = 0;  // m2: sum of squared deviations from mean
};

// Merges the summaries `each(visit)` visits, in that fixed order:
// the total mean first, then M2 = sum of M2_i + count_i * (mean_i - mean)^2
// (the parallel-variance identity behind Chan's formula, without a division
// per summary: this runs over thousands of block partials per call).
// Means are summed relative to the first non-empty summary's, so equal means
// (a constant channel) merge exactly and a large common mean loses nothing to
// the products count_i * mean_i. Empty summaries (count 0) are skipped, so a
// merge with an empty part returns the other part exactly; all empty gives {}.
template <class Each>
Summary merge_summaries(Each&& each) {
  double count = 0, sum = 0, reference = 0;
  bool first = true;
  each([&](double n, double m, double) {
    if (n == 0) return;
    if (first) reference = m;
    first = false;
    count += n;
    sum += n * (m - reference);
  });
  if (count == 0) return {};
  Summary out;
  out.count = count;
  out.mean = reference + sum / count;
  each([&](double n, double m, double q) {
    if (n == 0) return;
    const double d = m - out.mean;
    out.m2 += q + n * d * d;
  });
  return out;
}

// term(0) + ... + term(n - 1) in four running lanes (term i into lane i % 4),
// combined in a fixed order: independent chains the compiler interleaves,
// where one chain of dependent adds per channel was a fifth of a small
// BatchNorm training call ([8,2048,7,7]: 49 parts per channel).
template <class Term>
double sum_in_lanes(std::int64_t n, Term&& term) {
  double lane[4] = {};
  std::int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int l = 0; l < 4; ++l) lane[l] += term(i + l);
  double sum = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  for (; i < n; ++i) sum += term(i);
  return sum;
}
inline double sum_in_lanes(const double* v, std::int64_t n) {
  return sum_in_lanes(n, [v](std::int64_t i) { return v[i]; });
}

// merge_summaries of `parts` summaries of n > 0 values each, given as their
// means and M2s: the same identity, its sums in lanes (sum_in_lanes), so the
// result depends on nothing but the parts.
inline Summary merge_equal_counts(std::int64_t parts, double n, const double* mean, const double* m2) {
  const double reference = mean[0];
  Summary out;
  out.count = n * double(parts);
  out.mean = reference + sum_in_lanes(parts, [&](std::int64_t i) { return mean[i] - reference; }) / double(parts);
  const double sum_dd = sum_in_lanes(parts, [&](std::int64_t i) {
    const double d = mean[i] - out.mean;
    return d * d;
  });
  out.m2 = sum_in_lanes(m2, parts) + n * sum_dd;
  return out;
}

// merge_summaries for `sets` sets side by side: part i of set j is
// (count(i), mean[i * pitch + j], part_m2(i * pitch + j)), every count(i) > 0.
// The same operations per set, in the same order, as merge_summaries over the
// set's parts, but for a multiplication by 1 / count for its division (one
// per set: a tenth of a [1,1280,8,8] GroupNorm), the parts read in memory order, part after
// part, where one set at a time read them `pitch` apart (BatchNorm's planes
// merged over the samples: 8% of a [256,512,7,7] call in cache misses; the
// columns statistics' blocks: a third of a [1,1280,8,8] GroupNorm). Writes
// each set's mean and M2 (no allocation: the sums run in the outputs) and
// returns the sets' count.
template <class Count, class PartM2>
double merge_sets_side_by_side(std::int64_t parts, std::int64_t sets, std::int64_t pitch, Count&& count,
                               const double* mean, PartM2&& part_m2, double* out_mean, double* out_m2) {
  const double* reference = mean;  // the first part of every set
  double total = 0;
  std::fill(out_mean, out_mean + sets, 0.0);  // sum of n * (mean - reference) first
  for (std::int64_t i = 0; i < parts; ++i) {
    const double n = count(i);
    const double* part = mean + i * pitch;
    total += n;
    for (std::int64_t j = 0; j < sets; ++j) out_mean[j] += n * (part[j] - reference[j]);
  }
  const double inv_total = 1.0 / total;
  for (std::int64_t j = 0; j < sets; ++j) out_mean[j] = reference[j] + out_mean[j] * inv_total;
  std::fill(out_m2, out_m2 + sets, 0.0);
  for (std::int64_t i = 0; i < parts; ++i) {
    const double n = count(i);
    const double* part = mean + i * pitch;
    for (std::int64_t j = 0; j < sets; ++j) {
      const double d = part[j] - out_mean[j];
      out_m2[j] += part_m2(i * pitch + j) + n * d * d;
    }
  }
  return total;
}

// merge_sets_side_by_side of parts given as mean and variance, each counting
// n > 0 (part i of set j at i * sets + j); writes each set's mean and
// variance (M2 / count).
inline void merge_side_by_side(std::int64_t parts, std::int64_t sets, double n, const double* mean, const double* var,
                               double* out_mean, double* out_var) {
  std::vector<double> m2(sets);
  const double count = merge_sets_side_by_side(
      parts, sets, sets, [n](std::int64_t) { return n; }, mean, [&](std::int64_t r) { return var[r] * n; },
      out_mean, m2.data());
  for (std::int64_t j = 0; j < sets; ++j) out_var[j] = m2[j] / count;
}

}  // namespace normkit::plan
