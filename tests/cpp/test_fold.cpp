// test_fold.cpp - fold_batch_norm (normkit/fused.hpp) and BatchNorm::fold.
//
// Results against a plain float64 reference written per group (group g,
// its input rows, its output channels), which is independent of the
// library's flat channel formula; every dtype, absent optional vectors,
// in place, IEEE results for var = -eps, correct rounding to 16 bits, the
// layer method, and errors naming the argument.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"
#include "test_support.hpp"

namespace nk = normkit;
using std::int64_t;

namespace {

std::vector<double> random_vector(int64_t n, unsigned seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (auto& e : v) e = dist(gen);
  return v;
}

using nk_test::expect_error;

// One folding problem in float64, with the reference result.
struct Problem {
  nk::Dims shape;  // weight's
  bool transpose = false;
  int64_t groups = 1;
  int64_t c_out = 0;
  double eps = 1e-5;
  std::vector<double> weight, bias, mean, var, bn_weight, bn_bias;

  Problem(nk::Dims shape_, bool transpose_, int64_t groups_, unsigned seed)
      : shape(shape_), transpose(transpose_), groups(groups_) {
    c_out = transpose ? shape[1] * groups : shape[0];
    weight = random_vector(shape.product(), seed);
    bias = random_vector(c_out, seed + 1);
    mean = random_vector(c_out, seed + 2);
    var = random_vector(c_out, seed + 3, 0.1, 3.0);
    bn_weight = random_vector(c_out, seed + 4, 0.5, 2.0);
    bn_bias = random_vector(c_out, seed + 5);
  }

  // The fold written out per group: weight [C_out, C_in/g, K...] scales dim 0
  // by output channel; transposed [C_in, C_out/g, K...] has group g's input
  // rows g*(C_in/g) .. (g+1)*(C_in/g)-1, whose dim-1 index j is output channel
  // g*(C_out/g) + j.
  void reference(std::vector<double>& w_out, std::vector<double>& b_out) const {
    std::vector<double> a(c_out);
    for (int64_t c = 0; c < c_out; ++c) {
      a[c] = bn_weight[c] / std::sqrt(var[c] + eps);
      b_out.push_back((bias[c] - mean[c]) * a[c] + bn_bias[c]);
    }
    const int64_t d0 = shape[0], d1 = shape.size() > 1 ? shape[1] : 1;
    const int64_t k = shape.product() / (d0 * d1);
    w_out.assign(weight.size(), 0.0);
    if (!transpose) {
      for (int64_t o = 0; o < d0; ++o)
        for (int64_t e = 0; e < d1 * k; ++e) w_out[o * d1 * k + e] = weight[o * d1 * k + e] * a[o];
      return;
    }
    const int64_t in_per_group = d0 / groups, out_per_group = d1;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t r = 0; r < in_per_group; ++r)
        for (int64_t j = 0; j < out_per_group; ++j)
          for (int64_t s = 0; s < k; ++s) {
            const int64_t at = (((g * in_per_group + r) * out_per_group) + j) * k + s;
            w_out[at] = weight[at] * a[g * out_per_group + j];
          }
  }

  nk::TensorView<double> vec(std::vector<double>& v) { return {v.data(), {c_out}}; }
};

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double rtol, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], rtol * std::max(1.0, std::fabs(want[i]))) << what << " at " << i;
}

struct Case {
  nk::Dims shape;
  bool transpose;
  int64_t groups;
};

class FoldFloat64 : public ::testing::TestWithParam<int> {};

const std::vector<Case>& cases() {
  static const std::vector<Case> c = {
      {{8, 3, 3, 3}, false, 1},  {{8, 2, 3, 3}, false, 4},  {{6, 5}, false, 1},    {{6}, false, 1},
      {{4, 5, 3}, false, 1},     {{4, 6, 2, 2}, true, 1},   {{8, 3, 3, 3}, true, 2}, {{8, 2, 3}, true, 4},
      {{12, 1, 2, 2}, true, 12}, {{6, 4, 1, 2, 2}, true, 3}, {{4, 3}, true, 2},
  };
  return c;
}

