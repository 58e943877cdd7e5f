// test_fused.cpp - the fused forms of normkit/fused.hpp through the public C++
// API: the residual add (add_layer_norm, add_rms_norm), activations on every
// forward norm, and quantized outputs (int8, float8_e4m3; static and dynamic
// scales), on every kernel path, against float64 reference loops written
// below (and the shared ones of test_support.hpp).
//
// Semantics checked: y = quantize(act(affine(norm(x)))) computed in float32
// (float64 for float64 x); s = x + residual (+ residual_bias) stored once in
// x's dtype and y the norm of s as stored, bit for bit what layer_norm /
// rms_norm give on that s on the same kernel path.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"
#include "test_support.hpp"

namespace {

using namespace nk_test;
using nk_test::random_data;  // (not glibc's struct random_data)
using Act = nk::Activation;
using Quant = nk::Quantize;

class Fused : public KernelPathTest {};

const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------
// Reference activations and quantizers, in double.
// ---------------------------------------------------------------------------

const Act kActivations[] = {Act::relu, Act::silu, Act::gelu, Act::gelu_tanh};

const char* act_name(Act a) {
  switch (a) {
    case Act::none: return "none";
    case Act::relu: return "relu";
    case Act::silu: return "silu";
    case Act::gelu: return "gelu";
    case Act::gelu_tanh: return "gelu_tanh";
  }
  return "?";
}

double ref_act(double v, Act a) {
  switch (a) {
    case Act::none: return v;
    case Act::relu: return std::isnan(v) ? v : (v > 0 ? v : 0.0);
    case Act::silu: return v / (1.0 + std::exp(-v));
    case Act::gelu: return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    case Act::gelu_tanh: {
      const double k = std::sqrt(2.0 / 3.14159265358979323846);
      return 0.5 * v * (1.0 + std::tanh(k * (v + 0.044715 * v * v * v)));
    }
  }
  return v;
}

std::vector<double> apply_act(std::vector<double> y, Act a) {
  for (double& v : y) v = ref_act(v, a);
  return y;
}

// int8: round half to even, saturate to [-127, 127], NaN to 0.
int ref_int8(double v) {
  if (std::isnan(v)) return 0;
  if (v >= 127) return 127;
  if (v <= -127) return -127;
  const double f = std::floor(v), rest = v - f;
  double r = f;
  if (rest > 0.5 || (rest == 0.5 && std::fmod(f, 2.0) != 0)) r = f + 1;
  return static_cast<int>(r);
}

// E4M3 decoded the obvious way: bias 7, 3 mantissa bits, subnormals m * 2^-9,
// 0x7f / 0xff NaN, no infinities.
double decode_e4m3(std::uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  double v;
  if (e == 15 && m == 7) v = kNaN;
  else if (e == 0) v = std::ldexp(m, -9);
  else v = std::ldexp(8 + m, e - 10);
  return (b & 0x80) ? -v : v;
}

// The nearest E4M3 by search over all 127 non-negative finite codes, ties to
// the even code; saturating to 448; NaN kept (sign | 0x7f).
std::uint8_t ref_e4m3(double v) {
  const std::uint8_t sign = std::signbit(v) ? 0x80 : 0;
  if (std::isnan(v)) return sign | 0x7f;
  const double a = std::fabs(v);
  if (a >= 448) return sign | 0x7e;
  int k = 0;
  while (k + 1 <= 0x7e && decode_e4m3(static_cast<std::uint8_t>(k + 1)) <= a) ++k;
  const double lo = decode_e4m3(static_cast<std::uint8_t>(k)), hi = decode_e4m3(static_cast<std::uint8_t>(k + 1));
  const double dl = a - lo, dh = hi - a;
  const int q = (dl < dh || (dl == dh && k % 2 == 0)) ? k : k + 1;
  return static_cast<std::uint8_t>(sign | q);
}

double qmax(Quant q) { return q == Quant::int8 ? 127.0 : 448.0; }
const char* quant_name(Quant q) { return q == Quant::int8 ? "int8" : "float8_e4m3"; }

// The quantized value (as a number) of an already divided v.
double ref_quantized(double v, Quant q) {
  return q == Quant::int8 ? static_cast<double>(ref_int8(v)) : decode_e4m3(ref_e4m3(v));
}

// A stored quantized element as a number.
double stored_quantized(const std::vector<std::uint8_t>& out, size_t i, Quant q) {
  if (q == Quant::int8) return static_cast<double>(static_cast<std::int8_t>(out[i]));
  return decode_e4m3(out[i]);
}

// The quantized output of the exact value `want` is bracketed by those of
// want -+ its float tolerance: rounding is monotonic.
::testing::AssertionResult quantized_close(const std::vector<std::uint8_t>& got, const std::vector<double>& want,
                                           const std::vector<double>& scale_per_elem, Quant q, Tol tol) {
  int64_t bad = 0;
  std::string report;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = stored_quantized(got, i, q), s = scale_per_elem[i], w = want[i];
    bool ok;
    if (std::isnan(w)) {
      ok = q == Quant::int8 ? g == 0 : std::isnan(g);
    } else {
      const double d = tol.atol + tol.rtol * std::fabs(w);
      const double lo = ref_quantized((w - d) / s, q), hi = ref_quantized((w + d) / s, q);
      ok = lo <= g && g <= hi;
    }
    if (!ok) {
      if (bad < 5)
        report += "\n  q[" + std::to_string(i) + "]: got " + std::to_string(g) + ", want about " +
                  std::to_string(w / s) + " (v " + std::to_string(w) + ", scale " + std::to_string(s) + ")";
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << want.size() << " quantized values wrong" << report;
}

// Quantization of a value the kernel computed in A (float or double), as the
// contract says: v / scale in A, then rounded. Exact.
template <class A>
std::uint8_t quantize_bits(A v, A scale, Quant q) {
  const A r = v / scale;
  if (q == Quant::int8) return static_cast<std::uint8_t>(static_cast<std::int8_t>(ref_int8(static_cast<double>(r))));
  return ref_e4m3(static_cast<double>(r));
}

// ---------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------

template <class T>
nk::TensorView<const T> in(const std::vector<T>& v, nk::Dims shape) {
  return nk::TensorView<const T>(v.data(), shape);
}
template <class T>
nk::TensorView<T> out(std::vector<T>& v, nk::Dims shape) {
  return nk::TensorView<T>(v.data(), shape);
}
// A quantized output over a byte buffer.
nk::TensorRef qout(std::vector<std::uint8_t>& v, Quant q, nk::Dims shape) {
  return nk::TensorRef(v.data(), q == Quant::int8 ? nk::DType::int8 : nk::DType::float8_e4m3, shape,
                       nk::contiguous_strides(shape));
}

template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// The element past a buffer's view still holds the sentinel.
template <class T>
bool same_bits_at_end(const std::vector<T>& v, T sentinel) {
  return std::memcmp(&v.back(), &sentinel, sizeof(T)) == 0;
}

template <class T>
std::vector<double> as_double(const std::vector<T>& v) {
  std::vector<double> d(v.size());
  for (size_t i = 0; i < v.size(); ++i) d[i] = to_double(v[i]);
  return d;
}

nk::Epilogue epilogue(Act a, Quant q = Quant::none, std::optional<double> scale = std::nullopt,
                      nk::TensorRef scales = {}) {
  nk::Epilogue e;
  e.activation = a;
  e.quantize = q;
  e.scale = scale;
  e.scales = scales;
  return e;
}

// Runs f(T{}, W{}) for float/float, double/double, half/half, bf16/bf16.
template <class F>
void for_each_dtype(F&& f) {
  f(float{}, float{});
  f(double{}, double{});
  f(nk::half{}, nk::half{});
  f(nk::bfloat16{}, nk::bfloat16{});
}

// Rows norm on a (rows, cols) view: layer_norm (weight, bias) or rms_norm (weight).
template <class T, class W>
void rows_norm(Norm norm, const std::vector<T>& x, nk::TensorRef y, int64_t rows, int64_t cols,
               const std::vector<W>& w, const std::vector<W>& b, double eps, const nk::Epilogue& e,
               nk::TensorRef mean = {}, nk::TensorRef rstd = {}) {
  const nk::TensorRef wv = w.empty() ? nk::TensorRef() : nk::TensorRef(in(w, {cols}));
  const nk::TensorRef bv = b.empty() ? nk::TensorRef() : nk::TensorRef(in(b, {cols}));
  if (norm == Norm::layer) nk::layer_norm(in(x, {rows, cols}), y, {cols}, wv, bv, eps, mean, rstd, e);
  else nk::rms_norm(in(x, {rows, cols}), y, {cols}, wv, eps, rstd, e);
}

const int64_t kCols[] = {1, 7, 16, 33, 65, 513, 1000, 4097};

// ---------------------------------------------------------------------------
// Activations on the rows norms
// ---------------------------------------------------------------------------

TEST_P(Fused, ActivationsOnRowsNormsMatchReference) {
  for_each_dtype([&](auto t, auto) {
    using T = decltype(t);
    for (int64_t cols : kCols) {
      const int64_t rows = 3;
      const Data<T> x = random_rows<T>(rows, cols, rng_);
      const Data<T> w = random_data<T>(cols, rng_, 0.0, 1.5), b = random_data<T>(cols, rng_, 0.0, 0.5);
      for (Norm norm : {Norm::layer, Norm::rms}) {
        const std::vector<double> bd = norm == Norm::layer ? b.d : std::vector<double>();
        const std::vector<T> bt = norm == Norm::layer ? b.t : std::vector<T>();
        const Reference ref = reference_norm(norm, x.d, rows, cols, w.d, bd, 1e-5);
        for (Act a : kActivations) {
          SCOPED_TRACE(std::string(norm_name(norm)) + " " + type_name<T>() + " cols " + std::to_string(cols) + " " +
                       act_name(a));
          std::vector<T> y(rows * cols, from_double<T>(-777.0));
          ASSERT_NO_THROW(rows_norm(norm, x.t, out(y, {rows, cols}), rows, cols, w.t, bt, 1e-5, epilogue(a)));
          EXPECT_TRUE(all_close("y", rows * cols, [&](int64_t k) { return to_double(y[k]); }, apply_act(ref.y, a),
                                output_tol<T>()));
        }
      }
    }
  });
}

// relu keeps NaN; every activation keeps a NaN row NaN and the other rows clean.
TEST_P(Fused, ActivationsKeepNanInItsRow) {
  const int64_t rows = 3, cols = 37;
  Data<float> x = random_rows<float>(rows, cols, rng_);
  x.t[cols + 5] = std::numeric_limits<float>::quiet_NaN();
  for (Act a : kActivations) {
    std::vector<float> y(rows * cols);
    nk::rms_norm(in(x.t, {rows, cols}), out(y, {rows, cols}), {cols}, {}, 1e-5, {}, epilogue(a));
    for (int64_t k = 0; k < rows * cols; ++k)
      EXPECT_EQ(std::isnan(y[k]), k / cols == 1) << act_name(a) << " at " << k;
  }
}

// ---------------------------------------------------------------------------
// Activations on the channel norms: BatchNorm (training and eval), GroupNorm,
// InstanceNorm, AdaIN, channels-first and channels-last.
// ---------------------------------------------------------------------------

struct Shape4 {
  int64_t n, c, h, w;
};
const Shape4 kShapes[] = {{2, 3, 4, 5}, {3, 17, 7, 1}, {2, 8, 9, 11}, {1, 32, 5, 5}};

nk::Dims shape_of(const Shape4& k, bool last) {
  return last ? nk::Dims{k.n, k.h, k.w, k.c} : nk::Dims{k.n, k.c, k.h, k.w};
}
nk::Layout layout_of(bool last) { return last ? nk::Layout::NHWC : nk::Layout::NCHW; }
const char* layout_name(bool last) { return last ? "NHWC" : "NCHW"; }

// Channel-norm data: x channels-first (n, c, s), per-channel weight and bias.
template <class T>
struct ChannelData {
  int64_t n, c, s;
  Data<T> x, w, b;
  ChannelData(const Shape4& k, std::mt19937& rng) : n(k.n), c(k.c), s(k.h * k.w) {
    x = random_data<T>(n * c * s, rng, 0.5, 2.0);
    w = random_data<T>(c, rng, 1.0, 0.5);
    b = random_data<T>(c, rng, 0.0, 0.5);
  }
  std::vector<T> x_in(bool last) const { return last ? to_last(x.t, n, c, s) : x.t; }
  std::vector<double> back(const std::vector<T>& y, bool last) const {
    return as_double(last ? to_first(y, n, c, s) : y);
  }
};

// Running statistics for eval BatchNorm (channel-norm cases) and the float64
// reference output of an eval BatchNorm with them (eps 1e-5).
template <class T>
struct EvalStats {
  std::vector<T> rm, rv;
  std::vector<double> ref;
};

template <class T>
EvalStats<T> eval_stats(const ChannelData<T>& d) {
  EvalStats<T> e;
  e.rm.resize(d.c);
  e.rv.resize(d.c);
  for (int64_t ci = 0; ci < d.c; ++ci) {
    e.rm[ci] = from_double<T>(0.1 * ci - 0.5);
    e.rv[ci] = from_double<T>(0.5 + 0.25 * ci);
  }
  e.ref.resize(d.x.d.size());
  for (size_t i = 0; i < e.ref.size(); ++i) {
    const int64_t ci = (static_cast<int64_t>(i) / d.s) % d.c;
    e.ref[i] = (d.x.d[i] - to_double(e.rm[ci])) / std::sqrt(to_double(e.rv[ci]) + 1e-5) * d.w.d[ci] + d.b.d[ci];
  }
  return e;
}

template <class T>
void check_channel_activations(std::mt19937& rng) {
  const Tol tol = output_tol<T>();
  for (const Shape4& k : kShapes) {
    const ChannelData<T> d(k, rng);
    std::vector<double> ones(d.c, 1.0), zeros(d.c, 0.0);
    EvalStats<T> ev = eval_stats(d);
    std::vector<T>& rm = ev.rm;  // eval: read only, passed as the running statistics
    std::vector<T>& rv = ev.rv;
    const std::vector<double>& eval_ref = ev.ref;
    const Ref bn_ref = reference(d.x.d, d.n, d.c, d.s, d.c, false, d.w.d, d.b.d, 1e-5);
    const int64_t groups = d.c % 4 == 0 ? 4 : 1;
    const Ref gn_ref = reference(d.x.d, d.n, d.c, d.s, groups, true, d.w.d, d.b.d, 1e-5);
    const Ref in_ref = reference(d.x.d, d.n, d.c, d.s, d.c, true, d.w.d, d.b.d, 1e-5);
    // AdaIN from given statistics: y = xhat * style_std + style_mean per (n, c).
    std::vector<T> smean(d.n * d.c), sstd(d.n * d.c);
    for (size_t i = 0; i < smean.size(); ++i) {
      smean[i] = from_double<T>(0.3 * static_cast<double>(i % 11) - 1.5);
      sstd[i] = from_double<T>(0.5 + 0.1 * static_cast<double>(i % 7));
    }
    const Ref unit_ref = reference(d.x.d, d.n, d.c, d.s, d.c, true, ones, zeros, 1e-5);
    std::vector<double> adain_ref(unit_ref.y.size());
    for (size_t i = 0; i < adain_ref.size(); ++i)
      adain_ref[i] = unit_ref.y[i] * to_double(sstd[i / d.s]) + to_double(smean[i / d.s]);

    for (const bool last : {false, true}) {
      const nk::Dims shape = shape_of(k, last);
      const std::vector<T> xin = d.x_in(last);
      const auto xv = in(xin, shape);
      const auto wv = in(d.w.t, {d.c}), bv = in(d.b.t, {d.c});
      for (Act a : kActivations) {
        SCOPED_TRACE(std::string(type_name<T>()) + " " + layout_name(last) + " " + act_name(a) + " shape " +
                     shape.to_string());
        const nk::Epilogue e = epilogue(a);
        std::vector<T> y(xin.size());
        {  // BatchNorm training (running statistics updated as without the activation)
          std::vector<T> rm2 = rm, rv2 = rv, rm_plain = rm, rv_plain = rv, y_plain(xin.size());
          ASSERT_NO_THROW(nk::batch_norm(xv, out(y, shape), out(rm2, {d.c}), out(rv2, {d.c}), wv, bv, true, 0.1,
                                         1e-5, layout_of(last), {}, {}, e));
          EXPECT_TRUE(all_close("batch_norm training y", static_cast<int64_t>(y.size()),
                                [&, yb = d.back(y, last)](int64_t i) { return yb[i]; }, apply_act(bn_ref.y, a), tol));
          nk::batch_norm(xv, out(y_plain, shape), out(rm_plain, {d.c}), out(rv_plain, {d.c}), wv, bv, true, 0.1,
                         1e-5, layout_of(last));
          EXPECT_TRUE(same_bytes(rm2, rm_plain) && same_bytes(rv2, rv_plain)) << "running statistics differ";
        }
        {  // BatchNorm eval
          std::vector<T> rm2 = rm, rv2 = rv;
          ASSERT_NO_THROW(nk::batch_norm(xv, out(y, shape), out(rm2, {d.c}), out(rv2, {d.c}), wv, bv, false, 0.1,
                                         1e-5, layout_of(last), {}, {}, e));
          EXPECT_TRUE(all_close("batch_norm eval y", static_cast<int64_t>(y.size()),
                                [&, yb = d.back(y, last)](int64_t i) { return yb[i]; }, apply_act(eval_ref, a), tol));
          EXPECT_TRUE(same_bytes(rm2, rm) && same_bytes(rv2, rv)) << "eval changed the running statistics";
        }
        ASSERT_NO_THROW(nk::group_norm(xv, out(y, shape), groups, wv, bv, 1e-5, layout_of(last), {}, {}, e));
        EXPECT_TRUE(all_close("group_norm y", static_cast<int64_t>(y.size()),
                              [&, yb = d.back(y, last)](int64_t i) { return yb[i]; }, apply_act(gn_ref.y, a), tol));
        if (d.s > 1) {
          ASSERT_NO_THROW(
              nk::instance_norm(xv, out(y, shape), {}, {}, wv, bv, true, 0.1, 1e-5, layout_of(last), {}, {}, e));
          EXPECT_TRUE(all_close("instance_norm y", static_cast<int64_t>(y.size()),
                                [&, yb = d.back(y, last)](int64_t i) { return yb[i]; }, apply_act(in_ref.y, a), tol));
        }
        ASSERT_NO_THROW(nk::adaptive_instance_norm(xv, out(y, shape), in(smean, {d.n, d.c}), in(sstd, {d.n, d.c}),
                                                   1e-5, layout_of(last), e));
        EXPECT_TRUE(all_close("adaptive_instance_norm y", static_cast<int64_t>(y.size()),
                              [&, yb = d.back(y, last)](int64_t i) { return yb[i]; }, apply_act(adain_ref, a), tol));
      }
    }
  }
}

TEST_P(Fused, ActivationsOnChannelNormsMatchReference) {
  check_channel_activations<float>(rng_);
  check_channel_activations<double>(rng_);
  check_channel_activations<nk::half>(rng_);
  check_channel_activations<nk::bfloat16>(rng_);
}

// AdaIN from a style feature map, with an activation.
TEST_P(Fused, AdaptiveInstanceNormFromStyleWithActivation) {
  const Shape4 k{2, 5, 6, 7};
  const ChannelData<float> d(k, rng_);
  const int64_t ss = 3 * 4;
  const Data<float> style = random_data<float>(k.n * k.c * ss, rng_, -1.0, 3.0);
  std::vector<double> ones(k.c, 1.0), zeros(k.c, 0.0);
  const Ref xr = reference(d.x.d, d.n, d.c, d.s, d.c, true, ones, zeros, 1e-5);
  const Ref sr = reference(style.d, d.n, d.c, ss, d.c, true, ones, zeros, 1e-5);
  std::vector<double> want(xr.y.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const size_t nc = i / d.s;
    want[i] = xr.y[i] * std::sqrt(sr.var[nc] + 1e-5) + sr.mean[nc];
  }
  for (const bool last : {false, true}) {
    const std::vector<float> xin = d.x_in(last);
    const std::vector<float> sin = last ? to_last(style.t, k.n, k.c, ss) : style.t;
    const nk::Dims sshape = last ? nk::Dims{k.n, 3, 4, k.c} : nk::Dims{k.n, k.c, 3, 4};
    for (Act a : kActivations) {
      std::vector<float> y(xin.size());
      ASSERT_NO_THROW(nk::adaptive_instance_norm(in(xin, shape_of(k, last)), out(y, shape_of(k, last)),
                                                 in(sin, sshape), 1e-5, layout_of(last), epilogue(a)));
      const std::vector<double> yb = d.back(y, last);
      EXPECT_TRUE(all_close("adain y", static_cast<int64_t>(y.size()), [&](int64_t i) { return yb[i]; },
                            apply_act(want, a), output_tol<float>()))
          << layout_name(last) << " " << act_name(a);
    }
  }
}

// ---------------------------------------------------------------------------
// Quantized outputs of the rows norms
// ---------------------------------------------------------------------------

// Quantization tolerance: the kernel quantizes float32 (float64) values.
template <class T> Tol quant_tol() { return std::is_same_v<T, double> ? Tol{1e-12, 1e-12} : Tol{3e-5, 3e-5}; }

// One quantized rows-norm call against the reference; for float32 / float64
// also bit for bit against quantizing the same call's unquantized output.
template <class T>
void check_rows_quantized(Norm norm, int64_t rows, int64_t cols, Act a, Quant q, std::optional<double> scale,
                          std::mt19937& rng) {
  using A = nk::acc_t<T>;
  SCOPED_TRACE(std::string(norm_name(norm)) + " " + type_name<T>() + " cols " + std::to_string(cols) + " " +
               act_name(a) + " " + quant_name(q) + (scale ? " static " + std::to_string(*scale) : " dynamic"));
  const Data<T> x = random_rows<T>(rows, cols, rng);
  const Data<T> w = random_data<T>(cols, rng, 0.0, 1.5), b = random_data<T>(cols, rng, 0.0, 0.5);
  const std::vector<double> bd = norm == Norm::layer ? b.d : std::vector<double>();
  const std::vector<T> bt = norm == Norm::layer ? b.t : std::vector<T>();
  const std::vector<double> want = apply_act(reference_norm(norm, x.d, rows, cols, w.d, bd, 1e-5).y, a);

  std::vector<std::uint8_t> qy(rows * cols + 1, 0x5a);  // one sentinel byte past the end
  std::vector<float> scales(rows + 1, -1.0f);
  const nk::TensorRef scales_v = scale ? nk::TensorRef() : nk::TensorRef(out(scales, {rows}));
  ASSERT_NO_THROW(rows_norm(norm, x.t, qout(qy, q, {rows, cols}), rows, cols, w.t, bt, 1e-5,
                            epilogue(a, q, scale, scales_v)));
  EXPECT_EQ(qy[rows * cols], 0x5a) << "written past y";
  EXPECT_EQ(scales[rows], -1.0f) << "written past scales";

  std::vector<double> elem_scale(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    double s;
    if (scale) {
      s = static_cast<double>(static_cast<A>(*scale));
    } else {
      double amax = 0;
      for (int64_t j = 0; j < cols; ++j) amax = std::max(amax, std::fabs(want[r * cols + j]));
      const double want_scale = amax > 0 ? amax / qmax(q) : 1.0;
      EXPECT_NEAR(scales[r], want_scale, 1e-4 * want_scale) << "scale of row " << r;
      s = scales[r];
    }
    for (int64_t j = 0; j < cols; ++j) elem_scale[r * cols + j] = s;
  }
  const std::vector<std::uint8_t> qv(qy.begin(), qy.end() - 1);
  EXPECT_TRUE(quantized_close(qv, want, elem_scale, q, quant_tol<T>()));

  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    // The same call unquantized gives the values the quantizer saw.
    std::vector<T> y(rows * cols);
    rows_norm(norm, x.t, out(y, {rows, cols}), rows, cols, w.t, bt, 1e-5, epilogue(a));
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; ++r) {
      A s;
      if (scale) {
        s = static_cast<A>(*scale);
      } else {
        A amax = 0;
        for (int64_t j = 0; j < cols; ++j)
          if (std::isfinite(y[r * cols + j])) amax = std::max(amax, std::fabs(y[r * cols + j]));
        const float expected = amax > 0 ? static_cast<float>(amax / static_cast<A>(qmax(q))) : 1.0f;
        EXPECT_EQ(scales[r], expected) << "row " << r << ": scale is not max|y| / qmax of the unquantized y";
        s = static_cast<A>(scales[r]);
      }
      for (int64_t j = 0; j < cols; ++j) {
        const std::uint8_t expected = quantize_bits<A>(y[r * cols + j], s, q);
        if (qy[r * cols + j] != expected && bad++ < 5)
          ADD_FAILURE() << "q[" << r << ", " << j << "] = 0x" << std::hex << int(qy[r * cols + j]) << ", want 0x"
                        << int(expected) << std::dec << " (y " << y[r * cols + j] << " / scale " << s << ")";
      }
    }
    EXPECT_EQ(bad, 0) << "quantized values differ from the unquantized output quantized";
  }
}

