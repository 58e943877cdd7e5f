// test_rows_norms.cpp - LayerNorm and RMSNorm through normkit's public C++ API.
//
// Every test that runs a kernel runs once per kernel path ("scalar", "avx2",
// "avx512"; a path this CPU or build lacks is skipped), against a plain
// float64 reference written below. Shapes in comments are (rows, cols):
// the norms reduce over the trailing `cols` elements of each row.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "normkit/normkit.hpp"
#include "test_support.hpp"

namespace nk = normkit;
using std::int64_t;

namespace {

using namespace nk_test;
using nk_test::random_data;  // (not glibc's struct random_data)

nk::Dims dims2(int64_t a, int64_t b) { return nk::Dims{a, b}; }

// Which affine parameters a call gets.
enum class Affine { none, weight, bias, both };
const char* affine_name(Affine a) {
  switch (a) {
    case Affine::none: return "no affine";
    case Affine::weight: return "weight";
    case Affine::bias: return "bias";
    case Affine::both: return "weight+bias";
  }
  return "?";
}
bool has_weight(Affine a) { return a == Affine::weight || a == Affine::both; }
bool has_bias(Affine a) { return a == Affine::bias || a == Affine::both; }

// ---------------------------------------------------------------------------
// One checked call: x (rows, cols) with row strides of its own, y likewise
// or in place, weights of type W, statistics requested; compares y and the
// statistics with the reference and checks that x and the padding between
// rows were left alone.
// ---------------------------------------------------------------------------

struct Geometry {
  int64_t rows = 1, cols = 1;
  int64_t x_pad = 0;      // extra elements after each row of x (row stride = cols + pad)
  int64_t y_pad = 0;
  int64_t x_offset = 0;   // elements before the first row (misaligns the data)
  int64_t y_offset = 0;
  bool in_place = false;  // y is exactly x (same view)
};

template <class T, class W>
void check_call(Norm norm, const Geometry& g, Affine affine, std::optional<double> eps, std::mt19937& rng,
                const Data<T>* given_x = nullptr) {
  SCOPED_TRACE(std::string(norm_name(norm)) + " " + type_name<T>() + " weights " + type_name<W>() + " " +
               affine_name(affine) + " rows " + std::to_string(g.rows) + " cols " + std::to_string(g.cols) +
               (g.in_place ? " in place" : "") + " x stride " + std::to_string(g.cols + g.x_pad) +
               " y stride " + std::to_string(g.cols + g.y_pad) + (eps ? "" : " default eps"));
  const int64_t rows = g.rows, cols = g.cols;
  const Data<T> x = given_x ? *given_x : random_rows<T>(rows, cols, rng);
  const Data<W> w = random_data<W>(has_weight(affine) ? cols : 0, rng, 0.0, 1.5);
  const Data<W> b = random_data<W>(has_bias(affine) && norm == Norm::layer ? cols : 0, rng, 0.0, 0.5);
  const double e = eps ? *eps : torch_eps<T>();
  const Reference ref = reference_norm(norm, x.d, rows, cols, w.d, b.d, e);

  // Lay x (and y) out in padded buffers filled with a sentinel.
  const T sentinel = from_double<T>(-777.0);
  const int64_t xs = cols + g.x_pad, ys = g.in_place ? xs : cols + g.y_pad;
  std::vector<T> xbuf(static_cast<size_t>(g.x_offset + rows * xs + 1), sentinel);
  for (int64_t i = 0; i < rows; ++i)
    std::copy_n(x.t.begin() + i * cols, cols, xbuf.begin() + g.x_offset + i * xs);
  const std::vector<T> xbuf_before = xbuf;
  std::vector<T> ybuf(static_cast<size_t>(g.y_offset + rows * ys + 1), sentinel);

  T* xp = xbuf.data() + g.x_offset;
  T* yp = g.in_place ? xp : ybuf.data() + g.y_offset;
  const nk::TensorView<const T> xv(xp, dims2(rows, cols), dims2(xs, 1));
  const nk::TensorView<T> yv(yp, dims2(rows, cols), dims2(ys, 1));

  const nk::TensorRef wv = has_weight(affine) ? nk::TensorRef(nk::TensorView<const W>(w.t.data(), nk::Dims{cols}))
                                              : nk::TensorRef();
  const nk::TensorRef bv = has_bias(affine) && norm == Norm::layer
                               ? nk::TensorRef(nk::TensorView<const W>(b.t.data(), nk::Dims{cols}))
                               : nk::TensorRef();
  const stats_t<T> nan_stat = std::numeric_limits<stats_t<T>>::quiet_NaN();
  std::vector<stats_t<T>> mean(static_cast<size_t>(rows), nan_stat), rstd(static_cast<size_t>(rows), nan_stat);
  const nk::TensorView<stats_t<T>> mean_v(mean.data(), nk::Dims{rows, 1});
  const nk::TensorView<stats_t<T>> rstd_v(rstd.data(), nk::Dims{rows, 1});

  if (norm == Norm::layer) {
    ASSERT_NO_THROW(nk::layer_norm(xv, yv, nk::Dims{cols}, wv, bv, e, mean_v, rstd_v));
  } else {
    ASSERT_NO_THROW(nk::rms_norm(xv, yv, nk::Dims{cols}, wv, eps, rstd_v));
  }

  const Tol tol = output_tol<T>();
  EXPECT_TRUE(all_close("y", rows * cols,
                        [&](int64_t k) { return to_double(yp[(k / cols) * ys + k % cols]); }, ref.y, tol));
  EXPECT_TRUE(all_close("rstd", rows, [&](int64_t k) { return static_cast<double>(rstd[k]); }, ref.rstd,
                        stats_tol<T>()));
  if (norm == Norm::layer) {
    // The mean's error scales with the data's magnitude (|x| <= 5 here).
    EXPECT_TRUE(all_close("mean", rows, [&](int64_t k) { return static_cast<double>(mean[k]); }, ref.mean,
                          Tol{5 * stats_tol<T>().atol, stats_tol<T>().rtol}));
  }

  // x untouched (unless in place), padding untouched in both buffers.
  auto same_bits = [](const T& a, const T& b) { return std::memcmp(&a, &b, sizeof(T)) == 0; };
  for (size_t k = 0; k < xbuf.size(); ++k) {
    const int64_t pos = static_cast<int64_t>(k) - g.x_offset;
    const bool in_row = pos >= 0 && pos < rows * xs && pos % xs < cols;
    if (g.in_place && in_row) continue;
    ASSERT_TRUE(same_bits(xbuf[k], xbuf_before[k])) << "x buffer changed at element " << k;
  }
  if (!g.in_place) {
    for (size_t k = 0; k < ybuf.size(); ++k) {
      const int64_t pos = static_cast<int64_t>(k) - g.y_offset;
      const bool in_row = pos >= 0 && pos < rows * ys && pos % ys < cols;
      if (!in_row) {
        ASSERT_TRUE(same_bits(ybuf[k], sentinel)) << "y written outside its rows at element " << k;
      }
    }
  }
}

// Runs `f.template operator()<T, W>()` for every (element, weight) type pair:
// float/float, double/double, half/half, half/float, bf16/bf16, bf16/float.
template <class F>
void for_each_type_pair(F&& f) {
  f(float{}, float{});
  f(double{}, double{});
  f(nk::half{}, nk::half{});
  f(nk::half{}, float{});
  f(nk::bfloat16{}, nk::bfloat16{});
  f(nk::bfloat16{}, float{});
}

const int64_t kRowLengths[] = {1, 3, 7, 15, 16, 17, 31, 33, 63, 65, 4095, 4097, 8193};

// ---------------------------------------------------------------------------
// Fixture: one instance per kernel path.
// ---------------------------------------------------------------------------

class PerPath : public KernelPathTest {};

// ---------------------------------------------------------------------------
// Against the reference: every type pair, every row length, every affine mix.
// ---------------------------------------------------------------------------

TEST_P(PerPath, LayerNormMatchesReference) {
  for_each_type_pair([&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    for (int64_t cols : kRowLengths) {
      const int64_t rows = cols > 1000 ? 3 : 5;
      for (Affine a : {Affine::none, Affine::weight, Affine::bias, Affine::both}) {
        if (!std::is_same_v<T, W> && a == Affine::none) continue;  // weight type irrelevant
        Geometry g;
        g.rows = rows;
        g.cols = cols;
        check_call<T, W>(Norm::layer, g, a, 1e-5, rng_);
      }
    }
  });
}

TEST_P(PerPath, RmsNormMatchesReference) {
  for_each_type_pair([&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    for (int64_t cols : kRowLengths) {
      const int64_t rows = cols > 1000 ? 3 : 5;
      for (Affine a : {Affine::none, Affine::weight}) {
        if (!std::is_same_v<T, W> && a == Affine::none) continue;
        Geometry g;
        g.rows = rows;
        g.cols = cols;
        check_call<T, W>(Norm::rms, g, a, 1e-6, rng_);
        check_call<T, W>(Norm::rms, g, a, std::nullopt, rng_);  // eps = finfo(dtype).eps
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Memory layouts: in place, padded rows, misaligned starts, big outputs
// (which take the streaming-store path).
// ---------------------------------------------------------------------------

TEST_P(PerPath, InPlace) {
  for_each_type_pair([&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    for (int64_t cols : {1, 17, 65, 4097}) {
      Geometry g;
      g.rows = 4;
      g.cols = cols;
      g.in_place = true;
      check_call<T, W>(Norm::layer, g, Affine::both, 1e-5, rng_);
      check_call<T, W>(Norm::rms, g, Affine::weight, 1e-5, rng_);
      g.x_pad = 3;  // in place on padded rows
      check_call<T, W>(Norm::layer, g, Affine::both, 1e-5, rng_);
      check_call<T, W>(Norm::rms, g, Affine::weight, 1e-5, rng_);
    }
  });
}

TEST_P(PerPath, StridedRows) {
  for_each_type_pair([&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    for (int64_t cols : {1, 7, 16, 33, 4095}) {
      Geometry g;
      g.rows = 6;
      g.cols = cols;
      g.x_pad = 5;      // row stride > cols
      g.y_pad = 11;     // and a different one for y
      g.x_offset = 1;   // rows start misaligned
      g.y_offset = 3;
      check_call<T, W>(Norm::layer, g, Affine::both, 1e-5, rng_);
      check_call<T, W>(Norm::rms, g, Affine::weight, 1e-5, rng_);
    }
  });
}

// Outputs of 16 MiB and more are written with streaming stores; an odd row
// length and a misaligned start make every row need a head and a tail.
TEST_P(PerPath, LargeOutputsStreamingStores) {
  auto run = [&](auto t, int64_t rows, Norm norm) {
    using T = decltype(t);
    Geometry g;
    g.rows = rows;
    g.cols = 4099;
    g.y_offset = 1;
    check_call<T, T>(norm, g, norm == Norm::layer ? Affine::both : Affine::weight, 1e-5, rng_);
  };
  // Each about 16.8 MB of x; one norm per type keeps the test quick.
  run(float{}, 1025, Norm::layer);
  run(float{}, 1025, Norm::rms);
  run(nk::half{}, 2049, Norm::layer);
  run(nk::bfloat16{}, 2049, Norm::rms);
  run(double{}, 513, Norm::layer);
}

// Leading dims that collapse to one row stride, a multi-dim normalized_shape,
// and a size-1 leading dim with an arbitrary stride.
TEST_P(PerPath, MultiDimShapes) {
  std::mt19937& rng = rng_;
  // x: (2, 3, 4, 8) contiguous, normalized over (4, 8): 6 rows of 32.
  {
    const Data<float> x = random_rows<float>(6, 32, rng);
    const Data<float> w = random_data<float>(32, rng, 0.0, 1.5), b = random_data<float>(32, rng, 0.0, 0.5);
    const Reference ref = reference_norm(Norm::layer, x.d, 6, 32, w.d, b.d, 1e-5);
    std::vector<float> y(x.t.size());
    nk::layer_norm(nk::TensorView<const float>(x.t.data(), nk::Dims{2, 3, 4, 8}),
                   nk::TensorView<float>(y.data(), nk::Dims{2, 3, 4, 8}), nk::Dims{4, 8},
                   nk::TensorView<const float>(w.t.data(), nk::Dims{4, 8}),
                   nk::TensorView<const float>(b.t.data(), nk::Dims{4, 8}), 1e-5);
    EXPECT_TRUE(all_close("y", 6 * 32, [&](int64_t k) { return double(y[k]); }, ref.y, output_tol<float>()));
  }
  // x: (2, 3, 40) with strides (3 * 50, 50, 1): padded rows that collapse to stride 50.
  {
    const Data<float> x = random_rows<float>(6, 40, rng);
    std::vector<float> xb(6 * 50, 0.f), yb(6 * 50, -1.f);
    for (int i = 0; i < 6; ++i) std::copy_n(x.t.begin() + i * 40, 40, xb.begin() + i * 50);
    const Reference ref = reference_norm(Norm::rms, x.d, 6, 40, {}, {}, 1e-5);
    nk::rms_norm(nk::TensorView<const float>(xb.data(), nk::Dims{2, 3, 40}, nk::Dims{150, 50, 1}),
                 nk::TensorView<float>(yb.data(), nk::Dims{2, 3, 40}, nk::Dims{150, 50, 1}), nk::Dims{40}, {},
                 1e-5);
    EXPECT_TRUE(all_close("y", 6 * 40, [&](int64_t k) { return double(yb[(k / 40) * 50 + k % 40]); }, ref.y,
                          output_tol<float>()));
  }
  // x: (1, 4, 16) whose size-1 leading dim has a nonsense stride.
  {
    const Data<double> x = random_rows<double>(4, 16, rng);
    const Reference ref = reference_norm(Norm::layer, x.d, 4, 16, {}, {}, 1e-5);
    std::vector<double> y(64);
    nk::layer_norm(nk::TensorView<const double>(x.t.data(), nk::Dims{1, 4, 16}, nk::Dims{12345, 16, 1}),
                   nk::TensorView<double>(y.data(), nk::Dims{1, 4, 16}), nk::Dims{16});
    EXPECT_TRUE(all_close("y", 64, [&](int64_t k) { return y[k]; }, ref.y, output_tol<double>()));
  }
  // A 1-D x is one row.
  {
    const Data<float> x = random_rows<float>(1, 100, rng);
    const Reference ref = reference_norm(Norm::layer, x.d, 1, 100, {}, {}, 1e-5);
    std::vector<float> y(100), mean(1), rstd(1);
    nk::layer_norm(nk::TensorView<const float>(x.t.data(), nk::Dims{100}),
                   nk::TensorView<float>(y.data(), nk::Dims{100}), nk::Dims{100}, {}, {}, 1e-5,
                   nk::TensorView<float>(mean.data(), nk::Dims{}), nk::TensorView<float>(rstd.data(), nk::Dims{}));
    EXPECT_TRUE(all_close("y", 100, [&](int64_t k) { return double(y[k]); }, ref.y, output_tol<float>()));
    EXPECT_NEAR(mean[0], ref.mean[0], 1e-5);
    EXPECT_NEAR(rstd[0], ref.rstd[0], 1e-5 * ref.rstd[0]);
  }
}

TEST_P(PerPath, EmptyInputs) {
  // No rows: nothing written.
  std::vector<float> x(8, 1.f), y(8, 5.f);
  nk::layer_norm(nk::TensorView<const float>(x.data(), nk::Dims{0, 8}), nk::TensorView<float>(y.data(), nk::Dims{0, 8}),
                 nk::Dims{8});
  EXPECT_EQ(y[0], 5.f);
  // Rows of length 0: no output, statistics NaN (0/0).
  std::vector<float> mean(3, 0.f), rstd(3, 0.f);
  nk::layer_norm(nk::TensorView<const float>(x.data(), nk::Dims{3, 0}), nk::TensorView<float>(y.data(), nk::Dims{3, 0}),
                 nk::Dims{0}, {}, {}, 1e-5, nk::TensorView<float>(mean.data(), nk::Dims{3}),
                 nk::TensorView<float>(rstd.data(), nk::Dims{3}));
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(std::isnan(mean[i]));
    EXPECT_TRUE(std::isnan(rstd[i]));
  }
}

// ---------------------------------------------------------------------------
// Hostile data
// ---------------------------------------------------------------------------

// mean 1e4, standard deviation 1e-2, float32: the naive E[x^2] - E[x]^2 loses
// every digit here; normkit must still give unit variance within 1e-3.
// The first element of a row is also moved away from the rest (by 0, 3, 50
// and 1000 standard deviations): kernels that shift by x[0] must not lose the
// digits when x[0] is far from the row's mean.
TEST_P(PerPath, LargeMeanSmallSpreadFloat32) {
  std::normal_distribution<double> normal(1e4, 1e-2);
  for (double first_offset : {0.0, 3e-2, 0.5, 10.0})
  for (int64_t cols : {7, 64, 768, 4095, 4097, 8193, 20000}) {
    SCOPED_TRACE("cols " + std::to_string(cols) + ", x[0] moved by " + std::to_string(first_offset));
    const int64_t rows = 3;
    std::vector<float> x(static_cast<size_t>(rows * cols)), y(x.size()), mean(rows), rstd(rows);
    std::vector<double> xd(x.size());
    for (size_t k = 0; k < x.size(); ++k) {
      const bool first = k % static_cast<size_t>(cols) == 0;
      xd[k] = x[k] = static_cast<float>(normal(rng_) + (first ? first_offset : 0.0));
    }
    const double eps = 1e-12;  // far below var(x) = 1e-4, so var(y) should be 1
    nk::layer_norm(nk::TensorView<const float>(x.data(), dims2(rows, cols)),
                   nk::TensorView<float>(y.data(), dims2(rows, cols)), nk::Dims{cols}, {}, {}, eps,
                   nk::TensorView<float>(mean.data(), nk::Dims{rows}), nk::TensorView<float>(rstd.data(), nk::Dims{rows}));
    const Reference ref = reference_norm(Norm::layer, xd, rows, cols, {}, {}, eps);
    for (int64_t i = 0; i < rows; ++i) {
      double m = 0, v = 0;
      for (int64_t j = 0; j < cols; ++j) m += y[i * cols + j];
      m /= cols;
      for (int64_t j = 0; j < cols; ++j) v += (y[i * cols + j] - m) * (y[i * cols + j] - m);
      v /= cols;
      EXPECT_NEAR(v, 1.0, 1e-3) << "row " << i << ": variance of the normalized row";
      EXPECT_NEAR(m, 0.0, 1e-3) << "row " << i << ": mean of the normalized row";
      EXPECT_NEAR(mean[i], ref.mean[i], 1e-3) << "row " << i;
      EXPECT_NEAR(rstd[i], ref.rstd[i], 1e-3 * ref.rstd[i]) << "row " << i;
    }
    EXPECT_TRUE(all_close("y", rows * cols, [&](int64_t k) { return double(y[k]); }, ref.y, Tol{2e-3, 2e-3}));
  }
}

// Statistics of data whose values are float16 numbers (float16 inputs, or
// float32 copies of them) must be as accurate as those of continuous float32
// data: rows.inc budgets "a relative error of about 1e-6 in float32", and
// continuous data stay under 7e-7 on every path. Here each row's first
// element is small (|x[0]| < 0.1, so it has finer low bits than the rest) and
// the rest are 1.5 +- 2, all float16 values. Shifting by x[0] then gives every
// term the same low-order bits, and the float running sums round the same way
// at every step instead of at random, so the error grows with the row length
// instead of its square root (seen: up to ~1e-5 relative on the scalar path).
TEST_P(PerPath, LayerNormStatisticsOfHalfValuedData) {
  const int64_t rows = 256, cols = 4096;
  std::uniform_real_distribution<double> rest(-0.5, 3.5), first(-0.1, 0.1);
  for (bool half_valued : {false, true}) {
    SCOPED_TRACE(half_valued ? "float16 data" : "continuous float32 data (control)");
    std::vector<float> x(static_cast<size_t>(rows * cols)), y(x.size()), mean(rows), rstd(rows);
    for (int64_t k = 0; k < rows * cols; ++k) {
      const double v = k % cols == 0 ? first(rng_) : rest(rng_);
      x[k] = half_valued ? static_cast<float>(nk::half(static_cast<float>(v))) : static_cast<float>(v);
    }
    std::vector<nk::half> xh(x.size()), yh(x.size());
    for (size_t k = 0; k < x.size(); ++k) xh[k] = nk::half(x[k]);
    if (half_valued)
      nk::layer_norm(nk::TensorView<const nk::half>(xh.data(), dims2(rows, cols)),
                     nk::TensorView<nk::half>(yh.data(), dims2(rows, cols)), nk::Dims{cols}, {}, {}, 0.0,
                     nk::TensorView<float>(mean.data(), nk::Dims{rows}), nk::TensorView<float>(rstd.data(), nk::Dims{rows}));
    else
      nk::layer_norm(nk::TensorView<const float>(x.data(), dims2(rows, cols)),
                     nk::TensorView<float>(y.data(), dims2(rows, cols)), nk::Dims{cols}, {}, {}, 0.0,
                     nk::TensorView<float>(mean.data(), nk::Dims{rows}), nk::TensorView<float>(rstd.data(), nk::Dims{rows}));
    const std::vector<double> xd(x.begin(), x.end());
    const Reference ref = reference_norm(Norm::layer, xd, rows, cols, {}, {}, 0.0);
    double worst_mean = 0, worst_rstd = 0;  // |mean error| / std, |rstd error| / rstd
    for (int64_t i = 0; i < rows; ++i) {
      worst_mean = std::max(worst_mean, std::fabs(mean[i] - ref.mean[i]) * ref.rstd[i]);
      worst_rstd = std::max(worst_rstd, std::fabs(rstd[i] - ref.rstd[i]) / ref.rstd[i]);
    }
    EXPECT_LE(worst_mean, 1.5e-6) << "worst mean error, in standard deviations, over " << rows << " rows";
    EXPECT_LE(worst_rstd, 1.5e-6) << "worst relative rstd error over " << rows << " rows";
  }
}

// float16 values near the top of its range (6e4; max 65504) must not overflow.
TEST_P(PerPath, Float16NearMaxDoesNotOverflow) {
  for (int64_t cols : {17, 4097}) {
    const int64_t rows = 2;
    std::uniform_real_distribution<double> u(6.0e4, 6.5e4);
    Data<nk::half> x;
    for (int64_t k = 0; k < rows * cols; ++k) {
      x.t.push_back(nk::half(static_cast<float>(u(rng_))));
      x.d.push_back(to_double(x.t.back()));
      ASSERT_TRUE(std::isfinite(x.d.back()));
    }
    Geometry g;
    g.rows = rows;
    g.cols = cols;
    check_call<nk::half, nk::half>(Norm::layer, g, Affine::both, 1e-5, rng_, &x);
    check_call<nk::half, float>(Norm::rms, g, Affine::weight, std::nullopt, rng_, &x);
  }
}

// A NaN poisons its own row and nothing else.
TEST_P(PerPath, NanStaysInItsRow) {
  for_each_type_pair([&](auto t, auto) {
    using T = decltype(t);
    for (Norm norm : {Norm::layer, Norm::rms}) {
      for (int64_t cols : {5, 33, 4097}) {
        SCOPED_TRACE(std::string(norm_name(norm)) + " " + type_name<T>() + " cols " + std::to_string(cols));
        const int64_t rows = 4, nan_row = 2;
        Data<T> x = random_rows<T>(rows, cols, rng_);
        x.t[nan_row * cols + cols / 2] = from_double<T>(std::numeric_limits<double>::quiet_NaN());
        x.d[nan_row * cols + cols / 2] = std::numeric_limits<double>::quiet_NaN();
        std::vector<T> y(x.t.size());
        std::vector<stats_t<T>> mean(rows), rstd(rows);
        if (norm == Norm::layer)
          nk::layer_norm(nk::TensorView<const T>(x.t.data(), dims2(rows, cols)),
                         nk::TensorView<T>(y.data(), dims2(rows, cols)), nk::Dims{cols}, {}, {}, 1e-5,
                         nk::TensorView<stats_t<T>>(mean.data(), nk::Dims{rows}),
                         nk::TensorView<stats_t<T>>(rstd.data(), nk::Dims{rows}));
        else
          nk::rms_norm(nk::TensorView<const T>(x.t.data(), dims2(rows, cols)),
                       nk::TensorView<T>(y.data(), dims2(rows, cols)), nk::Dims{cols}, {}, 1e-5,
                       nk::TensorView<stats_t<T>>(rstd.data(), nk::Dims{rows}));
        const Reference ref = reference_norm(norm, x.d, rows, cols, {}, {}, 1e-5);  // NaN row: all NaN
        EXPECT_TRUE(all_close("y", rows * cols, [&](int64_t k) { return to_double(y[k]); }, ref.y,
                              output_tol<T>()));
        EXPECT_TRUE(std::isnan(rstd[nan_row]));
        for (int64_t i = 0; i < rows; ++i) {
          if (i == nan_row) continue;
          EXPECT_TRUE(std::isfinite(rstd[i])) << "row " << i;
          for (int64_t j = 0; j < cols; ++j)
            ASSERT_TRUE(std::isfinite(to_double(y[i * cols + j]))) << "row " << i << " col " << j;
        }
      }
    }
  });
}

// Zero variance: rstd = 1/sqrt(eps), output finite (LayerNorm: exactly the bias).
TEST_P(PerPath, ConstantRowsStayFinite) {
  for_each_type_pair([&](auto t, auto) {
    using T = decltype(t);
    for (int64_t cols : {1, 9, 64, 4097}) {
      for (double value : {0.0, 3.75, -1000.0}) {
        SCOPED_TRACE(std::string(type_name<T>()) + " cols " + std::to_string(cols) + " value " +
                     std::to_string(value));
        const int64_t rows = 3;
        Data<T> x;
        x.t.assign(static_cast<size_t>(rows * cols), from_double<T>(value));
        x.d.assign(x.t.size(), to_double(x.t[0]));
        const Data<T> b = random_data<T>(cols, rng_, 0.0, 0.5);
        std::vector<T> y(x.t.size());
        std::vector<stats_t<T>> rstd(rows);
        nk::layer_norm(nk::TensorView<const T>(x.t.data(), dims2(rows, cols)),
                       nk::TensorView<T>(y.data(), dims2(rows, cols)), nk::Dims{cols}, {},
                       nk::TensorView<const T>(b.t.data(), nk::Dims{cols}), 1e-5, {},
                       nk::TensorView<stats_t<T>>(rstd.data(), nk::Dims{rows}));
        for (int64_t k = 0; k < rows * cols; ++k)
          ASSERT_EQ(to_double(y[k]), b.d[k % cols]) << "layer_norm of a constant row must be the bias, at " << k;
        for (int64_t i = 0; i < rows; ++i) EXPECT_NEAR(rstd[i], 1.0 / std::sqrt(1e-5), 1e-2);

        nk::rms_norm(nk::TensorView<const T>(x.t.data(), dims2(rows, cols)),
                     nk::TensorView<T>(y.data(), dims2(rows, cols)), nk::Dims{cols}, {}, 1e-5);
        const Reference ref = reference_norm(Norm::rms, x.d, rows, cols, {}, {}, 1e-5);
        EXPECT_TRUE(all_close("rms y", rows * cols, [&](int64_t k) { return to_double(y[k]); }, ref.y,
                              output_tol<T>()));
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Determinism: the thread count does not change a single bit.
// ---------------------------------------------------------------------------

TEST_P(PerPath, ThreadCountDoesNotChangeResults) {
  const int64_t rows = 2048, cols = 1024;  // 8 MiB of float32: enough to be split over threads
  const Data<float> x = random_rows<float>(rows, cols, rng_);
  const Data<float> w = random_data<float>(cols, rng_, 0.0, 1.5), b = random_data<float>(cols, rng_, 0.0, 0.5);
  struct Out {
    std::vector<float> y, mean, rstd, rms_y, rms_rstd;
  };
  auto run = [&](int threads) {
    nk::set_num_threads(threads);
    EXPECT_EQ(nk::get_num_threads(), threads);
    Out o;
    o.y.resize(x.t.size());
    o.rms_y.resize(x.t.size());
    o.mean.resize(rows);
    o.rstd.resize(rows);
    o.rms_rstd.resize(rows);
    const nk::TensorView<const float> xv(x.t.data(), dims2(rows, cols));
    nk::layer_norm(xv, nk::TensorView<float>(o.y.data(), dims2(rows, cols)), nk::Dims{cols},
                   nk::TensorView<const float>(w.t.data(), nk::Dims{cols}),
                   nk::TensorView<const float>(b.t.data(), nk::Dims{cols}), 1e-5,
                   nk::TensorView<float>(o.mean.data(), nk::Dims{rows}),
                   nk::TensorView<float>(o.rstd.data(), nk::Dims{rows}));
    nk::rms_norm(xv, nk::TensorView<float>(o.rms_y.data(), dims2(rows, cols)), nk::Dims{cols},
                 nk::TensorView<const float>(w.t.data(), nk::Dims{cols}), 1e-6,
                 nk::TensorView<float>(o.rms_rstd.data(), nk::Dims{rows}));
    return o;
  };
  const Out one = run(1), two = run(2);
  auto bits_equal = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  EXPECT_TRUE(bits_equal(one.y, two.y)) << "layer_norm y differs between 1 and 2 threads";
  EXPECT_TRUE(bits_equal(one.mean, two.mean)) << "layer_norm mean differs between 1 and 2 threads";
  EXPECT_TRUE(bits_equal(one.rstd, two.rstd)) << "layer_norm rstd differs between 1 and 2 threads";
  EXPECT_TRUE(bits_equal(one.rms_y, two.rms_y)) << "rms_norm y differs between 1 and 2 threads";
  EXPECT_TRUE(bits_equal(one.rms_rstd, two.rms_rstd)) << "rms_norm rstd differs between 1 and 2 threads";
}

// An engine that owns its threads calls normkit from several of them at once.
TEST_P(PerPath, ConcurrentCallsFromCallerThreads) {
  nk::set_num_threads(1);
  const int64_t rows = 64, cols = 1000;
  const Data<float> x = random_rows<float>(rows, cols, rng_);
  const Reference ref = reference_norm(Norm::layer, x.d, rows, cols, {}, {}, 1e-5);
  std::vector<std::vector<float>> outs(4, std::vector<float>(x.t.size()));
  std::vector<std::thread> workers;
  for (auto& out : outs)
    workers.emplace_back([&x, &out] {
      for (int repeat = 0; repeat < 20; ++repeat)
        nk::layer_norm(nk::TensorView<const float>(x.t.data(), dims2(rows, cols)),
                       nk::TensorView<float>(out.data(), dims2(rows, cols)), nk::Dims{cols});
    });
  for (auto& w : workers) w.join();
  for (const auto& out : outs)
    EXPECT_TRUE(all_close("y", rows * cols, [&](int64_t k) { return double(out[k]); }, ref.y, output_tol<float>()));
}

NK_TEST_ON_EVERY_PATH(PerPath);

// ---------------------------------------------------------------------------
// Errors: one normkit::Error per mistake, of the right kind, whose message
// starts with the argument's name.
// ---------------------------------------------------------------------------


class Errors : public ::testing::Test {
 protected:
  std::vector<float> xb = std::vector<float>(40, 1.f), yb = std::vector<float>(40, 0.f);
  std::vector<float> w8 = std::vector<float>(8, 1.f), stats = std::vector<float>(8, 0.f);
  std::vector<double> dbuf = std::vector<double>(40, 0.0);
  std::vector<nk::half> hb = std::vector<nk::half>(40), hy = std::vector<nk::half>(40);
  nk::TensorView<const float> x{xb.data(), nk::Dims{4, 8}};
  nk::TensorView<float> y{yb.data(), nk::Dims{4, 8}};
  nk::TensorView<const float> w{w8.data(), nk::Dims{8}};
};

constexpr auto kValue = nk::ErrorKind::value;
constexpr auto kType = nk::ErrorKind::type;

TEST_F(Errors, NormalizedShape) {
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{7}); }, kValue, "normalized_shape"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8, 4}); }, kValue, "normalized_shape"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{2, 4, 8}); }, kValue, "normalized_shape"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{}); }, kValue, "normalized_shape"));
  EXPECT_TRUE(throws_error([&] { nk::rms_norm(x, y, nk::Dims{7}); }, kValue, "normalized_shape"));
}