TEST_P(FoldFloat64, MatchesReference) {
  const Case& cs = cases()[static_cast<size_t>(GetParam())];
  Problem p(cs.shape, cs.transpose, cs.groups, 10u + static_cast<unsigned>(GetParam()));
  std::vector<double> want_w, want_b, fw(p.weight.size()), fb(p.c_out);
  p.reference(want_w, want_b);
  nk::fold_batch_norm(nk::TensorView<double>(p.weight.data(), p.shape), p.vec(p.bias), p.vec(p.mean),
                      p.vec(p.var), p.eps, p.vec(p.bn_weight), p.vec(p.bn_bias),
                      nk::TensorView<double>(fw.data(), p.shape), nk::TensorView<double>(fb.data(), {p.c_out}),
                      p.transpose, p.groups);
  expect_close(fw, want_w, 1e-15, "folded_weight");
  expect_close(fb, want_b, 1e-15, "folded_bias");
}

INSTANTIATE_TEST_SUITE_P(Shapes, FoldFloat64, ::testing::Range(0, 11));

TEST(Fold, AbsentVectorsAreZerosOnesZeros) {
  Problem p({6, 2, 3}, true, 3, 40);
  std::vector<double> zeros(p.c_out, 0.0), ones(p.c_out, 1.0);
  std::vector<double> w1(p.weight.size()), b1(p.c_out), w2(p.weight.size()), b2(p.c_out);
  const nk::TensorView<double> wv(p.weight.data(), p.shape);
  nk::fold_batch_norm(wv, {}, p.vec(p.mean), p.vec(p.var), p.eps, {}, {}, nk::TensorView<double>(w1.data(), p.shape),
                      nk::TensorView<double>(b1.data(), {p.c_out}), true, 3);
  nk::fold_batch_norm(wv, p.vec(zeros), p.vec(p.mean), p.vec(p.var), p.eps, p.vec(ones), p.vec(zeros),
                      nk::TensorView<double>(w2.data(), p.shape), nk::TensorView<double>(b2.data(), {p.c_out}), true,
                      3);
  EXPECT_EQ(w1, w2);
  EXPECT_EQ(b1, b2);
}

TEST(Fold, InPlace) {
  Problem p({8, 2, 3, 3}, true, 2, 50);
  std::vector<double> want_w, want_b;
  p.reference(want_w, want_b);
  const nk::TensorView<double> wv(p.weight.data(), p.shape);
  nk::fold_batch_norm(wv, p.vec(p.bias), p.vec(p.mean), p.vec(p.var), p.eps, p.vec(p.bn_weight), p.vec(p.bn_bias),
                      wv, p.vec(p.bias), true, 2);
  expect_close(p.weight, want_w, 1e-15, "weight in place");
  expect_close(p.bias, want_b, 1e-15, "bias in place");
}

// 16-bit and float32 weights: the float64 result rounded once to the dtype.
template <class T>
void check_dtype(bool float32_vectors, double rtol) {
  Problem p({6, 2, 2, 2}, true, 3, 60);
  std::vector<T> w(p.weight.size()), b(p.c_out), fw(p.weight.size()), fb(p.c_out);
  // The inputs as the dtype holds them, so the float64 reference sees the same values.
  for (size_t i = 0; i < w.size(); ++i) {
    w[i] = T(static_cast<float>(p.weight[i]));
    p.weight[i] = static_cast<double>(static_cast<float>(w[i]));
  }
  for (int64_t c = 0; c < p.c_out; ++c) {
    b[c] = T(static_cast<float>(p.bias[c]));
    p.bias[c] = static_cast<double>(static_cast<float>(b[c]));
  }
  std::vector<std::vector<double>*> vectors = {&p.mean, &p.var, &p.bn_weight, &p.bn_bias};
  std::vector<std::vector<T>> narrow(4, std::vector<T>(p.c_out));
  std::vector<std::vector<float>> wide(4, std::vector<float>(p.c_out));
  std::vector<nk::TensorRef> refs;
  for (size_t v = 0; v < 4; ++v) {
    for (int64_t c = 0; c < p.c_out; ++c) {
      std::vector<double>& src = *vectors[v];
      if (float32_vectors) {
        wide[v][c] = static_cast<float>(src[c]);
        src[c] = wide[v][c];
      } else {
        narrow[v][c] = T(static_cast<float>(src[c]));
        src[c] = static_cast<double>(static_cast<float>(narrow[v][c]));
      }
    }
    if (float32_vectors) refs.push_back(nk::TensorView<float>(wide[v].data(), {p.c_out}));
    else refs.push_back(nk::TensorView<T>(narrow[v].data(), {p.c_out}));
  }
  std::vector<double> want_w, want_b;
  p.reference(want_w, want_b);
  nk::fold_batch_norm(nk::TensorView<T>(w.data(), p.shape), nk::TensorView<T>(b.data(), {p.c_out}), refs[0], refs[1],
                      p.eps, refs[2], refs[3], nk::TensorView<T>(fw.data(), p.shape),
                      nk::TensorView<T>(fb.data(), {p.c_out}), true, 3);
  std::vector<double> got_w, got_b;
  for (const T& e : fw) got_w.push_back(static_cast<double>(static_cast<float>(e)));
  for (const T& e : fb) got_b.push_back(static_cast<double>(static_cast<float>(e)));
  expect_close(got_w, want_w, rtol, "folded_weight");
  expect_close(got_b, want_b, rtol, "folded_bias");
}