TEST_P(Fused, StaticQuantizationOfRowsNorms) {
  for_each_dtype([&](auto t, auto) {
    using T = decltype(t);
    for (int64_t cols : {1, 7, 16, 33, 513, 1000, 4097})
      for (Norm norm : {Norm::layer, Norm::rms})
        for (Quant q : {Quant::int8, Quant::float8_e4m3}) {
          // int8: a scale that saturates the tails; float8: one that spreads
          // the values over the subnormals, the normals and saturation.
          const double scale = q == Quant::int8 ? 0.021 : 0.0075;
          check_rows_quantized<T>(norm, 3, cols, Act::none, q, scale, rng_);
          check_rows_quantized<T>(norm, 2, cols, cols % 2 ? Act::gelu : Act::silu, q, scale, rng_);
        }
  });
}

TEST_P(Fused, DynamicQuantizationOfRowsNorms) {
  for_each_dtype([&](auto t, auto) {
    using T = decltype(t);
    for (int64_t cols : {1, 7, 16, 33, 513, 1000, 4097})
      for (Norm norm : {Norm::layer, Norm::rms})
        for (Quant q : {Quant::int8, Quant::float8_e4m3}) {
          check_rows_quantized<T>(norm, 4, cols, Act::none, q, std::nullopt, rng_);
          check_rows_quantized<T>(norm, 3, cols, cols % 2 ? Act::relu : Act::gelu_tanh, q, std::nullopt, rng_);
        }
  });
}

