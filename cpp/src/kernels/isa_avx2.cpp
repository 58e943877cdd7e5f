// isa_avx2.cpp - kernels compiled with -mavx2 -mfma -mf16c (see CMakeLists).
// Only ever called after CPUID/XGETBV said the CPU and OS support them.
#include <immintrin.h>

#include "kernels/kernel_api.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

#define NORMKIT_ISA_NAME avx2
#define NORMKIT_ISA_STRING "avx2"
#define NORMKIT_VEC_HEADER "kernels/simd/vec_avx2.inc"
#include "kernels/isa_body.inc"