TEST(Fold, Float32) { check_dtype<float>(false, 1.2e-7); }
TEST(Fold, Float16) { check_dtype<nk::half>(false, 1e-3); }
TEST(Fold, Float16WithFloat32Vectors) { check_dtype<nk::half>(true, 1e-3); }
TEST(Fold, Bfloat16) { check_dtype<nk::bfloat16>(false, 8e-3); }
TEST(Fold, Bfloat16WithFloat32Vectors) { check_dtype<nk::bfloat16>(true, 8e-3); }

// a = 1 + 2^-11 + 2^-40: just above the half tie between 1 and 1 + 2^-10.
// Rounding through float first would land on the tie and then on 1 (even).
TEST(Fold, RoundsOnceTo16Bits) {
  const double a = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  std::vector<float> mean{0.0f}, var{0.0f};
  const double eps = 1.0 / (a * a);
  std::vector<nk::half> w{nk::half(1.0f)}, b{nk::half(1.0f)}, fw(1), fb(1);
  nk::fold_batch_norm(nk::TensorView<nk::half>(w.data(), {1}), nk::TensorView<nk::half>(b.data(), {1}),
                      nk::TensorView<float>(mean.data(), {1}), nk::TensorView<float>(var.data(), {1}), eps, {}, {},
                      nk::TensorView<nk::half>(fw.data(), {1}), nk::TensorView<nk::half>(fb.data(), {1}));
  EXPECT_EQ(static_cast<float>(fw[0]), 1.0009765625f);
  EXPECT_EQ(static_cast<float>(fb[0]), 1.0009765625f);
  // bfloat16: ties between 1 and 1 + 2^-7 at 1 + 2^-8.
  const double a2 = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  std::vector<nk::bfloat16> w2{nk::bfloat16(1.0f)}, fw2(1), fb2(1);
  std::vector<float> var2{0.0f};
  nk::fold_batch_norm(nk::TensorView<nk::bfloat16>(w2.data(), {1}), {}, nk::TensorView<float>(mean.data(), {1}),
                      nk::TensorView<float>(var2.data(), {1}), 1.0 / (a2 * a2), {}, {},
                      nk::TensorView<nk::bfloat16>(fw2.data(), {1}), nk::TensorView<nk::bfloat16>(fb2.data(), {1}));
  EXPECT_EQ(static_cast<float>(fw2[0]), 1.0078125f);
}

TEST(Fold, VarianceMinusEpsGivesInfAndNaN) {
  const double eps = 1e-5;
  std::vector<double> w{2.0, 3.0, 4.0}, mean{0.0, 0.0, 0.0}, var{-eps, -eps, -1.0}, bw{1.0, 0.0, 1.0};
  std::vector<double> fw(3), fb(3);
  nk::fold_batch_norm(nk::TensorView<double>(w.data(), {3}), {}, nk::TensorView<double>(mean.data(), {3}),
                      nk::TensorView<double>(var.data(), {3}), eps, nk::TensorView<double>(bw.data(), {3}), {},
                      nk::TensorView<double>(fw.data(), {3}), nk::TensorView<double>(fb.data(), {3}));
  EXPECT_TRUE(std::isinf(fw[0]) && fw[0] > 0);
  EXPECT_TRUE(std::isnan(fw[1]));  // 0 / 0
  EXPECT_TRUE(std::isnan(fw[2]));  // sqrt of a negative
  EXPECT_TRUE(std::isnan(fb[0]));  // 0 * inf
}

