#!/usr/bin/env bash
# The CUDA backend, built and checked on any machine with nvcc (no GPU needed):
# configures build/cuda with -DNORMKIT_CUDA=ON and builds the C++ library, the C++
# CUDA tests and the Python extension (so none of the CUDA code can rot; the rest of
# the C++ suite is the CPU build's, scripts/test.sh), runs the C++ CUDA tests
# (the device ones skip themselves without a GPU), and runs tests/python/test_cuda.py
# against the CUDA-built extension (host-side routing and errors everywhere; the
# GPU suite where a GPU and PyTorch with CUDA are present). Without nvcc it says so
# and stops (exit 0).
# Usage: bash scripts/cuda_build.sh     (from anywhere)
#   NVCC=/path/to/nvcc                  the CUDA compiler (default: nvcc on PATH, then /usr/local/cuda)
#   CUDA_ARCHS="80-real;90"             CMAKE_CUDA_ARCHITECTURES (default: normkit's list)
#   JOBS                                build parallelism (default: nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
BUILD=build/cuda
step() { printf '\n==> %s\n' "$*"; }

NVCC=${NVCC:-$(command -v nvcc || true)}
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
if [ -z "$NVCC" ]; then
  echo
  echo "************************************************************************"
  echo "NOTE: the CUDA build check is SKIPPED: no nvcc (install the CUDA toolkit,"
  echo "      or set NVCC=/path/to/nvcc)"
  echo "************************************************************************"
  exit 0
fi
echo "nvcc: $NVCC ($("$NVCC" --version | tail -n 1))"

step "configuring $BUILD with -DNORMKIT_CUDA=ON (library, C++ CUDA tests, Python extension)"
args=(-DCMAKE_BUILD_TYPE=Release -DNORMKIT_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC"
      -DNORMKIT_BUILD_TESTS=ON -DNORMKIT_BUILD_PYTHON=ON -DNORMKIT_PYTHON_STUBS=OFF
      -DPython_EXECUTABLE="$(command -v "$PYTHON")")
[ -n "${CUDA_ARCHS:-}" ] && args+=(-DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS")
cmake -S . -B "$BUILD" "${args[@]}" >"$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
grep -E 'normkit: (CUDA|kernel paths)' "$BUILD.configure.log" || true

step "building (nvcc compiles the CUDA kernels for every architecture in the list)"
start=$(date +%s)
cmake --build "$BUILD" -j "$JOBS" --target normkit normkit_cuda_tests _ext
echo "CUDA build: $(( $(date +%s) - start ))s"

step "C++: the CUDA entry points (argument checks, no-device errors; GPU tests skip without a GPU)"
"$BUILD/tests/cpp/normkit_cuda_tests"

step "C++ package with CUDA: install, find_package(normkit COMPONENTS cuda), build and run the CUDA example of docs/cpp.md"
rm -rf "$BUILD-install" "$BUILD-consumer"
cmake --install "$BUILD" --prefix "$BUILD-install" >/dev/null
mkdir -p "$BUILD-consumer"
"$PYTHON" - "$BUILD-consumer/main.cpp" <<'PY'
import sys
text = open("docs/cpp.md").read()
start = text.index("```cpp", text.index("## CUDA")) + len("```cpp")
open(sys.argv[1], "w").write(text[start:text.index("```", start)])
PY
cat >"$BUILD-consumer/CMakeLists.txt" <<'CM'
cmake_minimum_required(VERSION 3.18)
project(normkit_cuda_consumer LANGUAGES CXX)
find_package(normkit CONFIG REQUIRED COMPONENTS cuda)
add_executable(cuda_example main.cpp)
target_link_libraries(cuda_example PRIVATE normkit::normkit)
CM
cmake -S "$BUILD-consumer" -B "$BUILD-consumer/build" -DCMAKE_PREFIX_PATH="$PWD/$BUILD-install" \
      -DCUDAToolkit_ROOT="$(dirname "$(dirname "$NVCC")")" >/dev/null
cmake --build "$BUILD-consumer/build" -j "$JOBS" >/dev/null
"$BUILD-consumer/build/cuda_example"

step "Python: the CUDA-built extension (routing and errors; the GPU suite skips without a GPU)"
stage="$BUILD/python-stage"
rm -rf "$stage" && mkdir -p "$stage/normkit"
cp python/normkit/*.py python/normkit/py.typed "$stage/normkit/"
cp "$BUILD"/python/_ext*.so "$stage/normkit/"
PYTHONPATH="$PWD/$stage" "$PYTHON" - <<'PY'
import normkit
info = normkit.info()
assert info["cuda_built"], "the CUDA build's extension does not report CUDA"
print(f"normkit {normkit.__version__}: cuda_built={info['cuda_built']}, cuda_devices={info['cuda_devices']}")
PY
(cd tests/python && PYTHONPATH="$PWD/../../$stage" "$PYTHON" -c \
   'import test_cuda; print(test_cuda.GPU_SKIP or "GPU suite: runs (CUDA device and PyTorch with CUDA found)")')
(cd tests && PYTHONPATH="$PWD/../$stage" "$PYTHON" -m pytest -q -p no:cacheprovider python/test_cuda.py)
