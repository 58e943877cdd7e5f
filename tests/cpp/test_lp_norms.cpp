// test_lp_norms.cpp - normkit/axis_norms.hpp through the public C++ API, on
// every kernel path: normalize (every p path, every dim, so both the rows and
// the columns mapping), its gradient, and mean_variance_norm over sets of axes
// that take every mapping (rows, columns, merged runs), against float64
// references written plainly here; hostile data and the argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "normkit/normkit.hpp"
#include "test_support.hpp"

namespace nk = normkit;
using std::int64_t;

namespace {

class LpNorms : public nk_test::KernelPathTest {};

constexpr double kInf = std::numeric_limits<double>::infinity();

// The slice of each element of a row-major `shape` for a reduction over `reduced`
// axes (row-major over the kept axes), and the number of slices.
std::vector<int64_t> slice_index(const std::vector<int64_t>& shape, const std::vector<bool>& reduced, int64_t& slices) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  std::vector<int64_t> out(n);
  slices = 1;
  for (size_t k = 0; k < shape.size(); ++k)
    if (!reduced[k]) slices *= shape[k];
  for (int64_t i = 0; i < n; ++i) {
    int64_t rest = i, s = 0, mult = 1;
    for (int k = int(shape.size()) - 1; k >= 0; --k) {
      const int64_t digit = rest % shape[k];
      rest /= shape[k];
      if (!reduced[k]) {
        s += digit * mult;
        mult *= shape[k];
      }
    }
    out[i] = s;
  }
  return out;
}

double lp(const std::vector<double>& v, double p) {
  double acc = 0;
  for (double e : v) acc = std::isinf(p) ? std::max(acc, std::fabs(e)) : acc + std::pow(std::fabs(e), p);
  return std::isinf(p) ? acc : std::pow(acc, 1.0 / p);
}

// float64 references.
std::vector<double> ref_normalize(const std::vector<double>& x, const std::vector<int64_t>& shape, int dim, double p,
                                  double eps) {
  std::vector<bool> red(shape.size(), false);
  red[dim] = true;
  int64_t slices = 0;
  const auto idx = slice_index(shape, red, slices);
  std::vector<std::vector<double>> members(slices);
  for (size_t i = 0; i < x.size(); ++i) members[idx[i]].push_back(x[i]);
  std::vector<double> den(slices);  // once per slice: per element it was quadratic (minutes under ASan)
  for (int64_t s = 0; s < slices; ++s) den[s] = std::max(lp(members[s], p), eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = den[idx[i]] == 0 ? 0 : x[i] / den[idx[i]];
  return y;
}

std::vector<double> ref_normalize_backward(const std::vector<double>& dy, const std::vector<double>& x,
                                           const std::vector<int64_t>& shape, int dim, double p, double eps) {
  std::vector<bool> red(shape.size(), false);
  red[dim] = true;
  int64_t slices = 0;
  const auto idx = slice_index(shape, red, slices);
  std::vector<std::vector<double>> members(slices);
  std::vector<double> dot(slices, 0), maxima(slices, 0);
  for (size_t i = 0; i < x.size(); ++i) {
    members[idx[i]].push_back(x[i]);
    dot[idx[i]] += dy[i] * x[i];
  }
  std::vector<double> norm(slices);
  for (int64_t s = 0; s < slices; ++s) norm[s] = lp(members[s], p);
  for (size_t i = 0; i < x.size(); ++i)
    if (std::fabs(x[i]) == norm[idx[i]]) maxima[idx[i]] += 1;
  std::vector<double> dx(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const int64_t s = idx[i];
    const double n = norm[s], den = std::max(n, eps);
    if (den == 0) {
      dx[i] = 0;
    } else if (n >= eps && n > 0) {
      const double sg = double((x[i] > 0) - (x[i] < 0));
      const double g = std::isinf(p) ? (std::fabs(x[i]) == n ? sg / maxima[s] : 0.0)
                                     : sg * std::pow(std::fabs(x[i]), p - 1) / std::pow(n, p - 1);
      dx[i] = dy[i] / den - g * dot[s] / (den * den);
    } else {
      dx[i] = dy[i] / den;
    }
  }
  return dx;
}

std::vector<double> ref_mvn(const std::vector<double>& x, const std::vector<int64_t>& shape,
                            const std::vector<bool>& red, double eps) {
  int64_t slices = 0;
  const auto idx = slice_index(shape, red, slices);
  // Sums relative to each slice's first element: a plain sum of 1e8s would
  // round away the digits a spread of 1e-3 has.
  std::vector<double> mean(slices, 0), m2(slices, 0), count(slices, 0), shift(slices, NAN);
  for (size_t i = 0; i < x.size(); ++i) {
    if (count[idx[i]] == 0) shift[idx[i]] = x[i];
    mean[idx[i]] += x[i] - shift[idx[i]];
    count[idx[i]] += 1;
  }
  for (int64_t s = 0; s < slices; ++s) mean[s] = shift[s] + mean[s] / count[s];
  for (size_t i = 0; i < x.size(); ++i) m2[idx[i]] += (x[i] - mean[idx[i]]) * (x[i] - mean[idx[i]]);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double den = std::sqrt(m2[idx[i]] / count[idx[i]]) + eps;
    y[i] = den == 0 ? 0 : (x[i] - mean[idx[i]]) / den;
  }
  return y;
}