TEST(Fold, EmptyWeights) {
  std::vector<double> mean(4, 0.0), var(4, 1.0), fb(4, -1.0);
  // C_in = 0, transposed: no weight elements, C_out = 4 biases.
  nk::fold_batch_norm(nk::TensorView<double>(nullptr, {0, 2, 3}), {}, nk::TensorView<double>(mean.data(), {4}),
                      nk::TensorView<double>(var.data(), {4}), 0.0, {}, {},
                      nk::TensorView<double>(nullptr, {0, 2, 3}), nk::TensorView<double>(fb.data(), {4}), true, 2);
  for (double b : fb) EXPECT_EQ(b, 0.0);
}

TEST(Fold, Errors) {
  std::vector<double> w(8 * 2 * 9, 1.0), fw(w.size()), v8(8, 1.0), fb(8), v4(4, 1.0), big(200, 1.0);
  std::vector<float> f8(8, 1.0f), fw32(w.size());
  std::vector<nk::half> h8(8), hw(w.size()), hfw(w.size()), hfb(8);
  std::vector<std::int8_t> i8(w.size());
  std::vector<nk::float8_e4m3> e8(8);
  const nk::Dims shape{8, 2, 3, 3};
  const nk::TensorView<double> W(w.data(), shape), FW(fw.data(), shape), V(v8.data(), {8}), FB(fb.data(), {8});
  auto fold = [&](const nk::TensorRef& weight, const nk::TensorRef& bias, const nk::TensorRef& rm,
                  const nk::TensorRef& rv, double eps, const nk::TensorRef& bw, const nk::TensorRef& bb,
                  const nk::TensorRef& fwr, const nk::TensorRef& fbr, bool transpose = false, int64_t groups = 1) {
    return [=] { nk::fold_batch_norm(weight, bias, rm, rv, eps, bw, bb, fwr, fbr, transpose, groups); };
  };
  // Shapes.
  expect_error(fold(W, {}, nk::TensorView<double>(v4.data(), {4}), V, 1e-5, {}, {}, FW, FB),
               "running_mean: expected shape (8,), got (4,)");
  expect_error(fold(W, {}, V, nk::TensorView<double>(v4.data(), {4}), 1e-5, {}, {}, FW, FB),
               "running_var: expected shape (8,), got (4,)");
  expect_error(fold(W, nk::TensorView<double>(v4.data(), {4}), V, V, 1e-5, {}, {}, FW, FB), "bias: expected shape");
  expect_error(fold(W, {}, V, V, 1e-5, nk::TensorView<double>(v4.data(), {2, 2}), {}, FW, FB),
               "bn_weight: expected shape (8,), got (2, 2)");
  expect_error(fold(W, {}, V, V, 1e-5, {}, nk::TensorView<double>(v4.data(), {4}), FW, FB), "bn_bias: expected shape");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, nk::TensorView<double>(fw.data(), {8, 18}), FB),
               "folded_weight: expected shape (8, 2, 3, 3)");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, nk::TensorView<double>(fb.data(), {4})),
               "folded_bias: expected shape (8,)");
  // Transposed with groups 4: C_out = 2 * 4.
  EXPECT_NO_THROW(fold(W, {}, V, V, 1e-5, {}, {}, FW, FB, true, 4)());
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, FB, true, 2), "running_mean: expected shape (4,), got (8,)");
  // Rank, groups.
  expect_error(fold(nk::TensorView<double>(w.data(), {}), {}, V, V, 1e-5, {}, {}, FW, FB), "weight: expected at least 1 dim");
  expect_error(fold(nk::TensorView<double>(w.data(), {8}), {}, V, V, 1e-5, {}, {}, FW, FB, true), "weight: a transposed");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, FB, false, 0), "groups: must be > 0, got 0");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, FB, false, -2), "groups: must be > 0");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, FB, false, 3), "groups: 3 does not divide C_out");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, FB, true, 3), "groups: 3 does not divide C_in");
  // eps.
  expect_error(fold(W, {}, V, V, -1e-5, {}, {}, FW, FB), "eps: must be a finite number >= 0");
  expect_error(fold(W, {}, V, V, std::nan(""), {}, {}, FW, FB), "eps:");
  expect_error(fold(W, {}, V, V, std::numeric_limits<double>::infinity(), {}, {}, FW, FB), "eps:");
  // Missing.
  expect_error(fold({}, {}, V, V, 1e-5, {}, {}, FW, FB), "weight: is required");
  expect_error(fold(W, {}, {}, V, 1e-5, {}, {}, FW, FB), "running_mean: is required");
  expect_error(fold(W, {}, V, {}, 1e-5, {}, {}, FW, FB), "running_var: is required");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, {}, FB), "folded_weight: is required");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, {}), "folded_bias: is required");
  // Dtypes.
  const nk::TensorView<float> F(f8.data(), {8});
  expect_error(fold(W, {}, F, V, 1e-5, {}, {}, FW, FB), "running_mean: expected dtype float64, got float32");
  expect_error(fold(W, F, V, V, 1e-5, {}, {}, FW, FB), "bias: expected dtype float64");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, nk::TensorView<float>(fw32.data(), shape), FB),
               "folded_weight: expected dtype float64");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, F), "folded_bias: expected dtype float64");
  expect_error(fold(nk::TensorView<std::int8_t>(i8.data(), shape), {}, V, V, 1e-5, {}, {}, FW, FB),
               "weight: expected a float dtype");
  expect_error(fold(W, {}, V, nk::TensorView<nk::float8_e4m3>(e8.data(), {8}), 1e-5, {}, {}, FW, FB),
               "running_var: expected a float dtype");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, nk::TensorView<std::int8_t>(i8.data(), shape), FB),
               "folded_weight: expected a float dtype");
  // 16-bit weight: vectors float16 or float32, not float64.
  const nk::TensorView<nk::half> HW(hw.data(), shape), HFW(hfw.data(), shape), HFB(hfb.data(), {8});
  EXPECT_NO_THROW(nk::fold_batch_norm(HW, {}, F, nk::TensorView<nk::half>(h8.data(), {8}), 1e-5, F, {}, HFW, HFB));
  expect_error(fold(HW, {}, F, V, 1e-5, {}, {}, HFW, HFB), "running_var: expected dtype float16, got float64");
  expect_error(fold(HW, F, F, F, 1e-5, {}, {}, HFW, HFB), "bias: expected dtype float16, got float32");
  // Non-contiguous.
  expect_error(fold(nk::TensorView<double>(big.data(), shape, {18, 9, 3, 2}), {}, V, V, 1e-5, {}, {}, FW, FB),
               "weight: must be contiguous");
  expect_error(fold(W, {}, V, nk::TensorView<double>(big.data(), {8}, {2}), 1e-5, {}, {}, FW, FB),
               "running_var: must be contiguous");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, nk::TensorView<double>(big.data(), {8}, {3})),
               "folded_bias: must be contiguous");
  // Overlap: only exactly weight / bias.
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, nk::TensorView<double>(w.data() + 1, shape), FB),
               "folded_weight: overlaps weight");
  std::vector<double> bias(9, 0.0);
  expect_error(fold(W, nk::TensorView<double>(bias.data(), {8}), V, V, 1e-5, {}, {}, FW,
                    nk::TensorView<double>(bias.data() + 1, {8})),
               "folded_bias: overlaps bias");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, nk::TensorView<double>(v8.data(), {8})),
               "folded_bias: shares memory with running_mean");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, nk::TensorView<double>(w.data(), {8})),
               "folded_bias: shares memory with weight");
  expect_error(fold(W, nk::TensorView<double>(fw.data(), {8}), V, V, 1e-5, {}, {}, FW, FB),
               "folded_weight: shares memory with bias");
  expect_error(fold(W, {}, V, V, 1e-5, {}, {}, FW, nk::TensorView<double>(fw.data() + 70, {8})),
               "folded_weight: shares memory with folded_bias");
  // An empty view touches no byte: an empty folded_weight whose pointer lies
  // inside running_mean (or inside weight) is no overlap (found by the fuzzer).
  const nk::Dims empty{8, 0, 3, 2};
  const nk::TensorView<double> W0(w.data(), empty);
  EXPECT_NO_THROW(fold(W0, {}, V, V, 1e-5, {}, {}, nk::TensorView<double>(v8.data() + 3, empty), FB)());
  EXPECT_NO_THROW(fold(W0, {}, V, V, 1e-5, {}, {}, nk::TensorView<double>(w.data() + 5, empty), FB)());
}