TEST_F(Errors, WeightAndBias) {
  const nk::TensorView<const float> w7(w8.data(), nk::Dims{7});
  const nk::TensorView<const float> w18(w8.data(), nk::Dims{1, 8});
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, w7); }, kValue, "weight"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, w18); }, kValue, "weight"));
  EXPECT_TRUE(throws_error([&] { nk::rms_norm(x, y, nk::Dims{8}, w7); }, kValue, "weight"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, w, w7); }, kValue, "bias"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, {}, w7); }, kValue, "bias"));
  // Not contiguous.
  const nk::TensorView<const float> w_strided(w8.data(), nk::Dims{4}, nk::Dims{2});
  const nk::TensorView<const float> x4(xb.data(), nk::Dims{2, 4});
  const nk::TensorView<float> y4(yb.data(), nk::Dims{2, 4});
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x4, y4, nk::Dims{4}, w_strided); }, kValue, "weight"));
}

TEST_F(Errors, WeightDtype) {
  const nk::TensorView<const double> wd(dbuf.data(), nk::Dims{8});
  const nk::TensorView<const nk::half> wh(hb.data(), nk::Dims{8});
  const nk::TensorView<const nk::half> xh(hb.data(), nk::Dims{4, 8});
  const nk::TensorView<nk::half> yh(hy.data(), nk::Dims{4, 8});
  // float32 x takes only float32 weights.
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, wd); }, kType, "weight"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, wh); }, kType, "weight"));
  EXPECT_TRUE(throws_error([&] { nk::rms_norm(x, y, nk::Dims{8}, wd); }, kType, "weight"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, w, wd); }, kType, "bias"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, {}, wd); }, kType, "bias"));
  // 16-bit x takes its own type or float32, not float64, and weight and bias agree.
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(xh, yh, nk::Dims{8}, wd); }, kType, "weight"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(xh, yh, nk::Dims{8}, w, wh); }, kType, "bias"));
  EXPECT_NO_THROW(nk::layer_norm(xh, yh, nk::Dims{8}, w, w));
  EXPECT_NO_THROW(nk::layer_norm(xh, yh, nk::Dims{8}, wh, wh));
}

