// runtime/threads.hpp - how much parallelism and which stores a problem gets.
#pragma once

#include <cstdint>
#include <functional>

namespace normkit::runtime {

// Threads to use for a problem that moves `bytes` of memory: one thread per
// kMinBytesPerThread, at most get_num_threads(). Below that the OpenMP fork
// costs more than the work it would split. A LayerNorm [64, 1024] (512 KiB
// moved, 6-9 us on one core) splits in two: on a Zen 5 EPYC, called back to
// back, float32 ran 1.35-1.5x faster (16-bit 1.5-1.65x) on two threads than
// on one, and from Python 1.2x; with the second thread asleep (1 ms between
// calls) it may wake late, which PyTorch, splitting the same problem, pays too.
// A Zen 3 EPYC measured the same direction (LayerNorm [64, 1024] 15-16 us on two
// threads, 17-25 us on one); a Zen 4 EPYC found two threads no faster.
// NORMKIT_MIN_BYTES_PER_THREAD overrides it (for tuning).
constexpr std::int64_t kMinBytesPerThread = 128 * 1024;
int threads_for(std::int64_t bytes);

// threads_for row-wise work of `bytes` in `rows` rows: each row adds
// kRowFixedBytes, its fixed cost (horizontal sums, coefficients, set-up and
// tail) in bytes of streaming, as short rows are more work per byte
// (InstanceNorm [1,512,7,7], 512 rows of 49 values, 200 KiB moved: 19 -> 14 us
// from Python on two threads instead of one, Zen 5 EPYC).
constexpr std::int64_t kRowFixedBytes = 128;
int threads_for_rows(std::int64_t bytes, std::int64_t rows);

// Whether to write an output of `bytes` with non-temporal (streaming) stores.
// Large outputs do not fit in cache anyway; streaming them avoids reading each
// line before writing it. Default threshold kStreamingMinBytes; the
// environment variable NORMKIT_STREAMING_MIN_BYTES overrides it (for tuning).
constexpr std::int64_t kStreamingMinBytes = 16 * 1024 * 1024;
bool use_streaming_stores(std::int64_t bytes);

// Runs body(id, team) on a team of up to `threads` threads (id in [0, team)),
// for plans that keep one team through several phases: team_barrier() between
// them costs less than a join and a second fork, and the team shares the work
// in between. The body must not throw. Without OpenMP: body(0, 1).
void run_team(int threads, const std::function<void(int id, int team)>& body);
void team_barrier();  // inside run_team's body: waits for the whole team

// Thread `id`'s share [begin, end) of `count` units split over `team` threads
// in contiguous runs, the first count % team threads taking one more.
struct Share {
  std::int64_t begin, end;
};
inline Share share_of(std::int64_t count, int id, int team) {
  const std::int64_t base = count / team, extra = count % team;
  const std::int64_t begin = id * base + (id < extra ? id : extra);
  return {begin, begin + base + (id < extra ? 1 : 0)};
}

}  // namespace normkit::runtime