nk::Dims dims(const std::vector<int64_t>& s) { return nk::Dims(s.begin(), s.end()); }
int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

// Tolerance for normalized outputs of T (scaled by the output's magnitude: |y| <= 1 for normalize).
template <class T>
nk_test::Tol tol() {
  nk_test::Tol t = nk_test::output_tol<T>();
  return t;
}

template <class T>
void check_normalize(std::mt19937& rng, const std::vector<int64_t>& shape, double p, double center) {
  const auto data = nk_test::random_data<T>(numel(shape), rng, center, 2.0);
  for (int dim = 0; dim < int(shape.size()); ++dim) {
    std::vector<T> y(data.t.size());
    nk::normalize(nk::TensorView<const T>(data.t.data(), dims(shape)), nk::TensorView<T>(y.data(), dims(shape)), p,
                  dim - int(shape.size()) * (dim % 2));  // negative dims too
    const auto want = ref_normalize(data.d, shape, dim, p, 1e-12);
    EXPECT_TRUE(nk_test::all_close("y", int64_t(y.size()), [&](int64_t i) { return nk_test::to_double(y[i]); }, want,
                                   tol<T>()))
        << nk_test::type_name<T>() << " p=" << p << " dim=" << dim;
  }
}

TEST_P(LpNorms, NormalizeEveryDimEveryPMatchesFloat64) {
  for (const double p : {2.0, 1.0, 3.0, 1.5, kInf}) {
    check_normalize<float>(rng_, {3, 5, 37}, p, 0.3);
    check_normalize<double>(rng_, {4, 33, 6}, p, -0.2);
    check_normalize<nk::half>(rng_, {2, 3, 4, 19}, p, 0.1);
    check_normalize<nk::bfloat16>(rng_, {5, 40}, p, 0.0);
  }
}

TEST_P(LpNorms, NormalizeLongRowsAndThreads) {
  for (int threads : {1, 2}) {
    nk::set_num_threads(threads);
    check_normalize<float>(rng_, {6, 10000}, 2.0, 1.0);  // rows of several statistics chunks
    check_normalize<float>(rng_, {3, 3000, 5}, 2.0, 1.0);  // columns of several row blocks
  }
}

TEST_P(LpNorms, NormalizeLargeMeanIsExact) {
  // Sum of squares = M2 + n * mean^2: both terms non-negative, so a mean of 1e4
  // with a spread of 1e-2 keeps its digits (as the float64 reference has them).
  std::normal_distribution<double> dist(0.0, 1.0);
  const std::vector<int64_t> shape{4, 300};
  std::vector<float> x(numel(shape));
  for (auto& v : x) v = float(1e4 + 1e-2 * dist(rng_));
  const std::vector<double> xd(x.begin(), x.end());
  for (int dim : {0, 1}) {
    std::vector<float> y(x.size());
    nk::normalize(nk::TensorView<const float>(x.data(), dims(shape)), nk::TensorView<float>(y.data(), dims(shape)),
                  2.0, dim);
    const auto want = ref_normalize(xd, shape, dim, 2.0, 1e-12);
    EXPECT_TRUE(nk_test::all_close("y", int64_t(y.size()), [&](int64_t i) { return double(y[i]); }, want,
                                   {1e-6, 1e-6}));
  }
}