TEST_F(Errors, Eps) {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (double eps : {-1e-5, -0.0 - 1e-300, nan, inf, -inf}) {
    SCOPED_TRACE("eps " + std::to_string(eps));
    EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, {}, {}, eps); }, kValue, "eps"));
    EXPECT_TRUE(throws_error([&] { nk::rms_norm(x, y, nk::Dims{8}, {}, eps); }, kValue, "eps"));
  }
  EXPECT_NO_THROW(nk::layer_norm(x, y, nk::Dims{8}, {}, {}, 0.0));
}

TEST_F(Errors, Output) {
  const nk::TensorView<float> y_short(yb.data(), nk::Dims{4, 7});
  const nk::TensorView<float> y_flat(yb.data(), nk::Dims{32});
  const nk::TensorView<double> y_double(dbuf.data(), nk::Dims{4, 8});
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y_short, nk::Dims{8}); }, kValue, "y"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y_flat, nk::Dims{8}); }, kValue, "y"));
  EXPECT_TRUE(throws_error([&] { nk::rms_norm(x, y_short, nk::Dims{8}); }, kValue, "y"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y_double, nk::Dims{8}); }, kType, "y"));
  EXPECT_TRUE(throws_error([&] { nk::rms_norm(x, y_double, nk::Dims{8}); }, kType, "y"));
}

