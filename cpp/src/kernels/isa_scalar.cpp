// isa_scalar.cpp - the portable kernels, compiled with the baseline flags only.
#include "kernels/kernel_api.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

#define NORMKIT_ISA_NAME scalar
#define NORMKIT_ISA_STRING "scalar"
#define NORMKIT_VEC_HEADER "kernels/simd/vec_scalar.inc"
#include "kernels/isa_body.inc"
