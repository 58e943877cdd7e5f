// test_support.hpp - what the C++ test files share: element-type helpers,
// float64 references of the norms, tolerant comparison, test data, the
// per-kernel-path fixture, and the error-checking helper.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "normkit/normkit.hpp"

namespace nk_test {

namespace nk = normkit;
using std::int64_t;

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------

template <class T> double to_double(T v) { return static_cast<double>(v); }
template <> inline double to_double(nk::half v) { return static_cast<double>(static_cast<float>(v)); }
template <> inline double to_double(nk::bfloat16 v) { return static_cast<double>(static_cast<float>(v)); }

template <class T> T from_double(double v) { return static_cast<T>(v); }
template <> inline nk::half from_double(double v) { return nk::half(static_cast<float>(v)); }
template <> inline nk::bfloat16 from_double(double v) { return nk::bfloat16(static_cast<float>(v)); }

template <class T> const char* type_name();
template <> inline const char* type_name<float>() { return "float32"; }
template <> inline const char* type_name<double>() { return "float64"; }
template <> inline const char* type_name<nk::half>() { return "float16"; }
template <> inline const char* type_name<nk::bfloat16>() { return "bfloat16"; }

// Statistics type: float for float32 and the 16-bit types, double for float64.
template <class T> using stats_t = nk::acc_t<T>;

// |got - want| <= atol + rtol * |want| (+ half an ulp of `want` in a 16-bit
// format, when `mantissa_bits` is set) for outputs of type T. 16-bit outputs
// are computed in float and rounded once, to nearest: they must be within half
// an ulp of the exact result, give or take the float32 tolerance (atol/rtol).
// A kernel that truncates, or rounds twice, fails this.
struct Tol {
  double atol, rtol;
  int mantissa_bits = 0;  // 10 (float16) or 7 (bfloat16): stored fraction bits
  int min_exponent = 0;   // of the smallest normal number: -14 or -126
};
template <class T> Tol output_tol();
template <> inline Tol output_tol<float>() { return {3e-5, 3e-5}; }
template <> inline Tol output_tol<double>() { return {1e-12, 1e-12}; }
template <> inline Tol output_tol<nk::half>() { return {3e-5, 3e-5, 10, -14}; }
template <> inline Tol output_tol<nk::bfloat16>() { return {3e-5, 3e-5, 7, -126}; }

// Half an ulp of v in a 16-bit format (subnormals: half the subnormal spacing).
inline double half_ulp16(double v, const Tol& tol) {
  const int e = v == 0 ? tol.min_exponent : std::max(std::ilogb(v), tol.min_exponent);
  return std::ldexp(0.5, e - tol.mantissa_bits);
}
// Statistics are float or double whatever the element type.
template <class T> Tol stats_tol() { return std::is_same_v<T, double> ? Tol{1e-12, 1e-12} : Tol{3e-5, 3e-5}; }

// PyTorch's torch.finfo(dtype).eps: what rms_norm uses when eps is not given.
template <class T> double torch_eps();
template <> inline double torch_eps<float>() { return 1.1920928955078125e-07; }
template <> inline double torch_eps<double>() { return 2.220446049250313e-16; }
template <> inline double torch_eps<nk::half>() { return 0.0009765625; }
template <> inline double torch_eps<nk::bfloat16>() { return 0.0078125; }

// ---------------------------------------------------------------------------
// The float64 reference, as plain as it gets: two passes per row.
// ---------------------------------------------------------------------------

enum class Norm { layer, rms };
inline const char* norm_name(Norm n) { return n == Norm::layer ? "layer_norm" : "rms_norm"; }

struct Reference {
  std::vector<double> y, mean, rstd;
};

// x: rows x cols, row-major, dense. w, b: cols values or empty.
inline Reference reference_norm(Norm norm, const std::vector<double>& x, int64_t rows, int64_t cols,
                         const std::vector<double>& w, const std::vector<double>& b, double eps) {
  Reference r;
  r.y.resize(x.size());
  r.mean.resize(rows);
  r.rstd.resize(rows);
  for (int64_t i = 0; i < rows; ++i) {
    const double* xr = x.data() + i * cols;
    double mean = 0, var = 0;
    if (norm == Norm::layer) {
      for (int64_t j = 0; j < cols; ++j) mean += xr[j];
      mean /= static_cast<double>(cols);
      for (int64_t j = 0; j < cols; ++j) var += (xr[j] - mean) * (xr[j] - mean);
      var /= static_cast<double>(cols);
    } else {
      for (int64_t j = 0; j < cols; ++j) var += xr[j] * xr[j];  // mean square
      var /= static_cast<double>(cols);
    }
    const double rstd = 1.0 / std::sqrt(var + eps);
    r.mean[i] = mean;
    r.rstd[i] = rstd;
    for (int64_t j = 0; j < cols; ++j) {
      double v = (xr[j] - mean) * rstd;
      if (!w.empty()) v *= w[j];
      if (!b.empty()) v += b[j];
      r.y[i * cols + j] = v;
    }
  }
  return r;
}

// ---------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------

inline bool close(double got, double want, Tol tol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  double bound = tol.atol + tol.rtol * std::fabs(want);
  if (tol.mantissa_bits) bound += half_ulp16(want, tol);
  return std::fabs(got - want) <= bound;
}

// Compares n values; reports the count and the first few mismatches.
template <class GetGot>
::testing::AssertionResult all_close(const char* what, int64_t n, GetGot got, const std::vector<double>& want,
                                     Tol tol) {
  int64_t bad = 0;
  std::string report;
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double g = got(i), w = want[static_cast<size_t>(i)];
    if (!close(g, w, tol)) {
      if (bad < 5)
        report += "\n  " + std::string(what) + "[" + std::to_string(i) + "]: got " + std::to_string(g) +
                  ", want " + std::to_string(w);
      worst = std::max(worst, std::fabs(g - w));
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << n << " " << what << " values out of tolerance (atol "
                                       << tol.atol << ", rtol " << tol.rtol << "; worst |diff| " << worst << ")"
                                       << report;
}

// ---------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------

// Values of type T (already rounded to T) and the same values as double.
template <class T>
struct Data {
  std::vector<T> t;
  std::vector<double> d;
};

// Uniform values in [center - spread, center + spread], rounded to T.
template <class T>
Data<T> random_data(int64_t n, std::mt19937& rng, double center, double spread) {
  std::uniform_real_distribution<double> u(-spread, spread);
  Data<T> out;
  out.t.resize(static_cast<size_t>(n));
  out.d.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out.t[i] = from_double<T>(center + u(rng));
    out.d[i] = to_double(out.t[i]);
  }
  return out;
}

// Rows with different means so that a wrong row offset shows: row i has
// values around (i % 7 - 3) * 0.5 with spread 2.
template <class T>
Data<T> random_rows(int64_t rows, int64_t cols, std::mt19937& rng) {
  Data<T> out;
  for (int64_t i = 0; i < rows; ++i) {
    Data<T> row = random_data<T>(cols, rng, (i % 7 - 3) * 0.5, 2.0);
    out.t.insert(out.t.end(), row.t.begin(), row.t.end());
    out.d.insert(out.d.end(), row.d.begin(), row.d.end());
  }
  return out;
}

// ---------------------------------------------------------------------------
// The float64 reference of the channel norms (channels-first data) and the
// channels-first <-> channels-last transposes.
// ---------------------------------------------------------------------------

// float64 reference of one channel norm on channels-first data x[n][c][s]:
// statistics per (n, group) (per_sample) or per channel; y = (x - mean) * rstd * w + b.
struct Ref {
  std::vector<double> y, mean, var;
};
inline Ref reference(const std::vector<double>& x, int64_t n, int64_t c, int64_t s, int64_t groups, bool per_sample,
              const std::vector<double>& w, const std::vector<double>& b, double eps) {
  Ref r;
  r.y.resize(x.size());
  const int64_t per = per_sample ? c / groups : 1;
  const int64_t stats = per_sample ? n * groups : c;
  r.mean.assign(stats, 0);
  r.var.assign(stats, 0);
  std::vector<double> count(stats, 0);
  auto group_of = [&](int64_t ni, int64_t ci) { return per_sample ? ni * groups + ci / per : ci; };
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t si = 0; si < s; ++si) {
        r.mean[group_of(ni, ci)] += x[(ni * c + ci) * s + si];
        count[group_of(ni, ci)] += 1;
      }
  for (int64_t g = 0; g < stats; ++g) r.mean[g] /= count[g];
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t si = 0; si < s; ++si) {
        const double d = x[(ni * c + ci) * s + si] - r.mean[group_of(ni, ci)];
        r.var[group_of(ni, ci)] += d * d;
      }
  for (int64_t g = 0; g < stats; ++g) r.var[g] /= count[g];
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t si = 0; si < s; ++si) {
        const int64_t i = (ni * c + ci) * s + si, g = group_of(ni, ci);
        r.y[i] = (x[i] - r.mean[g]) / std::sqrt(r.var[g] + eps) * w[ci] + b[ci];
      }
  return r;
}

