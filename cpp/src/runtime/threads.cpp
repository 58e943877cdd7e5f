#include "runtime/threads.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "core/check.hpp"
#include "normkit/runtime.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace normkit {

namespace {
std::atomic<int> g_num_threads{0};  // 0: not chosen yet

int default_num_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();  // honours OMP_NUM_THREADS, else the core count
#else
  return 1;
#endif
}
}  // namespace

void set_num_threads(int n) {
  if (n < 1) core::fail_value("n: number of threads must be >= 1, got " + std::to_string(n));
  g_num_threads.store(n, std::memory_order_relaxed);
}

int get_num_threads() {
  int n = g_num_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    n = default_num_threads();
    if (n < 1) n = 1;
    int expected = 0;
    if (!g_num_threads.compare_exchange_strong(expected, n)) n = expected;
  }
  return n;
}

namespace runtime {

namespace {
// A byte count from the environment variable `name`, or `fallback` when it is
// unset or not a number >= 0 (read once per variable: the callers cache it).
std::int64_t env_bytes(const char* name, std::int64_t fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  return (end != env && v >= 0) ? static_cast<std::int64_t>(v) : fallback;
}
}  // namespace

int threads_for(std::int64_t bytes) {
#if defined(_OPENMP)
  static const std::int64_t per_thread =
      std::max<std::int64_t>(1, env_bytes("NORMKIT_MIN_BYTES_PER_THREAD", kMinBytesPerThread));
  const std::int64_t useful = bytes / per_thread;
  const int n = get_num_threads();
  if (useful <= 1) return 1;
  return useful < n ? static_cast<int>(useful) : n;
#else
  (void)bytes;
  return 1;
#endif
}

int threads_for_rows(std::int64_t bytes, std::int64_t rows) { return threads_for(bytes + rows * kRowFixedBytes); }

void run_team(int threads, const std::function<void(int, int)>& body) {
#if defined(_OPENMP)
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    body(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  (void)threads;
  body(0, 1);
}

void team_barrier() {
#if defined(_OPENMP)
#pragma omp barrier
#endif
}

bool use_streaming_stores(std::int64_t bytes) {
  static const std::int64_t threshold = env_bytes("NORMKIT_STREAMING_MIN_BYTES", kStreamingMinBytes);
  return bytes >= threshold;
}

}  // namespace runtime
}  // namespace normkit
