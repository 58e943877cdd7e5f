// isa_avx512_bf16.cpp - the AVX-512 kernels compiled with -mavx512bf16 (and
// -mavx512dq) as well (see CMakeLists): the same code, with float32 -> bfloat16
// narrowing done by the CPU's VCVTNEPS2BF16 (simd/vec_avx512.inc). Only called
// after CPUID/XGETBV agree.
#include <immintrin.h>

#include "kernels/kernel_api.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

#define NORMKIT_ISA_NAME avx512_bf16
#define NORMKIT_ISA_STRING "avx512_bf16"
#define NORMKIT_VEC_HEADER "kernels/simd/vec_avx512.inc"
#include "kernels/isa_body.inc"
