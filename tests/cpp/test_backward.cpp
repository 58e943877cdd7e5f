// test_backward.cpp - the backward functions through normkit's public C++ API.
//
// Gradients of L = sum(dy * y) are checked against central finite differences
// of the float64 forward (itself tested against a plain reference in
// test_rows_norms.cpp / test_channel_norms.cpp), on every kernel path and in
// both layouts; float32 against float64; determinism across thread counts;
// errors naming the argument.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"
#include "test_support.hpp"

namespace nk = normkit;
using std::int64_t;

namespace {

std::vector<double> random_vector(int64_t n, unsigned seed, double mean = 0.0, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(mean, scale);
  std::vector<double> v(n);
  for (auto& e : v) e = dist(gen);
  return v;
}

nk::TensorView<double> view(std::vector<double>& v, nk::Dims shape) { return {v.data(), shape}; }

// L(x, w, b) = sum(dy * forward(x, w, b)), and its finite-difference gradient
// with respect to one input vector.
using Forward = std::function<void(std::vector<double>& x, std::vector<double>& w, std::vector<double>& b,
                                   std::vector<double>& y)>;

double objective(const Forward& f, std::vector<double>& x, std::vector<double>& w, std::vector<double>& b,
                 const std::vector<double>& dy) {
  std::vector<double> y(x.size());
  f(x, w, b, y);
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += dy[i] * y[i];
  return s;
}

std::vector<double> finite_difference(const Forward& f, std::vector<double>& x, std::vector<double>& w,
                                      std::vector<double>& b, const std::vector<double>& dy,
                                      std::vector<double>& wrt) {
  std::vector<double> grad(wrt.size());
  for (size_t i = 0; i < wrt.size(); ++i) {
    const double keep = wrt[i], h = 1e-6 * std::max(1.0, std::fabs(keep));
    wrt[i] = keep + h;
    const double up = objective(f, x, w, b, dy);
    wrt[i] = keep - h;
    const double down = objective(f, x, w, b, dy);
    wrt[i] = keep;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double tol, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0;
  for (double v : want) scale = std::max(scale, std::fabs(v));
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], tol * std::max(scale, 1e-12)) << what << " at " << i;
}

using nk_test::expect_error;

class BackwardOnPath : public nk_test::KernelPathTest {};

TEST_P(BackwardOnPath, LayerNormAndRmsNormMatchFiniteDifferences) {
  const int64_t rows = 5, cols = 19;
  auto x = random_vector(rows * cols, 1, 0.5, 2.0), w = random_vector(cols, 2), b = random_vector(cols, 3);
  const auto dy = random_vector(rows * cols, 4);
  for (bool rms : {false, true}) {
    Forward f = [&](auto& xv, auto& wv, auto& bv, auto& yv) {
      if (rms) nk::rms_norm(view(xv, {rows, cols}), view(yv, {rows, cols}), {cols}, view(wv, {cols}), 1e-5);
      else nk::layer_norm(view(xv, {rows, cols}), view(yv, {rows, cols}), {cols}, view(wv, {cols}), view(bv, {cols}));
    };
    std::vector<double> y(x.size()), mean(rows), rstd(rows), dx(x.size()), dw(cols), db(cols);
    auto dyc = dy;
    if (rms) {
      nk::rms_norm(view(x, {rows, cols}), view(y, {rows, cols}), {cols}, view(w, {cols}), 1e-5, view(rstd, {rows}));
      nk::rms_norm_backward(view(dyc, {rows, cols}), view(x, {rows, cols}), view(rstd, {rows}), {cols},
                            view(w, {cols}), view(dx, {rows, cols}), view(dw, {cols}));
    } else {
      nk::layer_norm(view(x, {rows, cols}), view(y, {rows, cols}), {cols}, view(w, {cols}), view(b, {cols}), 1e-5,
                     view(mean, {rows}), view(rstd, {rows}));
      nk::layer_norm_backward(view(dyc, {rows, cols}), view(x, {rows, cols}), view(mean, {rows}), view(rstd, {rows}),
                              {cols}, view(w, {cols}), view(dx, {rows, cols}), view(dw, {cols}), view(db, {cols}));
      expect_close(db, finite_difference(f, x, w, b, dy, b), 1e-6, "layer_norm dbias");
    }
    expect_close(dx, finite_difference(f, x, w, b, dy, x), 1e-6, rms ? "rms_norm dx" : "layer_norm dx");
    expect_close(dw, finite_difference(f, x, w, b, dy, w), 1e-6, rms ? "rms_norm dweight" : "layer_norm dweight");
  }
}

