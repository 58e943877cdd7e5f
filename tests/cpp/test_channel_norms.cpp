// test_channel_norms.cpp - BatchNorm, InstanceNorm, GroupNorm and AdaIN
// through normkit's public C++ API, on every kernel path, in both layouts,
// against a float64 reference written plainly below.
//
// Shapes are (N, C, S...) channels-first; the channels-last runs use the same
// data transposed to (N, S..., C), and their outputs are compared after
// transposing back.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"
#include "test_support.hpp"

namespace nk = normkit;
using std::int64_t;

namespace {

using nk_test::Ref;
using nk_test::reference;
using nk_test::to_first;
using nk_test::to_last;

struct Case {
  int64_t n, c, h, w;  // 4-D: NCHW / NHWC
};

class ChannelNorms : public nk_test::KernelPathTest {};

// The data, weights and float64 copies for one case.
struct Data {
  int64_t n, c, s;
  std::vector<float> x, w, b;
  std::vector<double> xd, wd, bd;
  Data(const Case& k, unsigned seed, double mean = 0.5, double spread = 2.0) : n(k.n), c(k.c), s(k.h * k.w) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    x.resize(n * c * s);
    for (auto& v : x) v = static_cast<float>(mean + spread * dist(gen));
    w.resize(c);
    b.resize(c);
    for (auto& v : w) v = 1.0f + 0.5f * dist(gen);
    for (auto& v : b) v = 0.5f * dist(gen);
    xd.assign(x.begin(), x.end());
    wd.assign(w.begin(), w.end());
    bd.assign(b.begin(), b.end());
  }
};

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double tol, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], tol * (1 + std::abs(want[i]))) << what << " at " << i;
}

const Case kCases[] = {{2, 3, 4, 5}, {3, 17, 7, 1}, {2, 65, 3, 3}, {1, 1, 33, 1}, {4, 8, 9, 11}};
constexpr double kTol = 2e-5;  // float32 output vs float64 reference

TEST_P(ChannelNorms, BatchNormTrainingBothLayoutsAndRunningStats) {
  for (const Case& k : kCases) {
    Data d(k, 1);
    const Ref ref = reference(d.xd, d.n, d.c, d.s, d.c, false, d.wd, d.bd, 1e-5);
    for (const bool last : {false, true}) {
      std::vector<float> xin = last ? to_last(d.x, d.n, d.c, d.s) : d.x, y(d.x.size());
      std::vector<float> rm(d.c, 0.25f), rv(d.c, 2.0f), mean(d.c), rstd(d.c);
      const nk::Dims shape = last ? nk::Dims{k.n, k.h, k.w, k.c} : nk::Dims{k.n, k.c, k.h, k.w};
      nk::batch_norm(nk::TensorView<const float>(xin.data(), shape), nk::TensorView<float>(y.data(), shape),
                     nk::TensorView<float>(rm.data(), {k.c}), nk::TensorView<float>(rv.data(), {k.c}),
                     nk::TensorView<const float>(d.w.data(), {k.c}), nk::TensorView<const float>(d.b.data(), {k.c}),
                     /*training=*/true, 0.1, 1e-5, last ? nk::Layout::NHWC : nk::Layout::NCHW,
                     nk::TensorView<float>(mean.data(), {k.c}), nk::TensorView<float>(rstd.data(), {k.c}));
      expect_close(last ? to_first(y, d.n, d.c, d.s) : y, ref.y, kTol, "y");
      const double count = double(d.n * d.s);
      for (int64_t ci = 0; ci < d.c; ++ci) {
        EXPECT_NEAR(mean[ci], ref.mean[ci], 1e-5 * (1 + std::abs(ref.mean[ci])));
        EXPECT_NEAR(rstd[ci], 1 / std::sqrt(ref.var[ci] + 1e-5), 1e-5 / std::sqrt(ref.var[ci] + 1e-5));
        EXPECT_NEAR(rm[ci], 0.9 * 0.25 + 0.1 * ref.mean[ci], 1e-6);
        const double unbiased = ref.var[ci] * count / (count - 1);
        EXPECT_NEAR(rv[ci], 0.9 * 2.0 + 0.1 * unbiased, 1e-5 * (1 + unbiased));
      }
    }
  }
}

