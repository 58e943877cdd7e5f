// plan/merge.hpp - merging partial statistics (count, mean, M2) in double.
//
// The one merge behind every statistic normkit forms from parts: the kernels'
// per-block partials, BatchNorm's per-plane rows, and the public Moments
// (normkit/moments.hpp) merged across shards.
#pragma once

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

}  // namespace normkit::plan