// Exact values: rows of +-1 with eps = 0 have rstd = 1 exactly, so
// rms_norm's y is +-weight exactly and the weight picks what is quantized.
// Ties at .5 go to the even neighbour; large and infinite values saturate.
template <class T, class W>
void check_exact_quantization(Quant q) {
  SCOPED_TRACE(std::string(type_name<T>()) + " weights " + type_name<W>() + " " + quant_name(q));
  // int8 ties, e4m3 ties (1.0625 between 1 and 1.125 -> 1; 1.1875 -> 1.25;
  // 15 * 2^-10 between the subnormal 7 * 2^-9 and 2^-6 -> 2^-6), saturation.
  const std::vector<double> wq = {0.5,   1.5,    2.5,  -0.5,  -1.5,  -2.5,  3.5,    126.5, -126.5, 125.5, 127.5,
                                  300,   -300,   0.25, 1.0625, 1.1875, -1.0625, 15.0 / 1024, 3.0 / 1024, 1.0 / 1024,
                                  448,   464,    -464, 1e4,    0};
  const int64_t cols = static_cast<int64_t>(wq.size()), rows = 3;
  std::vector<W> w(cols);
  for (int64_t j = 0; j < cols; ++j) w[j] = from_double<W>(wq[j]);
  for (int64_t j = 0; j < cols; ++j) ASSERT_EQ(to_double(w[j]), wq[j]) << "weight not exact in " << type_name<W>();
  std::vector<T> x(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) x[i] = from_double<T>((i * 7) % 3 == 1 ? -1.0 : 1.0);
  std::vector<double> want(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) want[i] = to_double(x[i]) * wq[i % cols];

  // Static scale 1: y itself is rounded.
  std::vector<std::uint8_t> qy(rows * cols);
  const std::vector<W> nob;
  ASSERT_NO_THROW(rows_norm(Norm::rms, x, qout(qy, q, {rows, cols}), rows, cols, w, nob, 0.0,
                            epilogue(Act::none, q, 1.0)));
  for (int64_t i = 0; i < rows * cols; ++i) {
    const std::uint8_t expected =
        q == Quant::int8 ? static_cast<std::uint8_t>(static_cast<std::int8_t>(ref_int8(want[i]))) : ref_e4m3(want[i]);
    EXPECT_EQ(qy[i], expected) << "static scale 1: y " << want[i] << " at " << i;
  }
  // Static scale 2 (y / 2 halves the ties: 2.5 / 2 = 1.25 rounds to 1 in int8).
  ASSERT_NO_THROW(rows_norm(Norm::rms, x, qout(qy, q, {rows, cols}), rows, cols, w, nob, 0.0,
                            epilogue(Act::none, q, 2.0)));
  for (int64_t i = 0; i < rows * cols; ++i) {
    const std::uint8_t expected = q == Quant::int8 ? static_cast<std::uint8_t>(static_cast<std::int8_t>(ref_int8(want[i] / 2)))
                                                   : ref_e4m3(want[i] / 2);
    EXPECT_EQ(qy[i], expected) << "static scale 2: y " << want[i] << " at " << i;
  }
  // Dynamic: a row whose largest |y| is qmax has scale 1, so the same ties.
  std::vector<double> wd(wq.begin(), wq.end());
  for (double& v : wd) v = std::max(-qmax(q), std::min(qmax(q), v));  // largest |w| = qmax
  std::vector<W> w2(cols);
  for (int64_t j = 0; j < cols; ++j) w2[j] = from_double<W>(wd[j]);
  std::vector<float> scales(rows, -1.0f);
  ASSERT_NO_THROW(rows_norm(Norm::rms, x, qout(qy, q, {rows, cols}), rows, cols, w2, nob, 0.0,
                            epilogue(Act::none, q, std::nullopt, out(scales, {rows}))));
  for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(scales[r], 1.0f) << "row " << r;
  for (int64_t i = 0; i < rows * cols; ++i) {
    const double v = to_double(x[i]) * wd[i % cols];
    const std::uint8_t expected =
        q == Quant::int8 ? static_cast<std::uint8_t>(static_cast<std::int8_t>(ref_int8(v))) : ref_e4m3(v);
    EXPECT_EQ(qy[i], expected) << "dynamic: y " << v << " at " << i;
  }
}