TEST_F(Errors, PartialOverlap) {
  const nk::TensorView<float> y_shifted(xb.data() + 4, nk::Dims{4, 8});
  const nk::TensorView<float> y_back(xb.data() + 1, nk::Dims{4, 8});
  // Same start, different row stride: overlapping, not the same view.
  const nk::TensorView<const float> x2(xb.data(), nk::Dims{2, 8}, nk::Dims{16, 1});
  const nk::TensorView<float> y2(xb.data(), nk::Dims{2, 8}, nk::Dims{8, 1});
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y_shifted, nk::Dims{8}); }, kValue, "y"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y_back, nk::Dims{8}); }, kValue, "y"));
  EXPECT_TRUE(throws_error([&] { nk::rms_norm(x, y_shifted, nk::Dims{8}); }, kValue, "y"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x2, y2, nk::Dims{8}); }, kValue, "y"));
  // Exactly the same view is in place, which is allowed.
  const nk::TensorView<float> same(xb.data(), nk::Dims{4, 8});
  EXPECT_NO_THROW(nk::layer_norm(same, same, nk::Dims{8}));
}

// An output whose rows share memory (a broadcast view, or a row stride below
// the row length) is an error, also in place and for the backward's dx.
TEST_F(Errors, SelfOverlappingOutput) {
  const nk::TensorView<float> y_broadcast(yb.data(), nk::Dims{4, 8}, nk::Dims{0, 1});
  const nk::TensorView<float> y_short_stride(yb.data(), nk::Dims{4, 8}, nk::Dims{4, 1});
  const nk::TensorView<float> x_broadcast(xb.data(), nk::Dims{4, 8}, nk::Dims{0, 1});
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y_broadcast, nk::Dims{8}); }, kValue, "y: its rows overlap"));
  EXPECT_TRUE(throws_error([&] { nk::rms_norm(x, y_short_stride, nk::Dims{8}); }, kValue, "y: its rows overlap"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x_broadcast, x_broadcast, nk::Dims{8}); }, kValue, "y: its rows overlap"));
  std::vector<float> mean(4), rstd(4, 1.f), dyb(32, 1.f);
  const nk::TensorView<float> m(mean.data(), nk::Dims{4}), r(rstd.data(), nk::Dims{4});
  const nk::TensorView<float> dy(dyb.data(), nk::Dims{4, 8});
  EXPECT_TRUE(throws_error([&] { nk::layer_norm_backward(dy, x, m, r, nk::Dims{8}, {}, y_broadcast); }, kValue,
                           "dx: its rows overlap"));
  // A broadcast x (read only) stays valid input.
  EXPECT_NO_THROW(nk::layer_norm(x_broadcast, y, nk::Dims{8}));
}