// (N, C, S) channels-first <-> (N, S, C) channels-last.
template <class T>
std::vector<T> to_last(const std::vector<T>& a, int64_t n, int64_t c, int64_t s) {
  std::vector<T> out(a.size());
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t si = 0; si < s; ++si) out[(ni * s + si) * c + ci] = a[(ni * c + ci) * s + si];
  return out;
}
template <class T>
std::vector<T> to_first(const std::vector<T>& a, int64_t n, int64_t c, int64_t s) {
  std::vector<T> out(a.size());
  for (int64_t ni = 0; ni < n; ++ni)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t si = 0; si < s; ++si) out[(ni * c + ci) * s + si] = a[(ni * s + si) * c + ci];
  return out;
}

// ---------------------------------------------------------------------------
// Fixture: one instance per kernel path compiled in (the runtime's list, as
// Highway runs every test on every target); a path this CPU lacks is skipped
// with a message saying it was NOT TESTED. Restores the path and thread count.
// Use:  class MySuite : public nk_test::KernelPathTest {};  TEST_P(MySuite, ...)
//       NK_TEST_ON_EVERY_PATH(MySuite);
// ---------------------------------------------------------------------------

// The kernel paths this build compiled (read when the tests are registered, after main starts).
inline std::vector<std::string> compiled_paths() { return nk::runtime_info().kernel_paths_compiled; }