TEST_P(Fused, QuantizationTiesRoundToEvenAndSaturate) {
  for (Quant q : {Quant::int8, Quant::float8_e4m3}) {
    check_exact_quantization<float, float>(q);
    check_exact_quantization<double, double>(q);
    check_exact_quantization<nk::half, float>(q);
    check_exact_quantization<nk::bfloat16, float>(q);
  }
  // A few outcomes spelled out, int8 static scale 1 on float32.
  const std::vector<float> w = {0.5f, 1.5f, 2.5f, -2.5f, 126.5f, 127.5f, 1000.f, -1000.f};
  const std::vector<float> x(8, 1.0f);
  std::vector<std::uint8_t> qy(8);
  nk::rms_norm(in(x, {1, 8}), qout(qy, Quant::int8, {1, 8}), {8}, in(w, {8}), 0.0, {},
               epilogue(Act::none, Quant::int8, 1.0));
  const std::int8_t want[] = {0, 2, 2, -2, 126, 127, 127, -127};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(static_cast<std::int8_t>(qy[i]), want[i]) << "w " << w[i];
}

// Infinite values saturate; a NaN row quantizes to 0 (int8) / NaN (float8),
// gets a dynamic scale of 1 (its max over finite values is 0), and leaves the
// other rows alone; a row of zeros gets scale 1 and zeros.
TEST_P(Fused, QuantizationOfInfNanAndZeroRows) {
  const int64_t rows = 3, cols = 21;
  for (Quant q : {Quant::int8, Quant::float8_e4m3}) {
    SCOPED_TRACE(quant_name(q));
    // y = x * weight with rstd 1: weight inf at column 3.
    std::vector<float> w(cols, 1.0f);
    w[3] = std::numeric_limits<float>::infinity();
    w[4] = -std::numeric_limits<float>::infinity();
    std::vector<float> x(rows * cols, 1.0f);
    std::vector<std::uint8_t> qy(rows * cols);
    nk::rms_norm(in(x, {rows, cols}), qout(qy, q, {rows, cols}), {cols}, in(w, {cols}), 0.0, {},
                 epilogue(Act::none, q, 0.5));
    for (int64_t r = 0; r < rows; ++r) {
      EXPECT_EQ(stored_quantized(qy, r * cols + 3, q), qmax(q));
      EXPECT_EQ(stored_quantized(qy, r * cols + 4, q), -qmax(q));
      EXPECT_EQ(stored_quantized(qy, r * cols + 5, q), 2.0);
    }
    // Dynamic with inf in a row: the scale comes from the finite values.
    std::vector<float> scales(rows, -1.0f);
    for (float& v : w) v = 2.0f;
    w[3] = std::numeric_limits<float>::infinity();
    nk::rms_norm(in(x, {rows, cols}), qout(qy, q, {rows, cols}), {cols}, in(w, {cols}), 0.0, {},
                 epilogue(Act::none, q, std::nullopt, out(scales, {rows})));
    for (int64_t r = 0; r < rows; ++r) {
      EXPECT_EQ(scales[r], static_cast<float>(2.0f / static_cast<float>(qmax(q)))) << "row " << r;
      EXPECT_EQ(stored_quantized(qy, r * cols + 3, q), qmax(q));
      EXPECT_EQ(stored_quantized(qy, r * cols + 0, q), qmax(q));
    }

    // A NaN in row 1, zeros in row 2.
    Data<float> xr = random_rows<float>(rows, cols, rng_);
    xr.t[cols + 7] = std::numeric_limits<float>::quiet_NaN();
    for (int64_t j = 0; j < cols; ++j) xr.t[2 * cols + j] = 0.0f;
    for (Norm norm : {Norm::layer, Norm::rms}) {
      std::fill(scales.begin(), scales.end(), -1.0f);
      const std::vector<float> none;
      rows_norm(norm, xr.t, qout(qy, q, {rows, cols}), rows, cols, none, none, 1e-5,
                epilogue(Act::none, q, std::nullopt, out(scales, {rows})));
      EXPECT_GT(scales[0], 0.0f);
      EXPECT_NE(scales[0], 1.0f);
      EXPECT_EQ(scales[1], 1.0f) << norm_name(norm) << ": NaN row";
      EXPECT_EQ(scales[2], 1.0f) << norm_name(norm) << ": zero row";
      double amax0 = 0;
      for (int64_t j = 0; j < cols; ++j) {
        const double g0 = stored_quantized(qy, j, q), g1 = stored_quantized(qy, cols + j, q),
                     g2 = stored_quantized(qy, 2 * cols + j, q);
        amax0 = std::max(amax0, std::fabs(g0));
        EXPECT_FALSE(std::isnan(g0));
        if (q == Quant::int8) {
          EXPECT_EQ(g1, 0.0) << norm_name(norm) << " col " << j;
        } else {
          EXPECT_TRUE(std::isnan(g1)) << norm_name(norm) << " col " << j;
        }
        EXPECT_EQ(g2, 0.0);
      }
      EXPECT_EQ(amax0, qmax(q)) << norm_name(norm) << ": the largest |q| of a dynamic row is qmax";
    }
  }
}

// A row the activation zeroes (relu of a row of negative values) has a
// dynamic scale of 1; a problem with no columns gives every row scale 1.
TEST_P(Fused, DynamicScaleEdgeRows) {
  const int64_t rows = 2, cols = 19;
  std::vector<float> x(rows * cols), w(cols, 1.0f), b(cols, -10.0f);
  for (int64_t i = 0; i < rows * cols; ++i) x[i] = static_cast<float>(i % 5);
  for (Quant q : {Quant::int8, Quant::float8_e4m3}) {
    std::vector<std::uint8_t> qy(rows * cols, 0x5a);
    std::vector<float> scales(rows, -1.0f);
    nk::layer_norm(in(x, {rows, cols}), qout(qy, q, {rows, cols}), {cols}, in(w, {cols}), in(b, {cols}), 1e-5, {}, {},
                   epilogue(Act::relu, q, std::nullopt, out(scales, {rows})));
    for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(scales[r], 1.0f) << quant_name(q);
    for (std::uint8_t v : qy) EXPECT_EQ(v, 0) << quant_name(q);
    std::vector<float> x0;
    std::vector<std::uint8_t> q0(1, 0x5a);
    std::fill(scales.begin(), scales.end(), -1.0f);
    nk::rms_norm(nk::TensorView<const float>(x0.data(), {rows, 0}), qout(q0, q, {rows, 0}), {0}, {}, 1e-5, {},
                 epilogue(Act::none, q, std::nullopt, out(scales, {rows})));
    for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(scales[r], 1.0f) << quant_name(q) << " no columns";
    EXPECT_EQ(q0[0], 0x5a);
  }
}

// ---------------------------------------------------------------------------
// Quantized outputs of BatchNorm and GroupNorm (static scale)
// ---------------------------------------------------------------------------

// BatchNorm eval with running_mean 0, running_var 1, eps 0 and no affine is
// y = x * 1 + 0, x exactly (but for -0): the ties and saturation of the channel kernels' store.
TEST_P(Fused, ChannelNormQuantizationTiesRoundToEven) {
  const std::vector<float> v = {0.5f, 1.5f, 2.5f, -0.5f, -2.5f, 126.5f, 125.5f, 127.5f, 200.f, -1e9f,
                                1.0625f, 1.1875f, 15.0f / 1024, 3.0f / 1024, 1.0f / 1024, 464.f, -464.f,
                                std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                                0.f, -3.5f};
  const int64_t c = 3, n = 2, s = static_cast<int64_t>(v.size());
  std::vector<float> x(n * c * s);
  for (size_t i = 0; i < x.size(); ++i) x[i] = v[i % v.size()] * ((i / v.size()) % 2 ? -1.0f : 1.0f);
  std::vector<float> rm(c, 0.0f), rv(c, 1.0f);
  for (Quant q : {Quant::int8, Quant::float8_e4m3})
    for (const bool last : {false, true}) {
      const nk::Dims shape = last ? nk::Dims{n, s, c} : nk::Dims{n, c, s};
      const nk::Layout layout = last ? nk::Layout::NLC : nk::Layout::NCL;
      const std::vector<float> xin = last ? to_last(x, n, c, s) : x;
      std::vector<std::uint8_t> qy(x.size());
      ASSERT_NO_THROW(nk::batch_norm(in(xin, shape), qout(qy, q, shape), out(rm, {c}), out(rv, {c}), {}, {}, false,
                                     0.1, 0.0, layout, {}, {}, epilogue(Act::none, q, 1.0)));
      const std::vector<std::uint8_t> qf = last ? to_first(qy, n, c, s) : qy;
      for (size_t i = 0; i < x.size(); ++i) {
        const float v = x[i] + 0.0f;  // y = x * 1 + 0: -0 comes out +0
        const std::uint8_t expected =
            q == Quant::int8 ? static_cast<std::uint8_t>(static_cast<std::int8_t>(ref_int8(v))) : ref_e4m3(v);
        EXPECT_EQ(qf[i], expected) << quant_name(q) << " " << (last ? "NLC" : "NCL") << " x " << x[i];
      }
    }
}

