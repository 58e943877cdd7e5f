// bench_backward.cpp - Google Benchmark of normkit's backward functions
// (layer_norm_backward, rms_norm_backward, batch_norm_backward in training
// mode, group_norm_backward, instance_norm_backward), C++ only.
//
// One benchmark per (case, dtype, layout, shape, kernel path, thread count), named
//   batch_norm_train_bwd/f32/NHWC/32x64x56x56/avx512/nk_threads:2
//   layer_norm_bwd/f32/8192x768/avx2/nk_threads:1
// with channel shapes written logically as N x C x spatial... (an NHWC case
// stores x and dy as (N, H, W, C)), so --benchmark_filter picks any slice
// (e.g. --benchmark_filter=_bwd/f32/NHWC or --benchmark_filter=/scalar/).
// Cases (the shapes of bench/python/bench_backward.py): LayerNorm [8192,768]
// float32 and float16 (float32 weight), RMSNorm [8192,4096] float32, BatchNorm2d
// training [32,64,56,56] NCHW and NHWC, and NCHW [256,512,7,7], [64,2048,7,7],
// [32,1024,14,14]; GroupNorm G=32 [8,320,64,64] NCHW and NHWC, InstanceNorm2d
// [16,64,128,128] NCHW and NHWC (affine).
//
// Only the backward is timed. x and dy are fixed; mean and rstd come from one
// untimed forward (the statistics the forward writes for backward); every call
// writes dx and, where the norm has parameters, dweight/dbias (overwritten,
// float32). Bytes processed = bytes of x read + dy read + dx written per call
// (3 times x's bytes; statistics and parameter gradients left out), so the
// bytes_per_second column is the effective memory bandwidth. Every backward
// here needs per-row / per-channel / per-group sums before it writes dx, so it
// reads x and dy twice unless they stay in cache; it is counted once. The
// memcpy rows copy 1.5 times x's bytes (as many bytes moved, one thread): a
// rough ceiling. Wall-clock time (UseRealTime): the kernels run on OpenMP threads.
//
// Extra flags (removed before Google Benchmark sees the rest):
//   --nk_threads=1,2          normkit::set_num_threads values (default 1,2)
//   --nk_paths=scalar,avx512  kernel paths (default: every one this CPU supports)
#include <set>
#include <string>

#include "bench_common.hpp"

using namespace nkbench;