// The channel norms on (N, C, S) data, channels-first and channels-last.
TEST_P(BackwardOnPath, ChannelNormsMatchFiniteDifferences) {
  const int64_t n = 3, c = 4, h = 3, wd = 5;
  for (nk::Layout layout : {nk::Layout::NCHW, nk::Layout::NHWC}) {
    const bool last = layout == nk::Layout::NHWC;
    const nk::Dims shape = last ? nk::Dims{n, h, wd, c} : nk::Dims{n, c, h, wd};
    auto x = random_vector(n * c * h * wd, 5, 1.0, 3.0), w = random_vector(c, 6), b = random_vector(c, 7);
    const auto dy = random_vector(x.size(), 8);
    for (int norm = 0; norm < 4; ++norm) {  // batch (training), batch (eval), instance, group
      SCOPED_TRACE("layout " + std::string(nk::to_string(layout)) + ", norm " + std::to_string(norm));
      std::vector<double> rm = random_vector(c, 9), rv = random_vector(c, 10);
      for (auto& v : rv) v = 0.5 + std::fabs(v);
      Forward f = [&](auto& xv, auto& wv, auto& bv, auto& yv) {
        std::vector<double> rmc = rm, rvc = rv;
        if (norm <= 1)
          nk::batch_norm(view(xv, shape), view(yv, shape), view(rmc, {c}), view(rvc, {c}), view(wv, {c}),
                         view(bv, {c}), norm == 0, 0.1, 1e-5, layout);
        else if (norm == 2)
          nk::instance_norm(view(xv, shape), view(yv, shape), {}, {}, view(wv, {c}), view(bv, {c}), true, 0.1, 1e-5,
                            layout);
        else
          nk::group_norm(view(xv, shape), view(yv, shape), 2, view(wv, {c}), view(bv, {c}), 1e-5, layout);
      };
      const int64_t stats = norm <= 1 ? c : (norm == 2 ? n * c : n * 2);
      std::vector<double> y(x.size()), mean(stats), rstd(stats), dx(x.size()), dw(c), db(c), rmc = rm, rvc = rv;
      auto dyc = dy;
      if (norm <= 1) {
        nk::batch_norm(view(x, shape), view(y, shape), view(rmc, {c}), view(rvc, {c}), view(w, {c}), view(b, {c}),
                       norm == 0, 0.1, 1e-5, layout, view(mean, {c}), view(rstd, {c}));
        nk::batch_norm_backward(view(dyc, shape), view(x, shape), view(mean, {c}), view(rstd, {c}), view(w, {c}),
                                view(dx, shape), view(dw, {c}), view(db, {c}), norm == 0, layout);
      } else if (norm == 2) {
        nk::instance_norm(view(x, shape), view(y, shape), {}, {}, view(w, {c}), view(b, {c}), true, 0.1, 1e-5, layout,
                          view(mean, {n, c}), view(rstd, {n, c}));
        nk::instance_norm_backward(view(dyc, shape), view(x, shape), view(mean, {n, c}), view(rstd, {n, c}),
                                   view(w, {c}), view(dx, shape), view(dw, {c}), view(db, {c}), true, layout);
      } else {
        nk::group_norm(view(x, shape), view(y, shape), 2, view(w, {c}), view(b, {c}), 1e-5, layout,
                       view(mean, {n, 2}), view(rstd, {n, 2}));
        nk::group_norm_backward(view(dyc, shape), view(x, shape), view(mean, {n, 2}), view(rstd, {n, 2}), 2,
                                view(w, {c}), view(dx, shape), view(dw, {c}), view(db, {c}), layout);
      }
      expect_close(dx, finite_difference(f, x, w, b, dy, x), 1e-6, "dx");
      expect_close(dw, finite_difference(f, x, w, b, dy, w), 1e-6, "dweight");
      expect_close(db, finite_difference(f, x, w, b, dy, b), 1e-6, "dbias");
    }
  }
}