template <class T>
void check_channel_quantized(std::mt19937& rng) {
  for (const Shape4& k : kShapes) {
    const ChannelData<T> d(k, rng);
    EvalStats<T> ev = eval_stats(d);
    std::vector<T>& rm = ev.rm;  // eval: read only, passed as the running statistics
    std::vector<T>& rv = ev.rv;
    const std::vector<double>& eval_ref = ev.ref;
    const Ref bn_ref = reference(d.x.d, d.n, d.c, d.s, d.c, false, d.w.d, d.b.d, 1e-5);
    const int64_t groups = d.c % 4 == 0 ? 4 : 1;
    const Ref gn_ref = reference(d.x.d, d.n, d.c, d.s, groups, true, d.w.d, d.b.d, 1e-5);
    for (const bool last : {false, true})
      for (Quant q : {Quant::int8, Quant::float8_e4m3})
        for (Act a : {Act::none, Act::relu, Act::silu}) {
          SCOPED_TRACE(std::string(type_name<T>()) + " " + layout_name(last) + " " + quant_name(q) + " " +
                       act_name(a) + " shape " + shape_of(k, last).to_string());
          const double scale = q == Quant::int8 ? 0.023 : 0.0061;
          const nk::Dims shape = shape_of(k, last);
          const std::vector<T> xin = d.x_in(last);
          const nk::Epilogue e = epilogue(a, q, scale);
          const std::vector<double> es(xin.size(), static_cast<double>(static_cast<nk::acc_t<T>>(scale)));
          std::vector<std::uint8_t> qy(xin.size());
          auto back = [&] { return last ? to_first(qy, d.n, d.c, d.s) : qy; };
          std::vector<T> rm2 = rm, rv2 = rv;
          ASSERT_NO_THROW(nk::batch_norm(in(xin, shape), qout(qy, q, shape), out(rm2, {d.c}), out(rv2, {d.c}),
                                         in(d.w.t, {d.c}), in(d.b.t, {d.c}), true, 0.1, 1e-5, layout_of(last), {},
                                         {}, e));
          EXPECT_TRUE(quantized_close(back(), apply_act(bn_ref.y, a), es, q, quant_tol<T>())) << "batch_norm training";
          ASSERT_NO_THROW(nk::batch_norm(in(xin, shape), qout(qy, q, shape), out(rm, {d.c}), out(rv, {d.c}),
                                         in(d.w.t, {d.c}), in(d.b.t, {d.c}), false, 0.1, 1e-5, layout_of(last), {},
                                         {}, e));
          EXPECT_TRUE(quantized_close(back(), apply_act(eval_ref, a), es, q, quant_tol<T>())) << "batch_norm eval";
          ASSERT_NO_THROW(nk::group_norm(in(xin, shape), qout(qy, q, shape), groups, in(d.w.t, {d.c}),
                                         in(d.b.t, {d.c}), 1e-5, layout_of(last), {}, {}, e));
          EXPECT_TRUE(quantized_close(back(), apply_act(gn_ref.y, a), es, q, quant_tol<T>())) << "group_norm";
        }
  }
}

TEST_P(Fused, StaticQuantizationOfBatchAndGroupNorm) {
  check_channel_quantized<float>(rng_);
  check_channel_quantized<double>(rng_);
  check_channel_quantized<nk::half>(rng_);
  check_channel_quantized<nk::bfloat16>(rng_);
}

// ---------------------------------------------------------------------------
// add_layer_norm / add_rms_norm
// ---------------------------------------------------------------------------

// Runs add_layer_norm (weight, bias) or add_rms_norm (weight) on explicit views.
void add_norm(Norm norm, nk::TensorRef x, nk::TensorRef residual, nk::TensorRef y, nk::TensorRef sum,
              const nk::Dims& normalized_shape, nk::TensorRef w, nk::TensorRef b, double eps, nk::TensorRef rb,
              const nk::Epilogue& e, nk::TensorRef mean, nk::TensorRef rstd) {
  if (norm == Norm::layer) nk::add_layer_norm(x, residual, y, sum, normalized_shape, w, b, eps, rb, e, mean, rstd);
  else nk::add_rms_norm(x, residual, y, sum, normalized_shape, w, eps, rb, e, rstd);
}

enum class Bcast { full, trailing, leading_one };
const char* bcast_name(Bcast b) {
  return b == Bcast::full ? "residual (B,S,H)" : (b == Bcast::trailing ? "residual (S,H)" : "residual (1,S,H)");
}

// x (B, S, H), residual broadcast as asked; checks s against x + residual
// (+ bias) in double, y and the statistics against the reference on s as
// stored, and y, the statistics and s bit for bit against layer_norm /
// rms_norm on that s.
template <class T>
void check_add(Norm norm, int64_t B, int64_t S, int64_t H, Bcast bc, bool with_rbias, std::mt19937& rng) {
  using St = stats_t<T>;
  SCOPED_TRACE(std::string("add_") + norm_name(norm) + " " + type_name<T>() + " x (" + std::to_string(B) + ", " +
               std::to_string(S) + ", " + std::to_string(H) + ") " + bcast_name(bc) +
               (with_rbias ? " residual_bias" : ""));
  const int64_t rows = B * S, n = rows * H;
  const int64_t res_rows = bc == Bcast::full ? rows : S;
  const nk::Dims xs{B, S, H};
  const nk::Dims rs = bc == Bcast::full ? xs : (bc == Bcast::trailing ? nk::Dims{S, H} : nk::Dims{1, S, H});
  const Data<T> x = random_rows<T>(rows, H, rng);
  const Data<T> res = random_data<T>(res_rows * H, rng, 0.25, 1.5);
  const Data<T> w = random_data<T>(H, rng, 1.0, 0.5), b = random_data<T>(H, rng, 0.0, 0.5);
  const Data<T> rb = random_data<T>(with_rbias ? H : 0, rng, 0.0, 0.5);
  const nk::TensorRef wv = in(w.t, {H});
  const nk::TensorRef bv = norm == Norm::layer ? nk::TensorRef(in(b.t, {H})) : nk::TensorRef();
  const nk::TensorRef rbv = with_rbias ? nk::TensorRef(in(rb.t, {H})) : nk::TensorRef();
  const std::vector<double> bd = norm == Norm::layer ? b.d : std::vector<double>();

  const T sentinel = from_double<T>(-777.0);
  std::vector<T> y(n + 1, sentinel), sum(n + 1, sentinel);
  std::vector<St> mean(rows, St(-1)), rstd(rows, St(-1));
  const std::vector<T> x_before = x.t, res_before = res.t;
  ASSERT_NO_THROW(add_norm(norm, in(x.t, xs), in(res.t, rs), out(y, xs), out(sum, xs), {H}, wv, bv, 1e-5, rbv, {},
                           norm == Norm::layer ? nk::TensorRef(out(mean, {rows})) : nk::TensorRef(),
                           out(rstd, {rows})));
  EXPECT_TRUE(same_bytes(x.t, x_before) && same_bytes(res.t, res_before)) << "inputs changed";
  EXPECT_TRUE(same_bits_at_end(y, sentinel) && same_bits_at_end(sum, sentinel)) << "written past the end";

  // s in x's dtype: within rounding of the exact sum.
  std::vector<double> s_want(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = i / H, j = i % H;
    s_want[i] = x.d[i] + res.d[(r % res_rows) * H + j] + (with_rbias ? rb.d[j] : 0.0);
  }
  EXPECT_TRUE(all_close("sum", n, [&](int64_t i) { return to_double(sum[i]); }, s_want, output_tol<T>()));
  // y: the norm of s as stored.
  std::vector<double> s_stored(n);
  for (int64_t i = 0; i < n; ++i) s_stored[i] = to_double(sum[i]);
  const Reference ref = reference_norm(norm, s_stored, rows, H, w.d, bd, 1e-5);
  EXPECT_TRUE(all_close("y", n, [&](int64_t i) { return to_double(y[i]); }, ref.y, output_tol<T>()));
  EXPECT_TRUE(all_close("rstd", rows, [&](int64_t i) { return static_cast<double>(rstd[i]); }, ref.rstd,
                        stats_tol<T>()));
  if (norm == Norm::layer) {
    EXPECT_TRUE(all_close("mean", rows, [&](int64_t i) { return static_cast<double>(mean[i]); }, ref.mean,
                          Tol{5 * stats_tol<T>().atol, stats_tol<T>().rtol}));
  }

  // Fused == unfused, bit for bit.
  const std::vector<T> s_copy(sum.begin(), sum.end() - 1);
  std::vector<T> y2(n);
  std::vector<St> mean2(rows), rstd2(rows);
  if (norm == Norm::layer)
    nk::layer_norm(in(s_copy, xs), out(y2, xs), {H}, wv, bv, 1e-5, out(mean2, {rows}), out(rstd2, {rows}));
  else
    nk::rms_norm(in(s_copy, xs), out(y2, xs), {H}, wv, 1e-5, out(rstd2, {rows}));
  EXPECT_EQ(std::memcmp(y.data(), y2.data(), n * sizeof(T)), 0) << "fused y differs from the norm of the stored sum";
  EXPECT_TRUE(same_bytes(rstd, rstd2)) << "rstd differs from the unfused call";
  if (norm == Norm::layer) {
    EXPECT_TRUE(same_bytes(mean, mean2)) << "mean differs from the unfused call";
  }
}

TEST_P(Fused, AddNormsMatchReferenceAndUnfused) {
  for_each_dtype([&](auto t, auto) {
    using T = decltype(t);
    for (int64_t H : {1, 7, 16, 64, 65, 1000, 4097})
      for (Norm norm : {Norm::layer, Norm::rms})
        for (Bcast bc : {Bcast::full, Bcast::trailing, Bcast::leading_one})
          for (bool rbias : {false, true}) check_add<T>(norm, 2, 3, H, bc, rbias, rng_);
  });
}

// Big enough for streaming stores (and the sum's cache-resident copy).
TEST_P(Fused, AddNormsLargeStreaming) {
  check_add<float>(Norm::rms, 1, 520, 4099, Bcast::full, false, rng_);
  check_add<float>(Norm::layer, 4, 130, 4099, Bcast::trailing, true, rng_);
  check_add<nk::half>(Norm::rms, 1, 1030, 4099, Bcast::full, true, rng_);
  check_add<float>(Norm::layer, 1, 260, 9000, Bcast::full, false, rng_);  // rows past the copy's 32 KiB
}

// 16-bit x with float32 weight, bias and residual_bias.
TEST_P(Fused, AddNormsFloat32ParamsFor16BitX) {
  auto run = [&](auto t) {
    using T = decltype(t);
    const int64_t rows = 5, H = 67;
    const Data<T> x = random_rows<T>(rows, H, rng_), res = random_data<T>(rows * H, rng_, 0.0, 2.0);
    const Data<float> w = random_data<float>(H, rng_, 1.0, 0.5), b = random_data<float>(H, rng_, 0.0, 0.5),
                      rb = random_data<float>(H, rng_, 0.0, 0.5);
    for (Norm norm : {Norm::layer, Norm::rms}) {
      std::vector<T> y(rows * H), sum(rows * H), y2(rows * H);
      const nk::TensorRef bv = norm == Norm::layer ? nk::TensorRef(in(b.t, {H})) : nk::TensorRef();
      ASSERT_NO_THROW(add_norm(norm, in(x.t, {rows, H}), in(res.t, {rows, H}), out(y, {rows, H}),
                               out(sum, {rows, H}), {H}, in(w.t, {H}), bv, 1e-5, in(rb.t, {H}), {}, {}, {}));
      std::vector<double> s_want(rows * H);
      for (int64_t i = 0; i < rows * H; ++i) s_want[i] = x.d[i] + res.d[i] + rb.d[i % H];
      EXPECT_TRUE(all_close("sum", rows * H, [&](int64_t i) { return to_double(sum[i]); }, s_want, output_tol<T>()))
          << norm_name(norm) << " " << type_name<T>();
      const nk::Dims rs{rows, H};
      if (norm == Norm::layer) nk::layer_norm(in(sum, rs), out(y2, rs), {H}, in(w.t, {H}), bv, 1e-5);
      else nk::rms_norm(in(sum, rs), out(y2, rs), {H}, in(w.t, {H}), 1e-5);
      EXPECT_TRUE(same_bytes(y, y2)) << norm_name(norm) << " " << type_name<T>();
    }
  };
  run(nk::half{});
  run(nk::bfloat16{});
}

