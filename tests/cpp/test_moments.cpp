// test_moments.cpp - normkit/moments.hpp through the public C++ API, on every
// kernel path: the norms' moments against float64 sums written plainly here,
// exact merges in any grouping, and a batch sharded as an engine would shard
// it (BatchNorm with the merged moments, the backward from summed reductions)
// against the unsharded calls.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "normkit/normkit.hpp"
#include "test_support.hpp"

namespace nk = normkit;
using std::int64_t;

namespace {

class Moments : public nk_test::KernelPathTest {};

// Mean and M2 per channel of channels-first x[n][c][s], plainly, in double (two passes).
void channel_reference(const std::vector<double>& x, int64_t n, int64_t c, int64_t s, std::vector<double>& mean,
                       std::vector<double>& m2) {
  mean.assign(c, 0.0);
  m2.assign(c, 0.0);
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t si = 0; si < s; ++si) mean[ci] += x[(ni * c + ci) * s + si];
  for (auto& m : mean) m /= double(n * s);
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t si = 0; si < s; ++si) {
        const double d = x[(ni * c + ci) * s + si] - mean[ci];
        m2[ci] += d * d;
      }
}

std::vector<float> hostile(int64_t size, std::mt19937& rng) {  // mean 1e4, spread 1e-2
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<float> x(size);
  for (auto& v : x) v = static_cast<float>(1e4 + 1e-2 * dist(rng));
  return x;
}

TEST_P(Moments, BatchMomentsOfShardsMergeToTheWholeBatch) {
  const int64_t n = 9, c = 6, s = 10;
  const std::vector<float> x = hostile(n * c * s, rng_);
  const std::vector<double> xd(x.begin(), x.end());
  std::vector<double> ref_mean, ref_m2;
  channel_reference(xd, n, c, s, ref_mean, ref_m2);
  for (const bool last : {false, true}) {
    const std::vector<float> xin = last ? nk_test::to_last(x, n, c, s) : x;
    const nk::Layout layout = last ? nk::Layout::NLC : nk::Layout::NCL;
    auto shard = [&](int64_t first, int64_t count) {
      const nk::Dims shape = last ? nk::Dims{count, s, c} : nk::Dims{count, c, s};
      return nk::batch_norm_moments(nk::TensorView<const float>(xin.data() + first * c * s, shape), layout);
    };
    const std::vector<nk::Moments> parts = {shard(0, 4), shard(4, 0), shard(4, 2), shard(6, 3)};
    const nk::Moments whole = shard(0, n);
    const nk::Moments merged = nk::merge_moments({&parts[0], &parts[1], &parts[2], &parts[3]});
    nk::Moments grouped = nk::merge_moments(parts[0], parts[1]);
    grouped.merge(nk::merge_moments(parts[2], parts[3]));
    for (const nk::Moments* m : {&whole, &merged, static_cast<const nk::Moments*>(&grouped)}) {
      ASSERT_EQ(m->count, n * s);
      ASSERT_EQ(m->shape, nk::Dims{c});
      for (int64_t ci = 0; ci < c; ++ci) {
        EXPECT_NEAR(m->mean[ci], ref_mean[ci], 1e-12 * 1e4) << ci;
        EXPECT_NEAR(m->m2[ci], ref_m2[ci], 1e-6 * ref_m2[ci]) << ci << (last ? " NLC" : " NCL");
      }
    }
    const std::vector<double> var1 = merged.var(1), rstd = merged.rstd(1e-5);
    for (int64_t ci = 0; ci < c; ++ci) {
      EXPECT_DOUBLE_EQ(var1[ci], merged.m2[ci] / double(n * s - 1));
      EXPECT_DOUBLE_EQ(rstd[ci], 1.0 / std::sqrt(merged.m2[ci] / double(n * s) + 1e-5));
    }
  }
}