TEST_P(BackwardOnPath, AdaptiveInstanceNormMatchesFiniteDifferences) {
  const int64_t n = 2, c = 3, s = 6, ss = 4;
  for (nk::Layout layout : {nk::Layout::NCL, nk::Layout::NLC}) {
    const bool last = layout == nk::Layout::NLC;
    const nk::Dims shape = last ? nk::Dims{n, s, c} : nk::Dims{n, c, s};
    const nk::Dims style_shape = last ? nk::Dims{n, ss, c} : nk::Dims{n, c, ss};
    auto x = random_vector(n * c * s, 11, 0.5, 2.0), style = random_vector(n * c * ss, 12, -1.0, 3.0);
    const auto dy = random_vector(x.size(), 13);
    std::vector<double> unused;
    Forward f = [&](auto& xv, auto& stv, auto&, auto& yv) {
      nk::adaptive_instance_norm(view(xv, shape), view(yv, shape), view(stv, style_shape), 1e-5, layout);
    };
    std::vector<double> dx(x.size()), dstyle(style.size());
    auto dyc = dy;
    nk::adaptive_instance_norm_backward(view(dyc, shape), view(x, shape), view(style, style_shape), 1e-5,
                                        view(dx, shape), view(dstyle, style_shape), layout);
    expect_close(dx, finite_difference(f, x, style, unused, dy, x), 1e-6, "AdaIN dx");
    expect_close(dstyle, finite_difference(f, x, style, unused, dy, style), 1e-6, "AdaIN dstyle");
  }
}