// In place: y = x, sum = residual (vLLM), sum = x, both; equal to the
// out-of-place call bit for bit.
TEST_P(Fused, AddNormsInPlace) {
  for_each_dtype([&](auto t, auto) {
    using T = decltype(t);
    for (int64_t H : {5, 64, 4097})
      for (Norm norm : {Norm::layer, Norm::rms}) {
        const int64_t rows = 6, n = rows * H;
        const nk::Dims s{rows, H};
        const Data<T> x = random_rows<T>(rows, H, rng_), res = random_data<T>(n, rng_, 0.0, 2.0);
        const Data<T> w = random_data<T>(H, rng_, 1.0, 0.5), rb = random_data<T>(H, rng_, 0.0, 0.5);
        std::vector<T> y_ref(n), sum_ref(n);
        add_norm(norm, in(x.t, s), in(res.t, s), out(y_ref, s), out(sum_ref, s), {H}, in(w.t, {H}), {}, 1e-5,
                 in(rb.t, {H}), {}, {}, {});
        enum class Mode { y_is_x, sum_is_residual, both, sum_is_x };
        for (Mode m : {Mode::y_is_x, Mode::sum_is_residual, Mode::both, Mode::sum_is_x}) {
          SCOPED_TRACE(std::string(norm_name(norm)) + " " + type_name<T>() + " H " + std::to_string(H) + " mode " +
                       std::to_string(static_cast<int>(m)));
          std::vector<T> xb = x.t, rbuf = res.t, yb(n), sb(n);
          const nk::TensorView<T> xv(xb.data(), s), rv(rbuf.data(), s);
          const nk::TensorView<T> yv = (m == Mode::y_is_x || m == Mode::both) ? xv : out(yb, s);
          const nk::TensorView<T> sv = (m == Mode::sum_is_residual || m == Mode::both) ? rv
                                       : (m == Mode::sum_is_x ? xv : out(sb, s));
          ASSERT_NO_THROW(add_norm(norm, xv, rv, yv, sv, {H}, in(w.t, {H}), {}, 1e-5, in(rb.t, {H}), {}, {}, {}));
          EXPECT_EQ(std::memcmp(yv.data, y_ref.data(), n * sizeof(T)), 0) << "y";
          EXPECT_EQ(std::memcmp(sv.data, sum_ref.data(), n * sizeof(T)), 0) << "sum";
        }
      }
  });
}

// The epilogue on the add forms: activation, static and dynamic
// quantization; equal bit for bit to the unfused norm of the stored sum with
// the same epilogue. vLLM's step: int8, dynamic per-token scales, sum written
// back into the residual.
TEST_P(Fused, AddNormsWithEpilogueEqualUnfused) {
  auto run = [&](auto t) {
    using T = decltype(t);
    for (int64_t H : {9, 64, 1000, 4097})
      for (Norm norm : {Norm::layer, Norm::rms})
        for (int v = 0; v < 5; ++v) {
          const Act a = v == 0 ? Act::none : kActivations[v - 1];
          for (Quant q : {Quant::none, Quant::int8, Quant::float8_e4m3})
            for (bool dynamic : {false, true}) {
              if (q == Quant::none && dynamic) continue;
              SCOPED_TRACE(std::string("add_") + norm_name(norm) + " " + type_name<T>() + " H " + std::to_string(H) +
                           " " + act_name(a) + " " + (q == Quant::none ? "none" : quant_name(q)) +
                           (dynamic ? " dynamic" : ""));
              const int64_t rows = 4, n = rows * H;
              const nk::Dims s{rows, H};
              const Data<T> x = random_rows<T>(rows, H, rng_), res = random_data<T>(n, rng_, 0.0, 2.0);
              const Data<T> w = random_data<T>(H, rng_, 1.0, 0.5), b = random_data<T>(H, rng_, 0.0, 0.5);
              const nk::TensorRef bv = norm == Norm::layer ? nk::TensorRef(in(b.t, {H})) : nk::TensorRef();
              std::vector<T> resbuf = res.t;  // sum written back into it
              const size_t out_bytes = static_cast<size_t>(n) * (q == Quant::none ? sizeof(T) : 1);
              std::vector<std::uint8_t> ybytes(out_bytes), y2bytes(out_bytes);
              std::vector<float> scales(rows, -1.0f), scales2(rows, -2.0f);
              auto y_of = [&](std::vector<std::uint8_t>& buf) {
                return q == Quant::none ? nk::TensorRef(buf.data(), nk::dtype_of<T>::value, s, nk::contiguous_strides(s))
                                        : qout(buf, q, s);
              };
              const std::optional<double> scale = q == Quant::none || dynamic ? std::nullopt : std::optional<double>(0.02);
              const nk::Epilogue e1 = epilogue(a, q, scale, dynamic ? nk::TensorRef(out(scales, {rows})) : nk::TensorRef());
              const nk::Epilogue e2 = epilogue(a, q, scale, dynamic ? nk::TensorRef(out(scales2, {rows})) : nk::TensorRef());
              const nk::TensorView<T> rv(resbuf.data(), s);
              ASSERT_NO_THROW(add_norm(norm, in(x.t, s), rv, y_of(ybytes), rv, {H}, in(w.t, {H}), bv, 1e-5, {}, e1,
                                       {}, {}));
              // The sum against double.
              std::vector<double> s_want(n);
              for (int64_t i = 0; i < n; ++i) s_want[i] = x.d[i] + res.d[i];
              EXPECT_TRUE(all_close("sum", n, [&](int64_t i) { return to_double(resbuf[i]); }, s_want,
                                    output_tol<T>()));
              // Unfused on the stored sum.
              if (norm == Norm::layer) nk::layer_norm(in(resbuf, s), y_of(y2bytes), {H}, in(w.t, {H}), bv, 1e-5, {}, {}, e2);
              else nk::rms_norm(in(resbuf, s), y_of(y2bytes), {H}, in(w.t, {H}), 1e-5, {}, e2);
              EXPECT_TRUE(ybytes == y2bytes) << "fused output differs from the unfused one";
              if (dynamic) {
                EXPECT_TRUE(same_bytes(scales, scales2)) << "dynamic scales differ";
              }
              // And against the double reference of the norm of the stored sum.
              if (q != Quant::none) {
                const std::vector<double> sd = as_double(resbuf);
                const std::vector<double> want = apply_act(reference_norm(norm, sd, rows, H, w.d,
                                                                          norm == Norm::layer ? b.d : std::vector<double>(),
                                                                          1e-5).y, a);
                std::vector<double> es(n);
                for (int64_t i = 0; i < n; ++i)
                  es[i] = dynamic ? scales[i / H] : static_cast<double>(static_cast<nk::acc_t<T>>(0.02));
                EXPECT_TRUE(quantized_close(ybytes, want, es, q, quant_tol<T>()));
              }
            }
        }
  };
  run(float{});
  run(double{});
  run(nk::half{});
  run(nk::bfloat16{});
}

// ---------------------------------------------------------------------------
// float8_e4m3: the struct's conversions
// ---------------------------------------------------------------------------

TEST(Float8E4M3, KnownEncodings) {
  struct Known {
    std::uint8_t bits;
    double value;
  };
  const Known table[] = {{0x00, 0.0},          {0x01, std::ldexp(1, -9)}, {0x07, 7 * std::ldexp(1, -9)},
                         {0x08, std::ldexp(1, -6)}, {0x0f, 1.875 * std::ldexp(1, -6)}, {0x38, 1.0},
                         {0x39, 1.125},        {0x3f, 1.875},        {0x40, 2.0},
                         {0x77, 240.0},        {0x78, 256.0},        {0x7e, 448.0},
                         {0xb8, -1.0},         {0xfe, -448.0},       {0x81, -std::ldexp(1, -9)}};
  for (const Known& k : table) {
    EXPECT_EQ(static_cast<double>(static_cast<float>(nk::float8_e4m3::from_bits(k.bits))), k.value)
        << "bits 0x" << std::hex << int(k.bits);
    EXPECT_EQ(nk::float8_e4m3(static_cast<float>(k.value)).bits, k.bits) << "value " << k.value;
  }
  EXPECT_TRUE(std::isnan(static_cast<float>(nk::float8_e4m3::from_bits(0x7f))));
  EXPECT_TRUE(std::isnan(static_cast<float>(nk::float8_e4m3::from_bits(0xff))));
  const float m0 = static_cast<float>(nk::float8_e4m3::from_bits(0x80));
  EXPECT_TRUE(m0 == 0.0f && std::signbit(m0)) << "0x80 is -0";
}

TEST(Float8E4M3, RoundsToNearestEvenAndSaturates) {
  auto bits = [](double v) { return int(nk::float8_e4m3(static_cast<float>(v)).bits); };
  EXPECT_EQ(bits(std::ldexp(1, -10)), 0x00) << "2^-10: tie between 0 and 2^-9 goes to 0";
  EXPECT_EQ(bits(-std::ldexp(1, -10)), 0x80);
  EXPECT_EQ(bits(3 * std::ldexp(1, -10)), 0x02) << "3*2^-10: tie between 2^-9 and 2^-8 goes to 2^-8";
  EXPECT_EQ(bits(15 * std::ldexp(1, -10)), 0x08) << "between the largest subnormal and 2^-6: to 2^-6 (even)";
  EXPECT_EQ(bits(1.0625), 0x38) << "tie 1 / 1.125 -> 1";
  EXPECT_EQ(bits(1.1875), 0x3a) << "tie 1.125 / 1.25 -> 1.25";
  EXPECT_EQ(bits(1.07), 0x39);
  EXPECT_EQ(bits(1e-10), 0x00);
  EXPECT_EQ(bits(440), 0x7e);  // 416 / 448 -> nearer 448
  EXPECT_EQ(bits(424), 0x7d);  // 416
  EXPECT_EQ(bits(432), 0x7e) << "tie 416 / 448 -> 448 (even)";
  EXPECT_EQ(bits(400), 0x7c) << "tie 384 / 416 -> 384 (even)";
  EXPECT_EQ(bits(464), 0x7e) << "464 saturates to 448";
  EXPECT_EQ(bits(1e6), 0x7e);
  EXPECT_EQ(bits(-1e6), 0xfe);
  EXPECT_EQ(bits(kInf), 0x7e) << "inf saturates to 448";
  EXPECT_EQ(bits(-kInf), 0xfe);
  EXPECT_EQ(bits(kNaN) & 0x7f, 0x7f) << "NaN stays NaN";
  EXPECT_EQ(bits(-0.0), 0x80);
}