TEST_P(LpNorms, NormalizeZerosEpsAndNonFinite) {
  const std::vector<int64_t> shape{3, 4};
  // Row 0 zeros, row 1 with a NaN, row 2 with an infinity.
  std::vector<float> x{0, 0, 0, 0, 1, NAN, 2, 3, 1, INFINITY, -2, 0};
  for (const double p : {2.0, 1.0, kInf, 3.0}) {
    for (const double eps : {0.0, 1e-12, 1e-45}) {  // 1e-45: 1/eps overflows float32 (the plain loop takes it)
      std::vector<float> y(x.size(), 7.0f);
      nk::normalize(nk::TensorView<const float>(x.data(), dims(shape)), nk::TensorView<float>(y.data(), dims(shape)),
                    p, 1, eps);
      for (int j = 0; j < 4; ++j) EXPECT_EQ(y[j], 0.0f) << "zero row, p=" << p << " eps=" << eps;
      for (int j = 4; j < 8; ++j) EXPECT_TRUE(std::isnan(y[j])) << "NaN row, p=" << p;
      EXPECT_EQ(y[8], 0.0f);
      EXPECT_TRUE(std::isnan(y[9]));  // inf / inf
      EXPECT_EQ(y[10], -0.0f);
      EXPECT_EQ(y[11], 0.0f);
    }
  }
  // A norm below eps: y = x / eps.
  std::vector<double> small{1e-8, -2e-8}, ys(2);
  nk::normalize(nk::TensorView<const double>(small.data(), {2}), nk::TensorView<double>(ys.data(), {2}), 2.0, 0, 1e-3);
  EXPECT_NEAR(ys[0], 1e-5, 1e-18);
  EXPECT_NEAR(ys[1], -2e-5, 1e-18);
  // Subnormal values with eps = 0: 1/norm overflows float32, the plain loop keeps the result.
  std::vector<float> tiny{3e-41f, 4e-41f}, yt(2);
  nk::normalize(nk::TensorView<const float>(tiny.data(), {1, 2}), nk::TensorView<float>(yt.data(), {1, 2}), 2.0, -1,
                0.0);
  EXPECT_NEAR(yt[0], double(tiny[0]) / std::hypot(double(tiny[0]), double(tiny[1])), 1e-6);
  EXPECT_NEAR(yt[1], double(tiny[1]) / std::hypot(double(tiny[0]), double(tiny[1])), 1e-6);
}

TEST_P(LpNorms, NormalizeSizeOneEmptyAndInPlace) {
  std::vector<float> x{3, -4, 5}, y(3);
  nk::normalize(nk::TensorView<const float>(x.data(), {3, 1}), nk::TensorView<float>(y.data(), {3, 1}), 2.0, 1);
  EXPECT_EQ(y, (std::vector<float>{1, -1, 1}));
  nk::normalize(nk::TensorView<const float>(x.data(), {1, 3}), nk::TensorView<float>(y.data(), {1, 3}), 2.0, 0);
  EXPECT_EQ(y, (std::vector<float>{1, -1, 1}));
  nk::normalize(nk::TensorView<const float>(nullptr, {0, 3}), nk::TensorView<float>(nullptr, {0, 3}), 2.0, 0);
  nk::normalize(nk::TensorView<const float>(nullptr, {2, 0}), nk::TensorView<float>(nullptr, {2, 0}), 1.0, 1);
  // In place, both mappings.
  const auto data = nk_test::random_data<float>(60, rng_, 0.5, 1.0);
  for (int dim : {0, 1, 2}) {
    std::vector<float> inplace = data.t;
    nk::TensorView<float> v(inplace.data(), {3, 4, 5});
    nk::normalize(v, v, 2.0, dim);
    const auto want = ref_normalize(data.d, {3, 4, 5}, dim, 2.0, 1e-12);
    EXPECT_TRUE(nk_test::all_close("y", 60, [&](int64_t i) { return double(inplace[i]); }, want, tol<float>()));
  }
}

