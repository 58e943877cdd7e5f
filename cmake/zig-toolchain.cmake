# CMake toolchain of the release wheel (scripts/build_wheel.sh): zig's clang
# (the ziglang PyPI package) targeting an old glibc, so the extension needs no
# newer glibc symbol versions than the manylinux policy the wheel is tagged with,
# and zig's libc++/libc++abi/libunwind linked statically (no GLIBCXX/CXXABI/GCC
# versions at all); OpenMP from LLVM's runtime (the cmeel-libomp PyPI package),
# which needs only GLIBC_2.14 and which auditwheel then bundles into the wheel.
# The developer build (`pip install .`) does not use this file.
#
# Inputs, from the environment (so that CMake's try_compile projects and every
# later compile see the same; scripts/build_wheel.sh sets them):
#   NORMKIT_ZIG        the zig executable
#   NORMKIT_ZIG_GLIBC  the glibc version to target, e.g. 2.17 (manylinux2014)
#   NORMKIT_LIBOMP     prefix with include/omp.h and lib/libomp.so
#
# Not a cross build (CMAKE_SYSTEM_NAME is left alone): the binaries run on the
# build machine too (its glibc is newer), so the type-stub step can import the
# extension.
foreach(var NORMKIT_ZIG NORMKIT_ZIG_GLIBC NORMKIT_LIBOMP)
  if(NOT DEFINED ENV{${var}})
    message(FATAL_ERROR "zig-toolchain.cmake: environment variable ${var} is not set "
                        "(this toolchain is meant to be used through scripts/build_wheel.sh)")
  endif()
endforeach()

# CMake takes one executable per tool: small wrappers add zig's subcommand and -target.
set(CMAKE_C_COMPILER "${CMAKE_CURRENT_LIST_DIR}/zig/cc")
set(CMAKE_CXX_COMPILER "${CMAKE_CURRENT_LIST_DIR}/zig/c++")
set(CMAKE_AR "${CMAKE_CURRENT_LIST_DIR}/zig/ar" CACHE FILEPATH "zig ar")
set(CMAKE_RANLIB "${CMAKE_CURRENT_LIST_DIR}/zig/ranlib" CACHE FILEPATH "zig ranlib")

# FindOpenMP would probe zig's clang for a runtime it does not ship: tell it
# which flags and library to use. omp.h comes from the same package as libomp.
set(OpenMP_CXX_FLAGS "-fopenmp -isystem $ENV{NORMKIT_LIBOMP}/include" CACHE STRING "")
set(OpenMP_CXX_LIB_NAMES "omp" CACHE STRING "")
set(OpenMP_omp_LIBRARY "$ENV{NORMKIT_LIBOMP}/lib/libomp.so" CACHE FILEPATH "")
