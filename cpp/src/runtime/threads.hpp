// runtime/threads.hpp - how much parallelism and which stores a problem gets.
#pragma once

#include <cstdint>

namespace normkit::runtime {

// Threads to use for a problem that moves `bytes` of memory: one thread per
// kMinBytesPerThread, at most get_num_threads(). Below that the OpenMP fork
// costs more than the work it would split: a LayerNorm [64, 1024] (512 KiB
// moved, ~8 us on one core) ran no faster on two threads, and its time then
// varied with how soon the second thread woke.
constexpr std::int64_t kMinBytesPerThread = 384 * 1024;
int threads_for(std::int64_t bytes);

// Whether to write an output of `bytes` with non-temporal (streaming) stores.
// Large outputs do not fit in cache anyway; streaming them avoids reading each
// line before writing it. Default threshold kStreamingMinBytes; the
// environment variable NORMKIT_STREAMING_MIN_BYTES overrides it (for tuning).
constexpr std::int64_t kStreamingMinBytes = 16 * 1024 * 1024;
bool use_streaming_stores(std::int64_t bytes);

}  // namespace normkit::runtime
