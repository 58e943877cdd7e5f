// runtime/info.cpp - what was built and what was found, for normkit.info().
#include "normkit/cuda.hpp"
#include "normkit/error.hpp"
#include "normkit/runtime.hpp"
#include "normkit/version.hpp"
#include "runtime/cpu_features.hpp"
#include "runtime/dispatch.hpp"

namespace normkit {

namespace {
std::string compiler_name() {
#if defined(__clang__)
  return std::string("Clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("GCC ") + __VERSION__;
#elif defined(_MSC_VER)
  return "MSVC " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}
}  // namespace

RuntimeInfo runtime_info() {
  RuntimeInfo info;
  info.build.version = NORMKIT_VERSION_STRING;
  info.build.compiler = compiler_name();
  info.build.kernel_flags.push_back(std::string("scalar: ") + NORMKIT_SCALAR_FLAGS);
#if defined(NORMKIT_HAVE_AVX2_KERNELS)
  info.build.kernel_flags.push_back(std::string("avx2: ") + NORMKIT_AVX2_FLAGS);
#endif
#if defined(NORMKIT_HAVE_AVX512_KERNELS)
  info.build.kernel_flags.push_back(std::string("avx512: ") + NORMKIT_AVX512_FLAGS);
#endif
#if defined(NORMKIT_HAVE_AVX512_BF16_KERNELS)
  info.build.kernel_flags.push_back(std::string("avx512_bf16: ") + NORMKIT_AVX512_BF16_FLAGS);
#endif
#if defined(_OPENMP)
  info.build.openmp = "OpenMP " + std::to_string(_OPENMP);
#else
  info.build.openmp = "none (single-threaded build)";
#endif
#if defined(NORMKIT_WITH_CUDA)
  info.build.cuda_built = true;
#endif
  info.cpu_features = runtime::cpu_features().names();
  info.kernel_paths_compiled = runtime::compiled_kernel_paths();
  info.kernel_paths_supported = runtime::supported_kernel_paths();
  try {
    info.kernel_path = kernel_path();
  } catch (const Error& e) {  // e.g. NORMKIT_ISA names a path this CPU lacks
    info.kernel_path = std::string("unavailable: ") + e.what();
  }
  info.num_threads = get_num_threads();
  info.cuda_devices = cuda::device_count();
  return info;
}

}  // namespace normkit