// Views that share no element are not an overlap, even when their address
// ranges interleave: x = buf[:, :8] and y = buf[:, 8:] of one (4, 16) buffer
// (an engine writing a norm into half of a concatenated activation buffer).
// norms.hpp forbids only partial overlap.
TEST(Overlap, InterleavedDisjointViewsAreAccepted) {
  std::vector<float> buf(4 * 16);
  for (size_t k = 0; k < buf.size(); ++k) buf[k] = static_cast<float>(k % 5);
  std::vector<double> xd;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 8; ++j) xd.push_back(buf[i * 16 + j]);
  const Reference ref = reference_norm(Norm::layer, xd, 4, 8, {}, {}, 1e-5);
  const nk::TensorView<const float> x(buf.data(), nk::Dims{4, 8}, nk::Dims{16, 1});
  const nk::TensorView<float> y(buf.data() + 8, nk::Dims{4, 8}, nk::Dims{16, 1});
  ASSERT_NO_THROW(nk::layer_norm(x, y, nk::Dims{8}));
  EXPECT_TRUE(all_close("y", 32, [&](int64_t k) { return double(buf[(k / 8) * 16 + 8 + k % 8]); }, ref.y,
                        output_tol<float>()));
}

TEST_F(Errors, Stats) {
  const nk::TensorView<float> s3(stats.data(), nk::Dims{3});
  const nk::TensorView<float> s5(stats.data(), nk::Dims{5});
  const nk::TensorView<double> sd(dbuf.data(), nk::Dims{4});
  const nk::TensorView<nk::half> sh(hy.data(), nk::Dims{4});
  const nk::TensorView<float> s4(stats.data(), nk::Dims{4});
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, {}, {}, 1e-5, s3, s4); }, kValue, "mean"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, {}, {}, 1e-5, {}, s5); }, kValue, "rstd"));
  EXPECT_TRUE(throws_error([&] { nk::rms_norm(x, y, nk::Dims{8}, {}, 1e-5, s3); }, kValue, "rstd"));
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x, y, nk::Dims{8}, {}, {}, 1e-5, sd); }, kType, "mean"));
  EXPECT_TRUE(throws_error([&] { nk::rms_norm(x, y, nk::Dims{8}, {}, 1e-5, sd); }, kType, "rstd"));
  // 16-bit x: statistics are float32, never the element type.
  const nk::TensorView<const nk::half> xh(hb.data(), nk::Dims{4, 8});
  const nk::TensorView<nk::half> yh(hy.data() , nk::Dims{4, 8});
  std::vector<nk::half> hs(4);
  EXPECT_TRUE(throws_error(
      [&] { nk::layer_norm(xh, yh, nk::Dims{8}, {}, {}, 1e-5, nk::TensorView<nk::half>(hs.data(), nk::Dims{4})); },
      kType, "mean"));
}