// dx may be x or dy itself (norms.hpp). Every backward, both layouts, float32
// and float64: in place gives the out-of-place dx, dweight, dbias (and style
// gradients) bit for bit, so no gradient sum reads an element already overwritten.
template <typename T>
void check_in_place_matches_out_of_place(int64_t n) {
  SCOPED_TRACE("n " + std::to_string(n));
  const int64_t c = 4, s = 10, rows = n * s;
  const auto xd = random_vector(n * c * s, 41, 0.7, 2.0), dyd = random_vector(n * c * s, 42, 0.3, 1.5);
  const auto wd = random_vector(c * s, 43), styled = random_vector(n * c * 6, 44, -1.0, 3.0);
  const std::vector<T> x0(xd.begin(), xd.end()), dy0(dyd.begin(), dyd.end()), w(wd.begin(), wd.end());
  std::vector<T> style(styled.begin(), styled.end()), rm(c, T(0.2)), rv(c, T(1.7));
  auto v = [](std::vector<T>& b, nk::Dims shape) { return nk::TensorView<T>(b.data(), shape); };
  for (nk::Layout layout : {nk::Layout::NCL, nk::Layout::NLC}) {
    const bool last = layout == nk::Layout::NLC;
    const nk::Dims shape = last ? nk::Dims{n, s, c} : nk::Dims{n, c, s};
    const nk::Dims style_shape = last ? nk::Dims{n, 6, c} : nk::Dims{n, c, 6};
    for (int kind = 0; kind < 9; ++kind) {
      // 0 LayerNorm, 1 RMSNorm, 2/3 BatchNorm training/eval, 4/5 InstanceNorm input/running
      // statistics, 6 GroupNorm, 7/8 AdaIN from a style map / from style statistics.
      if (kind <= 1 && last) continue;  // rows norms have no layout
      SCOPED_TRACE("layout " + std::string(nk::to_string(layout)) + ", kind " + std::to_string(kind));
      const int64_t stats = kind <= 1 ? rows : (kind <= 3 ? c : (kind == 6 ? n * 2 : n * c));
      std::vector<T> mean(stats), rstd(stats), y(x0.size()), xs = x0, smean(n * c), sstd(n * c);
      for (int64_t i = 0; i < n * c; ++i) smean[i] = T(0.1 * double(i)), sstd[i] = T(0.5 + 0.25 * double(i));
      std::vector<T> rmc = rm, rvc = rv;
      const nk::Dims rows_shape{rows, c};  // LayerNorm/RMSNorm over the last axis of an (n*s, c) matrix
      // Forward, for the statistics the backward takes.
      if (kind == 0) nk::layer_norm(v(xs, rows_shape), v(y, rows_shape), {c}, {}, {}, 1e-5, v(mean, {rows}), v(rstd, {rows}));
      if (kind == 1) nk::rms_norm(v(xs, rows_shape), v(y, rows_shape), {c}, {}, 1e-5, v(rstd, {rows}));
      if (kind == 2 || kind == 3)
        nk::batch_norm(v(xs, shape), v(y, shape), v(rmc, {c}), v(rvc, {c}), {}, {}, kind == 2, 0.1, 1e-5, layout,
                       v(mean, {c}), v(rstd, {c}));
      if (kind == 4 || kind == 5) {
        // The running-statistics backward uses given constants; take them from the data.
        nk::instance_norm(v(xs, shape), v(y, shape), {}, {}, {}, {}, true, 0.1, 1e-5, layout, v(mean, {n, c}),
                          v(rstd, {n, c}));
      }
      if (kind == 6)
        nk::group_norm(v(xs, shape), v(y, shape), 2, {}, {}, 1e-5, layout, v(mean, {n, 2}), v(rstd, {n, 2}));
      const bool rows_norm = kind <= 1;
      const nk::Dims xshape = rows_norm ? rows_shape : shape;
      std::vector<T> wc(w.begin(), w.begin() + c);
      // Runs the backward with dy, x and dx in the given buffers; returns every output.
      auto run = [&](std::vector<T>& dyb, std::vector<T>& xb, std::vector<T>& dxb) {
        std::vector<T> g1(kind >= 7 ? (kind == 7 ? style.size() : size_t(n * c)) : size_t(c), T(-7));
        std::vector<T> g2(kind == 8 ? size_t(n * c) : size_t(c), T(-7));
        const auto dyv = v(dyb, xshape), xv = v(xb, xshape), dxv = v(dxb, xshape);
        switch (kind) {
          case 0: nk::layer_norm_backward(dyv, xv, v(mean, {rows}), v(rstd, {rows}), {c}, v(wc, {c}), dxv, v(g1, {c}), v(g2, {c})); break;
          case 1: nk::rms_norm_backward(dyv, xv, v(rstd, {rows}), {c}, v(wc, {c}), dxv, v(g1, {c})); break;
          case 2: case 3:
            nk::batch_norm_backward(dyv, xv, v(mean, {c}), v(rstd, {c}), v(wc, {c}), dxv, v(g1, {c}), v(g2, {c}), kind == 2, layout);
            break;
          case 4: case 5:
            nk::instance_norm_backward(dyv, xv, v(mean, {n, c}), v(rstd, {n, c}), v(wc, {c}), dxv, v(g1, {c}),
                                       v(g2, {c}), kind == 4, layout);
            break;
          case 6:
            nk::group_norm_backward(dyv, xv, v(mean, {n, 2}), v(rstd, {n, 2}), 2, v(wc, {c}), dxv, v(g1, {c}), v(g2, {c}), layout);
            break;
          case 7: nk::adaptive_instance_norm_backward(dyv, xv, v(style, style_shape), 1e-5, dxv, v(g1, style_shape), layout); break;
          case 8:
            nk::adaptive_instance_norm_backward(dyv, xv, v(smean, {n, c}), v(sstd, {n, c}), 1e-5, dxv, v(g1, {n, c}),
                                                v(g2, {n, c}), layout);
            break;
        }
        std::vector<T> out = dxb;
        out.insert(out.end(), g1.begin(), g1.end());
        out.insert(out.end(), g2.begin(), g2.end());
        return out;
      };
      std::vector<T> dy = dy0, x = x0, dx(x0.size());
      const std::vector<T> want = run(dy, x, dx);
      std::vector<T> x_in_place = x0, dy_in_place = dy0, dy_keep = dy0, x_keep = x0;
      const std::vector<T> got_x = run(dy_keep, x_in_place, x_in_place);    // dx = x
      const std::vector<T> got_dy = run(dy_in_place, x_keep, dy_in_place);  // dx = dy
      ASSERT_EQ(want.size(), got_x.size());
      for (size_t i = 0; i < want.size(); ++i) {
        ASSERT_EQ(want[i], got_x[i]) << "dx = x: output element " << i << " of " << want.size();
        ASSERT_EQ(want[i], got_dy[i]) << "dx = dy: output element " << i << " of " << want.size();
      }
      EXPECT_EQ(dy_keep, dy0) << "dy modified";
      EXPECT_EQ(x_keep, x0) << "x modified";
    }
  }
}