namespace {

enum class Op { layer, rms, bn_training, group, instance };

constexpr int64_t kGroups = 32;
constexpr double kEps = 1e-5;
constexpr double kRmsEps = 1e-6;

struct Case {
  Op op;
  nk::Layout layout;  // channel norms only
  nk::Dims shape;     // rows norms: (rows, cols); channel norms: logical N, C, spatial...
  bool half_too;      // also a float16 benchmark (float32 weight)
};

const Case kCases[] = {
    {Op::layer, nk::Layout::NC, {8192, 768}, true},
    {Op::rms, nk::Layout::NC, {8192, 4096}, false},
    {Op::bn_training, nk::Layout::NCHW, {32, 64, 56, 56}, false},
    {Op::bn_training, nk::Layout::NHWC, {32, 64, 56, 56}, false},
    // Late ResNet stages, small planes: 7x7 (196 bytes) with 512 and 2048 channels, 14x14 (784 bytes) with 1024.
    {Op::bn_training, nk::Layout::NCHW, {256, 512, 7, 7}, false},
    {Op::bn_training, nk::Layout::NCHW, {64, 2048, 7, 7}, false},
    {Op::bn_training, nk::Layout::NCHW, {32, 1024, 14, 14}, false},
    {Op::group, nk::Layout::NCHW, {8, 320, 64, 64}, false},
    {Op::group, nk::Layout::NHWC, {8, 320, 64, 64}, false},
    {Op::instance, nk::Layout::NCHW, {16, 64, 128, 128}, false},
    {Op::instance, nk::Layout::NHWC, {16, 64, 128, 128}, false},
};

bool is_rows(Op op) { return op == Op::layer || op == Op::rms; }

const char* op_name(Op op) {
  switch (op) {
    case Op::layer: return "layer_norm_bwd";
    case Op::rms: return "rms_norm_bwd";
    case Op::bn_training: return "batch_norm_train_bwd";
    case Op::group: return "group_norm_bwd";
    case Op::instance: return "instance_norm_bwd";
  }
  return "?";
}

// x's shape as stored: channels-last layouts move C after the spatial axes.
nk::Dims physical_shape(const Case& c) {
  if (is_rows(c.op) || c.shape.size() <= 2 || !nk::is_channels_last(c.layout)) return c.shape;
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

// Number of mean/rstd entries the forward writes for this case.
int64_t stats_count(const Case& c) {
  switch (c.op) {
    case Op::layer:
    case Op::rms: return c.shape[0];
    case Op::bn_training: return c.shape[1];
    case Op::group: return c.shape[0] * kGroups;
    case Op::instance: return c.shape[0] * c.shape[1];
  }
  return 0;
}

// Statistics views in the shapes each backward expects.
nk::Dims stats_shape(const Case& c) {
  switch (c.op) {
    case Op::layer:
    case Op::rms: return nk::Dims{c.shape[0]};
    case Op::bn_training: return nk::Dims{c.shape[1]};
    case Op::group: return nk::Dims{c.shape[0], kGroups};
    case Op::instance: return nk::Dims{c.shape[0], c.shape[1]};
  }
  return {};
}

template <class T>
void bench_backward(benchmark::State& state, const Case& c, const std::string& path, int threads) {
  nk::set_kernel_path(path);
  nk::set_num_threads(threads);
  const nk::Dims phys = physical_shape(c);
  const int64_t n = phys.product();
  const int64_t params = c.shape[1];  // rows norms: cols; channel norms: channels
  const int64_t nstats = stats_count(c);
  Buffer<T> x(n), dy(n), dx(n), y(n);
  Buffer<float> w(params), b(params), dw(params), db(params), rm(params), rv(params);
  Buffer<float> mean(nstats), rstd(nstats);
  fill(x.get(), n, 0.5f, 1);
  fill(dy.get(), n, 0.0f, 5);
  fill(dx.get(), n, 0.0f, 2);  // touch the pages before timing
  fill(w.get(), params, 1.0f, 3);
  fill(b.get(), params, 0.0f, 4);
  fill(rm.get(), params, 0.0f, 6);
  fill(rv.get(), params, 1.0f, 7);
  const nk::TensorView<const T> xv(x.get(), phys), dyv(dy.get(), phys);
  const nk::TensorView<T> dxv(dx.get(), phys), yv(y.get(), phys);
  const nk::TensorView<const float> wv(w.get(), nk::Dims{params}), bv(b.get(), nk::Dims{params});
  const nk::TensorView<float> dwv(dw.get(), nk::Dims{params}), dbv(db.get(), nk::Dims{params});
  const nk::TensorView<float> rmv(rm.get(), nk::Dims{params}), rvv(rv.get(), nk::Dims{params});
  const nk::Dims sshape = stats_shape(c);
  const nk::TensorView<float> meanv(mean.get(), sshape), rstdv(rstd.get(), sshape);
  const nk::Dims normalized{c.shape[1]};

  // The forward, once, untimed: the statistics backward takes.
  switch (c.op) {
    case Op::layer: nk::layer_norm(xv, yv, normalized, wv, bv, kEps, meanv, rstdv); break;
    case Op::rms: nk::rms_norm(xv, yv, normalized, wv, kRmsEps, rstdv); break;
    case Op::bn_training:
      nk::batch_norm(xv, yv, rmv, rvv, wv, bv, /*training=*/true, 0.1, kEps, c.layout, meanv, rstdv);
      break;
    case Op::group: nk::group_norm(xv, yv, kGroups, wv, bv, kEps, c.layout, meanv, rstdv); break;
    case Op::instance:
      nk::instance_norm(xv, yv, {}, {}, wv, bv, /*use_input_stats=*/true, 0.1, kEps, c.layout, meanv, rstdv);
      break;
  }

  auto call = [&] {
    switch (c.op) {
      case Op::layer: nk::layer_norm_backward(dyv, xv, meanv, rstdv, normalized, wv, dxv, dwv, dbv); break;
      case Op::rms: nk::rms_norm_backward(dyv, xv, rstdv, normalized, wv, dxv, dwv); break;
      case Op::bn_training:
        nk::batch_norm_backward(dyv, xv, meanv, rstdv, wv, dxv, dwv, dbv, /*training=*/true, c.layout);
        break;
      case Op::group: nk::group_norm_backward(dyv, xv, meanv, rstdv, kGroups, wv, dxv, dwv, dbv, c.layout); break;
      case Op::instance:
        nk::instance_norm_backward(dyv, xv, meanv, rstdv, wv, dxv, dwv, dbv, /*use_input_stats=*/true, c.layout);
        break;
    }
  };
  time_calls(state, call, dx.get(), 3 * n * static_cast<int64_t>(sizeof(T)));
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (!parse_options(argc, argv, "bench_backward", options)) return 2;
  add_context();

  std::set<std::string> memcpy_names;  // one memcpy row per distinct size
  for (const Case& c : kCases) {
    const std::string shape = shape_name(c.shape);
    const std::string tail =
        (is_rows(c.op) ? std::string("/") : std::string("/") + nk::to_string(c.layout) + "/") + shape + "/";
    for (const auto& path : options.paths) {
      for (int t : options.thread_counts) {
        const std::string suffix = tail + path + "/nk_threads:" + std::to_string(t);
        configure(benchmark::RegisterBenchmark((op_name(c.op) + std::string("/f32") + suffix).c_str(),
                                               bench_backward<float>, c, path, t));
        if (c.half_too)
          configure(benchmark::RegisterBenchmark((op_name(c.op) + std::string("/f16") + suffix).c_str(),
                                                 bench_backward<nk::half>, c, path, t));
      }
    }
    for (int bytes_per_element : {4, 2}) {
      if (bytes_per_element == 2 && !c.half_too) continue;
      const std::string name =
          "memcpy/" + std::string(bytes_per_element == 4 ? "f32/" : "f16/") + shape + "/1thread";
      if (!memcpy_names.insert(name).second) continue;
      const int64_t bytes = 3 * c.shape.product() * bytes_per_element;  // bench_memcpy copies bytes / 2
      configure(benchmark::RegisterBenchmark(name.c_str(), bench_memcpy, bytes));
    }
  }

  return run_benchmarks(argc, argv);
}