template <class T>
void check_backward(std::mt19937& rng, const std::vector<int64_t>& shape, double p, double eps, nk_test::Tol t) {
  const auto x = nk_test::random_data<T>(numel(shape), rng, 0.2, 1.0);
  const auto dy = nk_test::random_data<T>(numel(shape), rng, 0.0, 1.0);
  for (int dim = 0; dim < int(shape.size()); ++dim) {
    std::vector<T> dx(x.t.size());
    nk::normalize_backward(nk::TensorView<const T>(dy.t.data(), dims(shape)),
                           nk::TensorView<const T>(x.t.data(), dims(shape)), nk::TensorView<T>(dx.data(), dims(shape)),
                           p, dim, eps);
    const auto want = ref_normalize_backward(dy.d, x.d, shape, dim, p, eps);
    EXPECT_TRUE(nk_test::all_close("dx", int64_t(dx.size()), [&](int64_t i) { return nk_test::to_double(dx[i]); },
                                   want, t))
        << nk_test::type_name<T>() << " p=" << p << " dim=" << dim << " eps=" << eps;
  }
}

TEST_P(LpNorms, NormalizeBackwardMatchesFloat64) {
  for (const double p : {2.0, 1.0, 3.0, kInf}) {
    check_backward<double>(rng_, {3, 7, 5}, p, 1e-12, {1e-11, 1e-11});
    check_backward<float>(rng_, {4, 6, 9}, p, 1e-12, {1e-4, 1e-4});
    check_backward<nk::half>(rng_, {3, 17}, p, 1e-12, {4e-3, 4e-3});
    check_backward<nk::bfloat16>(rng_, {3, 2, 5}, p, 1e-12, {3e-2, 3e-2});
    check_backward<double>(rng_, {3, 7, 5}, p, 10.0, {1e-11, 1e-11});  // every norm clamped: dx = dy / eps
  }
}

TEST_P(LpNorms, NormalizeBackwardZeroSliceAndInPlace) {
  std::vector<double> x{0, 0, 1, 2}, dy{1, 2, 3, 4}, dx(4, 9.0);
  nk::normalize_backward(nk::TensorView<const double>(dy.data(), {2, 2}), nk::TensorView<const double>(x.data(), {2, 2}),
                         nk::TensorView<double>(dx.data(), {2, 2}), 2.0, 1, 0.0);
  EXPECT_EQ(dx[0], 0.0);
  EXPECT_EQ(dx[1], 0.0);
  const auto want = ref_normalize_backward(dy, x, {2, 2}, 1, 2.0, 0.0);
  EXPECT_NEAR(dx[2], want[2], 1e-15);
  EXPECT_NEAR(dx[3], want[3], 1e-15);
  // dx = dy in place.
  std::vector<double> g = dy;
  nk::TensorView<double> gv(g.data(), {2, 2});
  nk::normalize_backward(gv, nk::TensorView<const double>(x.data(), {2, 2}), gv, 2.0, 1, 0.0);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(g[i], dx[i]);
}

template <class T>
void check_mvn(std::mt19937& rng, const std::vector<int64_t>& shape, const std::vector<int64_t>& axes, double center,
               double spread, nk_test::Tol t) {
  const auto data = nk_test::random_data<T>(numel(shape), rng, center, spread);
  std::vector<bool> red(shape.size(), false);
  for (auto a : axes) red[a < 0 ? a + int64_t(shape.size()) : a] = true;
  std::vector<T> y(data.t.size());
  nk::mean_variance_norm(nk::TensorView<const T>(data.t.data(), dims(shape)), nk::TensorView<T>(y.data(), dims(shape)),
                         dims(axes), 1e-9);
  const auto want = ref_mvn(data.d, shape, red, 1e-9);
  nk::Dims ad = dims(axes);
  EXPECT_TRUE(nk_test::all_close("y", int64_t(y.size()), [&](int64_t i) { return nk_test::to_double(y[i]); }, want, t))
      << nk_test::type_name<T>() << " axes " << ad.to_string();
}

