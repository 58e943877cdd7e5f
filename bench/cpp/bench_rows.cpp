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
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"

namespace nk = normkit;
using std::int64_t;

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

// 64-byte aligned, uninitialised storage for n elements of T.
template <class T>
struct Buffer {
  struct Free {
    void operator()(T* p) const { ::operator delete(p, std::align_val_t(64)); }
  };
  std::unique_ptr<T, Free> ptr;
  explicit Buffer(int64_t n)
      : ptr(static_cast<T*>(::operator new(static_cast<size_t>(n) * sizeof(T), std::align_val_t(64)))) {}
  T* get() const { return ptr.get(); }
};

template <class T> T make(float v) { return static_cast<T>(v); }
template <> nk::half make(float v) { return nk::half(v); }

// Cheap deterministic pseudo-random values in [center - 1, center + 1).
template <class T>
void fill(T* p, int64_t n, float center, std::uint32_t seed) {
  std::uint32_t s = seed * 2654435761u + 1u;
  for (int64_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    p[i] = make<T>(center + static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
}


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
  call();  // first use: kernel choice, OpenMP thread pool
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(y.get());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * 2 * n * static_cast<int64_t>(sizeof(T)));
  state.counters["MB_moved"] = benchmark::Counter(2.0 * n * sizeof(T) / 1e6);
}

// The same bytes through memcpy on one thread: a rough bandwidth ceiling.
void bench_memcpy(benchmark::State& state, int64_t bytes) {
  Buffer<unsigned char> src(bytes / 2), dst(bytes / 2);
  std::memset(src.get(), 1, static_cast<size_t>(bytes / 2));
  std::memset(dst.get(), 0, static_cast<size_t>(bytes / 2));
  for (auto _ : state) {
    std::memcpy(dst.get(), src.get(), static_cast<size_t>(bytes / 2));
    benchmark::DoNotOptimize(dst.get());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * bytes);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& item : v) s += (s.empty() ? "" : ",") + item;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  const nk::RuntimeInfo info = nk::runtime_info();
  std::vector<std::string> paths = info.kernel_paths_supported;
  std::vector<int> thread_counts = {1, 2};

  // Take our own flags out of argv.
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--nk_threads=", 0) == 0) {
      thread_counts.clear();
      for (const auto& t : split(arg.substr(13))) thread_counts.push_back(std::atoi(t.c_str()));
    } else if (arg.rfind("--nk_paths=", 0) == 0) {
      paths = split(arg.substr(11));
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;

  for (const auto& path : paths) {
    try {
      nk::set_kernel_path(path);  // refuse unknown / unsupported paths up front
    } catch (const nk::Error& e) {
      std::fprintf(stderr, "bench_rows: --nk_paths: %s\n", e.what());
      return 2;
    }
  }
  for (int t : thread_counts) {
    if (t < 1) {
      std::fprintf(stderr, "bench_rows: --nk_threads: thread counts must be >= 1\n");
      return 2;
    }
  }

  benchmark::AddCustomContext("normkit_version", info.build.version);
  benchmark::AddCustomContext("normkit_compiler", info.build.compiler);
  benchmark::AddCustomContext("normkit_openmp", info.build.openmp);
  benchmark::AddCustomContext("normkit_kernel_paths_supported", join(info.kernel_paths_supported));
  benchmark::AddCustomContext("normkit_default_threads", std::to_string(info.num_threads));

  for (const Case& c : kCases) {
    const std::string shape = std::to_string(c.rows) + "x" + std::to_string(c.cols);
    const std::string norm = c.norm == Norm::layer ? "layer_norm" : "rms_norm";
    for (const auto& path : paths) {
      for (int t : thread_counts) {
        const std::string suffix = "/" + shape + "/" + path + "/nk_threads:" + std::to_string(t);
        benchmark::RegisterBenchmark((norm + "/f32" + suffix).c_str(), bench_norm<float>, c.norm, c.rows, c.cols,
                                     path, t)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark((norm + "/f16" + suffix).c_str(), bench_norm<nk::half>, c.norm, c.rows,
                                     c.cols, path, t)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
      }
    }
    for (int bytes_per_element : {4, 2}) {
      const int64_t bytes = 2 * c.rows * c.cols * bytes_per_element;
      benchmark::RegisterBenchmark(
          ("memcpy/" + std::string(bytes_per_element == 4 ? "f32/" : "f16/") + shape + "/1thread").c_str(),
          bench_memcpy, bytes)
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
    }
  }

  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