TEST_F(Errors, LayoutsTheRowsPatternCannotTake) {
  // Normalized dim not contiguous.
  const nk::TensorView<const float> x_cols(xb.data(), nk::Dims{4, 8}, nk::Dims{1, 4});
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x_cols, y, nk::Dims{8}); }, kValue, "x"));
  // Leading dims that do not collapse to one stride.
  const nk::TensorView<const float> x3(xb.data(), nk::Dims{2, 2, 4}, nk::Dims{12, 4, 1});
  std::vector<float> y3(16);
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(x3, nk::TensorView<float>(y3.data(), nk::Dims{2, 2, 4}), nk::Dims{4}); },
                           kValue, "x"));
  // Missing x / y.
  EXPECT_TRUE(throws_error([&] { nk::layer_norm(nk::TensorRef(), y, nk::Dims{8}); }, kValue, "x"));
  EXPECT_TRUE(throws_error([&] { nk::rms_norm(x, nk::TensorRef(), nk::Dims{8}); }, kValue, "y"));
}

TEST(Runtime, UnknownKernelPath) {
  const std::string before = nk::kernel_path();
  EXPECT_TRUE(throws_error([] { nk::set_kernel_path("bogus"); }, kValue, "name"));
  EXPECT_TRUE(throws_error([] { nk::set_kernel_path(""); }, kValue, "name"));
  EXPECT_EQ(nk::kernel_path(), before) << "a refused path must not change the one in use";
  // A path that is compiled but not runnable here is refused too.
  const auto info = nk::runtime_info();
  for (const auto& path : info.kernel_paths_compiled) {
    if (std::find(info.kernel_paths_supported.begin(), info.kernel_paths_supported.end(), path) ==
        info.kernel_paths_supported.end()) {
      EXPECT_TRUE(throws_error([&] { nk::set_kernel_path(path); }, kValue, "name")) << path;
    }
  }
}