#define NK_TEST_ON_EVERY_PATH(Suite)                                                      \
  INSTANTIATE_TEST_SUITE_P(Paths, Suite, ::testing::ValuesIn(::nk_test::compiled_paths()), \
                           [](const auto& info) { return info.param; })

inline bool path_supported(const std::string& path) {
  const auto supported = nk::runtime_info().kernel_paths_supported;
  return std::find(supported.begin(), supported.end(), path) != supported.end();
}

class KernelPathTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!path_supported(GetParam()))
      GTEST_SKIP() << "kernel path " << GetParam() << " NOT TESTED: this CPU does not support it";
    saved_path_ = nk::kernel_path();
    saved_threads_ = nk::get_num_threads();
    nk::set_kernel_path(GetParam());
    ASSERT_EQ(nk::kernel_path(), GetParam());
  }
  void TearDown() override {
    if (!saved_path_.empty()) nk::set_kernel_path(saved_path_);
    if (saved_threads_ > 0) nk::set_num_threads(saved_threads_);
  }
  std::mt19937 rng_{12345};

 private:
  std::string saved_path_;
  int saved_threads_ = 0;
};

// Errors: one normkit::Error of the right kind, whose message starts with the
// argument's name.
template <class F>
::testing::AssertionResult throws_error(F&& f, nk::ErrorKind kind, const std::string& argument) {
  try {
    f();
  } catch (const nk::Error& e) {
    const std::string what = e.what();
    if (e.kind() != kind)
      return ::testing::AssertionFailure() << "wrong ErrorKind (" << (e.kind() == nk::ErrorKind::value ? "value" : "type")
                                           << ") for: " << what;
    if (what.rfind(argument, 0) != 0)
      return ::testing::AssertionFailure() << "message should start with \"" << argument << "\": " << what;
    return ::testing::AssertionSuccess() << what;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw something other than normkit::Error: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw (expected an error about " << argument << ")";
}

// Expects `call` to throw normkit::Error with a message that starts with
// `prefix` (any kind; throws_error above also checks the kind).
inline void expect_error(const std::function<void()>& call, const std::string& prefix) {
  try {
    call();
    ADD_FAILURE() << "no error, expected one starting with " << prefix;
  } catch (const nk::Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(prefix, 0), 0u) << e.what();
  }
}

}  // namespace nk_test