TEST(Float8E4M3, EveryCodeRoundTripsAndFloatsRoundToNearest) {
  for (int b = 0; b < 256; ++b) {
    const float f = static_cast<float>(nk::float8_e4m3::from_bits(static_cast<std::uint8_t>(b)));
    const double want = decode_e4m3(static_cast<std::uint8_t>(b));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(f)) << b;
      continue;
    }
    EXPECT_EQ(static_cast<double>(f), want) << "bits " << b;
    EXPECT_EQ(int(nk::float8_e4m3(f).bits), b) << "round trip of bits " << b;
  }
  // Random floats over the whole range (and midpoints between codes) against
  // the search-based reference.
  std::mt19937 rng(99);
  std::uniform_real_distribution<double> ex(-14, 10), u(-1, 1);
  for (int i = 0; i < 200000; ++i) {
    const float f = static_cast<float>(u(rng) * std::exp2(ex(rng)));
    ASSERT_EQ(int(nk::float8_e4m3(f).bits), int(ref_e4m3(f))) << "f " << f;
  }
  for (int b = 0; b < 0x7e; ++b) {
    const double mid = 0.5 * (decode_e4m3(static_cast<std::uint8_t>(b)) + decode_e4m3(static_cast<std::uint8_t>(b + 1)));
    ASSERT_EQ(int(nk::float8_e4m3(static_cast<float>(mid)).bits), int(ref_e4m3(mid))) << "midpoint above " << b;
    ASSERT_EQ(int(nk::float8_e4m3(static_cast<float>(-mid)).bits), int(ref_e4m3(-mid))) << "midpoint below " << -b;
  }
}

// ---------------------------------------------------------------------------
// Errors: each bad argument is a normkit::Error whose what() starts with the
// argument's name, and nothing the caller passed is written.
// ---------------------------------------------------------------------------

class FusedErrors : public ::testing::Test {
 protected:
  static constexpr int64_t R = 4, H = 8, N = R * H;
  std::vector<float> x = std::vector<float>(N, 1.5f), res = std::vector<float>(N, 0.5f);
  std::vector<float> y = std::vector<float>(N, -7.f), sum = std::vector<float>(N, -8.f);
  std::vector<float> w = std::vector<float>(H, 1.f), scales = std::vector<float>(R, -9.f);
  std::vector<float> rstd = std::vector<float>(R, -10.f), rm = std::vector<float>(H, 0.f), rv = std::vector<float>(H, 1.f);
  std::vector<std::uint8_t> q = std::vector<std::uint8_t>(N, 0x5a);
  std::vector<double> xd = std::vector<double>(N, 1.0);
  nk::Dims xs{R, H};

  void SetUp() override {
    for (int64_t i = 0; i < N; ++i) x[i] = static_cast<float>(i % 5) - 2.f;
  }
  nk::TensorView<const float> xv() const { return in(x, xs); }
  nk::TensorView<float> yv() { return out(y, xs); }
  nk::TensorRef q8() { return qout(q, Quant::int8, xs); }
  nk::TensorRef qf8() { return qout(q, Quant::float8_e4m3, xs); }
  nk::TensorView<float> scales_v() { return out(scales, {R}); }

  // Throws an Error of `kind` naming `argument`, and leaves every buffer as it was.
  template <class F>
  ::testing::AssertionResult refused(F&& f, nk::ErrorKind kind, const std::string& argument) {
    const auto x0 = x, res0 = res, y0 = y, sum0 = sum, w0 = w, scales0 = scales, rstd0 = rstd, rm0 = rm, rv0 = rv;
    const auto q0 = q;
    const auto xd0 = xd;
    ::testing::AssertionResult r = throws_error(f, kind, argument);
    if (!r) return r;
    const bool kept = same_bytes(x, x0) && same_bytes(res, res0) && same_bytes(y, y0) && same_bytes(sum, sum0) &&
                      same_bytes(w, w0) && same_bytes(scales, scales0) && same_bytes(rstd, rstd0) &&
                      same_bytes(rm, rm0) && same_bytes(rv, rv0) && q == q0 && same_bytes(xd, xd0);
    if (!kept) return ::testing::AssertionFailure() << "an argument was written before the error: " << r.message();
    return r;
  }
};

constexpr auto kValue = nk::ErrorKind::value;
constexpr auto kType = nk::ErrorKind::type;

TEST_F(FusedErrors, Scale) {
  for (double bad : {0.0, -1.0, kNaN, kInf, -kInf}) {
    EXPECT_TRUE(refused([&] { nk::layer_norm(xv(), q8(), {H}, {}, {}, 1e-5, {}, {}, epilogue(Act::none, Quant::int8, bad)); },
                        kValue, "scale"))
        << bad;
    EXPECT_TRUE(refused([&] { nk::rms_norm(xv(), qf8(), {H}, {}, 1e-5, {}, epilogue(Act::none, Quant::float8_e4m3, bad)); },
                        kValue, "scale"))
        << bad;
    EXPECT_TRUE(refused(
        [&] {
          nk::batch_norm(xv(), q8(), out(rm, {H}), out(rv, {H}), {}, {}, false, 0.1, 1e-5, nk::Layout::NC, {}, {},
                         epilogue(Act::none, Quant::int8, bad));
        },
        kValue, "scale"))
        << bad;
    EXPECT_TRUE(refused(
        [&] { nk::group_norm(xv(), qf8(), 2, {}, {}, 1e-5, nk::Layout::NC, {}, {}, epilogue(Act::none, Quant::float8_e4m3, bad)); },
        kValue, "scale"))
        << bad;
    EXPECT_TRUE(refused(
        [&] {
          nk::add_rms_norm(xv(), in(res, xs), q8(), out(sum, xs), {H}, {}, 1e-5, {}, epilogue(Act::none, Quant::int8, bad));
        },
        kValue, "scale"))
        << bad;
  }
  // A scale without quantize.
  EXPECT_TRUE(refused([&] { nk::layer_norm(xv(), yv(), {H}, {}, {}, 1e-5, {}, {}, epilogue(Act::relu, Quant::none, 1.0)); },
                      kValue, "scale"));
  EXPECT_TRUE(refused(
      [&] {
        nk::batch_norm(xv(), yv(), out(rm, {H}), out(rv, {H}), {}, {}, false, 0.1, 1e-5, nk::Layout::NC, {}, {},
                       epilogue(Act::none, Quant::none, 1.0));
      },
      kValue, "scale"));
  // The channel norms need a static scale.
  EXPECT_TRUE(refused(
      [&] {
        nk::batch_norm(xv(), q8(), out(rm, {H}), out(rv, {H}), {}, {}, false, 0.1, 1e-5, nk::Layout::NC, {}, {},
                       epilogue(Act::none, Quant::int8));
      },
      kValue, "scale"));
  EXPECT_TRUE(refused(
      [&] { nk::group_norm(xv(), q8(), 2, {}, {}, 1e-5, nk::Layout::NC, {}, {}, epilogue(Act::none, Quant::int8, std::nullopt, scales_v())); },
      kValue, "scale"));
}

TEST_F(FusedErrors, Scales) {
  // Dynamic quantization without scales.
  EXPECT_TRUE(refused([&] { nk::rms_norm(xv(), q8(), {H}, {}, 1e-5, {}, epilogue(Act::none, Quant::int8)); }, kValue,
                      "scales"));
  EXPECT_TRUE(refused(
      [&] { nk::add_layer_norm(xv(), in(res, xs), qf8(), out(sum, xs), {H}, {}, {}, 1e-5, {}, epilogue(Act::none, Quant::float8_e4m3)); },
      kValue, "scales"));
  // Scales without quantize, with a static scale, of the wrong count or dtype.
  EXPECT_TRUE(refused(
      [&] { nk::rms_norm(xv(), yv(), {H}, {}, 1e-5, {}, epilogue(Act::none, Quant::none, std::nullopt, scales_v())); },
      kValue, "scales"));
  EXPECT_TRUE(refused(
      [&] { nk::rms_norm(xv(), q8(), {H}, {}, 1e-5, {}, epilogue(Act::none, Quant::int8, 0.5, scales_v())); }, kValue,
      "scales"));
  EXPECT_TRUE(refused(
      [&] {
        nk::rms_norm(xv(), q8(), {H}, {}, 1e-5, {}, epilogue(Act::none, Quant::int8, std::nullopt, out(scales, {R - 1})));
      },
      kValue, "scales"));
  EXPECT_TRUE(refused(
      [&] {
        nk::rms_norm(xv(), q8(), {H}, {}, 1e-5, {},
                     epilogue(Act::none, Quant::int8, std::nullopt, nk::TensorView<double>(xd.data(), {R})));
      },
      kType, "scales"));
  // Scales inside x.
  EXPECT_TRUE(refused(
      [&] {
        nk::rms_norm(xv(), q8(), {H}, {}, 1e-5, {},
                     epilogue(Act::none, Quant::int8, std::nullopt, nk::TensorView<float>(x.data(), {R})));
      },
      kValue, "scales"));
}

TEST_F(FusedErrors, QuantizeOnNormsWithoutAQuantizedOutput) {
  const nk::Dims cs{2, 4, 4};  // (N, C, L)
  const auto xc = in(x, cs);
  const nk::TensorRef qc = qout(q, Quant::int8, cs);
  std::vector<float> smean(8, 0.f), sstd(8, 1.f);
  EXPECT_TRUE(refused([&] { nk::instance_norm(xc, qc, {}, {}, {}, {}, true, 0.1, 1e-5, std::nullopt, {}, {}, epilogue(Act::none, Quant::int8, 1.0)); },
                      kValue, "quantize"));
  EXPECT_TRUE(refused([&] { nk::adaptive_instance_norm(xc, qc, in(x, cs), 1e-5, std::nullopt, epilogue(Act::none, Quant::int8, 1.0)); },
                      kValue, "quantize"));
  EXPECT_TRUE(refused(
      [&] {
        nk::adaptive_instance_norm(xc, qout(q, Quant::float8_e4m3, cs), in(smean, {2, 4}), in(sstd, {2, 4}), 1e-5,
                                   std::nullopt, epilogue(Act::none, Quant::float8_e4m3, 1.0));
      },
      kValue, "quantize"));
  EXPECT_TRUE(refused([&] { nk::instance_norm(xc, out(y, cs), {}, {}, {}, {}, true, 0.1, 1e-5, std::nullopt, {}, {}, epilogue(Act::silu, Quant::none, 1.0)); },
                      kValue, "scale"));
}