TEST_P(ChannelNorms, BatchNormInferenceFolds) {
  for (const Case& k : kCases) {
    Data d(k, 2);
    std::vector<float> rm(d.c), rv(d.c);
    for (int64_t ci = 0; ci < d.c; ++ci) {
      rm[ci] = 0.1f * float(ci);
      rv[ci] = 0.5f + 0.25f * float(ci);
    }
    std::vector<double> want(d.x.size());
    for (int64_t i = 0; i < int64_t(want.size()); ++i) {
      const int64_t ci = (i / d.s) % d.c;
      want[i] = (d.xd[i] - rm[ci]) / std::sqrt(double(rv[ci]) + 1e-5) * d.wd[ci] + d.bd[ci];
    }
    for (const bool last : {false, true}) {
      std::vector<float> xin = last ? to_last(d.x, d.n, d.c, d.s) : d.x, y(d.x.size());
      const nk::Dims shape = last ? nk::Dims{k.n, k.h, k.w, k.c} : nk::Dims{k.n, k.c, k.h, k.w};
      nk::batch_norm(nk::TensorView<const float>(xin.data(), shape), nk::TensorView<float>(y.data(), shape),
                     nk::TensorView<float>(rm.data(), {k.c}), nk::TensorView<float>(rv.data(), {k.c}),
                     nk::TensorView<const float>(d.w.data(), {k.c}), nk::TensorView<const float>(d.b.data(), {k.c}),
                     false, 0.1, 1e-5, last ? nk::Layout::NHWC : nk::Layout::NCHW);
      expect_close(last ? to_first(y, d.n, d.c, d.s) : y, want, kTol, "y");
    }
  }
}

TEST_P(ChannelNorms, GroupAndInstanceNormBothLayouts) {
  for (const Case& k : kCases) {
    Data d(k, 3, /*mean=*/-3.0);
    for (int64_t groups = 1; groups <= k.c; ++groups) {
      if (k.c % groups != 0 || (groups != 1 && groups != k.c && groups > 4)) continue;
      const Ref ref = reference(d.xd, d.n, d.c, d.s, groups, true, d.wd, d.bd, 1e-5);
      for (const bool last : {false, true}) {
        std::vector<float> xin = last ? to_last(d.x, d.n, d.c, d.s) : d.x, y(d.x.size());
        std::vector<float> mean(d.n * groups), rstd(d.n * groups);
        const nk::Dims shape = last ? nk::Dims{k.n, k.h, k.w, k.c} : nk::Dims{k.n, k.c, k.h, k.w};
        nk::group_norm(nk::TensorView<const float>(xin.data(), shape), nk::TensorView<float>(y.data(), shape),
                       groups, nk::TensorView<const float>(d.w.data(), {k.c}),
                       nk::TensorView<const float>(d.b.data(), {k.c}), 1e-5, last ? nk::Layout::NHWC : nk::Layout::NCHW,
                       nk::TensorView<float>(mean.data(), {k.n, groups}),
                       nk::TensorView<float>(rstd.data(), {k.n, groups}));
        expect_close(last ? to_first(y, d.n, d.c, d.s) : y, ref.y, kTol, "group_norm y");
        for (int64_t g = 0; g < d.n * groups; ++g) EXPECT_NEAR(mean[g], ref.mean[g], 1e-5 * (1 + std::abs(ref.mean[g])));
        if (groups == k.c && d.s > 1) {  // InstanceNorm is GroupNorm with C groups
          std::vector<float> yi(d.x.size());
          nk::instance_norm(nk::TensorView<const float>(xin.data(), shape), nk::TensorView<float>(yi.data(), shape),
                            {}, {}, nk::TensorView<const float>(d.w.data(), {k.c}),
                            nk::TensorView<const float>(d.b.data(), {k.c}), true, 0.1, 1e-5,
                            last ? nk::Layout::NHWC : nk::Layout::NCHW);
          expect_close(last ? to_first(yi, d.n, d.c, d.s) : yi, ref.y, kTol, "instance_norm y");
        }
      }
    }
  }
}

TEST_P(ChannelNorms, AdaptiveInstanceNormFromStatistics) {
  const Case k{3, 5, 6, 7};
  Data d(k, 4);
  std::vector<float> smean(k.n * k.c), sstd(k.n * k.c);
  for (size_t i = 0; i < smean.size(); ++i) {
    smean[i] = 0.3f * float(i) - 2.0f;
    sstd[i] = 0.5f + 0.1f * float(i);
  }
  const std::vector<double> ones(k.c, 1.0), zeros(k.c, 0.0);
  const Ref ref = reference(d.xd, d.n, d.c, d.s, d.c, true, ones, zeros, 1e-5);
  std::vector<double> want(ref.y.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const size_t nc = i / d.s;
    want[i] = ref.y[i] * sstd[nc] + smean[nc];
  }
  for (const bool last : {false, true}) {
    std::vector<float> xin = last ? to_last(d.x, d.n, d.c, d.s) : d.x, y(d.x.size());
    const nk::Dims shape = last ? nk::Dims{k.n, k.h, k.w, k.c} : nk::Dims{k.n, k.c, k.h, k.w};
    nk::adaptive_instance_norm(nk::TensorView<const float>(xin.data(), shape), nk::TensorView<float>(y.data(), shape),
                               nk::TensorView<const float>(smean.data(), {k.n, k.c}),
                               nk::TensorView<const float>(sstd.data(), {k.n, k.c}), 1e-5,
                               last ? nk::Layout::NHWC : nk::Layout::NCHW);
    expect_close(last ? to_first(y, d.n, d.c, d.s) : y, want, kTol, "adain y");
  }
}

