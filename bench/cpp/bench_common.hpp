// bench_common.hpp - what the Google Benchmark programs in bench/cpp share:
// aligned buffers, deterministic fills, the timed loop, the memcpy ceiling,
// the --nk_threads= / --nk_paths= flags and the normkit context lines.
//
// Conventions (every program): one benchmark per (case, dtype, kernel path,
// thread count), wall-clock time (UseRealTime: the kernels run on OpenMP
// threads), microseconds, bytes processed = bytes of x read + bytes of y
// written per call.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "normkit/normkit.hpp"

namespace nkbench {

namespace nk = normkit;
using std::int64_t;

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

template <class T> inline T make(float v) { return static_cast<T>(v); }
template <> inline nk::half make(float v) { return nk::half(v); }
template <> inline nk::bfloat16 make(float v) { return nk::bfloat16(v); }

// Cheap deterministic pseudo-random values in [center - 1, center + 1).
template <class T>
void fill(T* p, int64_t n, float center, std::uint32_t seed) {
  std::uint32_t s = seed * 2654435761u + 1u;
  for (int64_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    p[i] = make<T>(center + static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
}

// The timed loop: one untimed call first (kernel choice, OpenMP thread pool),
// then `call` per iteration; `out` is the output kept alive; `bytes_moved` is
// x read + y written per call.
template <class Call>
void time_calls(benchmark::State& state, Call&& call, const void* out, int64_t bytes_moved) {
  call();
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(out);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * bytes_moved);
  state.counters["MB_moved"] = benchmark::Counter(static_cast<double>(bytes_moved) / 1e6);
}

// The same bytes through memcpy on one thread: a rough bandwidth ceiling.
inline void bench_memcpy(benchmark::State& state, int64_t bytes) {
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

// Wall-clock time in microseconds, as every benchmark here reports.
inline benchmark::internal::Benchmark* configure(benchmark::internal::Benchmark* b) {
  return b->UseRealTime()->Unit(benchmark::kMicrosecond);
}

inline std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

inline std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& item : v) s += (s.empty() ? "" : ",") + item;
  return s;
}

// The normkit flags, taken out of argv before Google Benchmark sees the rest:
//   --nk_threads=1,2          normkit::set_num_threads values (default 1,2)
//   --nk_paths=scalar,avx512  kernel paths (default: every one this CPU supports)
struct Options {
  std::vector<std::string> paths;
  std::vector<int> thread_counts = {1, 2};
};

// Parses and checks the flags (unknown / unsupported paths, thread counts < 1);
// on a bad value prints "<program>: <flag>: <why>" and returns false.
inline bool parse_options(int& argc, char** argv, const char* program, Options& options) {
  options.paths = nk::runtime_info().kernel_paths_supported;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--nk_threads=", 0) == 0) {
      options.thread_counts.clear();
      for (const auto& t : split(arg.substr(13))) options.thread_counts.push_back(std::atoi(t.c_str()));
    } else if (arg.rfind("--nk_paths=", 0) == 0) {
      options.paths = split(arg.substr(11));
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;

  for (const auto& path : options.paths) {
    try {
      nk::set_kernel_path(path);  // refuse unknown / unsupported paths up front
    } catch (const nk::Error& e) {
      std::fprintf(stderr, "%s: --nk_paths: %s\n", program, e.what());
      return false;
    }
  }
  for (int t : options.thread_counts) {
    if (t < 1) {
      std::fprintf(stderr, "%s: --nk_threads: thread counts must be >= 1\n", program);
      return false;
    }
  }
  return true;
}

// normkit's build and runtime facts in the benchmark context (JSON "context").
inline void add_context() {
  const nk::RuntimeInfo info = nk::runtime_info();
  benchmark::AddCustomContext("normkit_version", info.build.version);
  benchmark::AddCustomContext("normkit_compiler", info.build.compiler);
  benchmark::AddCustomContext("normkit_openmp", info.build.openmp);
  benchmark::AddCustomContext("normkit_kernel_paths_supported", join(info.kernel_paths_supported));
  benchmark::AddCustomContext("normkit_default_threads", std::to_string(info.num_threads));
}

// Google Benchmark's own flags and the run, after everything is registered.
inline int run_benchmarks(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace nkbench