TEST_F(FusedErrors, ActivationAndQuantizeCodes) {
  EXPECT_TRUE(refused([&] { nk::rms_norm(xv(), yv(), {H}, {}, 1e-5, {}, epilogue(static_cast<Act>(9))); }, kValue,
                      "activation"));
  EXPECT_TRUE(refused([&] { nk::rms_norm(xv(), yv(), {H}, {}, 1e-5, {}, epilogue(Act::none, static_cast<Quant>(7), 1.0)); },
                      kValue, "quantize"));
}

TEST_F(FusedErrors, QuantizedOutput) {
  // y of the wrong dtype: float32 for int8, int8 without quantize, float8 for int8.
  EXPECT_TRUE(refused([&] { nk::rms_norm(xv(), yv(), {H}, {}, 1e-5, {}, epilogue(Act::none, Quant::int8, 1.0)); }, kType,
                      "y"));
  EXPECT_TRUE(refused([&] { nk::rms_norm(xv(), q8(), {H}, {}, 1e-5, {}, epilogue(Act::relu)); }, kType, "y"));
  EXPECT_TRUE(refused([&] { nk::layer_norm(xv(), qf8(), {H}, {}, {}, 1e-5, {}, {}, epilogue(Act::none, Quant::int8, 1.0)); },
                      kType, "y"));
  EXPECT_TRUE(refused(
      [&] {
        nk::batch_norm(xv(), yv(), out(rm, {H}), out(rv, {H}), {}, {}, false, 0.1, 1e-5, nk::Layout::NC, {}, {},
                       epilogue(Act::none, Quant::float8_e4m3, 1.0));
      },
      kType, "y"));
  EXPECT_TRUE(refused([&] { nk::group_norm(xv(), q8(), 2, {}, {}, 1e-5, nk::Layout::NC); }, kType, "y"));
  EXPECT_TRUE(refused(
      [&] { nk::add_rms_norm(xv(), in(res, xs), q8(), out(sum, xs), {H}); }, kType, "y"));
  // A quantized y over x's memory (in place is for same-dtype outputs only).
  const nk::TensorRef q_over_x(x.data(), nk::DType::int8, xs, nk::contiguous_strides(xs));
  EXPECT_TRUE(refused([&] { nk::rms_norm(xv(), q_over_x, {H}, {}, 1e-5, {}, epilogue(Act::none, Quant::int8, 1.0)); },
                      kValue, "y"));
  EXPECT_TRUE(refused(
      [&] {
        nk::batch_norm(xv(), q_over_x, out(rm, {H}), out(rv, {H}), {}, {}, false, 0.1, 1e-5, nk::Layout::NC, {}, {},
                       epilogue(Act::none, Quant::int8, 1.0));
      },
      kValue, "y"));
  EXPECT_TRUE(refused(
      [&] {
        nk::add_layer_norm(xv(), in(res, xs), q_over_x, out(sum, xs), {H}, {}, {}, 1e-5, {},
                           epilogue(Act::none, Quant::int8, 1.0));
      },
      kValue, "y"));
  // A quantized y over the residual.
  const nk::TensorRef q_over_res(res.data(), nk::DType::int8, xs, nk::contiguous_strides(xs));
  EXPECT_TRUE(refused(
      [&] {
        nk::add_rms_norm(xv(), in(res, xs), q_over_res, out(sum, xs), {H}, {}, 1e-5, {},
                         epilogue(Act::none, Quant::int8, 1.0));
      },
      kValue, "y"));
  // The quantized dtypes are outputs only.
  EXPECT_TRUE(refused([&] { nk::rms_norm(nk::TensorRef(q.data(), nk::DType::int8, xs, nk::contiguous_strides(xs)), yv(), {H}); },
                      kType, "x"));
}

TEST_F(FusedErrors, Residual) {
  auto add = [&](nk::TensorRef r) { nk::add_rms_norm(xv(), r, yv(), out(sum, xs), {H}); };
  // Shapes that do not broadcast to x (4, 8).
  EXPECT_TRUE(refused([&] { add(in(res, {2, H})); }, kValue, "residual"));
  EXPECT_TRUE(refused([&] { add(in(res, {R, H - 1})); }, kValue, "residual"));
  EXPECT_TRUE(refused([&] { add(in(res, {R / 2, 2, H})); }, kValue, "residual"));
  EXPECT_TRUE(refused([&] { add(in(res, {1, R, H})); }, kValue, "residual"));  // more dims than x
  EXPECT_TRUE(refused([&] { add(in(res, {H / 2})); }, kValue, "residual"));
  EXPECT_TRUE(refused([&] { add(nk::TensorRef()); }, kValue, "residual"));
  // x (2, 2, 8) takes (2, 8) and (1, 2, 8), not (2, 1, 8).
  const nk::Dims x3{2, 2, H};
  EXPECT_TRUE(refused([&] { nk::add_rms_norm(in(x, x3), in(res, {2, 1, H}), out(y, x3), out(sum, x3), {H}); }, kValue,
                      "residual"));
  // Another dtype.
  EXPECT_TRUE(refused([&] { add(nk::TensorView<const double>(xd.data(), xs)); }, kType, "residual"));
  // residual_bias of the wrong shape or dtype.
  EXPECT_TRUE(refused([&] { nk::add_layer_norm(xv(), in(res, xs), yv(), out(sum, xs), {H}, {}, {}, 1e-5, in(w, {H - 1})); },
                      kValue, "residual_bias"));
  EXPECT_TRUE(refused(
      [&] { nk::add_layer_norm(xv(), in(res, xs), yv(), out(sum, xs), {H}, {}, {}, 1e-5, nk::TensorView<const double>(xd.data(), {H})); },
      kType, "residual_bias"));
}

TEST_F(FusedErrors, Sum) {
  std::vector<float> big(N + 4, 0.f);
  // Missing, wrong shape, wrong dtype.
  EXPECT_TRUE(refused([&] { nk::add_rms_norm(xv(), in(res, xs), yv(), {}, {H}); }, kValue, "sum"));
  EXPECT_TRUE(refused([&] { nk::add_rms_norm(xv(), in(res, xs), yv(), out(sum, {R / 2, H}), {H}); }, kValue, "sum"));
  EXPECT_TRUE(refused(
      [&] { nk::add_rms_norm(xv(), in(res, xs), yv(), nk::TensorView<double>(xd.data(), xs), {H}); }, kType, "sum"));
  // Overlapping x without being x.
  EXPECT_TRUE(refused([&] { nk::add_rms_norm(xv(), in(res, xs), yv(), out(x, {R - 1, H}), {H}); }, kValue, "sum"));
  EXPECT_TRUE(refused(
      [&] { nk::add_rms_norm(xv(), in(res, xs), yv(), nk::TensorView<float>(x.data() + 1, {R - 1, H}), {H}); },
      kValue, "sum"));
  // Overlapping the residual without being it, or a broadcast residual at all.
  EXPECT_TRUE(refused(
      [&] { nk::add_rms_norm(xv(), in(res, xs), yv(), nk::TensorView<float>(res.data() + H, {R - 1, H}), {H}); },
      kValue, "sum"));
  EXPECT_TRUE(refused(
      [&] { nk::add_rms_norm(in(x, {2, 2, H}), in(res, {2, H}), out(y, {2, 2, H}), out(res, {2, 2, H}), {H}); },
      kValue, "sum"));
  // A broadcast (self-overlapping) sum.
  EXPECT_TRUE(refused(
      [&] { nk::add_rms_norm(xv(), in(res, xs), yv(), nk::TensorView<float>(sum.data(), xs, {0, 1}), {H}); }, kValue,
      "sum"));
}

// y and sum must not share memory: one of the two is named.
TEST_F(FusedErrors, YAndSumTheSameMemory) {
  auto names_y_or_sum = [&](auto&& call) {
    const ::testing::AssertionResult as_sum = refused(call, kValue, "sum");
    if (as_sum) return as_sum;
    return refused(call, kValue, "y") << " / " << as_sum.message();
  };
  // A separate buffer given as both.
  EXPECT_TRUE(names_y_or_sum([&] { nk::add_rms_norm(xv(), in(res, xs), yv(), yv(), {H}); }));
  EXPECT_TRUE(names_y_or_sum([&] { nk::add_layer_norm(xv(), in(res, xs), yv(), yv(), {H}); }));
  // Both in place on x, or both on the residual.
  const nk::TensorView<float> xo(x.data(), xs), ro(res.data(), xs);
  EXPECT_TRUE(names_y_or_sum([&] { nk::add_rms_norm(xo, in(res, xs), xo, xo, {H}); }));
  EXPECT_TRUE(names_y_or_sum([&] { nk::add_layer_norm(xo, in(res, xs), xo, xo, {H}); }));
  EXPECT_TRUE(names_y_or_sum([&] { nk::add_rms_norm(xv(), ro, ro, ro, {H}); }));
}

TEST_F(FusedErrors, StatisticsAndWeightsApartFromSum) {
  EXPECT_TRUE(refused(
      [&] { nk::add_rms_norm(xv(), in(res, xs), yv(), out(sum, xs), {H}, {}, 1e-5, {}, {}, out(sum, {R})); }, kValue,
      "sum"));
  EXPECT_TRUE(refused([&] { nk::add_rms_norm(xv(), in(res, xs), yv(), out(sum, xs), {H}, in(sum, {H})); }, kValue,
                      "sum"));
}

class FusedApi : public nk_test::KernelPathTest {};

TEST_P(FusedApi, QuantizeMax) {
  EXPECT_EQ(nk::quantize_max(Quant::int8), 127.0);
  EXPECT_EQ(nk::quantize_max(Quant::float8_e4m3), 448.0);
}

NK_TEST_ON_EVERY_PATH(Fused);

NK_TEST_ON_EVERY_PATH(FusedApi);

}  // namespace
