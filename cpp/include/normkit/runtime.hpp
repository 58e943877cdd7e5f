// normkit/runtime.hpp - threads, kernel-path selection and build information.
#pragma once

#include <string>
#include <vector>

namespace normkit {

// Threads used by normkit's kernels. Default: OMP_NUM_THREADS if set, else the
// number of cores OpenMP sees. n must be >= 1. An engine that owns its threads
// calls set_num_threads(1) and runs normkit calls from its own workers; calls
// from several threads at once are safe. Small problems always run on one thread.
void set_num_threads(int n);
// The number of threads normkit's kernels use at most (process-wide).
int get_num_threads();

// Kernel paths, from the portable one up: "scalar", "avx2", "avx512",
// "avx512_bf16" (the AVX-512 kernels with the CPU's bfloat16 conversion).
// The best path the CPU (and OS) supports is chosen at first use; the
// environment variable NORMKIT_ISA=scalar|avx2|avx512|avx512_bf16 forces one,
// and asking for one the CPU lacks is an Error (at first use).
// The kernel path in use (one of the above); chooses it on first use.
std::string kernel_path();
// Switch the path at run time (tests use this to cover every path in one
// process). Throws Error if `name` is unknown, not compiled in, or unsupported.
void set_kernel_path(const std::string& name);

// How this normkit was built.
struct BuildInfo {
  std::string version;                         // "0.1.0" (NORMKIT_VERSION_STRING)
  std::string compiler;                        // e.g. "GCC 12.2.0"
  std::vector<std::string> kernel_flags;       // "avx2: -mavx2 -mfma -mf16c", one per compiled path
  std::string openmp;                          // "OpenMP 201511" or "none (single-threaded build)"
  bool cuda_built = false;                     // built with the CUDA backend (-DNORMKIT_CUDA=ON)
};

// What normkit found and uses in this process.
struct RuntimeInfo {
  BuildInfo build;
  std::vector<std::string> cpu_features;       // what CPUID + XGETBV reported
  std::vector<std::string> kernel_paths_compiled;
  std::vector<std::string> kernel_paths_supported;  // compiled and runnable on this CPU
  std::string kernel_path;                     // the one in use
  int num_threads = 1;                         // get_num_threads()
  int cuda_devices = 0;                        // CUDA devices found (0 without CUDA)
};

// Build facts, CPU features, kernel paths (compiled, supported, in use) and threads.
RuntimeInfo runtime_info();

}  // namespace normkit
