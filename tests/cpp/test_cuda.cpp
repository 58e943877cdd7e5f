// normkit::cuda (normkit/cuda.hpp) from C++.
//
// Every build: the CUDA entry points exist and say whether they were built.
// A CPU-only build: each throws ErrorKind::runtime saying so. A CUDA build:
// arguments are checked before the device is touched (the same errors as on
// the CPU), a machine without a GPU gets a runtime error, and with a GPU host
// memory is refused and the results match the CPU's (skipped without one).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"

#if NORMKIT_TEST_CUDA
#include <cuda_runtime.h>
#endif

namespace nk = normkit;

namespace {

void expect_error(const std::function<void()>& call, nk::ErrorKind kind, const std::string& start) {
  try {
    call();
    ADD_FAILURE() << "no error; expected one starting with \"" << start << "\"";
  } catch (const nk::Error& e) {
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(kind)) << e.what();
    EXPECT_EQ(std::string(e.what()).rfind(start, 0), 0u) << e.what();
  }
}

}  // namespace

TEST(Cuda, BuildIsReported) {
  EXPECT_EQ(nk::cuda::built(), bool(NORMKIT_TEST_CUDA));
  EXPECT_EQ(nk::runtime_info().build.cuda_built, bool(NORMKIT_TEST_CUDA));
  EXPECT_GE(nk::cuda::device_count(), 0);
  EXPECT_EQ(nk::runtime_info().cuda_devices, nk::cuda::device_count());
}

#if !NORMKIT_TEST_CUDA

TEST(Cuda, EveryFunctionSaysItIsNotBuilt) {
  std::vector<float> x(24), y(24), s(6);
  const nk::TensorView<float> xv(x.data(), {2, 3, 4}), yv(y.data(), {2, 3, 4}), sv(s.data(), {2, 3});
  const nk::TensorView<float> cv(s.data(), {3});
  const std::vector<std::function<void()>> calls = {
      [&] { nk::cuda::layer_norm(xv, yv, {4}); },
      [&] { nk::cuda::rms_norm(xv, yv, {4}); },
      [&] { nk::cuda::batch_norm(xv, yv, cv, cv); },
      [&] { nk::cuda::instance_norm(xv, yv); },
      [&] { nk::cuda::group_norm(xv, yv, 3); },
      [&] { nk::cuda::adaptive_instance_norm(xv, yv, xv); },
      [&] { nk::cuda::adaptive_instance_norm(xv, yv, sv, sv); },
      [&] { nk::cuda::layer_norm_backward(xv, xv, sv, sv, {4}, {}, yv); },
      [&] { nk::cuda::rms_norm_backward(xv, xv, sv, {4}, {}, yv); },
      [&] { nk::cuda::batch_norm_backward(xv, xv, cv, cv, {}, yv); },
      [&] { nk::cuda::instance_norm_backward(xv, xv, sv, sv, {}, yv); },
      [&] { nk::cuda::group_norm_backward(xv, xv, sv, sv, 3, {}, yv); },
      [&] { nk::cuda::adaptive_instance_norm_backward(xv, xv, xv, 1e-5, yv); },
      [&] { nk::cuda::adaptive_instance_norm_backward(xv, xv, sv, sv, 1e-5, yv); },
  };
  for (const auto& call : calls) expect_error(call, nk::ErrorKind::runtime, "normkit::cuda::");
  try {
    calls.front()();
  } catch (const nk::Error& e) {
    EXPECT_NE(std::string(e.what()).find("built without CUDA"), std::string::npos) << e.what();
  }
}

#else  // a CUDA build

TEST(Cuda, ArgumentsAreCheckedBeforeTheDevice) {
  // Host pointers, so no device is touched: the argument errors come first,
  // exactly as the CPU entry points give them.
  std::vector<float> x(24), y(24), w(5);
  const nk::TensorView<float> xv(x.data(), {2, 3, 4}), yv(y.data(), {2, 3, 4}), wv(w.data(), {5});
  expect_error([&] { nk::cuda::layer_norm(xv, yv, {4}, wv); }, nk::ErrorKind::value, "weight: expected shape (4,)");
  expect_error([&] { nk::cuda::group_norm(xv, yv, 2); }, nk::ErrorKind::value, "num_groups:");
  expect_error([&] { nk::cuda::batch_norm(xv, yv, {}, {}, {}, {}, false); }, nk::ErrorKind::value,
               "running_mean: required");
  expect_error([&] { nk::cuda::layer_norm(xv, yv, {4}, {}, {}, -1.0); }, nk::ErrorKind::value, "eps:");
}