TEST_P(BackwardOnPath, InPlaceGradientsMatchOutOfPlace) {
  // BatchNorm training: a row per channel for small x, the columns sums past
  // 4 MiB of x (30000 samples of 4 x 10 float32 values).
  for (int64_t n : {3, 1}) {
    check_in_place_matches_out_of_place<double>(n);
    check_in_place_matches_out_of_place<float>(n);
  }
  check_in_place_matches_out_of_place<float>(30000);
}

NK_TEST_ON_EVERY_PATH(BackwardOnPath);

// float32 gradients against float64 ones on data with a large mean (the saved
// float32 mean is rounded; the backward recentres on the exact mean).
class Backward : public nk_test::KernelPathTest {};

TEST_P(Backward, Float32LayerNormWithLargeMeanMatchesFloat64) {
  const int64_t rows = 8, cols = 1000;
  auto xd = random_vector(rows * cols, 21, 1e4, 1e-2), dyd = random_vector(rows * cols, 22);
  auto wd = random_vector(cols, 23);
  std::vector<float> x(xd.begin(), xd.end()), dy(dyd.begin(), dyd.end()), w(wd.begin(), wd.end());
  // The float64 reference starts from the float32 data.
  std::vector<double> xr(x.begin(), x.end()), dyr(dy.begin(), dy.end()), wr(w.begin(), w.end());
  std::vector<float> y(x.size()), mean(rows), rstd(rows), dx(x.size()), dw(cols);
  std::vector<double> yr(x.size()), meanr(rows), rstdr(rows), dxr(x.size()), dwr(cols);
  const nk::Dims shape{rows, cols};
  nk::layer_norm(nk::TensorView<float>(x.data(), shape), nk::TensorView<float>(y.data(), shape), {cols},
                 nk::TensorView<float>(w.data(), {cols}), {}, 1e-5, nk::TensorView<float>(mean.data(), {rows}),
                 nk::TensorView<float>(rstd.data(), {rows}));
  nk::layer_norm_backward(nk::TensorView<float>(dy.data(), shape), nk::TensorView<float>(x.data(), shape),
                          nk::TensorView<float>(mean.data(), {rows}), nk::TensorView<float>(rstd.data(), {rows}),
                          {cols}, nk::TensorView<float>(w.data(), {cols}), nk::TensorView<float>(dx.data(), shape),
                          nk::TensorView<float>(dw.data(), {cols}));
  nk::layer_norm(view(xr, shape), view(yr, shape), {cols}, view(wr, {cols}), {}, 1e-5, view(meanr, {rows}),
                 view(rstdr, {rows}));
  nk::layer_norm_backward(view(dyr, shape), view(xr, shape), view(meanr, {rows}), view(rstdr, {rows}), {cols},
                          view(wr, {cols}), view(dxr, shape), view(dwr, {cols}));
  expect_close(std::vector<double>(dx.begin(), dx.end()), dxr, 1e-5, "dx");
  expect_close(std::vector<double>(dw.begin(), dw.end()), dwr, 1e-5, "dweight");
}