TEST(Runtime, EverySupportedPathCanBeSelected) {
  const auto info = nk::runtime_info();
  const std::string before = nk::kernel_path();
  ASSERT_FALSE(info.kernel_paths_supported.empty());
  EXPECT_EQ(info.kernel_paths_supported.front(), "scalar");
  // The fixture above covers exactly these; a new path must be added to it.
  for (const auto& path : info.kernel_paths_compiled)
    EXPECT_TRUE(path == "scalar" || path == "avx2" || path == "avx512" || path == "avx512_bf16") << "untested kernel path " << path;
  for (const auto& path : info.kernel_paths_supported) {
    nk::set_kernel_path(path);
    EXPECT_EQ(nk::kernel_path(), path);
    EXPECT_EQ(nk::runtime_info().kernel_path, path);
  }
  nk::set_kernel_path(before);
  // The default choice is the widest path this CPU supports.
  EXPECT_EQ(before, info.kernel_paths_supported.back());
}

TEST(Runtime, Threads) {
  const int before = nk::get_num_threads();
  EXPECT_GE(before, 1);
  EXPECT_TRUE(throws_error([] { nk::set_num_threads(0); }, kValue, "n"));
  EXPECT_TRUE(throws_error([] { nk::set_num_threads(-3); }, kValue, "n"));
  EXPECT_EQ(nk::get_num_threads(), before);
  nk::set_num_threads(3);
  EXPECT_EQ(nk::get_num_threads(), 3);
  nk::set_num_threads(before);
}

TEST(Runtime, MachineEpsilonIsTorchFinfoEps) {
  EXPECT_EQ(nk::machine_epsilon(nk::DType::float32), torch_eps<float>());
  EXPECT_EQ(nk::machine_epsilon(nk::DType::float64), torch_eps<double>());
  EXPECT_EQ(nk::machine_epsilon(nk::DType::float16), torch_eps<nk::half>());
  EXPECT_EQ(nk::machine_epsilon(nk::DType::bfloat16), torch_eps<nk::bfloat16>());
}

// NORMKIT_ISA forces the path at first use. These run from their own ctest
// entries (tests/cpp/CMakeLists.txt), which set NORMKIT_ISA in a fresh process.
TEST(ForcedIsa, EnvironmentPathIsUsed) {
  const char* expected = std::getenv("NORMKIT_TEST_FORCED_ISA");
  if (expected == nullptr) GTEST_SKIP() << "run by the ctest entry cpp.forced_isa.scalar";
  EXPECT_EQ(nk::kernel_path(), expected);
  EXPECT_EQ(nk::runtime_info().kernel_path, expected);
}

TEST(ForcedIsa, UnknownEnvironmentPathIsAnError) {
  if (std::getenv("NORMKIT_TEST_FORCED_ISA") == nullptr) GTEST_SKIP() << "run by the ctest entry cpp.forced_isa.bogus";
  EXPECT_TRUE(throws_error([] { (void)nk::kernel_path(); }, kValue, "NORMKIT_ISA"));
  std::vector<float> xb(8, 1.f), yb(8);
  EXPECT_TRUE(throws_error(
      [&] {
        nk::layer_norm(nk::TensorView<const float>(xb.data(), nk::Dims{8}), nk::TensorView<float>(yb.data(), nk::Dims{8}),
                       nk::Dims{8});
      },
      kValue, "NORMKIT_ISA"));
  // info() reports the problem instead of throwing.
  EXPECT_EQ(nk::runtime_info().kernel_path.rfind("unavailable: NORMKIT_ISA", 0), 0u) << nk::runtime_info().kernel_path;
  // And set_kernel_path recovers.
  nk::set_kernel_path("scalar");
  EXPECT_EQ(nk::kernel_path(), "scalar");
}

// ---------------------------------------------------------------------------
// half / bfloat16 conversions
// ---------------------------------------------------------------------------

// IEEE binary16 decoded the slow, obvious way.
double decode_half(std::uint16_t bits) {
  const int sign = bits >> 15, exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
  double v;
  if (exponent == 0) v = std::ldexp(mantissa, -24);
  else if (exponent == 31) v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else v = std::ldexp(1024 + mantissa, exponent - 25);
  return sign ? -v : v;
}

bool half_is_nan(std::uint16_t bits) { return (bits & 0x7c00) == 0x7c00 && (bits & 0x3ff) != 0; }
bool bf16_is_nan(std::uint16_t bits) { return (bits & 0x7f80) == 0x7f80 && (bits & 0x7f) != 0; }

float bits_to_float(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

TEST(Conversions, HalfRoundTripsAllBitPatterns) {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float f = static_cast<float>(nk::half::from_bits(bits));
    const double want = decode_half(bits);
    if (half_is_nan(bits)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << "0x" << b;
      const std::uint16_t back = nk::half(f).bits;
      ASSERT_TRUE(half_is_nan(back)) << std::hex << "NaN 0x" << b << " came back as 0x" << back;
      ASSERT_EQ(back & 0x8000, bits & 0x8000) << std::hex << "NaN sign lost for 0x" << b;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), want) << std::hex << "float(half 0x" << b << ")";
    ASSERT_EQ(nk::half(f).bits, bits) << std::hex << "half(float(half 0x" << b << "))";
  }
}