TEST(Cuda, NoDeviceIsARuntimeError) {
  if (nk::cuda::device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  std::vector<float> x(24), y(24);
  const nk::TensorView<float> xv(x.data(), {2, 3, 4}), yv(y.data(), {2, 3, 4});
  expect_error([&] { nk::cuda::layer_norm(xv, yv, {4}); }, nk::ErrorKind::runtime, "no CUDA device");
  expect_error([&] { nk::cuda::group_norm(xv, yv, 3); }, nk::ErrorKind::runtime, "no CUDA device");
}

namespace {

std::vector<float> random_values(std::size_t n, unsigned seed, float offset = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& e : v) e = offset + d(rng);
  return v;
}

// A device copy of host floats, freed at scope end.
struct DeviceFloats {
  float* ptr = nullptr;
  std::size_t n = 0;
  explicit DeviceFloats(const std::vector<float>& host) : n(host.size()) {
    EXPECT_EQ(cudaMalloc(&ptr, n * sizeof(float) + 1), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(ptr, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceFloats() { cudaFree(ptr); }
  std::vector<float> host() const {
    std::vector<float> v(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(v.data(), ptr, n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
  nk::TensorView<float> view(nk::Dims shape) const { return {ptr, shape}; }
};

void expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu, float tol, const char* what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  for (std::size_t i = 0; i < gpu.size(); ++i)
    ASSERT_LE(std::fabs(gpu[i] - cpu[i]), tol * std::max(1.0f, std::fabs(cpu[i]))) << what << " at " << i;
}

}  // namespace

TEST(CudaDevice, HostMemoryIsRefused) {
  if (nk::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const std::vector<float> xs = random_values(24, 1);
  DeviceFloats x(xs), y(xs);
  std::vector<float> w(4, 1.0f);
  expect_error([&] { nk::cuda::layer_norm(x.view({2, 3, 4}), y.view({2, 3, 4}), {4}, nk::TensorView<float>(w.data(), {4})); },
               nk::ErrorKind::value, "weight: is host memory");
}

TEST(CudaDevice, EveryNormMatchesTheCpu) {
  if (nk::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const nk::Dims shape{4, 6, 5, 7};
  const std::size_t n = 4 * 6 * 5 * 7;
  const std::vector<float> xs = random_values(n, 2, 3.0f), dys = random_values(n, 3), ws = random_values(6, 4, 1.0f);
  const std::vector<float> zeros(n, 0.0f);
  DeviceFloats x(xs), dy(dys), w(ws), y(zeros), dx(zeros);
  std::vector<float> y_cpu(n), dx_cpu(n);
  const nk::TensorView<const float> xh(xs.data(), shape), dyh(dys.data(), shape), wh(ws.data(), {6});
  for (nk::Layout layout : {nk::Layout::NCHW, nk::Layout::NHWC}) {
    // BatchNorm training, forward and backward.
    std::vector<float> m(6), r(6);
    nk::batch_norm(xh, nk::TensorView<float>(y_cpu.data(), shape), {}, {}, wh, {}, true, 0.1, 1e-5, layout,
                   nk::TensorView<float>(m.data(), {6}), nk::TensorView<float>(r.data(), {6}));
    DeviceFloats md(m), rd(r);
    nk::cuda::batch_norm(x.view(shape), y.view(shape), {}, {}, w.view({6}), {}, true, 0.1, 1e-5, layout,
                         md.view({6}), rd.view({6}));
    expect_close(y.host(), y_cpu, 2e-5f, "batch_norm");
    expect_close(md.host(), m, 2e-5f, "batch_norm mean");
    expect_close(rd.host(), r, 2e-5f, "batch_norm rstd");
    nk::batch_norm_backward(dyh, xh, nk::TensorView<const float>(m.data(), {6}),
                            nk::TensorView<const float>(r.data(), {6}), wh,
                            nk::TensorView<float>(dx_cpu.data(), shape), {}, {}, true, layout);
    nk::cuda::batch_norm_backward(dy.view(shape), x.view(shape), md.view({6}), rd.view({6}), w.view({6}),
                                  dx.view(shape), {}, {}, true, layout);
    expect_close(dx.host(), dx_cpu, 1e-4f, "batch_norm_backward");
    // GroupNorm.
    nk::group_norm(xh, nk::TensorView<float>(y_cpu.data(), shape), 3, wh, {}, 1e-5, layout);
    nk::cuda::group_norm(x.view(shape), y.view(shape), 3, w.view({6}), {}, 1e-5, layout);
    expect_close(y.host(), y_cpu, 2e-5f, "group_norm");
  }
  // LayerNorm over the last two dims.
  nk::layer_norm(xh, nk::TensorView<float>(y_cpu.data(), shape), {5, 7});
  nk::cuda::layer_norm(x.view(shape), y.view(shape), {5, 7});
  expect_close(y.host(), y_cpu, 2e-5f, "layer_norm");
}

#endif