// Wherever dx lies relative to x and dy (a few bytes above either modulo 4 KiB
// included): the same bits, and nothing beside dx written. The large size is
// past the streaming-store threshold, where dx just above x or dy takes the
// writers' loads-ahead loop (loads_ahead in store_stage.inc).
static void expect_dx_placement_does_not_change_the_bits(int64_t rows, int64_t cols) {
  SCOPED_TRACE("[" + std::to_string(rows) + "," + std::to_string(cols) + "]");
  const int64_t n = 2, groups = 2, c = 4, s = rows * cols / (n * c);
  auto xd = random_vector(rows * cols, 41), dyd = random_vector(rows * cols, 42), wd = random_vector(cols, 43);
  std::vector<float> x(xd.begin(), xd.end()), dy(dyd.begin(), dyd.end()), w(wd.begin(), wd.end());
  auto fv = [](std::vector<float>& v, const nk::Dims& d) { return nk::TensorView<float>(v.data(), d); };
  std::vector<float> y(x.size()), mean(rows), rstd(rows), gmean(n * groups), grstd(n * groups);
  const nk::Dims shape{rows, cols}, cshape{n, c, s};
  nk::layer_norm(fv(x, shape), fv(y, shape), {cols}, fv(w, {cols}), {}, 1e-5, fv(mean, {rows}),
                 fv(rstd, {rows}));
  nk::group_norm(fv(x, cshape), fv(y, cshape), groups, {}, {}, 1e-5, nk::Layout::NCL, fv(gmean, {n, groups}),
                 fv(grstd, {n, groups}));
  constexpr int64_t guard = 16;
  std::vector<float> buf(x.size() + 1024 + 2 * guard);
  // dx starting `offset` bytes past `base` modulo 4 KiB, inside buf with guards either side.
  auto placed = [&](const float* base, int64_t offset) {
    const auto lag = (reinterpret_cast<std::uintptr_t>(base) + offset -
                      reinterpret_cast<std::uintptr_t>(buf.data() + guard)) % 4096;
    return buf.data() + guard + lag / sizeof(float);
  };
  auto run = [&](float* dx) {
    std::fill(buf.begin(), buf.end(), 7.0f);
    nk::layer_norm_backward(fv(dy, shape), fv(x, shape), fv(mean, {rows}), fv(rstd, {rows}), {cols},
                            fv(w, {cols}), nk::TensorView<float>(dx, shape));
    std::vector<float> out(dx, dx + x.size());
    nk::group_norm_backward(fv(dy, cshape), fv(x, cshape), fv(gmean, {n, groups}), fv(grstd, {n, groups}),
                            groups, {}, nk::TensorView<float>(dx, cshape), {}, {}, nk::Layout::NCL);
    out.insert(out.end(), dx, dx + x.size());
    const int64_t start = dx - buf.data(), end = start + static_cast<int64_t>(x.size());
    for (int64_t i = 0; i < static_cast<int64_t>(buf.size()); ++i) {
      if (i < start || i >= end) {
        EXPECT_EQ(buf[i], 7.0f) << "wrote beside dx at " << i - start;
      }
    }
    return out;
  };
  const auto expected = run(placed(x.data(), 2048));
  for (const float* base : {x.data(), dy.data()})
    for (int64_t offset : {0, 4, 16, 32, 48, 64, 100, 128, 200, 1040, 4080})
      EXPECT_EQ(run(placed(base, offset)), expected) << "dx at " << (base == x.data() ? "x" : "dy") << " + "
                                                     << offset << " mod 4096";
}

TEST_P(Backward, DxPlacementDoesNotChangeTheBits) {
  expect_dx_placement_does_not_change_the_bits(24, 1000);
  expect_dx_placement_does_not_change_the_bits(4100, 1024);  // 16 MiB: streamed
}