// Channels-last statistics shift each block by the mean of its first rows; where
// those rows sit far from the block's mean (here 100 standard deviations), one
// pass would cancel most bits of M2 and the block is redone in two passes.
TEST_P(Moments, ChannelsLastBlocksWhoseFirstRowsAreOutliers) {
  const int64_t n = 2, s = 1000, c = 70;  // 70 channels: whole tiles and a partial one on every path
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<float> x(n * s * c);  // channels-last [n][s][c]
  for (int64_t r = 0; r < n * s; ++r)
    for (int64_t ci = 0; ci < c; ++ci)
      x[r * c + ci] = static_cast<float>(1e3 + ci + (r < 8 ? 1.0 : 0.0) + 1e-2 * dist(rng_));
  std::vector<double> mean(c, 0.0), m2(c, 0.0);
  for (int64_t r = 0; r < n * s; ++r)
    for (int64_t ci = 0; ci < c; ++ci) mean[ci] += x[r * c + ci];
  for (auto& m : mean) m /= double(n * s);
  for (int64_t r = 0; r < n * s; ++r)
    for (int64_t ci = 0; ci < c; ++ci) m2[ci] += (x[r * c + ci] - mean[ci]) * (x[r * c + ci] - mean[ci]);
  const nk::Moments m = nk::batch_norm_moments(nk::TensorView<const float>(x.data(), {n, s, c}), nk::Layout::NLC);
  ASSERT_EQ(m.count, n * s);
  for (int64_t ci = 0; ci < c; ++ci) {
    EXPECT_NEAR(m.mean[ci], mean[ci], 1e-9 * 1e3) << ci;
    EXPECT_NEAR(m.m2[ci], m2[ci], 2e-6 * m2[ci]) << ci;
  }
}

TEST_P(Moments, PerSampleAndLayerMoments) {
  const int64_t n = 3, c = 8, s = 12, groups = 4;
  const auto data = nk_test::random_data<float>(n * c * s, rng_, 2.0, 3.0);
  const nk::TensorView<const float> x(data.t.data(), {n, c, s});
  const nk::Moments inst = nk::instance_norm_moments(x), grp = nk::group_norm_moments(x, groups),
                    layer = nk::layer_norm_moments(x, {c, s});
  ASSERT_EQ(inst.shape, (nk::Dims{n, c}));
  ASSERT_EQ(grp.shape, (nk::Dims{n, groups}));
  ASSERT_EQ(layer.shape, nk::Dims{n});
  EXPECT_EQ(inst.count, s);
  EXPECT_EQ(grp.count, (c / groups) * s);
  EXPECT_EQ(layer.count, c * s);
  auto check = [&](const nk::Moments& m, int64_t per_stat) {  // statistic i covers values [i * per, (i + 1) * per)
    for (int64_t i = 0; i < m.size(); ++i) {
      double mean = 0, m2 = 0;
      for (int64_t j = 0; j < per_stat; ++j) mean += data.d[i * per_stat + j];
      mean /= double(per_stat);
      for (int64_t j = 0; j < per_stat; ++j) m2 += (data.d[i * per_stat + j] - mean) * (data.d[i * per_stat + j] - mean);
      EXPECT_NEAR(m.mean[i], mean, 1e-5 * 5) << i;
      EXPECT_NEAR(m.m2[i], m2, 1e-5 * m2) << i;
    }
  };
  check(inst, s);
  check(grp, (c / groups) * s);
  check(layer, c * s);
}

class MomentsMerge : public nk_test::KernelPathTest {};