TEST(Fold, BatchNormLayer) {
  nk::BatchNorm bn(4, 1e-3);
  Problem p({2, 2, 3}, true, 2, 70);
  p.eps = 1e-3;
  auto copy = [](nk::Buffer& b, const std::vector<double>& v) {
    for (size_t i = 0; i < v.size(); ++i) static_cast<float*>(b.data())[i] = static_cast<float>(v[i]);
  };
  copy(bn.running_mean(), p.mean);
  copy(bn.running_var(), p.var);
  copy(bn.weight(), p.bn_weight);
  copy(bn.bias(), p.bn_bias);
  std::vector<float> w(p.weight.begin(), p.weight.end()), b(p.bias.begin(), p.bias.end());
  std::vector<float> fw(w.size()), fb(4), fw2(w.size()), fb2(4);
  const nk::TensorView<float> W(w.data(), p.shape), B(b.data(), {4});
  bn.fold(W, B, nk::TensorView<float>(fw.data(), p.shape), nk::TensorView<float>(fb.data(), {4}), true, 2);
  nk::fold_batch_norm(W, B, bn.running_mean().ref(), bn.running_var().ref(), 1e-3, bn.weight().ref(),
                      bn.bias().ref(), nk::TensorView<float>(fw2.data(), p.shape),
                      nk::TensorView<float>(fb2.data(), {4}), true, 2);
  EXPECT_EQ(fw, fw2);
  EXPECT_EQ(fb, fb2);

  // float16 weights with the float32 layer.
  std::vector<nk::half> hw(w.size()), hfw(w.size()), hfb(4);
  EXPECT_NO_THROW(bn.fold(nk::TensorView<nk::half>(hw.data(), p.shape), {},
                          nk::TensorView<nk::half>(hfw.data(), p.shape), nk::TensorView<nk::half>(hfb.data(), {4}),
                          true, 2));

  std::vector<double> dw(w.size()), dfw(w.size()), dfb(4);
  expect_error([&] {
    bn.fold(nk::TensorView<double>(dw.data(), p.shape), {}, nk::TensorView<double>(dfw.data(), p.shape),
            nk::TensorView<double>(dfb.data(), {4}), true, 2);
  }, "weight: dtype float64 does not match the layer's float32");
  expect_error([&] {
    bn.fold(W, {}, nk::TensorView<float>(fw.data(), p.shape), nk::TensorView<float>(fb.data(), {4}), true, 1);
  }, "weight: has 2 output channels");
  nk::BatchNorm untracked(4, 1e-5, 0.1, true, false);
  expect_error([&] {
    untracked.fold(W, {}, nk::TensorView<float>(fw.data(), p.shape), nk::TensorView<float>(fb.data(), {4}), true, 2);
  }, "fold: needs running statistics");

  // Without affine: bn_weight 1, bn_bias 0.
  nk::BatchNorm plain(4, 1e-3, 0.1, false);
  copy(plain.running_mean(), p.mean);
  copy(plain.running_var(), p.var);
  plain.fold(W, B, nk::TensorView<float>(fw.data(), p.shape), nk::TensorView<float>(fb.data(), {4}), true, 2);
  nk::fold_batch_norm(W, B, plain.running_mean().ref(), plain.running_var().ref(), 1e-3, {}, {},
                      nk::TensorView<float>(fw2.data(), p.shape), nk::TensorView<float>(fb2.data(), {4}), true, 2);
  EXPECT_EQ(fw, fw2);
  EXPECT_EQ(fb, fb2);
}

}  // namespace