// Fixed blocks merged in a fixed order: the same bits for 1 and 2 threads.
TEST_P(Backward, GradientsDoNotDependOnTheThreadCount) {
  const int64_t rows = 2048, cols = 384, n = 8, c = 32, s = 1024;
  auto xd = random_vector(rows * cols, 31), dyd = random_vector(rows * cols, 32), wd = random_vector(cols, 33);
  std::vector<float> x(xd.begin(), xd.end()), dy(dyd.begin(), dyd.end()), w(wd.begin(), wd.end());
  auto xcd = random_vector(n * c * s, 34), dycd = random_vector(n * c * s, 35);
  std::vector<float> xc(xcd.begin(), xcd.end()), dyc(dycd.begin(), dycd.end());
  auto run = [&](int threads) {
    nk::set_num_threads(threads);
    std::vector<float> y(x.size()), mean(rows), rstd(rows), dx(x.size()), dw(cols), db(cols);
    const nk::Dims shape{rows, cols};
    nk::layer_norm(nk::TensorView<float>(x.data(), shape), nk::TensorView<float>(y.data(), shape), {cols},
                   nk::TensorView<float>(w.data(), {cols}), {}, 1e-5, nk::TensorView<float>(mean.data(), {rows}),
                   nk::TensorView<float>(rstd.data(), {rows}));
    nk::layer_norm_backward(nk::TensorView<float>(dy.data(), shape), nk::TensorView<float>(x.data(), shape),
                            nk::TensorView<float>(mean.data(), {rows}), nk::TensorView<float>(rstd.data(), {rows}),
                            {cols}, nk::TensorView<float>(w.data(), {cols}), nk::TensorView<float>(dx.data(), shape),
                            nk::TensorView<float>(dw.data(), {cols}), nk::TensorView<float>(db.data(), {cols}));
    std::vector<float> out = dx;
    out.insert(out.end(), dw.begin(), dw.end());
    out.insert(out.end(), db.begin(), db.end());
    for (nk::Layout layout : {nk::Layout::NCL, nk::Layout::NLC}) {
      const nk::Dims cshape = layout == nk::Layout::NLC ? nk::Dims{n, s, c} : nk::Dims{n, c, s};
      std::vector<float> yc(xc.size()), m(c), r(c), dxc(xc.size()), dwc(c), dbc(c);
      nk::batch_norm(nk::TensorView<float>(xc.data(), cshape), nk::TensorView<float>(yc.data(), cshape), {}, {}, {},
                     {}, true, 0.1, 1e-5, layout, nk::TensorView<float>(m.data(), {c}),
                     nk::TensorView<float>(r.data(), {c}));
      nk::batch_norm_backward(nk::TensorView<float>(dyc.data(), cshape), nk::TensorView<float>(xc.data(), cshape),
                              nk::TensorView<float>(m.data(), {c}), nk::TensorView<float>(r.data(), {c}), {},
                              nk::TensorView<float>(dxc.data(), cshape), nk::TensorView<float>(dwc.data(), {c}),
                              nk::TensorView<float>(dbc.data(), {c}), true, layout);
      out.insert(out.end(), dxc.begin(), dxc.end());
      out.insert(out.end(), dwc.begin(), dwc.end());
      out.insert(out.end(), dbc.begin(), dbc.end());
    }
    return out;
  };
  const int before = nk::get_num_threads();
  const auto one = run(1), two = run(2), again = run(2);
  nk::set_num_threads(before);
  ASSERT_EQ(one.size(), two.size());
  for (size_t i = 0; i < one.size(); ++i) {
    ASSERT_EQ(one[i], two[i]) << "element " << i;
    ASSERT_EQ(two[i], again[i]) << "element " << i;
  }
}

// An output may be x (or dx may be dy) itself, and nothing else it shares
// memory with: one buffer carved into views that overlap where they must not.
class Aliasing : public nk_test::KernelPathTest {};