TEST_P(MomentsMerge, EmptyPartsAreExactAndShapesMustAgree) {
  nk::Moments a;
  a.shape = nk::Dims{2};
  a.count = 5;
  a.mean = {1e4 + 0.125, -3.0};
  a.m2 = {0.5, 7.0};
  nk::Moments empty;
  empty.shape = nk::Dims{2};
  empty.mean = {0.0, 0.0};
  empty.m2 = {0.0, 0.0};
  const nk::Moments m = nk::merge_moments({&empty, &a, &empty});
  EXPECT_EQ(m.count, 5);
  EXPECT_EQ(m.mean, a.mean);
  EXPECT_EQ(m.m2, a.m2);
  const nk::Moments none = nk::merge_moments(empty, empty);
  EXPECT_EQ(none.count, 0);
  EXPECT_TRUE(std::isnan(none.var()[0]));
  nk::Moments other = a;
  other.shape = nk::Dims{1, 2};
  nk_test::expect_error([&] { nk::merge_moments(a, other); }, "parts[1]");
  nk_test::expect_error([&] { nk::merge_moments(std::vector<const nk::Moments*>{}); }, "parts");
  nk_test::expect_error([&] { a.var(-1); }, "correction");
}

// An engine's data-parallel BatchNorm step: the batch cut into shards, each
// normalized with the merged moments, the backward's sums added over shards.
TEST_P(Moments, ShardedBatchNormEqualsTheWholeBatch) {
  const int64_t n = 7, c = 5, s = 6;
  const auto xs = nk_test::random_data<float>(n * c * s, rng_, 40.0, 0.5);
  const auto dys = nk_test::random_data<float>(n * c * s, rng_, 0.0, 1.0);
  const std::vector<float> w = {1.5f, 0.5f, -1.0f, 2.0f, 1.0f}, b = {0.1f, 0.2f, 0.3f, -0.4f, 0.0f};
  const nk::TensorView<const float> wv(w.data(), {c}), bv(b.data(), {c});
  const nk::Dims shape{n, c, s};
  // The whole batch at once.
  std::vector<float> y_all(n * c * s), dx_all(n * c * s), mean(c), rstd(c), dw_all(c), db_all(c);
  std::vector<float> rm_all(c, 0.f), rv_all(c, 1.f);
  nk::batch_norm(nk::TensorView<const float>(xs.t.data(), shape), nk::TensorView<float>(y_all.data(), shape),
                 nk::TensorView<float>(rm_all.data(), {c}), nk::TensorView<float>(rv_all.data(), {c}), wv, bv, true,
                 0.1, 1e-5, std::nullopt, nk::TensorView<float>(mean.data(), {c}),
                 nk::TensorView<float>(rstd.data(), {c}));
  nk::batch_norm_backward(nk::TensorView<const float>(dys.t.data(), shape),
                          nk::TensorView<const float>(xs.t.data(), shape),
                          nk::TensorView<const float>(mean.data(), {c}), nk::TensorView<const float>(rstd.data(), {c}),
                          wv, nk::TensorView<float>(dx_all.data(), shape), nk::TensorView<float>(dw_all.data(), {c}),
                          nk::TensorView<float>(db_all.data(), {c}));
  // Shards [0, 3), [3, 3) (empty), [3, 7).
  const int64_t cuts[] = {0, 3, 3, 7};
  auto view = [&](const std::vector<float>& v, int k) {
    return nk::TensorView<const float>(v.data() + cuts[k] * c * s, {cuts[k + 1] - cuts[k], c, s});
  };
  std::vector<nk::Moments> parts;
  for (int k = 0; k < 3; ++k) parts.push_back(nk::batch_norm_moments(view(xs.t, k)));
  const nk::Moments global = nk::merge_moments({&parts[0], &parts[1], &parts[2]});
  const std::vector<double> rstd_g = global.rstd(1e-5);
  nk::BatchNormGradSums sums;
  for (int k = 0; k < 3; ++k)
    sums.add(nk::batch_norm_grad_sums(view(dys.t, k), view(xs.t, k),
                                      nk::TensorView<const double>(global.mean.data(), {c})));
  ASSERT_EQ(sums.count, n * s);
  for (int k = 0; k < 3; ++k) {
    const int64_t rows = cuts[k + 1] - cuts[k];
    std::vector<float> y(rows * c * s), dx(rows * c * s), rm(c, 0.f), rv(c, 1.f), dw(c), db(c);
    nk::batch_norm_with_stats(view(xs.t, k), nk::TensorView<float>(y.data(), {rows, c, s}), global,
                              nk::TensorView<float>(rm.data(), {c}), nk::TensorView<float>(rv.data(), {c}), wv, bv);
    nk::batch_norm_backward_with_sums(view(dys.t, k), view(xs.t, k),
                                      nk::TensorView<const double>(global.mean.data(), {c}),
                                      nk::TensorView<const double>(rstd_g.data(), {c}), sums, wv,
                                      nk::TensorView<float>(dx.data(), {rows, c, s}),
                                      nk::TensorView<float>(dw.data(), {c}), nk::TensorView<float>(db.data(), {c}));
    for (int64_t i = 0; i < rows * c * s; ++i) {
      ASSERT_NEAR(y[i], y_all[cuts[k] * c * s + i], 3e-5 * (1 + std::abs(y_all[cuts[k] * c * s + i]))) << i;
      ASSERT_NEAR(dx[i], dx_all[cuts[k] * c * s + i], 1e-4 * (1 + std::abs(dx_all[cuts[k] * c * s + i]))) << i;
    }
    for (int64_t ci = 0; ci < c; ++ci) {  // every shard: the whole batch's running statistics and weight gradients
      EXPECT_NEAR(rm[ci], rm_all[ci], 1e-5 * (1 + std::abs(rm_all[ci])));
      EXPECT_NEAR(rv[ci], rv_all[ci], 1e-5 * (1 + rv_all[ci]));
      EXPECT_NEAR(dw[ci], dw_all[ci], 1e-4 * (1 + std::abs(dw_all[ci])));
      EXPECT_NEAR(db[ci], db_all[ci], 1e-4 * (1 + std::abs(db_all[ci])));
    }
  }
}