TEST_P(LpNorms, MeanVarianceNormAnyAxesMatchesFloat64) {
  const std::vector<int64_t> nchw{3, 4, 5, 6};
  // rows ([K, R]), columns ([R, K], [K, R, K]), merged runs ([R, K, R], [K, R, K, R], [R, K, R, K]).
  const std::vector<std::vector<int64_t>> sets = {{0, 2, 3}, {3}, {2, 3}, {0}, {1}, {0, 1, 2, 3}, {1, 3}, {0, 2},
                                                  {-1, 0}, {1, 2}, {0, 1}};
  for (const auto& axes : sets) {
    check_mvn<float>(rng_, nchw, axes, 0.5, 2.0, {1e-4, 1e-4});
    check_mvn<double>(rng_, nchw, axes, 0.5, 2.0, {1e-11, 1e-11});
    check_mvn<nk::half>(rng_, nchw, axes, 0.5, 2.0, {3e-3, 3e-3, 10, -14});
    check_mvn<nk::bfloat16>(rng_, nchw, axes, 0.5, 2.0, {3e-3, 3e-3, 7, -126});
  }
  check_mvn<float>(rng_, {2, 3000, 3}, {1}, 0.0, 1.0, {1e-4, 1e-4});  // several row blocks
  check_mvn<float>(rng_, {5, 9000}, {1}, 0.0, 1.0, {1e-4, 1e-4});     // several statistics chunks
}

TEST_P(LpNorms, MeanVarianceNormLargeMeanTinySpread) {
  // E[x^2] - E[x]^2 cancels to nothing here in float32 (and to noise in float64);
  // the kernels' shifted moments do not.
  for (const auto& axes : std::vector<std::vector<int64_t>>{{0, 2, 3}, {3}, {0}}) {
    check_mvn<float>(rng_, {4, 3, 8, 8}, axes, 1e4, 1e-2, {2e-3, 2e-3});
    check_mvn<double>(rng_, {4, 3, 8, 8}, axes, 1e8, 1e-3, {1e-6, 1e-6});
  }
}

TEST_P(LpNorms, MeanVarianceNormConstantNonFiniteAndEmpty) {
  std::vector<float> x{2, 2, 2, 2, 1, NAN, 3, 4}, y(8, 7.0f);
  nk::mean_variance_norm(nk::TensorView<const float>(x.data(), {2, 4}), nk::TensorView<float>(y.data(), {2, 4}), {1},
                         0.0);
  for (int j = 0; j < 4; ++j) EXPECT_EQ(y[j], 0.0f);  // constant with eps = 0: zeros, not 0/0
  for (int j = 4; j < 8; ++j) EXPECT_TRUE(std::isnan(y[j]));
  nk::mean_variance_norm(nk::TensorView<const float>(x.data(), {2, 4}), nk::TensorView<float>(y.data(), {2, 4}), {1});
  for (int j = 0; j < 4; ++j) EXPECT_EQ(y[j], 0.0f);
  nk::mean_variance_norm(nk::TensorView<const float>(nullptr, {0, 3, 2, 2}), nk::TensorView<float>(nullptr, {0, 3, 2, 2}));
  // Size-1 reduced axes: every slice one element, y = 0.
  std::vector<float> one{1, 2, 3}, y1(3, 7.0f);
  nk::mean_variance_norm(nk::TensorView<const float>(one.data(), {3, 1}), nk::TensorView<float>(y1.data(), {3, 1}), {1});
  EXPECT_EQ(y1, (std::vector<float>{0, 0, 0}));
  // In place.
  const auto data = nk_test::random_data<float>(120, rng_, 1.0, 1.0);
  std::vector<float> inplace = data.t;
  nk::TensorView<float> v(inplace.data(), {2, 3, 4, 5});
  nk::mean_variance_norm(v, v);
  const auto want = ref_mvn(data.d, {2, 3, 4, 5}, {true, false, true, true}, 1e-9);
  EXPECT_TRUE(nk_test::all_close("y", 120, [&](int64_t i) { return double(inplace[i]); }, want, {1e-4, 1e-4}));
}