TEST_P(ChannelNorms, LargeMeanSmallSpreadNormalizesToUnitVariance) {
  const Case k{4, 6, 9, 11};
  Data d(k, 5, /*mean=*/1e4, /*spread=*/1e-2);
  for (const bool last : {false, true}) {
    std::vector<float> xin = last ? to_last(d.x, d.n, d.c, d.s) : d.x, y(d.x.size());
    const nk::Dims shape = last ? nk::Dims{k.n, k.h, k.w, k.c} : nk::Dims{k.n, k.c, k.h, k.w};
    const auto layout = last ? nk::Layout::NHWC : nk::Layout::NCHW;
    nk::batch_norm(nk::TensorView<const float>(xin.data(), shape), nk::TensorView<float>(y.data(), shape), {}, {}, {},
                   {}, true, 0.1, 0.0, layout);
    const std::vector<float> yf = last ? to_first(y, d.n, d.c, d.s) : y;
    for (int64_t ci = 0; ci < d.c; ++ci) {
      double sum = 0, sum2 = 0;
      for (int64_t ni = 0; ni < d.n; ++ni)
        for (int64_t si = 0; si < d.s; ++si) {
          const double v = yf[(ni * d.c + ci) * d.s + si];
          sum += v;
          sum2 += v * v;
        }
      const double cnt = double(d.n * d.s), m = sum / cnt;
      EXPECT_NEAR(m, 0.0, 1e-3) << "channel " << ci << (last ? " NHWC" : " NCHW");
      EXPECT_NEAR(sum2 / cnt - m * m, 1.0, 1e-3) << "channel " << ci << (last ? " NHWC" : " NCHW");
    }
  }
}

NK_TEST_ON_EVERY_PATH(ChannelNorms);

// Bad input: normkit::Error of the right kind, message naming the argument.
template <class F>
void expect_error(F&& f, nk::ErrorKind kind, const std::string& argument) {
  try {
    f();
    FAIL() << "no error; expected one naming " << argument;
  } catch (const nk::Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_EQ(std::string(e.what()).rfind(argument + ":", 0), 0u) << e.what();
  }
}

class ChannelErrors : public nk_test::KernelPathTest {};

TEST_P(ChannelErrors, NameTheArgument) {
  std::vector<float> x(2 * 4 * 3), y(x.size()), rm(4), rv(4, 1.0f), short_stat(3);
  std::vector<int> unused;
  const nk::TensorView<const float> xv(x.data(), {2, 4, 3});
  const nk::TensorView<float> yv(y.data(), {2, 4, 3});
  const nk::TensorView<float> rmv(rm.data(), {4}), rvv(rv.data(), {4}), shortv(short_stat.data(), {3});
  using K = nk::ErrorKind;
  expect_error([&] { nk::batch_norm(xv, yv, shortv, rvv); }, K::value, "running_mean");
  expect_error([&] { nk::batch_norm(xv, yv, rmv, shortv); }, K::value, "running_var");
  expect_error([&] { nk::batch_norm(xv, yv, {}, {}); }, K::value, "running_mean");
  expect_error([&] { nk::batch_norm(xv, yv, rmv, rvv, {}, {}, false, 0.1, -1.0); }, K::value, "eps");
  expect_error([&] { nk::batch_norm(xv, yv, rmv, rvv, {}, {}, false, 0.1, 1e-5, nk::Layout::NCHW); }, K::value,
               "layout");
  std::vector<float> one(4);
  expect_error(
      [&] {
        nk::batch_norm(nk::TensorView<const float>(one.data(), {1, 4}), nk::TensorView<float>(one.data(), {1, 4}),
                       {}, {}, {}, {}, true);
      },
      K::value, "x");
  expect_error([&] { nk::group_norm(xv, yv, 0); }, K::value, "num_groups");
  expect_error([&] { nk::group_norm(xv, yv, 3); }, K::value, "num_groups");
  expect_error([&] { nk::group_norm(xv, yv, 2, shortv); }, K::value, "weight");
  std::vector<double> wd(4);
  expect_error([&] { nk::group_norm(xv, yv, 2, nk::TensorView<const double>(wd.data(), {4})); }, K::type, "weight");
  std::vector<float> style(3 * 4 * 5);
  expect_error(
      [&] { nk::adaptive_instance_norm(xv, yv, nk::TensorView<const float>(style.data(), {3, 4, 5})); }, K::value,
      "style");
  std::vector<float> x1(2 * 4);
  expect_error(
      [&] {
        nk::instance_norm(nk::TensorView<const float>(x1.data(), {2, 4, 1}), nk::TensorView<float>(x1.data(), {2, 4, 1}));
      },
      K::value, "x");
  expect_error([&] { nk::instance_norm(xv, yv, {}, {}, {}, {}, false); }, K::value, "running_mean");
  std::vector<float> ybad(2 * 4 * 4);
  expect_error([&] { nk::group_norm(xv, nk::TensorView<float>(ybad.data(), {2, 4, 4}), 2); }, K::value, "y");
  EXPECT_THROW(nk::parse_layout("NHCW"), nk::Error);
}

NK_TEST_ON_EVERY_PATH(ChannelErrors);

}  // namespace