class MomentsErrors : public nk_test::KernelPathTest {};

TEST_P(MomentsErrors, GivenStatisticsAndSums) {
  const int64_t n = 2, c = 3, s = 4;
  std::vector<float> x(n * c * s, 1.f), y(x.size()), dx(x.size());
  const nk::TensorView<const float> xv(x.data(), {n, c, s});
  const nk::TensorView<float> yv(y.data(), {n, c, s}), dxv(dx.data(), {n, c, s});
  nk::Moments m = nk::batch_norm_moments(xv);
  nk::Moments wrong = m;
  wrong.shape = nk::Dims{4};
  wrong.mean.resize(4);
  wrong.m2.resize(4);
  nk_test::expect_error([&] { nk::batch_norm_with_stats(xv, yv, wrong, {}, {}); }, "stats");
  nk::Moments one = m;
  one.count = 1;
  nk_test::expect_error([&] { nk::batch_norm_with_stats(xv, yv, one, {}, {}); }, "stats");
  std::vector<double> mean(c, 1.0), rstd(c, 1.0);
  const nk::TensorView<const double> mv(mean.data(), {c}), rv(rstd.data(), {c});
  nk::BatchNormGradSums sums = nk::batch_norm_grad_sums(xv, xv, mv);
  nk::BatchNormGradSums few = sums;
  few.count = n * s - 1;
  nk_test::expect_error([&] { nk::batch_norm_backward_with_sums(xv, xv, mv, rv, few, {}, dxv); }, "count");
  nk::BatchNormGradSums narrow = sums;
  narrow.sum_dy.resize(2);
  nk_test::expect_error([&] { nk::batch_norm_backward_with_sums(xv, xv, mv, rv, narrow, {}, dxv); }, "sum_dy");
  nk_test::expect_error([&] { sums.add(narrow); }, "other");
  std::vector<double> short_mean(2, 0.0);
  nk_test::expect_error([&] { nk::batch_norm_grad_sums(xv, xv, nk::TensorView<const double>(short_mean.data(), {2})); },
                        "mean");
}

NK_TEST_ON_EVERY_PATH(Moments);

NK_TEST_ON_EVERY_PATH(MomentsErrors);
NK_TEST_ON_EVERY_PATH(MomentsMerge);

}  // namespace