TEST(Conversions, Bfloat16RoundTripsAllBitPatterns) {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float f = static_cast<float>(nk::bfloat16::from_bits(bits));
    const float want = bits_to_float(b << 16);
    if (bf16_is_nan(bits)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << "0x" << b;
      const std::uint16_t back = nk::bfloat16(f).bits;
      ASSERT_TRUE(bf16_is_nan(back)) << std::hex << "NaN 0x" << b << " came back as 0x" << back;
      ASSERT_EQ(back & 0x8000, bits & 0x8000) << std::hex << "NaN sign lost for 0x" << b;
      continue;
    }
    ASSERT_EQ(std::memcmp(&f, &want, 4), 0) << std::hex << "float(bfloat16 0x" << b << ")";
    ASSERT_EQ(nk::bfloat16(f).bits, bits) << std::hex << "bfloat16(float(bfloat16 0x" << b << "))";
  }
}

// Every midpoint between two neighbouring finite halves (exact in float):
// it rounds to the neighbour with the even mantissa, and a float one step to
// either side rounds to the nearer neighbour. Covers subnormals, the
// normal/subnormal boundary and the overflow boundary (65520 -> inf).
TEST(Conversions, FloatToHalfRoundsToNearestEven) {
  for (std::uint32_t sign : {0u, 0x8000u}) {
    for (std::uint32_t lo = 0; lo < 0x7c00; ++lo) {
      const std::uint32_t hi = lo + 1;  // 0x7c00 is inf: the "neighbour" past 65504
      const double a = decode_half(static_cast<std::uint16_t>(lo)), b = decode_half(static_cast<std::uint16_t>(hi));
      const double mid_d = hi == 0x7c00 ? 65520.0 : (a + b) / 2;
      const float mid = static_cast<float>(sign ? -mid_d : mid_d);
      ASSERT_EQ(static_cast<double>(mid), sign ? -mid_d : mid_d) << "midpoint not exact in float";
      const std::uint32_t even = (lo & 1) ? hi : lo;
      ASSERT_EQ(nk::half(mid).bits, sign | even) << std::hex << "tie between 0x" << lo << " and 0x" << hi;
      const float toward_zero = std::nextafter(mid, 0.0f);
      const float away = std::nextafter(mid, sign ? -INFINITY : INFINITY);
      ASSERT_EQ(nk::half(toward_zero).bits, sign | lo) << std::hex << "just below the tie above 0x" << lo;
      ASSERT_EQ(nk::half(away).bits, sign | hi) << std::hex << "just above the tie above 0x" << lo;
    }
  }
  // Beyond the range: infinity; NaN stays NaN.
  EXPECT_EQ(nk::half(1e6f).bits, 0x7c00);
  EXPECT_EQ(nk::half(-1e6f).bits, 0xfc00);
  EXPECT_EQ(nk::half(INFINITY).bits, 0x7c00);
  EXPECT_TRUE(half_is_nan(nk::half(NAN).bits));
  // Below half the smallest subnormal: signed zero.
  EXPECT_EQ(nk::half(1e-9f).bits, 0x0000);
  EXPECT_EQ(nk::half(-1e-9f).bits, 0x8000);
}

TEST(Conversions, FloatToBfloat16RoundsToNearestEven) {
  for (std::uint32_t b = 0; b < 0x7f80; ++b) {  // every finite positive bf16 and its upper neighbour
    for (std::uint32_t sign : {0u, 0x80000000u}) {
      const std::uint32_t mid_bits = sign | (b << 16) | 0x8000;  // exactly halfway to b + 1
      const float mid = bits_to_float(mid_bits);
      const std::uint32_t even = (b & 1) ? b + 1 : b;
      ASSERT_EQ(nk::bfloat16(mid).bits, (sign >> 16) | even) << std::hex << "tie above 0x" << b;
      ASSERT_EQ(nk::bfloat16(bits_to_float(mid_bits - 1)).bits, (sign >> 16) | b) << std::hex << "below tie 0x" << b;
      ASSERT_EQ(nk::bfloat16(bits_to_float(mid_bits + 1)).bits, (sign >> 16) | (b + 1)) << std::hex << "above 0x" << b;
    }
  }
  EXPECT_TRUE(bf16_is_nan(nk::bfloat16(NAN).bits));
  EXPECT_EQ(nk::bfloat16(INFINITY).bits, 0x7f80);
}

// Every float NaN, including signalling ones whose payload sits only in the
// low mantissa bits (which a plain truncation would turn into infinity), stays
// a NaN of the same sign.
TEST(Conversions, NanFloatsStayNan) {
  for (std::uint32_t payload : {0x1u, 0x2u, 0xffu, 0x1000u, 0x1fffu, 0x2000u, 0xffffu, 0x10000u, 0x3fffffu,
                                0x400000u, 0x400001u, 0x7fffffu}) {
    for (std::uint32_t sign : {0u, 0x80000000u}) {
      const std::uint32_t fb = sign | 0x7f800000u | payload;
      const float f = bits_to_float(fb);
      ASSERT_TRUE(std::isnan(f));
      const std::uint16_t h = nk::half(f).bits, b = nk::bfloat16(f).bits;
      EXPECT_TRUE(half_is_nan(h)) << std::hex << "float 0x" << fb << " -> half 0x" << h;
      EXPECT_TRUE(bf16_is_nan(b)) << std::hex << "float 0x" << fb << " -> bfloat16 0x" << b;
      EXPECT_EQ(h & 0x8000u, sign >> 16) << std::hex << "float 0x" << fb;
      EXPECT_EQ(b & 0x8000u, sign >> 16) << std::hex << "float 0x" << fb;
    }
  }
}

// Random floats against an independent oracle: the nearest of all finite
// halves (ties to even), found by binary search in a sorted table.
TEST(Conversions, FloatToHalfMatchesNearestHalf) {
  std::vector<double> table;  // non-negative finite halves, ascending; index == bit pattern
  for (std::uint32_t b = 0; b < 0x7c00; ++b) table.push_back(decode_half(static_cast<std::uint16_t>(b)));
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  for (int n = 0; n < 300000; ++n) {
    std::uint32_t fb = any_bits(rng);
    if (n % 2) fb = (fb & 0x80000000u) | (0x33000000u + fb % (0x47800000u - 0x33000000u));  // the half range
    const float f = bits_to_float(fb);
    if (std::isnan(f)) continue;
    const double mag = std::fabs(static_cast<double>(f));
    std::uint32_t want;
    if (mag >= 65520.0) {
      want = 0x7c00;
    } else {
      const auto it = std::lower_bound(table.begin(), table.end(), mag);
      const auto hi = static_cast<std::uint32_t>(it - table.begin());
      if (hi == 0) {
        want = 0;
      } else if (hi == table.size()) {
        want = hi - 1;
      } else {
        const double dlo = mag - table[hi - 1], dhi = table[hi] - mag;
        want = dlo < dhi ? hi - 1 : dhi < dlo ? hi : ((hi - 1) & 1 ? hi : hi - 1);
      }
    }
    want |= (fb >> 16) & 0x8000;
    ASSERT_EQ(nk::half(f).bits, want) << std::hex << "float bits 0x" << fb << " (" << f << ")";
  }
}

}  // namespace
