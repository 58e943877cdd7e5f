// bench_channels.cpp - Google Benchmark of normkit's channel norms
// (batch_norm, group_norm, instance_norm), C++ only.
//
// One benchmark per (case, dtype, layout, shape, kernel path, thread count), named
//   batch_norm_train/f32/NHWC/32x64x56x56/avx512/nk_threads:2
// with the shape written logically as N x C x spatial... (an NHWC case stores
// x as (N, H, W, C)), so --benchmark_filter picks any slice
// (e.g. --benchmark_filter=/NHWC/ or --benchmark_filter=^group_norm/f16).
// Cases (issue 3): BatchNorm2d [32,64,56,56] inference and training, NCHW and
// NHWC; BatchNorm1d [4096,1024] inference (layout NC); GroupNorm G=32
// [8,320,64,64] NCHW and NHWC and [1,320,64,64] NHWC (N = 1, the common inference
// case; 5 MiB in float32, so it runs from cache); InstanceNorm2d [16,64,128,128] NCHW; float32
// everywhere, float16 and bfloat16 too for the BatchNorm2d and GroupNorm cases.
// weight, bias and the running statistics are float32 for every dtype
// (training updates the running statistics in place; with momentum 0.1 they
// stay finite, so they are not reset between iterations).
// Bytes processed = bytes of x read + bytes of y written per call, as in
// bench_rows (BatchNorm training reads x twice unless it stays in cache; it
// is still counted once); the memcpy rows (the same bytes, one thread) give a
// rough ceiling. Wall-clock time (UseRealTime): the kernels run on OpenMP threads.
//
// Extra flags (removed before Google Benchmark sees the rest):
//   --nk_threads=1,2          normkit::set_num_threads values (default 1,2)
//   --nk_paths=scalar,avx512  kernel paths (default: every one this CPU supports)
#include <algorithm>
#include <set>
#include <string>

#include "bench_common.hpp"

using namespace nkbench;