TEST_P(Aliasing, OutputsSharingMemoryWithOtherArgumentsAreErrors) {
  const int64_t n = 2, c = 4, s = 3;
  std::vector<double> buf(400, 0.5);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = 0.5 + 0.01 * double(i % 17);
  double* b = buf.data();
  auto at = [&](int64_t offset, nk::Dims shape) { return nk::TensorView<double>(b + offset, shape); };
  const nk::Dims xs{n, c, s};
  const auto x = at(0, xs), y = at(100, xs), dy = at(200, xs), dx = at(300, xs);
  // Forward: statistics outputs inside x, y over the weight, running statistics inside y.
  expect_error([&] { nk::layer_norm(x, y, {s}, {}, {}, 1e-5, at(2, {n * c}), {}); }, "mean: shares memory with x");
  expect_error([&] { nk::layer_norm(x, y, {s}, at(101, {s})); }, "y: shares memory with weight");
  expect_error([&] { nk::rms_norm(x, y, {s}, {}, 1e-5, at(4, {n * c})); }, "rstd: shares memory with x");
  expect_error([&] { nk::batch_norm(x, y, at(104, {c}), at(150, {c}), {}, {}, true, 0.1, 1e-5, nk::Layout::NCL); },
               "y: shares memory with running_mean");
  expect_error([&] { nk::group_norm(x, y, 2, {}, {}, 1e-5, nk::Layout::NCL, at(3, {n, 2}), {}); },
               "mean: shares memory with x");
  expect_error([&] { nk::adaptive_instance_norm(x, y, at(105, xs), 1e-5, nk::Layout::NCL); },
               "y: shares memory with style");
  // Backward: gradients of the parameters inside x or dy, dx over the saved statistics, dstyle = dx.
  std::vector<double> mc(c), rc(c, 1.0), mean_nc(n * c), rstd_nc(n * c, 1.0);
  const nk::Dims rs{n * c, s};
  expect_error([&] {
    nk::layer_norm_backward(at(200, rs), at(0, rs), view(mean_nc, {n * c}), view(rstd_nc, {n * c}), {s}, {},
                            at(300, rs), at(201, {s}));
  }, "dweight: shares memory with dy");
  expect_error([&] {
    nk::batch_norm_backward(dy, x, at(301, {c}), view(rc, {c}), {}, dx, {}, {}, true, nk::Layout::NCL);
  }, "dx: shares memory with mean");
  expect_error([&] {
    nk::instance_norm_backward(dy, x, view(mean_nc, {n, c}), view(rstd_nc, {n, c}), {}, dx, at(1, {c}), {}, true,
                               nk::Layout::NCL);
  }, "dweight: shares memory with x");
  expect_error([&] {
    nk::adaptive_instance_norm_backward(dy, x, at(100, xs), 1e-5, dx, dx, nk::Layout::NCL);
  }, "dx: shares memory with dstyle");
  expect_error([&] {
    nk::adaptive_instance_norm_backward(dy, x, view(mean_nc, {n, c}), view(rstd_nc, {n, c}), 1e-5, dx,
                                        at(205, {n, c}), {}, nk::Layout::NCL);
  }, "dstyle_mean: shares memory with dy");
  // Nothing was written by the refused calls, and the allowed in-place forms still work.
  for (size_t i = 0; i < buf.size(); ++i) ASSERT_EQ(buf[i], 0.5 + 0.01 * double(i % 17)) << "element " << i;
  EXPECT_NO_THROW(nk::layer_norm(x, x, {s}));
  EXPECT_NO_THROW(nk::batch_norm_backward(dy, x, view(mc, {c}), view(rc, {c}), {}, dy, {}, {}, true, nk::Layout::NCL));
}

TEST_P(Backward, BadArgumentsAreErrorsNamingThem) {
  std::vector<double> x(12, 1.0), dy(12, 1.0), dx(12), mean(3), rstd(3, 1.0), mean4(4), rstd4(4, 1.0), small(2);
  const nk::Dims shape{3, 4};
  expect_error([&] {
    nk::layer_norm_backward(view(dy, {4, 3}), view(x, shape), view(mean, {3}), view(rstd, {3}), {4}, {},
                            view(dx, shape));
  }, "dy:");
  expect_error([&] {
    nk::layer_norm_backward(view(dy, shape), view(x, shape), view(small, {2}), view(rstd, {3}), {4}, {},
                            view(dx, shape));
  }, "mean:");
  expect_error([&] {
    nk::layer_norm_backward(view(dy, shape), view(x, shape), view(mean, {3}), view(rstd, {3}), {4},
                            view(small, {2}), view(dx, shape));
  }, "weight:");
  expect_error([&] {
    nk::batch_norm_backward(view(dy, shape), view(x, shape), view(small, {2}), view(rstd4, {4}), {}, view(dx, shape));
  }, "mean:");
  expect_error([&] {
    nk::group_norm_backward(view(dy, {3, 4, 1}), view(x, {3, 4, 1}), view(mean, {3}), view(rstd, {3}), 3, {},
                            view(dx, {3, 4, 1}));
  }, "num_groups:");
  expect_error([&] {
    nk::batch_norm_backward(view(dy, shape), view(x, shape), view(mean4, {4}), view(rstd4, {4}), {},
                            nk::TensorView<double>(dy.data() + 1, {3, 4}));
  }, "dx:");
}

NK_TEST_ON_EVERY_PATH(Aliasing);
NK_TEST_ON_EVERY_PATH(Backward);

}  // namespace
