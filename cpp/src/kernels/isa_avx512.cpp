// isa_avx512.cpp - kernels compiled with -mavx512f -mavx512bw -mavx512vl (and
// the AVX2 set) (see CMakeLists). Only called after CPUID/XGETBV agree.
#include <immintrin.h>

#include "kernels/kernel_api.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

#define NORMKIT_ISA_NAME avx512
#define NORMKIT_ISA_STRING "avx512"
#define NORMKIT_VEC_HEADER "kernels/simd/vec_avx512.inc"
#include "kernels/isa_body.inc"