namespace {

enum class Op { bn_inference, bn_training, group, instance };

constexpr int64_t kGroups = 32;
constexpr double kMomentum = 0.1;
constexpr double kEps = 1e-5;

struct Case {
  Op op;
  nk::Layout layout;
  nk::Dims shape;  // logical: N, C, spatial...
  bool half_too;   // also float16 and bfloat16 benchmarks
};

const Case kCases[] = {
    {Op::bn_inference, nk::Layout::NCHW, {32, 64, 56, 56}, true},
    {Op::bn_inference, nk::Layout::NHWC, {32, 64, 56, 56}, true},
    {Op::bn_training, nk::Layout::NCHW, {32, 64, 56, 56}, true},
    {Op::bn_training, nk::Layout::NHWC, {32, 64, 56, 56}, true},
    {Op::bn_inference, nk::Layout::NC, {4096, 1024}, false},
    {Op::group, nk::Layout::NCHW, {8, 320, 64, 64}, true},
    {Op::group, nk::Layout::NHWC, {8, 320, 64, 64}, true},
    {Op::group, nk::Layout::NHWC, {1, 320, 64, 64}, true},  // one sample, in cache: inference
    {Op::instance, nk::Layout::NCHW, {16, 64, 128, 128}, false},
};

const char* op_name(Op op) {
  switch (op) {
    case Op::bn_inference: return "batch_norm_inf";
    case Op::bn_training: return "batch_norm_train";
    case Op::group: return "group_norm";
    case Op::instance: return "instance_norm";
  }
  return "?";
}

// x's shape as stored: channels-last layouts move C after the spatial axes.
nk::Dims physical_shape(const Case& c) {
  if (c.shape.size() <= 2 || !nk::is_channels_last(c.layout)) return c.shape;
  nk::Dims p;
  p.push_back(c.shape[0]);
  for (int i = 2; i < c.shape.size(); ++i) p.push_back(c.shape[i]);
  p.push_back(c.shape[1]);
  return p;
}

std::string shape_name(const nk::Dims& shape) {
  std::string s;
  for (int64_t d : shape) s += (s.empty() ? "" : "x") + std::to_string(d);
  return s;
}

template <class T>
void bench_channel(benchmark::State& state, const Case& c, const std::string& path, int threads) {
  nk::set_kernel_path(path);
  nk::set_num_threads(threads);
  const nk::Dims phys = physical_shape(c);
  const int64_t n = phys.product(), channels = c.shape[1];
  Buffer<T> x(n), y(n);
  Buffer<float> w(channels), b(channels), rm(channels), rv(channels);
  fill(x.get(), n, 0.5f, 1);
  fill(y.get(), n, 0.0f, 2);  // touch the pages before timing
  fill(w.get(), channels, 1.0f, 3);
  fill(b.get(), channels, 0.0f, 4);
  // x's true statistics (uniform on [-0.5, 1.5)): mean 0.5, variance 1/3.
  std::fill_n(rm.get(), channels, 0.5f);
  std::fill_n(rv.get(), channels, 1.0f / 3.0f);
  const nk::TensorView<const T> xv(x.get(), phys);
  const nk::TensorView<T> yv(y.get(), phys);
  const nk::TensorView<const float> wv(w.get(), nk::Dims{channels}), bv(b.get(), nk::Dims{channels});
  const nk::TensorView<float> rmv(rm.get(), nk::Dims{channels}), rvv(rv.get(), nk::Dims{channels});

  auto call = [&] {
    switch (c.op) {
      case Op::bn_inference:
        nk::batch_norm(xv, yv, rmv, rvv, wv, bv, /*training=*/false, kMomentum, kEps, c.layout);
        break;
      case Op::bn_training:
        nk::batch_norm(xv, yv, rmv, rvv, wv, bv, /*training=*/true, kMomentum, kEps, c.layout);
        break;
      case Op::group:
        nk::group_norm(xv, yv, kGroups, wv, bv, kEps, c.layout);
        break;
      case Op::instance:
        nk::instance_norm(xv, yv, {}, {}, wv, bv, /*use_input_stats=*/true, kMomentum, kEps, c.layout);
        break;
    }
  };
  time_calls(state, call, y.get(), 2 * n * static_cast<int64_t>(sizeof(T)));
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (!parse_options(argc, argv, "bench_channels", options)) return 2;
  add_context();

  std::set<std::string> memcpy_names;  // one memcpy row per distinct size
  for (const Case& c : kCases) {
    const std::string shape = shape_name(c.shape);
    const std::string tail = std::string("/") + nk::to_string(c.layout) + "/" + shape + "/";
    for (const auto& path : options.paths) {
      for (int t : options.thread_counts) {
        const std::string suffix = tail + path + "/nk_threads:" + std::to_string(t);
        configure(benchmark::RegisterBenchmark((op_name(c.op) + std::string("/f32") + suffix).c_str(),
                                               bench_channel<float>, c, path, t));
        if (c.half_too) {
          configure(benchmark::RegisterBenchmark((op_name(c.op) + std::string("/f16") + suffix).c_str(),
                                                 bench_channel<nk::half>, c, path, t));
          configure(benchmark::RegisterBenchmark((op_name(c.op) + std::string("/bf16") + suffix).c_str(),
                                                 bench_channel<nk::bfloat16>, c, path, t));
        }
      }
    }
    for (int bytes_per_element : {4, 2}) {
      if (bytes_per_element == 2 && !c.half_too) continue;
      const std::string name =
          "memcpy/" + std::string(bytes_per_element == 4 ? "f32/" : "f16/") + shape + "/1thread";
      if (!memcpy_names.insert(name).second) continue;
      const int64_t bytes = 2 * c.shape.product() * bytes_per_element;
      configure(benchmark::RegisterBenchmark(name.c_str(), bench_memcpy, bytes));
    }
  }

  return run_benchmarks(argc, argv);
}
