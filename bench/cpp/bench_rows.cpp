// bench_rows.cpp - Google Benchmark of normkit::layer_norm / rms_norm, C++ only.
//
// One benchmark per (norm, dtype, shape, kernel path, thread count), named
//   layer_norm/f32/8192x768/avx512/nk_threads:2
// so --benchmark_filter picks any slice (e.g. --benchmark_filter=/avx2/).
// Bytes processed = bytes of x read + bytes of y written per call, so the
// bytes_per_second column is the effective memory bandwidth; the memcpy
// rows (the same bytes, one thread) give a rough ceiling to read it against.
// Wall-clock time (UseRealTime): the kernels run on OpenMP threads.
//
// Extra flags (removed before Google Benchmark sees the rest):
//   --nk_threads=1,2          normkit::set_num_threads values (default 1,2)
//   --nk_paths=scalar,avx512  kernel paths (default: every one this CPU supports)
#include <string>

#include "bench_common.hpp"

using namespace nkbench;

namespace {

enum class Norm { layer, rms };

struct Case {
  Norm norm;
  int64_t rows, cols;
};

// The shapes of issue 2: LayerNorm at transformer widths and one latency
// case, RMSNorm at a Llama-like width.
const Case kCases[] = {
    {Norm::layer, 8192, 768},
    {Norm::layer, 4096, 4096},
    {Norm::layer, 2048, 12288},
    {Norm::layer, 64, 1024},
    {Norm::rms, 8192, 4096},
};

template <class T>
void bench_norm(benchmark::State& state, Norm norm, int64_t rows, int64_t cols, const std::string& path,
                int threads) {
  nk::set_kernel_path(path);
  nk::set_num_threads(threads);
  const int64_t n = rows * cols;
  Buffer<T> x(n), y(n), w(cols), b(cols);
  fill(x.get(), n, 0.5f, 1);
  fill(y.get(), n, 0.0f, 2);  // touch the pages before timing
  fill(w.get(), cols, 1.0f, 3);
  fill(b.get(), cols, 0.0f, 4);
  const nk::TensorView<const T> xv(x.get(), nk::Dims{rows, cols});
  const nk::TensorView<T> yv(y.get(), nk::Dims{rows, cols});
  const nk::TensorView<const T> wv(w.get(), nk::Dims{cols}), bv(b.get(), nk::Dims{cols});
  const nk::Dims normalized{cols};

  auto call = [&] {
    if (norm == Norm::layer) nk::layer_norm(xv, yv, normalized, wv, bv, 1e-5);
    else nk::rms_norm(xv, yv, normalized, wv, 1e-6);
  };
  time_calls(state, call, y.get(), 2 * n * static_cast<int64_t>(sizeof(T)));
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (!parse_options(argc, argv, "bench_rows", options)) return 2;
  add_context();

  for (const Case& c : kCases) {
    const std::string shape = std::to_string(c.rows) + "x" + std::to_string(c.cols);
    const std::string norm = c.norm == Norm::layer ? "layer_norm" : "rms_norm";
    for (const auto& path : options.paths) {
      for (int t : options.thread_counts) {
        const std::string suffix = "/" + shape + "/" + path + "/nk_threads:" + std::to_string(t);
        configure(benchmark::RegisterBenchmark((norm + "/f32" + suffix).c_str(), bench_norm<float>, c.norm, c.rows,
                                               c.cols, path, t));
        configure(benchmark::RegisterBenchmark((norm + "/f16" + suffix).c_str(), bench_norm<nk::half>, c.norm,
                                               c.rows, c.cols, path, t));
        configure(benchmark::RegisterBenchmark((norm + "/bf16" + suffix).c_str(), bench_norm<nk::bfloat16>, c.norm,
                                               c.rows, c.cols, path, t));
      }
    }
    for (int bytes_per_element : {4, 2}) {
      const int64_t bytes = 2 * c.rows * c.cols * bytes_per_element;
      configure(benchmark::RegisterBenchmark(
          ("memcpy/" + std::string(bytes_per_element == 4 ? "f32/" : "f16/") + shape + "/1thread").c_str(),
          bench_memcpy, bytes));
    }
  }

  return run_benchmarks(argc, argv);
}