TEST_P(LpNorms, Errors) {
  using nk::ErrorKind;
  std::vector<float> x(24, 1.0f), y(24);
  std::vector<double> yd(24);
  const nk::TensorView<const float> xv(x.data(), {2, 3, 4});
  const nk::TensorView<float> yv(y.data(), {2, 3, 4});
  EXPECT_TRUE(nk_test::throws_error([&] { nk::normalize(xv, yv, 0.5); }, ErrorKind::value, "p:"));
  EXPECT_TRUE(nk_test::throws_error([&] { nk::normalize(xv, yv, NAN); }, ErrorKind::value, "p:"));
  EXPECT_TRUE(nk_test::throws_error([&] { nk::normalize(xv, yv, 2.0, 3); }, ErrorKind::value, "dim:"));
  EXPECT_TRUE(nk_test::throws_error([&] { nk::normalize(xv, yv, 2.0, -4); }, ErrorKind::value, "dim:"));
  EXPECT_TRUE(nk_test::throws_error([&] { nk::normalize(xv, yv, 2.0, -1, -1.0); }, ErrorKind::value, "eps:"));
  EXPECT_TRUE(nk_test::throws_error([&] { nk::normalize(xv, nk::TensorView<float>(y.data(), {2, 12})); },
                                    ErrorKind::value, "y:"));
  EXPECT_TRUE(nk_test::throws_error([&] { nk::normalize(xv, nk::TensorView<double>(yd.data(), {2, 3, 4})); },
                                    ErrorKind::type, "y:"));
  EXPECT_TRUE(nk_test::throws_error(
      [&] { nk::normalize(nk::TensorView<const float>(x.data(), {2, 3, 4}, {1, 2, 6}), yv); }, ErrorKind::value,
      "x:"));
  EXPECT_TRUE(nk_test::throws_error(
      [&] { nk::normalize(nk::TensorView<const float>(x.data(), {}), nk::TensorView<float>(y.data(), {})); },
      ErrorKind::value, "dim:"));
  EXPECT_TRUE(nk_test::throws_error([&] { nk::normalize(xv, nk::TensorView<float>(x.data() + 1, {2, 3, 4})); },
                                    ErrorKind::value, "y:"));
  EXPECT_TRUE(nk_test::throws_error(
      [&] { nk::normalize_backward(nk::TensorView<const double>(yd.data(), {2, 3, 4}), xv, yv); }, ErrorKind::type,
      "dy:"));
  EXPECT_TRUE(nk_test::throws_error(
      [&] { nk::normalize_backward(nk::TensorView<const float>(y.data(), {2, 12}), xv, yv); }, ErrorKind::value, "dy:"));
  EXPECT_TRUE(nk_test::throws_error(
      [&] { nk::normalize_backward(xv, xv, nk::TensorView<float>(y.data(), {24})); }, ErrorKind::value, "dx:"));
  EXPECT_TRUE(nk_test::throws_error([&] { nk::normalize_backward(xv, xv, yv, 0.0); }, ErrorKind::value, "p:"));
  EXPECT_TRUE(nk_test::throws_error([&] { nk::mean_variance_norm(xv, yv); }, ErrorKind::value, "axes:"));  // axis 3
  EXPECT_TRUE(nk_test::throws_error([&] { nk::mean_variance_norm(xv, yv, {0, -3}); }, ErrorKind::value, "axes:"));
  EXPECT_TRUE(nk_test::throws_error([&] { nk::mean_variance_norm(xv, yv, nk::Dims{}); }, ErrorKind::value, "axes:"));
  EXPECT_TRUE(nk_test::throws_error([&] { nk::mean_variance_norm(xv, yv, {1}, NAN); }, ErrorKind::value, "eps:"));
  EXPECT_TRUE(nk_test::throws_error(
      [&] { nk::mean_variance_norm(xv, nk::TensorView<float>(y.data(), {2, 3, 2})); }, ErrorKind::value, "y:"));
}

NK_TEST_ON_EVERY_PATH(LpNorms);

}  // namespace
