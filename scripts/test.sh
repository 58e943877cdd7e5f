#!/usr/bin/env bash
# The whole test suite: installs what the tests need (CMake and Ninja from PyPI
# where missing), builds and installs normkit, then runs the Python tests
# (pytest), checks the release wheel and the sdist (scripts/check_wheel.sh),
# builds and runs the C++ example against the installed C++ package, checks the package's CMake errors, runs
# the C++ tests (GoogleTest, via ctest), builds the CUDA backend with nvcc and
# runs its host-side tests, runs the C++ tests again under ASan+UBSan and TSan,
# and fuzzes the C++ entry points.
# Usage: bash scripts/test.sh   (from anywhere; exits non-zero on failure)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

# Each step's wall time, listed at the end (also on failure): CI's budget is
# minutes, and this says where they went.
step_name="" step_start=$SECONDS step_times=()
end_step() {
  [ -n "$step_name" ] && step_times+=("$(printf '%5ss  %s' $((SECONDS - step_start)) "$step_name")")
  step_name=""
}
step() { end_step; step_name=$*; step_start=$SECONDS; printf '\n==> %s\n' "$*"; }
trap 'end_step; printf "\n==> time per step (%ss in all)\n" $SECONDS
      printf "  %s\n" ${step_times[@]+"${step_times[@]}"}' EXIT

# --- system packages for the C++ tests (GoogleTest, Google Benchmark) ----------
need_apt=()
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
[ -f /usr/include/benchmark/benchmark.h ] || need_apt+=(libbenchmark-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    step "installing ${need_apt[*]} from the system packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "NOTE: ${need_apt[*]} missing and cannot be installed here (needs apt-get as root):"
    echo "      the C++ tests that need them are skipped. Install them to run everything."
  fi
fi

# --- pip, CMake and Ninja ----------------------------------------------------------
# pip installs into PYTHON's environment. A system Python marked externally managed
# (PEP 668) refuses: say what to do rather than override it (--break-system-packages).
pip_install() {
  local log rc=0
  log=$(mktemp)
  "$PYTHON" -m pip install "$@" 2> >(tee "$log" >&2) || rc=$?
  if [ $rc -ne 0 ] && grep -q externally-managed-environment "$log"; then
    echo >&2
    echo "test.sh: $PYTHON refuses pip installs (PEP 668, externally managed). Use a virtual environment:" >&2
    echo "    python3 -m venv .venv && . .venv/bin/activate && bash scripts/test.sh" >&2
  fi
  rm -f "$log"
  return $rc
}
# The C++ builds below call cmake (and the wheel build ninja) from PATH: where the system
# has none, or a CMake older than CMakeLists.txt needs (3.18), they come from PyPI into
# PYTHON's environment, whose scripts directory goes first on PATH.
PY_SCRIPTS=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$PY_SCRIPTS:$PATH"
need_pip=()
cmake_ok=$(cmake --version 2>/dev/null | "$PYTHON" -c '
import re, sys
m = re.search(r"version (\d+)\.(\d+)", sys.stdin.read())
print(int(bool(m) and (int(m[1]), int(m[2])) >= (3, 18)))' || echo 0)
[ "$cmake_ok" = 1 ] || need_pip+=("cmake>=3.18")
command -v ninja >/dev/null || need_pip+=(ninja)
if [ ${#need_pip[@]} -gt 0 ]; then
  step "installing ${need_pip[*]} from PyPI (none suitable on PATH)"
  pip_install -q "${need_pip[@]}"
fi
echo "cmake: $(command -v cmake) ($(cmake --version | head -1)); ninja: $(command -v ninja) ($(ninja --version))"

# --- the package and the Python test requirements -------------------------------
step "building and installing normkit with its test extras"
pip_install -q ".[test]"

# PyTorch is a second oracle when it can be had (the suite passes without it).
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  step "trying to install torch==2.13.0 (optional second oracle)"
  timeout 600 "$PYTHON" -m pip install -q torch==2.13.0 \
    || echo "NOTE: torch not installed; the PyTorch comparisons will be skipped."
fi

# --- Python tests (run from outside the source tree: test the installed package) --
step "Python tests"
(cd tests && "$PYTHON" -m pytest -q -p no:cacheprovider python)

# --- the release wheel (scripts/build_wheel.sh: zig toolchain, manylinux2014, libomp
# bundled), its symbol versions vs the policy, fresh venv, smoke test of every norm on
# every kernel path; then the sdist, installed from source and smoke-tested
# (scripts/check_wheel.sh) ----------------------------------------------------------
step "wheel + sdist: release wheel (manylinux2014), symbol scan, fresh-venv smoke tests"
PYTHON="$PYTHON" JOBS="$JOBS" bash scripts/check_wheel.sh

# --- C++ tests -----------------------------------------------------------------
step "building the C++ library and its tests"
cmake -S . -B build/cpp-tests -DCMAKE_BUILD_TYPE=Release -DNORMKIT_BUILD_TESTS=ON >/dev/null
cmake --build build/cpp-tests -j "$JOBS"

# The installed C++ package, used as an engine would: install, then build
# examples/cpp as a separate project with find_package(normkit) and run it.
step "C++ package: install, build examples/cpp against it, run it"
rm -rf build/cpp-install build/cpp-example
cmake --install build/cpp-tests --prefix build/cpp-install >/dev/null
cmake -S examples/cpp -B build/cpp-example -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$PWD/build/cpp-install" >/dev/null
cmake --build build/cpp-example -j "$JOBS" >/dev/null
build/cpp-example/engine_demo

step "C++ package: a consumer asking for a missing component gets a clear CMake error"
bash tests/cmake/check_consumer_errors.sh build/cpp-install

step "C++ tests"
ctest --test-dir build/cpp-tests --output-on-failure -j "$JOBS"

# --- the CUDA backend: compiled and linked with nvcc (no GPU needed), its host-side
# checks run; its GPU suite runs where there is a GPU (scripts/cuda_build.sh) --------
step "CUDA build (-DNORMKIT_CUDA=ON): compile, link, host-side tests"
PYTHON="$PYTHON" JOBS="$JOBS" bash scripts/cuda_build.sh

step "C++ sanitizers: ASan+UBSan (whole C++ suite, leak check) and TSan (every norm from several threads, OpenMP inside)"
JOBS="$JOBS" bash scripts/sanitizers.sh

# --- fuzzing: libFuzzer + ASan/UBSan over the C++ entry points (clang installed when
# possible, else skipped with a NOTE); corpus in build/fuzz/corpus, outside the repo -----
step "fuzzing the C++ entry points (${FUZZ_SECONDS:-90}s)"
FUZZ_SECONDS=${FUZZ_SECONDS:-90} JOBS="$JOBS" bash scripts/fuzz.sh
